from __future__ import annotations

import datetime as dt

import pydicom
import pytest

from pacsflow.tasks.deid.choices import Option
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.pacs.models import FindResult, StudyInfo
from pacsflow.tasks.pacs.planning import Window, discover, plan_window, worklist

D = dt.date


def test_window_from_watermark_minus_overlap():
    w = plan_window(watermark=D(2026, 11, 20), overlap_days=2, initial_since=D(1900, 1, 1), today=D(2026, 11, 27))
    assert (w.start, w.end) == (D(2026, 11, 18), D(2026, 11, 27))
    assert len(w.days()) == 10


def test_window_first_run_and_explicit_bounds():
    w = plan_window(watermark=None, overlap_days=2, initial_since=D(2026, 1, 1), today=D(2026, 1, 3))
    assert w.start == D(2026, 1, 1)
    w = plan_window(watermark=None, overlap_days=2, initial_since=None, initial_days=30, today=D(2026, 1, 31))
    assert w.start == D(2026, 1, 1)
    w = plan_window(watermark=D(2026, 5, 5), overlap_days=2, initial_since=D(2026, 1, 1),
                    since=D(2026, 2, 1), until=D(2026, 2, 3))
    assert (w.start, w.end) == (D(2026, 2, 1), D(2026, 2, 3))
    with pytest.raises(ValueError):
        plan_window(watermark=None, overlap_days=0, initial_since=D(2026, 1, 1), since=D(2026, 3, 1),
                    until=D(2026, 2, 1))


def _study(uid, date="20261101", n=3):
    return StudyInfo(uid, date, n, 1, ("CT",))


class FakePacs:
    """Answers study C-FINDs on date (range) and time (range) like a PACS capped at ``cap``
    results, optionally marking capped answers as Orthanc does (final status Cancel)."""

    def __init__(self, studies, cap, mark_capped=False):
        self.studies, self.cap, self.mark_capped, self.calls = studies, cap, mark_capped, []

    def __call__(self, dates, times):
        self.calls.append((dates, times))
        lo_d, _, hi_d = dates.partition("-")
        hi_d = hi_d or lo_d
        lo_t, hi_t = 0, 86399
        if times:
            a, b = times.split("-")
            lo_t = int(a[:2]) * 3600 + int(a[2:4]) * 60 + int(a[4:])
            hi_t = int(b[:2]) * 3600 + int(b[2:4]) * 60 + int(b[4:])
        hits = [_study(uid, day) for uid, day, t in self.studies if lo_d <= day <= hi_d and lo_t <= t <= hi_t]
        answer = FindResult(hits[: self.cap] if self.cap else hits)
        answer.capped = self.mark_capped and self.cap and len(hits) > self.cap
        return answer


def _busy_days():
    # 40 studies on one day spread over the day, and a few on other days of the month
    return [(f"1.2.{i}", "20261101", i * 2000) for i in range(40)] + [
        (f"1.3.{d}", f"202611{d:02d}", 3600) for d in range(2, 30, 3)
    ]


@pytest.mark.parametrize("cap_setting, mark", [(None, True), (10, False), (10, True)])
def test_discover_splits_capped_answers_until_everything_is_found(cap_setting, mark):
    pacs = FakePacs(_busy_days(), cap=10, mark_capped=mark)
    found, warnings = discover(pacs, Window(D(2026, 11, 1), D(2026, 11, 30)), cap=cap_setting)
    assert sorted(s.study_uid for s in found) == sorted(uid for uid, _, _ in _busy_days())
    assert not warnings
    assert any(t is not None for _, t in pacs.calls)  # the busy day was split by time


def test_discover_with_an_unmarked_cap_it_does_not_know_misses_studies():
    # The reason the default is day by day: with cap=0 ("no cap") a silently capping PACS loses studies.
    pacs = FakePacs(_busy_days(), cap=10)
    found, _ = discover(pacs, Window(D(2026, 11, 1), D(2026, 11, 30)), cap=0)
    assert len(found) == 10 and len(pacs.calls) == 1


def test_discover_unknown_cap_queries_once_per_day_and_no_cap_once():
    pacs = FakePacs([("1.2", "20260102", 0)], cap=0)
    found, _ = discover(pacs, Window(D(2026, 1, 1), D(2026, 1, 3)), None)
    assert [c[0] for c in pacs.calls] == ["20260101", "20260102", "20260103"]
    assert len(found) == 1
    pacs.calls.clear()
    discover(pacs, Window(D(2026, 1, 1), D(2026, 1, 3)), 0)
    assert pacs.calls == [("20260101-20260103", None)]


def test_a_slice_still_capped_at_one_minute_is_reported():
    pacs = FakePacs([(f"1.2.{i}", "20261101", 3600) for i in range(20)], cap=10)
    found, warnings = discover(pacs, Window(D(2026, 11, 1), D(2026, 11, 1)), cap=10)
    assert len(found) == 10 and warnings


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


@pytest.mark.parametrize("options", [[Option.RETAIN_MODIFIED_DATES], [Option.RETAIN_FULL_DATES], []])
def test_a_work_items_label_has_the_date_as_the_lake_will_have_it(options):
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    original_date, patient_id = str(ds.StudyDate), str(ds.PatientID)
    deid = Deidentifier(b"planning-test-key", options)
    study = StudyInfo(str(ds.StudyInstanceUID), original_date, 1, 1, ("CT", "SR"), patient_id=patient_id)

    [item] = worklist([study], {}, deid.study_ref, lambda s: deid.date_as_deidentified(s.study_date, s.patient_id))
    deid.apply(ds)

    lake_date = str(ds.get("StudyDate", "") or "")
    assert item.shifted_date == (lake_date if options else "")
    day = f"{lake_date[:4]}-{lake_date[4:6]}-{lake_date[6:8]}"
    expected = " ".join(p for p in ("CT/SR", day if options else "", item.short_ref) if p)
    assert item.label == expected and len(item.short_ref) == 8
    if options == [Option.RETAIN_MODIFIED_DATES]:
        assert lake_date != original_date  # shifted: the original StudyDate is PHI
    assert f"patient_id={patient_id!r}" not in repr(study)
    for text in (item.label, repr(item)):
        assert patient_id not in text
        assert options == [Option.RETAIN_FULL_DATES] or original_date not in text.replace("-", "")
    assert item.pseudo_uid not in item.label  # short hash only; the full pseudonym goes to logs
