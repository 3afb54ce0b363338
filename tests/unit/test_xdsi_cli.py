"""`pacsflow xdsi status | consent`, called as a user would (typer's runner, a real ledger under state_root)."""

from __future__ import annotations

from typer.testing import CliRunner

from pacsflow.flows.cli import app
from pacsflow.tasks.xdsi.ledger import Failure, Publication, XdsiLedger

runner = CliRunner()
E1 = "urn:uuid:00000000-0000-4000-8000-000000000001"


def _env(tmp_path) -> dict[str, str]:
    return {"PACSFLOW_STATE_ROOT": str(tmp_path / "state"), "PACSFLOW_CATALOG_ROOT": str(tmp_path / "catalog"),
            "PACSFLOW_CONFIG": ""}


def test_status_counts_studies_by_status_and_error_code(tmp_path, monkeypatch):
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    ledger = XdsiLedger.under(tmp_path / "state")
    ledger.mark_published([Publication("2.25.1", "h1", "2.25.11", E1)], "r1")
    ledger.mark_failed([Failure("2.25.2", "h2", "XDSUnknownPatientId", "XdsRegistryError: Failure, "
                                "XDSUnknownPatientId; check xdsi.pseudonym_oid", False),
                        Failure("2.25.3", "h3", "XdsUnavailable", "XdsUnavailable: no answer", True)], "r1")
    ledger.mark_pending([("2.25.4", "h4", "no research consent")], "r1")

    result = runner.invoke(app, ["xdsi", "status"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert {"pending: 1", "published: 1", "failed: 2", "1 XDSUnknownPatientId (permanent)",
            "1 XdsUnavailable (transient: next run)"} <= set(lines)
    assert "2.25.2" not in result.output

    listed = runner.invoke(app, ["xdsi", "status", "--failed"])
    assert "2.25.2 XDSUnknownPatientId 1 XdsRegistryError: Failure, XDSUnknownPatientId; check xdsi.pseudonym_oid" \
        in listed.output
    assert "2.25.3 XdsUnavailable 1" in listed.output and "2.25.4" not in listed.output


def test_consent_grant_list_and_revoke(tmp_path, monkeypatch):
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    assert runner.invoke(app, ["xdsi", "consent", "grant", "PSEUDO-A", "PSEUDO-B"]).exit_code == 0
    assert XdsiLedger.under(tmp_path / "state").has_consent(["PSEUDO-A", "PSEUDO-B", "PSEUDO-C"]) == {"PSEUDO-A",
                                                                                                      "PSEUDO-B"}
    listed = runner.invoke(app, ["xdsi", "consent", "list"]).output.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["PSEUDO-A", "PSEUDO-B"]
    assert all("\tgranted 20" in line for line in listed)

    assert runner.invoke(app, ["xdsi", "consent", "revoke", "PSEUDO-A"]).exit_code == 0
    asked = runner.invoke(app, ["xdsi", "consent", "list", "PSEUDO-A", "PSEUDO-B"]).output.splitlines()
    assert asked[0] == "PSEUDO-A\tno consent" and asked[1].startswith("PSEUDO-B\tgranted ")
    assert runner.invoke(app, ["xdsi", "consent", "grant"]).exit_code == 2  # a pseudonym is required
