from __future__ import annotations

import datetime as dt

from pacsflow.tasks.ingest.ledger import Ledger


def test_failure_after_catalog_keeps_the_cataloged_count(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.mark_cataloged([("1.1", "p1", "20261101", 3)], "r1")
    ledger.mark_failed("1.1", "p1", "20261101", 5, "IncompleteRetrieve: 4 of 5", False, "r2")
    e = ledger.entries()["1.1"]
    assert (e.status, e.instances, e.attempts) == ("cataloged", 3, 2)


def test_cataloged_clears_failure_and_counts_attempts(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.mark_failed("1.1", "p1", "20261101", 5, "PacsStatusError", False, "r1")
    assert [e.study_uid for e in ledger.failed()] == ["1.1"]
    ledger.mark_cataloged([("1.1", "p1", "20261101", 5)], "r2")
    e = ledger.entries()["1.1"]
    assert (e.status, e.reason, e.instances, e.attempts) == ("cataloged", None, 5, 2)
    assert ledger.failed() == []


def test_permanent_failure_is_quarantined(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.mark_failed("1.1", "p1", None, None, "PacsConfigurationError: move destination unknown", True, "r1")
    [q] = ledger.quarantine_entries()
    assert q["pseudo_uid"] == "p1" and "destination" in q["reason"]


def test_watermark_only_moves_forward(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.watermark is None
    ledger.advance_watermark(dt.date(2026, 11, 5))
    ledger.advance_watermark(dt.date(2026, 11, 3))
    assert ledger.watermark == dt.date(2026, 11, 5)
    # a new process sees the same state
    assert Ledger(tmp_path / "l.sqlite").watermark == dt.date(2026, 11, 5)
