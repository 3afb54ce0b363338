"""The FHIR sync ledger on both engines: SQLite under state_root, or PostgreSQL (state.url)."""

from __future__ import annotations

import pytest

from pacsflow.tasks.fhir.ledger import FhirSyncLedger


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    url = None if request.param == "sqlite" else request.getfixturevalue("postgresql_url")
    return FhirSyncLedger.under(tmp_path, url)


def test_a_failure_keeps_the_hash_the_server_has(ledger):
    ledger.mark_synced([("2.1", "h1", "ImagingStudy/7"), ("2.2", "h2", None)], "r1")
    ledger.mark_failed([("2.1", "FhirUnavailable: 503", True), ("2.3", "FhirRejected: 422", False)], "r2")
    ledger.mark_failed([("2.1", "FhirUnavailable: 503", True)], "r3")
    rows = ledger.entries()
    assert (rows["2.1"].status, rows["2.1"].synced_hash, rows["2.1"].server_id, rows["2.1"].attempts) == (
        "failed", "h1", "ImagingStudy/7", 2)
    assert (rows["2.3"].synced_hash, rows["2.3"].transient) == (None, False)
    assert ledger.failed() == ["2.1", "2.3"]
    ledger.mark_synced([("2.1", "h1b", None)], "r4")
    again = ledger.entries(["2.1"])
    assert list(again) == ["2.1"] and (again["2.1"].status, again["2.1"].server_id, again["2.1"].attempts) == (
        "synced", "ImagingStudy/7", 0)


def test_entries_of_many_studies_are_read_in_parts(ledger):
    uids = [f"2.25.{i}" for i in range(1201)]
    ledger.mark_synced([(u, "h", None) for u in uids], "r1")
    wanted = uids[::2] + ["2.25.not-there"]
    assert sorted(ledger.entries(wanted)) == sorted(uids[::2])
    assert ledger.entries([]) == {}
