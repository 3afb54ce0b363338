from __future__ import annotations

import datetime as dt

import pytest

from tasks.ledger import Ledger
from tasks.pacs import StudyInfo
from tasks.planning import Window, discover, plan_window, worklist

D = dt.date


def test_window_from_watermark_minus_overlap():
    w = plan_window(watermark=D(2026, 11, 20), overlap_days=2, initial_since=D(1900, 1, 1), today=D(2026, 11, 27))
    assert (w.start, w.end) == (D(2026, 11, 18), D(2026, 11, 27))
    assert len(w.days()) == 10


def test_window_first_run_and_explicit_bounds():
    w = plan_window(watermark=None, overlap_days=2, initial_since=D(2026, 1, 1), today=D(2026, 1, 3))
    assert w.start == D(2026, 1, 1)
    w = plan_window(watermark=D(2026, 5, 5), overlap_days=2, initial_since=D(2026, 1, 1),
                    since=D(2026, 2, 1), until=D(2026, 2, 3))
    assert (w.start, w.end) == (D(2026, 2, 1), D(2026, 2, 3))
    with pytest.raises(ValueError):
        plan_window(watermark=None, overlap_days=0, initial_since=D(2026, 1, 1), since=D(2026, 3, 1),
                    until=D(2026, 2, 1))


def _study(uid, date="20261101", n=3):
    return StudyInfo(uid, date, n, 1, ("CT",))


def test_discover_splits_a_capped_day_by_time_until_everything_is_found():
    # 40 studies on one day, spread over the day; the fake PACS answers at most 10.
    studies = [(f"1.2.{i}", i * 2000) for i in range(40)]
    calls = []

    def find(day, time_range):
        calls.append((day, time_range))
        lo, hi = 0, 86399
        if time_range:
            a, b = time_range.split("-")
            lo = int(a[:2]) * 3600 + int(a[2:4]) * 60 + int(a[4:])
            hi = int(b[:2]) * 3600 + int(b[2:4]) * 60 + int(b[4:])
        hits = [_study(uid, day) for uid, t in studies if lo <= t <= hi and day == "20261101"]
        return hits[:10]

    found, warnings = discover(find, Window(D(2026, 11, 1), D(2026, 11, 2)), cap=10)
    assert sorted(s.study_uid for s in found) == sorted(uid for uid, _ in studies)
    assert not warnings
    assert len(calls) > 4


def test_discover_without_cap_queries_once_per_day():
    calls = []
    found, _ = discover(lambda d, t: calls.append(d) or [_study("1.2." + d, d)], Window(D(2026, 1, 1), D(2026, 1, 3)), 0)
    assert calls == ["20260101", "20260102", "20260103"]
    assert len(found) == 3


def test_worklist_new_grew_retry_and_unchanged(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.mark_cataloged([("1.1", "p1", "20261101", 3), ("1.2", "p2", "20261101", 3)], "r1")
    ledger.mark_failed("1.3", "p3", "20261101", 3, "PacsStatusError: x", False, "r1")
    ledger.mark_failed("1.4", "p4", "20261101", 3, "PacsConfigurationError: y", True, "r1")
    found = [_study("1.1"), _study("1.2", n=5), _study("1.3"), _study("1.4"), _study("1.5")]
    items = {w.study_uid: w.reason for w in worklist(found, ledger.entries(), lambda u: "p" + u)}
    assert items == {"1.2": "grew", "1.3": "retry", "1.5": "new"}
    # a permanent failure is retried when the PACS reports a change
    items = {w.study_uid for w in worklist([_study("1.4", n=4)], ledger.entries(), str)}
    assert items == {"1.4"}


def test_work_item_repr_has_no_original_uid():
    [item] = worklist([_study("1.2.840.99")], {}, lambda u: "2.25.1")
    assert "1.2.840.99" not in repr(item)
