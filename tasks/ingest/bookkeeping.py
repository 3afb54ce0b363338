"""The bookkeeping of one nightly run: what the ledger records of each study, where the watermark
goes, and the run's summary and per-study report.

Plain code (no Prefect, no sockets). The flow tells a :class:`RunBook` what happened to each study
(retrieved, de-identified, failed, cataloged) and then settles the run: quarantined objects,
failures (transient, or permanent after ``max_attempts`` runs) and the watermark.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

from pacsflow.tasks.core.clock import parse_dicom_date
from pacsflow.tasks.core.errors import error_text, is_transient
from pacsflow.tasks.deid.deidentifier import DeidReport
from pacsflow.tasks.deid.manifest import QuarantinedObject
from pacsflow.tasks.ingest.ledger import Ledger, MissingEntry
from pacsflow.tasks.lake.study import StudyOutcome
from pacsflow.tasks.pacs.models import MissingObject, Retrieved
from pacsflow.tasks.pacs.planning import Window, WorkItem

ALL_QUARANTINED = "all objects quarantined"
INTERRUPTED = "interrupted"
# The outcomes of a study (StudyReport.outcome) and of a run (RunSummary.outcome).
CATALOGED, CATALOGED_PARTIAL, FAILED, QUARANTINED = "cataloged", "cataloged-partial", "failed", "quarantined"
RUN_COMPLETED, RUN_PARTIAL, RUN_FAILED, RUN_STOPPED = "completed", "partial", "failed", "stopped"
# Rows of the per-study table artifact: a 2,000-study night's full table is an event of megabytes
# (the server refused one of 2.5 MB) and a peak in the flow's memory; the ledger has every study.
STUDY_ROWS = 200


@dataclass
class StudyReport:
    """One study's line in the run's table artifact (pseudonymous UID and label only)."""

    pseudo_uid: str
    reason: str
    label: str = ""  # modalities, de-identified date, short hash: as in the task run names
    # cataloged | cataloged-partial (objects quarantined or not sent) | failed | quarantined | interrupted
    outcome: str = "pending"
    instances: int = 0
    quarantined: int = 0
    missing: int = 0  # objects the PACS listed but did not send
    kind: str = ""  # of failure, as counted in the run's message
    error: str = ""


def table_rows(studies: Sequence[StudyReport], limit: int = STUDY_ROWS) -> list[dict[str, Any]]:
    """The per-study table artifact's rows: every study in run order when they fit in ``limit``,
    else the ``limit`` an operator must look at first (failed, wholly quarantined, interrupted,
    cataloged partly, then the rest), each group in run order. The ledger holds every study's
    outcome, and the summary counts them all."""
    rank = {FAILED: 0, QUARANTINED: 1, INTERRUPTED: 2, CATALOGED_PARTIAL: 3}
    order: Sequence[int] = range(len(studies))
    if len(studies) > limit:
        order = sorted(order, key=lambda i: (rank.get(studies[i].outcome, 4), i))
    return [dict(studies[i].__dict__) for i in order[:limit]]


def failure_kind(exc: BaseException) -> str:
    """A failure's kind in words, for counts by kind: our errors' ``reason`` (``pacs-unavailable``
    -> ``PACS unavailable``), else the exception's type."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, str) or reason in ("error", "transient", "permanent"):
        return type(exc).__name__
    return reason.replace("-", " ").replace("pacs", "PACS").replace("fhir", "FHIR")


