"""`pacsflow xdsi check` (pacsflow.tasks.xdsi.reconcile): the pure comparison of ledger rows and
registry entries, and the whole check over the publish tests' catalog and ledger, with a fake
registry built from what the fake repository received. The real registry is in
tests/integration/test_xdsi_check.py."""

from __future__ import annotations


import pytest
from typer.testing import CliRunner

from pacsflow.flows.cli import app, main
from pacsflow.tasks.xdsi import ebxml, reconcile
from pacsflow.tasks.xdsi.ledger import LedgerRow, PublishStatus, XdsiLedger, needs_publishing
from pacsflow.tasks.xdsi.publish import publish_catalog
from pacsflow.tasks.xdsi.query import RegistryEntry
from pacsflow.tasks.xdsi.reconcile import DifferenceKind, check_registry, compare, fix_missing
from tests.unit.test_xdsi_publish import PSEUDONYM_OID, FakeRepository, _settings, catalog_root  # noqa: F401
from tests.unit.test_xdsi_manifest import catalog  # noqa: F401  (fixture re-export: one catalog per module)

K = DifferenceKind


def _row(study: str, entry: str | None, kos: str | None, replaced: str | None = None,
         status: PublishStatus = PublishStatus.PUBLISHED) -> LedgerRow:
    return LedgerRow(study, status, "hash", kos, entry, replaced, None, None, None, False, 0, "2026-12-01", "run")


def _entry(entry: str, kos: str, status: str = "Approved", study: str | None = None) -> RegistryEntry:
    return RegistryEntry(entry, kos, status, "1.2.840.10008.5.1.4.1.1.88.59", study)


def test_compare_reports_each_kind_of_difference_once():
    rows = {"S1": _row("S1", "E1", "K1"),  # matches
            "S2": _row("S2", "E2", "K2"),  # missing
            "S3": _row("S3", "E3", "K3"),  # deprecated by someone else
            "S4": _row("S4", "E4b", "K4b", replaced="E4a"),  # its replaced entry still Approved
            "S5": _row("S5", "E5b", "K5b", replaced="E5a"),  # replaced properly; an older version too
            "S6": _row("S6", None, None, status=PublishStatus.PENDING)}  # never published: not checked
    entries = [_entry("E1", "K1"), _entry("E3", "K3", "Deprecated"), _entry("E4b", "K4b"), _entry("E4a", "K4a"),
               _entry("E5b", "K5b"), _entry("E5a", "K5a", "Deprecated"), _entry("E5-", "K5-", "Deprecated", "S5"),
               _entry("EX", "KX", study="SX"), _entry("EY", "KY", "Deprecated")]
    found = compare(rows, entries)
    assert [(d.study_uid, d.kind) for d in found] == [
        ("S2", K.MISSING), ("S3", K.NOT_APPROVED), ("S4", K.NOT_DEPRECATED), ("", K.UNKNOWN), ("SX", K.UNKNOWN)]
    assert "E2" in found[0].detail and "K2" in found[0].detail
    assert "Deprecated" in found[1].detail


def test_an_entry_found_by_its_kos_uid_counts_as_the_studys():
    assert compare({"S1": _row("S1", "E1", "K1")}, [_entry("E-other", "K1")]) == []


@pytest.fixture()
def published(catalog_root, tmp_path):  # noqa: F811
    """The catalog published to a fake repository: (settings, repository)."""
    settings, repo = _settings(catalog_root, tmp_path, registry_url="http://registry.test/xds-iti18"), FakeRepository()
    assert publish_catalog(settings, client=repo).ok
    return settings, repo


class FakeRegistry:
    """FindDocuments over what the fake repository received (the entryUUIDs ebxml derives), less ``lost``."""

    def __init__(self, repo: FakeRepository, lost: set[str] = frozenset()) -> None:
        self.repo, self.lost, self.asked = repo, lost, []

    def find_documents(self, patient_cx: str) -> list[RegistryEntry]:
        self.asked.append(patient_cx)
        return [_entry(ebxml.entry_uuid(s.kos_uid), s.kos_uid, study=s.study_uid) for s in self.repo.sent
                if ebxml.cx_patient_id(s.pseudonym, PSEUDONYM_OID) == patient_cx and s.study_uid not in self.lost]


def test_a_registry_holding_every_publication_gives_no_difference(published):
    settings, repo = published
    registry = FakeRegistry(repo)
    report = check_registry(settings, client=registry)
    assert (report.studies, report.patients, report.entries, report.differences) == (5, 2, 5, [])
    assert sorted(registry.asked) == sorted({ebxml.cx_patient_id(s.pseudonym, PSEUDONYM_OID) for s in repo.sent})
    assert report.message().endswith("no difference")


def test_a_lost_study_is_missing_and_fix_has_the_next_run_send_it_as_new(published):
    settings, repo = published
    lost = sorted({s.study_uid for s in repo.sent})[0]
    report = check_registry(settings, client=FakeRegistry(repo, {lost}))
    assert [(d.study_uid, d.kind) for d in report.differences] == [(lost, K.MISSING)]
    assert report.counts() == {"missing": 1}

    assert fix_missing(settings, report, "run-fix") == [lost]
    row = XdsiLedger.under(settings.state_root).entries([lost])[lost]
    assert (row.status, row.entry_uuid, row.kos_uid) == (PublishStatus.PENDING, None, None)
    assert needs_publishing(row, "any hash")
    sent_before = len(repo.sent)
    again = publish_catalog(settings, client=repo)
    assert (again.published, again.replaced, again.unchanged) == (1, 0, 4)
    assert (repo.sent[sent_before].study_uid, repo.sent[sent_before].replaces) == (lost, None)  # new, no RPLC
    assert check_registry(settings, client=FakeRegistry(repo)).differences == []


def _env(settings, **extra: str) -> dict[str, str]:
    return {"PACSFLOW_CATALOG_ROOT": str(settings.catalog_root), "PACSFLOW_STATE_ROOT": str(settings.state_root),
            "PACSFLOW_XDSI__PSEUDONYM_OID": PSEUDONYM_OID, **extra}


def test_the_command_without_a_registry_url_exits_2_naming_the_variable(published, monkeypatch, capsys):
    settings, _repo = published
    for name, value in _env(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PACSFLOW_XDSI__REGISTRY_URL", raising=False)
    with pytest.raises(SystemExit) as caught:
        main(["xdsi", "check"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PACSFLOW_XDSI__REGISTRY_URL" in err[0]


def test_the_command_lists_differences_and_exits_1_then_0_after_fix_and_publish(published, monkeypatch):
    settings, repo = published
    lost = {sorted({s.study_uid for s in repo.sent})[-1]}

    class Client(FakeRegistry):
        @classmethod
        def from_settings(cls, _xdsi):
            return Client(repo, lost)

        def __enter__(self):
            return self

        def __exit__(self, *_exc):
            return None

    monkeypatch.setattr(reconcile, "XdsRegistryClient", Client)
    env = _env(settings, PACSFLOW_XDSI__REGISTRY_URL="http://registry.test/xds-iti18")
    runner = CliRunner()
    result = runner.invoke(app, ["xdsi", "check", "--fix"], env=env)
    assert result.exit_code == 1, result.output
    assert next(iter(lost)) in result.output and "missing" in result.output
    assert "marked pending for the next publish run: 1" in result.output
    publish_catalog(settings, client=repo)
    lost.clear()
    result = runner.invoke(app, ["xdsi", "check"], env=env)
    assert result.exit_code == 0, result.output
    assert "no difference" in result.output

