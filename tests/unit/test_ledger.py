from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.tasks.ingest.ledger import Ledger


@pytest.fixture(params=["sqlite", "postgresql"])
def open_ledger(request, tmp_path):
    """Opens the ledger of one deployment: SQLite under tmp_path, or a fresh PostgreSQL database (state.url)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgresql_url")
    return lambda: Ledger(tmp_path / "l.sqlite", url)


def test_failure_after_catalog_keeps_the_cataloged_count(open_ledger):
    ledger = open_ledger()
    ledger.mark_cataloged([("1.1", "p1", "20261101", 3)], "r1")
    ledger.mark_failed("1.1", "p1", "20261101", 5, "IncompleteRetrieve: 4 of 5", False, "r2")
    e = ledger.entries()["1.1"]
    assert (e.status, e.instances, e.attempts) == ("cataloged", 3, 2)


def test_cataloged_clears_failure_and_counts_attempts(open_ledger):
    ledger = open_ledger()
    ledger.mark_failed("1.1", "p1", "20261101", 5, "PacsStatusError", False, "r1")
    assert [e.study_uid for e in ledger.failed()] == ["1.1"]
    ledger.mark_cataloged([("1.1", "p1", "20261101", 5)], "r2")
    e = ledger.entries()["1.1"]
    assert (e.status, e.reason, e.instances, e.attempts) == ("cataloged", None, 5, 2)
    assert ledger.failed() == []


def test_permanent_failure_is_quarantined(open_ledger):
    ledger = open_ledger()
    ledger.mark_failed("1.1", "p1", None, None, "PacsConfigurationError: move destination unknown", True, "r1")
    [q] = ledger.quarantine_entries()
    assert q["pseudo_uid"] == "p1" and "destination" in q["reason"]


def test_watermark_only_moves_forward(open_ledger):
    ledger = open_ledger()
    assert ledger.watermark is None
    ledger.advance_watermark(dt.date(2026, 11, 5))
    ledger.advance_watermark(dt.date(2026, 11, 3))
    assert ledger.watermark == dt.date(2026, 11, 5)
    # a new process sees the same state
    assert open_ledger().watermark == dt.date(2026, 11, 5)


def test_missing_objects_and_quarantine_on_either_engine(open_ledger):
    ledger = open_ledger()
    ledger.mark_cataloged([("1.1", "p1", "20261101", 3)], "r1")
    recorded = ledger.record_missing("1.1", "p1", [("1.1.9", "o9", "refused")], "r1", max_attempts=2)
    assert [(m.object_ref, m.attempts, m.permanent) for m in recorded] == [("o9", 1, False)]
    assert [e.study_uid for e in ledger.to_retry()] == ["1.1"]
    recorded = ledger.record_missing("1.1", "p1", [("1.1.9", "o9", "refused")], "r2", max_attempts=2)
    assert [(m.attempts, m.permanent) for m in recorded] == [(2, True)] and ledger.to_retry() == []
    ledger.quarantine("p1", "o9.dcm", "audit: 100% sure", "r2")
    ledger.quarantine("p2", "", "bad", "r2")
    assert [(q["pseudo_uid"], q["reason"]) for q in ledger.quarantine_entries()] == [
        ("p1", "audit: 100% sure"), ("p2", "bad")]
    assert ledger.record_missing("1.1", "p1", [], "r3", max_attempts=2) == []


def test_with_postgresql_nothing_is_written_under_state_root(tmp_path, postgresql_url):
    ledger = Ledger(tmp_path / "l.sqlite", postgresql_url)
    ledger.advance_watermark(dt.date(2026, 11, 5))
    assert Ledger(tmp_path / "elsewhere.sqlite", postgresql_url).watermark == dt.date(2026, 11, 5)
    assert list(tmp_path.iterdir()) == []


def test_each_source_has_its_own_watermark(open_ledger):
    ledger = open_ledger()
    ledger.advance_watermark(dt.date(2026, 11, 5))
    ledger.advance_watermark(dt.date(2026, 11, 2), "watermark:b")
    ledger.advance_watermark(dt.date(2026, 11, 1), "watermark:b")  # never back
    assert ledger.watermark == ledger.watermark_of("watermark") == dt.date(2026, 11, 5)
    assert open_ledger().watermark_of("watermark:b") == dt.date(2026, 11, 2)
    assert ledger.watermark_of("watermark:c") is None
