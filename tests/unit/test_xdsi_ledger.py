"""The XDS-I.b publish ledger and consent flags on both engines: SQLite under state_root, or PostgreSQL (state.url)."""

from __future__ import annotations

import pytest

from pacsflow.tasks.xdsi.ledger import LEDGER_NAME, Failure, Publication, PublishStatus, XdsiLedger

E1, E2, E3 = "urn:uuid:00000000-0000-4000-8000-000000000001", "urn:uuid:00000000-0000-4000-8000-000000000002", \
    "urn:uuid:00000000-0000-4000-8000-000000000003"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    url = None if request.param == "sqlite" else request.getfixturevalue("postgresql_url")
    return XdsiLedger.under(tmp_path, url)


def test_sqlite_ledger_lives_under_the_state_root(tmp_path):
    XdsiLedger.under(tmp_path).mark_pending([("2.1", "h1", "no research consent")], "r1")
    assert (tmp_path / LEDGER_NAME).is_file()


def test_new_changed_and_transiently_failed_studies_are_published(ledger):
    ledger.mark_published([Publication("2.1", "h1", "2.25.11", E1), Publication("2.2", "h2", "2.25.12", E2)], "r1")
    ledger.mark_failed([Failure("2.3", "h3", None, "XdsUnavailable: 503 from the repository", True)], "r1")
    hashes = {"2.1": "h1", "2.2": "h2-new-series", "2.3": "h3", "2.4": "h4"}
    assert ledger.to_publish(hashes) == ["2.2", "2.3", "2.4"]
    assert ledger.to_replace(hashes) == {"2.1": E1, "2.2": E2}


def test_a_registry_error_is_not_retried_until_the_study_changes(ledger):
    ledger.mark_failed([Failure("2.1", "h1", "XDSUnknownPatientId", "registry: unknown patient\nsecond line", False)],
                       "r1")
    ledger.mark_failed([Failure("2.1", "h1", "XDSUnknownPatientId", "registry: unknown patient", False)], "r2")
    row = ledger.entries()["2.1"]
    assert (row.status, row.error_code, row.reason, row.transient, row.attempts, row.run_id) == (
        PublishStatus.FAILED, "XDSUnknownPatientId", "registry: unknown patient", False, 2, "r2")
    assert ledger.to_publish({"2.1": "h1"}) == []
    assert ledger.to_publish({"2.1": "h1b"}) == ["2.1"]
    assert ledger.failed() == ledger.failed(transient=False) == ["2.1"] and ledger.failed(transient=True) == []


def test_a_failure_keeps_the_published_entry_that_the_next_publication_replaces(ledger):
    ledger.mark_published([Publication("2.1", "h1", "2.25.11", E1)], "r1")
    ledger.mark_failed([Failure("2.1", "h2", "XDSRegistryError", "registry error", False)], "r2")
    row = ledger.entries(["2.1"])["2.1"]
    assert (row.status, row.content_hash, row.kos_uid, row.entry_uuid, row.attempted_hash) == (
        PublishStatus.FAILED, "h1", "2.25.11", E1, "h2")
    assert ledger.to_publish({"2.1": "h2"}) == []  # the same manifest again: no
    assert ledger.to_publish({"2.1": "h1"}) == []  # back to what the registry has: nothing to send
    assert ledger.to_replace(["2.1"]) == {"2.1": E1}
    ledger.mark_published([Publication("2.1", "h3", "2.25.13", E3, E1)], "r3")
    row = ledger.entries(["2.1"])["2.1"]
    assert (row.status, row.content_hash, row.kos_uid, row.entry_uuid, row.replaced_entry_uuid) == (
        PublishStatus.PUBLISHED, "h3", "2.25.13", E3, E1)
    assert (row.attempted_hash, row.error_code, row.reason, row.attempts) == (None, None, None, 0)
    assert ledger.to_publish({"2.1": "h3"}) == [] and ledger.failed() == []


def test_pending_studies_are_published_and_keep_their_count(ledger):
    ledger.mark_failed([Failure("2.1", "h1", None, "XdsUnavailable: connection refused", True)], "r1")
    ledger.mark_pending([("2.1", "h1", "no research consent"), ("2.2", "h2", "no research consent")], "r2")
    rows = ledger.entries()
    assert {r.status for r in rows.values()} == {PublishStatus.PENDING}
    assert (rows["2.1"].attempts, rows["2.2"].attempts, rows["2.2"].content_hash) == (1, 0, None)
    assert ledger.to_publish({"2.1": "h1", "2.2": "h2"}) == ["2.1", "2.2"] and ledger.failed() == []


def test_entries_of_many_studies_are_read_in_parts(ledger):
    uids = [f"2.25.{i}" for i in range(1201)]
    ledger.mark_published([Publication(u, "h", u + ".1", f"urn:uuid:{i}") for i, u in enumerate(uids)], "r1")
    wanted = uids[::2] + ["2.25.not-there"]
    assert sorted(ledger.entries(wanted)) == sorted(uids[::2])
    assert ledger.entries([]) == {} and ledger.to_publish({}) == []
    assert ledger.to_publish({u: "h" for u in uids} | {"2.25.new": "h"}) == ["2.25.new"]


def test_consent_is_granted_and_revoked_per_pseudonym(ledger):
    assert ledger.has_consent(["P1", "P2"]) == set()
    ledger.grant(["P1", "P2", "P1"])
    with ledger.db.tx() as tx:
        tx.execute("UPDATE xdsi_consent SET granted_at = ? WHERE patient_pseudo_id = ?", ["2026-01-01T00:00:00", "P1"])
    ledger.grant(["P1"])  # a grant already recorded keeps its time
    with ledger.db.tx() as tx:
        granted = dict(tx.execute("SELECT patient_pseudo_id, granted_at FROM xdsi_consent").fetchall())
    assert granted["P1"] == "2026-01-01T00:00:00" and granted["P2"] > granted["P1"]
    assert ledger.has_consent(["P1", "P2", "P3"]) == {"P1", "P2"}
    ledger.revoke(["P2", "P3"])
    assert ledger.has_consent(["P1", "P2", "P3"]) == {"P1"} and ledger.has_consent([]) == set()
    many = [f"P{i}" for i in range(1100)]
    ledger.grant(many)
    assert ledger.has_consent(many + ["Q"]) == set(many)
