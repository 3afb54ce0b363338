"""The run's bookkeeping (pacsflow.tasks.ingest.bookkeeping) against a real ledger file: what is
recorded for cataloged, failed and quarantined studies, and where the watermark goes."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.tasks.core.errors import IncompleteRetrieve, PacsConfigurationError, PacsStatusError, PacsUnavailable
from pacsflow.tasks.ingest.bookkeeping import (
    RunBook,
    StudyReport,
    failure_kind,
    judge_failure,
    next_watermark,
    table_rows,
)
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.lake.study import StudyOutcome
from pacsflow.tasks.pacs.models import MissingObject, Retrieved, StudyInfo
from pacsflow.tasks.pacs.planning import Window, WorkItem, worklist
from pacsflow.tasks.pacs.status import MoveDestinationUnknown

D = dt.date
WINDOW = Window(D(2026, 11, 1), D(2026, 11, 10))


def _item(n: int, day: str = "20261105", expected: int | None = 3, reason: str = "new") -> WorkItem:
    return WorkItem(f"1.2.840.{n}", f"2.25.{n}", day, expected, reason)


def _cataloged(item: WorkItem, written: int = 3, quarantined: int = 0) -> StudyOutcome:
    return StudyOutcome(item.pseudo_uid, written=written,
                        quarantined=[(f"f{i}.dcm", "BadDicom: unreadable") for i in range(quarantined)],
                        actions={"X": written}, rows_dir=f"/rows/{item.pseudo_uid}",
                        study_uids=[f"9.9.{item.pseudo_uid}"])


def _retrieved(item: WorkItem, *missing: str, rejected: int = 0) -> Retrieved:
    lost = tuple(MissingObject(f"1.2.840.{item.pseudo_uid}.{m}", f"2.25.9{m}", "the PACS did not send it (status "
                               "0xC000 (unable to process))") for m in missing)
    return Retrieved(item.pseudo_uid, f"/staging/{item.pseudo_uid}", 3 - len(missing), lost, rejected)


def _book(ledger: Ledger, run_id: str = "r1", max_attempts: int = 3) -> RunBook:
    return RunBook(ledger, run_id, WINDOW, max_attempts=max_attempts, object_id=lambda rel: f"id({rel})")


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite")


def test_failures_are_judged_by_type_and_by_attempts():
    assert judge_failure(PacsConfigurationError("study 2.25.1: 0xA801"), 0, 5).permanent
    transient = judge_failure(PacsStatusError("study 2.25.1: 0xC000"), 3, 5)
    assert not transient.permanent and transient.reason == "PacsStatusError: study 2.25.1: 0xC000"
    last = judge_failure(IncompleteRetrieve("2 of 3"), 4, 5)
    assert last.permanent and last.reason == "gave up after 5 runs: IncompleteRetrieve: 2 of 3"
    # Anything not ours is named by its type only: its message could carry header values.
    assert judge_failure(ValueError("Doe^John"), 0, 5).reason == "ValueError"


def test_the_watermark_stops_at_the_earliest_held_day():
    end = D(2026, 11, 10)
    assert next_watermark(end, []) == end
    assert next_watermark(end, ["20261107", "20261104", None, "garbage"]) == D(2026, 11, 4)
    assert next_watermark(end, ["20261201"]) == end


def test_a_clean_run_records_every_study_and_advances_the_watermark(ledger):
    book = _book(ledger)
    items = [_item(1, "20261103"), _item(2, "20261109", expected=None)]
    book.planned(found=5, items=items)
    for w in items:
        book.retrieved(w, _retrieved(w))
        book.deidentified(w, _cataloged(w, written=4))
    book.cataloged(book.to_commit())
    assert book.settle() == []

    entries = ledger.entries()
    assert {u: (e.status, e.pseudo_uid, e.instances) for u, e in entries.items()} == {
        "1.2.840.1": ("cataloged", "2.25.1", 3),  # what the PACS reported, for the next run to compare
        "1.2.840.2": ("cataloged", "2.25.2", 4),  # the PACS gave no count: what was written
    }
    assert ledger.watermark == WINDOW.end
    assert book.catalog_uids == ["9.9.2.25.1", "9.9.2.25.2"]
    summary = book.finish(2.0)
    assert (summary.found, summary.queued, summary.retrieved, summary.deidentified, summary.cataloged,
            summary.failed, summary.instances) == (5, 2, 2, 2, 2, 0, 8)
    assert [(s.pseudo_uid, s.outcome, s.instances) for s in summary.studies] == [
        ("2.25.1", "cataloged", 4), ("2.25.2", "cataloged", 4)]
    assert summary.as_dict()["instances_per_second"] == 4.0 and "studies" not in summary.as_dict()
    assert book.deid_report.actions == {"X": 8} and book.written == 8


def test_a_transient_failure_holds_the_watermark_until_max_attempts(ledger):
    item = _item(1, "20261104")
    for run, permanent in (("r1", False), ("r2", False), ("r3", True)):
        book = _book(ledger, run, max_attempts=3)
        book.planned(1, [item])
        book.failed(item, PacsStatusError("C-MOVE for study 2.25.1: failure status 0xC000"))
        [(failed, verdict)] = book.settle()
        assert failed is item and verdict.permanent is permanent
        entry = ledger.entries()[item.study_uid]
        assert (entry.status, entry.permanent, entry.attempts) == ("failed", permanent, int(run[1]))
        assert book.finish(1).studies[0].error == entry.reason
    assert entry.reason.startswith("gave up after 3 runs: PacsStatusError")
    # Held at the study's day while it was transient; free once it is permanent.
    assert ledger.watermark == WINDOW.end
    [quarantined] = ledger.quarantine_entries()
    assert (quarantined["pseudo_uid"], quarantined["object_ref"], quarantined["run_id"]) == ("2.25.1", "", "r3")


def test_the_watermark_holds_at_a_transiently_failed_study_day(ledger):
    book = _book(ledger)
    ok, late, bad = _item(1, "20261102"), _item(2, "20261108"), _item(3, "20261106")
    book.planned(3, [ok, late, bad])
    book.deidentified(ok, _cataloged(ok))
    book.failed(late, PacsStatusError("0xC000"))
    book.failed(bad, IncompleteRetrieve("study 2.25.3: received 1 of 3 instances"))
    book.cataloged(book.to_commit())
    book.settle()
    assert ledger.watermark == D(2026, 11, 6)
    assert {e.study_uid for e in ledger.failed()} == {late.study_uid, bad.study_uid}


def test_a_grown_study_that_fails_keeps_its_catalog_entry_and_holds_the_watermark(ledger):
    item = _item(1, "20261105")
    ledger.mark_cataloged([(item.study_uid, item.pseudo_uid, item.study_date, 3)], "r0")
    grown = _item(1, "20261105", expected=5, reason="grew")
    book = _book(ledger)
    book.planned(1, [grown])
    book.failed(grown, IncompleteRetrieve("study 2.25.1: received 4 of 5 instances"))
    book.settle()
    entry = ledger.entries()[item.study_uid]
    assert (entry.status, entry.instances) == ("cataloged", 3)  # the next run still sees it grew
    assert ledger.watermark == D(2026, 11, 5)


def test_quarantined_objects_and_an_all_quarantined_study_are_recorded(ledger):
    partly, wholly = _item(1), _item(2, "20261107")
    book = _book(ledger)
    book.planned(2, [partly, wholly])
    book.deidentified(partly, _cataloged(partly, written=2, quarantined=1))
    book.deidentified(wholly, StudyOutcome(wholly.pseudo_uid, quarantined=[("a.dcm", "BadDicom: x"),
                                                                            ("b.dcm", "BadDicom: y")]))
    assert [w for w, _ in book.to_commit()] == [partly]
    book.cataloged(book.to_commit())
    assert book.settle() == []

    entry = ledger.entries()[wholly.study_uid]
    assert (entry.status, entry.permanent, entry.reason) == ("failed", True, "all objects quarantined")
    assert [(q["pseudo_uid"], q["object_ref"]) for q in ledger.quarantine_entries()] == [
        ("2.25.1", "f0.dcm"), ("2.25.2", "a.dcm"), ("2.25.2", "b.dcm"), ("2.25.2", "")]
    assert ledger.watermark == WINDOW.end  # a permanent failure does not hold it
    summary = book.finish(1)
    assert (summary.cataloged, summary.failed, summary.quarantined_objects, summary.deidentified) == (1, 1, 3, 2)
    # A study cataloged without some of its objects is told apart from a clean one; the run fails.
    assert {s.pseudo_uid: s.outcome for s in summary.studies} == {"2.25.1": "cataloged-partial",
                                                                 "2.25.2": "quarantined"}
    assert (summary.cataloged_partial, summary.outcome) == (1, "failed")
    assert summary.message == "1 of 2 studies failed (1 all objects quarantined)"
    # The manifest names objects by the (keyed) object id of study/file, with the reason.
    assert [(q.id, q.reason) for q in book.quarantined] == [
        ("id(2.25.1/f0.dcm)", "BadDicom: unreadable"), ("id(2.25.2/a.dcm)", "BadDicom: x"),
        ("id(2.25.2/b.dcm)", "BadDicom: y")]
    assert ledger.entries()[partly.study_uid].status == "cataloged" and book.written == 2


def test_the_crosswalk_rows_name_every_deidentified_study(ledger):
    item = _item(7)
    book = _book(ledger)
    book.planned(1, [item])
    book.deidentified(item, _cataloged(item))
    assert book.crosswalk_rows() == [("study", "2.25.7", "1.2.840.7")]


def test_an_interrupted_run_leaves_every_unfinished_study_for_the_next_run(ledger):
    ledger.advance_watermark(D(2026, 10, 30))
    book = _book(ledger, max_attempts=1)
    items = [_item(1, "20261103"), _item(2, "20261104"), _item(3, "20261105"), _item(4, "20261106")]
    book.planned(found=4, items=items)
    book.retrieved(items[0], _retrieved(items[0]))
    book.deidentified(items[0], _cataloged(items[0]))  # de-identified, but the commit never came
    book.retrieved(items[1], _retrieved(items[1]))  # de-identifying when the signal came; 3 retrieving, 4 still queued
    book.failed(items[2], PacsConfigurationError("study 2.25.3: 0xA801"))

    unfinished = book.interrupted("run interrupted (signal 15)")

    assert [w.pseudo_uid for w in unfinished] == ["2.25.1", "2.25.2", "2.25.4"]
    entries = ledger.entries()
    assert {u: (e.status, e.permanent, e.reason) for u, e in entries.items()} == {
        "1.2.840.1": ("failed", False, "run interrupted (signal 15)"),
        "1.2.840.2": ("failed", False, "run interrupted (signal 15)"),
        "1.2.840.3": ("failed", True, "PacsConfigurationError: study 2.25.3: 0xA801"),
        "1.2.840.4": ("failed", False, "run interrupted (signal 15)"),
    }
    # Even at the last allowed attempt an interruption is no verdict on the study.
    assert {e.study_uid for e in ledger.failed() if not e.permanent} == {"1.2.840.1", "1.2.840.2", "1.2.840.4"}
    assert ledger.watermark == D(2026, 10, 30)
    summary = book.finish(1.0, KeyboardInterrupt())
    assert [s.outcome for s in summary.studies] == ["interrupted", "interrupted", "failed", "interrupted"]
    assert summary.outcome == "stopped" and summary.message == (
        "run stopped: KeyboardInterrupt; 4 of 4 studies failed (3 interrupted, 1 PACS configuration)")
    # The runs that were interrupted never got to judge these studies: no attempt is counted.
    assert {u: e.attempts for u, e in ledger.entries().items()} == {
        "1.2.840.1": 0, "1.2.840.2": 0, "1.2.840.3": 1, "1.2.840.4": 0}


def _run_with_missing(ledger: Ledger, run_id: str, *missing: str) -> RunBook:
    item = _item(1, reason="new")
    book = _book(ledger, run_id=run_id, max_attempts=2)
    book.planned(1, [item])
    book.retrieved(item, _retrieved(item, *missing, rejected=1))
    book.deidentified(item, _cataloged(item, written=3 - len(missing)))
    book.cataloged(book.to_commit())
    book.settle()
    return book


def test_objects_the_pacs_did_not_send_are_asked_for_again_until_given_up(ledger):
    at_pacs = [StudyInfo("1.2.840.1", "20261105", 3, 1, ("CT",))]
    first = _run_with_missing(ledger, "r1", "a", "b")
    summary = first.finish(1.0)
    assert (summary.cataloged, summary.missing_objects, summary.rejected_objects) == (1, 2, 1)
    assert summary.studies[0].missing == 2 and summary.studies[0].outcome == "cataloged-partial"
    assert summary.outcome == "partial" and summary.message == (
        "1 of 1 studies cataloged, 1 of them partly (0 objects quarantined, 2 not sent by the PACS)")
    assert [(m.object_ref, m.attempts, m.permanent) for m in first.missing_recorded] == [
        ("2.25.9a", 1, False), ("2.25.9b", 1, False)]
    # The next run asks for the study by UID, whatever its window, and retrieves it again.
    assert [e.study_uid for e in ledger.to_retry()] == ["1.2.840.1"]
    assert [w.reason for w in worklist(at_pacs, ledger.entries(), lambda u: "2.25.1")] == ["missing"]

    second = _run_with_missing(ledger, "r2", "b")  # "a" arrived this time
    assert [(m.object_ref, m.attempts, m.permanent) for m in second.missing_recorded] == [("2.25.9b", 2, True)]
    assert [m.object_ref for m in ledger.missing_entries()] == ["2.25.9b"]
    assert "0xC000" in ledger.missing_entries()[0].reason
    # Given up after max_attempts: the study is no longer asked for until the PACS's count changes.
    assert ledger.to_retry() == [] and worklist(at_pacs, ledger.entries(), lambda u: "2.25.1") == []


def test_a_run_with_failed_studies_counts_them_by_kind(ledger):
    items = [_item(n, f"2026110{n}") for n in range(1, 6)]
    book = _book(ledger)
    book.planned(found=7, items=items)
    book.failed(items[0], PacsUnavailable("C-MOVE for study 2.25.1: no answer from PACS"))
    book.failed(items[1], PacsUnavailable("C-MOVE for study 2.25.2: no answer from PACS"))
    book.failed(items[2], MoveDestinationUnknown("C-MOVE for study 2.25.3: status 0xA801"))
    book.failed(items[3], ConnectionResetError("Doe^John"))
    book.deidentified(items[4], _cataloged(items[4]))
    book.cataloged(book.to_commit())
    book.settle()

    summary = book.finish(2.0)

    assert (summary.outcome, summary.failed, summary.cataloged) == ("failed", 4, 1)
    assert summary.message == ("4 of 5 studies failed (2 PACS unavailable, 1 ConnectionResetError, "
                               "1 move destination unknown)")
    assert [s.kind for s in summary.studies] == ["PACS unavailable", "PACS unavailable", "move destination unknown",
                                                 "ConnectionResetError", ""]
    assert {k: summary.as_dict()[k] for k in ("outcome", "message")} == {"outcome": "failed",
                                                                       "message": summary.message}


def test_a_clean_run_is_completed_and_says_so(ledger):
    item = _item(1)
    book = _book(ledger)
    book.planned(found=3, items=[item])
    book.deidentified(item, _cataloged(item))
    book.cataloged(book.to_commit())
    book.settle()
    summary = book.finish(1.0)
    assert (summary.outcome, summary.message) == ("completed", "1 of 1 studies cataloged (3 found)")
    assert [s.outcome for s in summary.studies] == ["cataloged"]


def test_failure_kinds_are_words_from_the_error_type():
    assert failure_kind(PacsStatusError("x")) == "PACS status"
    assert failure_kind(IncompleteRetrieve("x")) == "incomplete retrieve"
    assert failure_kind(TimeoutError()) == "TimeoutError"


def test_each_study_is_handed_to_one_commit_and_an_interruption_keeps_what_was_cataloged(ledger):
    """The run commits full batches while retrieval goes on: a committed or failed study is not
    offered again, and a signal after a commit leaves the cataloged studies cataloged."""
    book = _book(ledger)
    first, second, third, queued = _item(1, "20261104"), _item(2, "20261103"), _item(3), _item(4)
    book.planned(found=4, items=[first, second, third, queued])
    for w in (first, second):
        book.retrieved(w, _retrieved(w))
        book.deidentified(w, _cataloged(w))
    assert book.uncommitted == 2 and [w for w, _ in book.to_commit()] == [second, first]  # by day
    book.cataloged(book.to_commit())
    assert book.uncommitted == 0 and book.to_commit() == []
    book.retrieved(third, _retrieved(third))
    book.deidentified(third, _cataloged(third))
    book.failed(third, PacsUnavailable("catalog lock busy"))  # its batch could not be committed
    assert book.uncommitted == 0 and book.to_commit() == []

    unfinished = book.interrupted("run interrupted (signal 15)")

    assert unfinished == [queued]
    assert {u: e.status for u, e in ledger.entries().items()} == {
        "1.2.840.1": "cataloged", "1.2.840.2": "cataloged", "1.2.840.3": "failed", "1.2.840.4": "failed"}
    assert [s.outcome for s in book.finish(1.0, KeyboardInterrupt()).studies] == [
        "cataloged", "cataloged", "failed", "interrupted"]


def test_the_study_table_holds_every_study_when_they_fit_and_the_failures_first_when_not():
    outcomes = ["cataloged", "failed", "cataloged", "cataloged-partial", "quarantined", "interrupted", "failed"]
    reports = [StudyReport(f"2.25.{i}", "new", outcome=o) for i, o in enumerate(outcomes)]
    assert [r["pseudo_uid"] for r in table_rows(reports, limit=7)] == [f"2.25.{i}" for i in range(7)]
    assert table_rows(reports, limit=7)[1] == {**reports[1].__dict__}
    assert [(r["pseudo_uid"], r["outcome"]) for r in table_rows(reports, limit=5)] == [
        ("2.25.1", "failed"), ("2.25.6", "failed"), ("2.25.4", "quarantined"), ("2.25.5", "interrupted"),
        ("2.25.3", "cataloged-partial")]
    assert [r["pseudo_uid"] for r in table_rows(reports, limit=6)][-1] == "2.25.0"


def test_a_long_night_keeps_totals_not_each_studys_actions_and_missing_objects(ledger):
    items = [_item(n) for n in range(1, 51)]
    book = _book(ledger)
    book.planned(50, items)
    for item in items:
        book.retrieved(item, _retrieved(item, "a") if item.pseudo_uid == "2.25.7" else _retrieved(item))
        book.deidentified(item, _cataloged(item, written=3))
    # The manifest's totals are there as studies are de-identified, before the run settles.
    assert book.deid_report.actions == {"X": 150}
    assert list(book.missing) == ["2.25.7"]  # only studies with objects not sent are kept, until cataloged
    book.cataloged(book.to_commit())
    assert book.missing == {} and book.settle() == []
    assert book.deid_report.actions == {"X": 150} and book.written == 150
    summary = book.finish(1.0)
    assert (summary.cataloged, summary.cataloged_partial, summary.missing_objects) == (50, 1, 1)
    assert [m.object_ref for m in ledger.missing_entries()] == ["2.25.9a"]