def kinds_text(kinds: Counter[str]) -> str:
    """``2 PACS unavailable, 1 move destination unknown``: most frequent first."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class RunSummary:
    # Counters, one field each (they look alike by design): the result dict and the summary artifact.
    run_id: str
    window: str
    # completed | partial (studies cataloged without some objects) | failed (studies failed) |
    # stopped (the run ended early); ``message`` says it in one PHI-free line
    outcome: str = "running"
    message: str = ""
    # studies: at the PACS, to process, on disk
    found: int = 0
    pacs_queries: int = 0  # C-FIND requests of discovery (its cost at the PACS)
    queued: int = 0
    retrieved: int = 0
    # studies: through de-identification, into the catalog, failed (or wholly quarantined)
    deidentified: int = 0
    cataloged: int = 0
    cataloged_partial: int = 0  # of those, studies with objects quarantined or not sent by the PACS
    failed: int = 0
    # objects
    instances: int = 0
    quarantined_objects: int = 0
    missing_objects: int = 0  # listed by the PACS, not sent (recorded in the ledger, asked for again)
    rejected_objects: int = 0  # sent to us but not listed by the PACS: refused
    # the FHIR copy (studies)
    fhir_sent: int = 0
    fhir_failed: int = 0
    fhir_differences: int = 0
    # the XDS-I.b copy (studies whose KOS manifest was published or replaced, or failed)
    xdsi_published: int = 0
    xdsi_failed: int = 0
    seconds: float = 0.0
    studies: list[StudyReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The flow's result: counts only (the per-study reports go to an artifact)."""
        d = {k: v for k, v in self.__dict__.items() if k != "studies"}
        d["instances_per_second"] = round(self.instances / self.seconds, 1) if self.seconds else 0.0
        return d

    def conclude(self, error: BaseException | None = None) -> None:
        """Set ``outcome`` and ``message`` from the counts and the per-study reports; ``error``
        stopped the run before its end."""
        failed = Counter(r.kind or r.outcome for r in self.studies if r.outcome in (FAILED, QUARANTINED, INTERRUPTED))
        if error is not None:
            self.outcome = RUN_STOPPED
            self.message = f"run stopped: {error_text(error)}"
            if failed:
                self.message += f"; {sum(failed.values())} of {self.queued} studies failed ({kinds_text(failed)})"
        elif self.failed:
            self.outcome = RUN_FAILED
            self.message = f"{self.failed} of {self.queued} studies failed ({kinds_text(failed)})"
        elif self.cataloged_partial:
            self.outcome = RUN_PARTIAL
            self.message = (f"{self.cataloged} of {self.queued} studies cataloged, {self.cataloged_partial} of them "
                            f"partly ({self.quarantined_objects} objects quarantined, {self.missing_objects} not "
                            "sent by the PACS)")
        else:
            self.outcome = RUN_COMPLETED
            self.message = f"{self.cataloged} of {self.queued} studies cataloged ({self.found} found)"


@dataclass(frozen=True)
class FailureVerdict:
    permanent: bool
    reason: str  # PHI-free: error class and message


def judge_failure(exc: BaseException, prior_attempts: int, max_attempts: int) -> FailureVerdict:
    """A transient failure is retried by later runs, until this run is the ``max_attempts``-th
    that tried the study: then it stops holding the watermark and waits for an operator."""
    text = error_text(exc)
    if not is_transient(exc):
        return FailureVerdict(True, text)
    attempts = prior_attempts + 1
    if attempts >= max_attempts:
        return FailureVerdict(True, f"gave up after {attempts} runs: {text}")
    return FailureVerdict(False, text)


def next_watermark(window_end: dt.date, held_study_dates: Iterable[str | None]) -> dt.date:
    """The watermark moves over completed days only: a study that failed transiently holds it at
    that study's day, so the next window (watermark minus the overlap) still covers it. A study
    date that is not a date holds nothing: such a study is retried by UID."""
    days = [d for d in map(parse_dicom_date, held_study_dates) if d is not None]
    return min([window_end, *days])


class RunBook:
    """What one run did to each study, written to the ledger.

    ``object_id`` names a quarantined object in the manifest (a keyed id: staged file names are
    hashes of original UIDs).
    """

    def __init__(self, ledger: Ledger, run_id: str, window: Window, *, max_attempts: int,
                 object_id: Callable[[str], str]) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.window = window
        self.max_attempts = max_attempts
        self._object_id = object_id
        self.summary = RunSummary(run_id, str(window))
        self.reports: dict[str, StudyReport] = {}
        self.items: list[WorkItem] = []
        self.outcomes: dict[str, tuple[WorkItem, StudyOutcome]] = {}
        self._uncommitted: dict[str, tuple[WorkItem, StudyOutcome]] = {}  # de-identified, with rows, not yet committed
        self.failures: dict[str, tuple[WorkItem, BaseException]] = {}
        self.catalog_uids: list[str] = []  # catalog StudyInstanceUIDs committed by this run
        self.deid_report = DeidReport()
        # The manifest's first STUDY_ROWS quarantined objects and the count of all: a night of
        # ultrasound quarantines tens of thousands, each already in the ledger.
        self.quarantined: list[QuarantinedObject] = []
        self.quarantined_count = 0
        self.missing: dict[str, tuple[MissingObject, ...]] = {}  # by study pseudonym
        self.missing_recorded: list[MissingEntry] = []  # as the ledger holds them after this run
        self.written = 0

    # -- what happened, as the tasks report it ----------------------------------------------
    def planned(self, found: int, items: Sequence[WorkItem]) -> None:
        self.summary.found, self.summary.queued = found, len(items)
        self.items = list(items)
        self.reports = {w.pseudo_uid: StudyReport(w.pseudo_uid, w.reason, w.label) for w in items}

    def retrieved(self, item: WorkItem, result: Retrieved) -> None:
        self.summary.retrieved += 1
        self.summary.rejected_objects += result.rejected
        if result.missing:  # kept until the study is cataloged: most studies have none
            self.missing[item.pseudo_uid] = result.missing

    def deidentified(self, item: WorkItem, outcome: StudyOutcome) -> None:
        # The run's manifest needs the actions' totals only, and the ledger takes the quarantined
        # objects now: neither is kept for the night, whose length they would grow with.
        self.deid_report.merge(DeidReport(dict(outcome.actions)))
        self._record_quarantined(item, outcome.quarantined)
        outcome = replace(outcome, actions={}, quarantined=[])
        self.outcomes[item.pseudo_uid] = (item, outcome)
        if outcome.rows_dir:
            self._uncommitted[item.pseudo_uid] = (item, outcome)

    def failed(self, item: WorkItem, exc: BaseException) -> None:
        self.failures[item.pseudo_uid] = (item, exc)
        self._uncommitted.pop(item.pseudo_uid, None)

    @property
    def uncommitted(self) -> int:
        """De-identified studies waiting for a catalog commit: the run commits a batch as soon as
        it is full, so the night's staging and row files do not pile up until its end."""
        return len(self._uncommitted)

    def to_commit(self) -> list[tuple[WorkItem, StudyOutcome]]:
        """De-identified studies with catalog rows (at least one object written) that are neither
        cataloged nor failed yet, by day."""
        return sorted(self._uncommitted.values(), key=lambda wo: (wo[0].study_date, wo[0].pseudo_uid))

    def cataloged(self, batch: Sequence[tuple[WorkItem, StudyOutcome]]) -> None:
        """After a catalog commit: the ledger follows it. A study's count is what the PACS reported
        (what the next run compares with), else what was written."""
        self.ledger.mark_cataloged(
            [(w.study_uid, w.pseudo_uid, w.study_date, w.expected or o.written) for w, o in batch], self.run_id
        )
        for w, o in batch:
            self._uncommitted.pop(w.pseudo_uid, None)
            self._record_missing(w)
            report = self.reports[w.pseudo_uid]
            report.instances = o.written
            report.outcome = CATALOGED_PARTIAL if report.quarantined or report.missing else CATALOGED
            self.summary.cataloged_partial += report.outcome == CATALOGED_PARTIAL
            self.summary.cataloged += 1
            self.summary.instances += o.written
            self.catalog_uids.extend(o.study_uids)

    def _record_missing(self, w: WorkItem) -> None:
        """The cataloged study's objects the PACS did not send: each one more attempt in the
        ledger (given up at ``max_attempts``); those that arrived this time are forgotten."""
        missing = self.missing.pop(w.pseudo_uid, ())
        recorded = self.ledger.record_missing(w.study_uid, w.pseudo_uid, [(m.sop_uid, m.ref, m.reason) for m in missing],
                                              self.run_id, self.max_attempts)
        self.missing_recorded.extend(recorded)
        self.reports[w.pseudo_uid].missing = len(missing)
        self.summary.missing_objects += len(missing)

    # -- settling the run -------------------------------------------------------------------
    def settle(self, *, watermark: bool = True) -> list[tuple[WorkItem, FailureVerdict]]:
        """Record quarantined objects and failed studies, then advance the watermark (unless not
        ``watermark``: a shard of a window moves nothing, its planner does). Returns the failures
        with their verdicts (for the run's log)."""
        self._record_deidentified()
        verdicts = self._record_failures()
        held = [w.study_date for w, v in verdicts if not v.permanent]
        if watermark:
            self.ledger.advance_watermark(next_watermark(self.window.end, held))
        return verdicts

    def _record_deidentified(self) -> None:
        self.summary.quarantined_objects = self.quarantined_count
        for w, o in self.outcomes.values():
            self.summary.deidentified += 1
            self.written += o.written
            if not o.rows_dir:
                self.ledger.mark_failed(w.study_uid, w.pseudo_uid, w.study_date, w.expected, ALL_QUARANTINED, True,
                                        self.run_id)
                report = self.reports[w.pseudo_uid]
                report.outcome, report.kind, report.error = QUARANTINED, ALL_QUARANTINED, ALL_QUARANTINED
                self.summary.failed += 1

    def _record_quarantined(self, w: WorkItem, objects: Sequence[tuple[str, str]]) -> None:
        self.ledger.quarantine_many(w.pseudo_uid, objects, self.run_id)
        self.reports[w.pseudo_uid].quarantined = len(objects)
        self.quarantined_count += len(objects)
        for name, reason in objects[:max(0, STUDY_ROWS - len(self.quarantined))]:
            self.quarantined.append(QuarantinedObject(self._object_id(f"{w.pseudo_uid}/{name}"), reason))

    def _record_failures(self) -> list[tuple[WorkItem, FailureVerdict]]:
        prior = self.ledger.entries([w.study_uid for w, _ in self.failures.values()])
        verdicts = []
        for w, exc in self.failures.values():
            entry = prior.get(w.study_uid)
            verdict = judge_failure(exc, entry.attempts if entry else 0, self.max_attempts)
            self.ledger.mark_failed(w.study_uid, w.pseudo_uid, w.study_date, w.expected, verdict.reason,
                                    verdict.permanent, self.run_id)
            report = self.reports[w.pseudo_uid]
            report.outcome, report.kind, report.error = FAILED, failure_kind(exc), verdict.reason
            self.summary.failed += 1
            verdicts.append((w, verdict))
        return verdicts

    def interrupted(self, reason: str) -> list[WorkItem]:
        """The run is stopped (a signal): studies cataloged so far stay so, failures so far are
        recorded as usual, and every other planned study (retrieving, de-identified but not
        cataloged, or still queued) as a transient failure with ``reason``, which the next run
        retries; an interruption neither counts as an attempt nor makes a study permanent. The
        watermark does not move. Returns the unfinished studies."""
        self._record_failures()
        done = (CATALOGED, CATALOGED_PARTIAL)
        unfinished = [w for w in self.items
                      if w.pseudo_uid not in self.failures and self.reports[w.pseudo_uid].outcome not in done]
        for w in unfinished:
            self.ledger.mark_failed(w.study_uid, w.pseudo_uid, w.study_date, w.expected, reason, False, self.run_id,
                                    attempted=False)
            report = self.reports[w.pseudo_uid]
            report.outcome, report.kind, report.error = INTERRUPTED, INTERRUPTED, reason
        return unfinished

    def finish(self, seconds: float, error: BaseException | None = None) -> RunSummary:
        """The run's summary, concluded; ``error`` ended the run early (it is summarised all the same)."""
        self.summary.seconds = round(seconds, 2)
        self.summary.studies = list(self.reports.values())
        self.summary.conclude(error)
        return self.summary

    def crosswalk_rows(self) -> list[tuple[str, str, str]]:
        """(kind, pseudonym, original) for the optional crosswalk (PHI zone): every study this run
        de-identified."""
        return [("study", w.pseudo_uid, w.study_uid) for w, _ in self.outcomes.values()]
