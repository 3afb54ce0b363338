"""The nightly ingest flow: PACS → de-identified lake → Parquet catalog → FHIR.

Parameters are dates only (no PHI). Settings are read at run time from the environment or
``PACSFLOW_CONFIG`` (a YAML file); see ``tasks/settings.py``. This module is the list of steps;
what each study's fate means for the ledger, the watermark and the summary is decided in
:mod:`pacsflow.tasks.ingest.bookkeeping`.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import time
from collections import deque
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sized
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed

from pacsflow.flows.concurrency import hold_slots
from pacsflow.flows.secrets import load_run_settings
from pacsflow.tasks.core.clock import new_run_id, parse_dicom_date
from pacsflow.tasks.core.errors import InsufficientSpace, PacsflowError, error_text, is_transient
from pacsflow.tasks.core.files import ensure_private_dir, low_space, purge_older_than, remove_tree
from pacsflow.tasks.deid.crosswalk import open_crosswalk
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.deid.manifest import build_manifest, manifest_markdown, object_id
from pacsflow.tasks.ingest.bookkeeping import RUN_FAILED, RUN_PARTIAL, STUDY_ROWS, RunBook, RunSummary, table_rows
from pacsflow.tasks.ingest.ledger import WATERMARK, Ledger, MissingEntry
from pacsflow.tasks.lake.steps import commit_catalog, deidentify_studies, deidentify_study
from pacsflow.tasks.lake.study import GROUP_STUDIES, StudyOutcome, StudyProcessor, group_size
from pacsflow.tasks.pacs.client import quiet_pynetdicom
from pacsflow.tasks.pacs.models import PacsPeer, Retrieved, RetrieveRoute
from pacsflow.tasks.pacs.planning import Window, WorkItem, plan_window, worklist
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver
from pacsflow.tasks.pacs.tls import check_tls_files
from pacsflow.tasks.pacs.steps import PACS_LIMIT, discover_studies, retrieve_studies, retrieve_study
from pacsflow.tasks.settings import RetrieveMethod, Settings

log = logging.getLogger(__name__)
STALE_RUN_DAYS = 1
PROGRESS_EVERY_S = 2.0  # one API call per study would cost more than a long run's progress is worth
Logger = logging.Logger | logging.LoggerAdapter


@dataclass(frozen=True)
class NightlyRun:
    """What one run builds once and every step shares."""

    run_id: str
    key: bytes
    deid: Deidentifier
    ledger: Ledger
    staging: StagingWriter  # names each study's staging folder (its pseudonymous UID): the one way
    work_dir: Path  # this run's catalog row files, removed at the end

    @property
    def rows_root(self) -> Path:
        return self.work_dir / "rows"


class StudiesFailed(PacsflowError):
    """The run ended, but studies failed: the flow run's state is Failed, and ``result`` is the
    run's result dict all the same (see :func:`run_result`)."""

    reason = "studies-failed"

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def run_result(outcome: Any) -> dict[str, Any]:
    """The result dict of a nightly or sweep run, from what the flow call returned (with or
    without ``return_state=True``), whether its studies all went in or not. A run that stopped
    early has no result: its error is raised."""
    if isinstance(outcome, State):
        outcome = outcome.result(raise_on_failure=False)
    if isinstance(outcome, StudiesFailed):
        return outcome.result
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def final_state(summary: RunSummary, result: dict[str, Any]) -> State:
    """What the Prefect UI shows of a run that reached its end: Failed when studies failed (so
    alerts on Failed runs fire), Completed named ``Partial`` when studies went in without some of
    their objects; the message counts what happened by kind (no PHI)."""
    if summary.outcome == RUN_FAILED:
        return Failed(message=summary.message, data=StudiesFailed(summary.message, result))
    name = "Partial" if summary.outcome == RUN_PARTIAL else "Completed"
    return Completed(message=summary.message, data=result, name=name)


def run_name(prefix: str) -> Callable[[], str]:
    """The first name of a run (``nightly 2026-11-30``); the window is added once it is planned."""
    return lambda: f"{prefix} {dt.date.today().isoformat()}"


def name_flow_run(name: str) -> None:
    """Rename the current flow run (nothing outside one)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, name=name)


@flow(name="nightly-ingest", flow_run_name=run_name("nightly"), log_prints=False, persist_result=False)
def nightly_ingest(since: dt.date | None = None, until: dt.date | None = None) -> Any:
    """C-FIND new and changed studies, retrieve, de-identify, store and catalog them.

    since/until: StudyDate window (default: last watermark minus the overlap .. today).
    Returns the result dict, or (studies failed) a Failed state carrying it: :func:`run_result`.
    """
    summary = run_nightly(since=since, until=until, logger=get_run_logger())
    return final_state(summary, summary.as_dict())


@dataclass
class RunParts:
    """What a run has built so far: its summary is written from these however far it got."""

    run_id: str
    settings: Settings | None = None
    run: NightlyRun | None = None
    book: RunBook | None = None

    def finish(self, seconds: float, error: BaseException | None) -> RunSummary:
        if self.book is not None:
            return self.book.finish(seconds, error)
        summary = RunSummary(self.run_id, "", seconds=round(seconds, 2))
        summary.conclude(error)
        return summary

    def manifest(self) -> dict | None:
        """The run's manifest; its artifact lists the first ``STUDY_ROWS`` quarantined objects (a
        night of ultrasound quarantines thousands: the ledger lists every one), and counts them all."""
        if self.run is None or self.book is None:
            return None
        return build_manifest(self.run.deid, self.book.deid_report, self.book.quarantined, self.book.written,
                              quarantined_count=self.book.quarantined_count)


def run_nightly(settings: Settings | None = None, *, since: dt.date | None = None, until: dt.date | None = None,
                logger: Logger | None = None, artifacts: str = "nightly") -> RunSummary:
    """One run, step by step (see :func:`run_steps`); settings default to the run's
    (:func:`load_run_settings`). Its summary artifact is written however the run ends (keys start
    with ``artifacts``: the sweep's are its own): a run that stops early says why."""
    logger = logger or log
    return run_summarised(lambda parts: run_steps(settings or load_run_settings(), parts, since, until, logger,
                                                  artifacts), logger, artifacts)


def run_summarised(steps: Callable[[RunParts], None], logger: Logger, artifacts: str) -> RunSummary:
    """Run ``steps`` (a nightly run's, or a shard's) on a new :class:`RunParts`; its summary,
    artifacts (keys start with ``artifacts``) and run report are written however it ends."""
    started = time.monotonic()
    parts = RunParts(new_run_id())
    error: BaseException | None = None
    try:
        steps(parts)
    except BaseException as exc:
        error = exc
        raise
    finally:
        summary = parts.finish(time.monotonic() - started, error)
        try:
            publish(summary, parts.manifest(), artifacts,
                    missing=parts.book.missing_recorded if parts.book else ())
        except Exception as exc:  # noqa: BLE001 - a reporting failure must not hide the run's own error
            logger.error("run %s: artifacts not written: %s", parts.run_id, error_text(exc))
        if parts.settings is not None:  # the run history and its report (never raises)
            from pacsflow.flows.run_report import publish_report  # DuckDB: not on the way to the first C-FIND

            publish_report(parts.settings, summary, parts.book.catalog_uids if parts.book else [], flow=artifacts,
                           logger=logger)
        (logger.error if error else logger.info)("run %s: %s (%.1fs)", parts.run_id, summary.message,
                                                 summary.seconds)
    return summary


def run_steps(settings: Settings, parts: RunParts, since: dt.date | None, until: dt.date | None, logger: Logger,
              prefix: str) -> None:
    """settings → discover → worklist → retrieve + de-identify → commit → bookkeeping → FHIR → XDS-I.b."""
    parts.settings = settings
    check_free_space(settings)
    check_tls_files(settings)
    run = parts.run = open_run(settings, parts.run_id)
    window = run_window(settings, run.ledger, since, until)
    name_flow_run(f"{prefix} {dt.date.today().isoformat()} ({window})")
    book = parts.book = RunBook(run.ledger, run.run_id, window, max_attempts=settings.max_attempts,
                                object_id=partial(object_id, run.key))
    with hold_slots(PACS_LIMIT, settings.max_associations, run_id=run.run_id, max_wait_s=settings.slot_wait_s,
                    logger=logger):
        items = discover_work(settings, run, window, book, logger)
        progress = Progress(f"{prefix}-progress", len(items))
        with recording_interruption(book, logger):
            retrieve_and_deidentify(settings, run, items, book, progress)
    commit(settings, run, book)
    progress.finish()
    for item, verdict in book.settle():
        logger.warning("study %s (%s) failed (%s): %s", item.pseudo_uid, item.label,
                       "permanent" if verdict.permanent else "transient", verdict.reason)
    tidy(settings, run, book)
    if settings.fhir.base_url:
        sync_fhir(settings, book.catalog_uids, book.summary, logger)
    if settings.xdsi.enabled:
        publish_xdsi(settings, book.catalog_uids, book.summary, logger)


def run_window(settings: Settings, ledger: Ledger, since: dt.date | None, until: dt.date | None,
               watermark: str = WATERMARK) -> Window:
    """The StudyDate window of a run: the watermark (the state row ``watermark``) minus the overlap
    (or the first run's) .. today."""
    return plan_window(watermark=ledger.watermark_of(watermark), overlap_days=settings.overlap_days,
                       initial_since=parse_dicom_date(settings.initial_since), initial_days=settings.initial_days,
                       since=since, until=until)


def check_free_space(settings: Settings) -> None:
    """Refuse to start when a local zone is nearly full: a run would fail half-way through."""
    zones = {"catalog_root": settings.catalog_root, "state_root": settings.state_root}
    if settings.local_storage_root is not None:
        zones["storage_root"] = settings.local_storage_root
    problems = low_space(zones, settings.min_free_mb)
    if problems:
        raise InsufficientSpace(f"less than min_free_mb={settings.min_free_mb} MiB free: " + "; ".join(problems))


def open_deid(settings: Settings) -> tuple[bytes, Deidentifier]:
    """The key and a run's one Deidentifier; the PHI-zone folders exist (owner-only)."""
    key = settings.resolve_deid_key()
    deid = Deidentifier.from_settings(key, settings.deid)
    for folder in (settings.state_root, settings.staging_dir, settings.quarantine_dir):
        ensure_private_dir(folder)
    return key, deid


def open_run(settings: Settings, run_id: str) -> NightlyRun:
    """The key, the run's one Deidentifier, the PHI-zone folders (owner-only) and the ledger."""
    quiet_pynetdicom()
    key, deid = open_deid(settings)
    staging = StagingWriter(settings.staging_dir, deid.study_ref, settings.receiver.max_object_mb)
    ledger = Ledger(settings.ledger_path, settings.state.url)
    return NightlyRun(run_id, key, deid, ledger, staging, settings.state_root / "runs" / run_id)


def discover_work(settings: Settings, run: NightlyRun, window: Window | None, book: RunBook, logger: Logger,
                  only: list[str] | None = None) -> list[WorkItem]:
    """C-FIND the window (and, by UID, earlier transient failures and studies with objects still
    missing); keep what is new, grew or is retried. ``only``: these studies and no other (a
    shard's; looked up by UID when the window does not show them)."""
    retry_uids = [e.study_uid for e in run.ledger.to_retry()] if only is None else only
    discovery = discover_studies(PacsPeer.from_settings(settings), window, retry_uids)
    keep = None if only is None else set(only)
    found = [s for s in discovery.found if keep is None or s.study_uid in keep]
    book.summary.pacs_queries = discovery.queries
    items = worklist(found, run.ledger.entries(only), run.deid.study_ref,
                     lambda s: run.deid.date_as_deidentified(s.study_date, s.patient_id))
    book.planned(len(found), items)
    logger.info("run %s: window %s, %d studies found, %d to process", run.run_id, book.summary.window, len(found),
                len(items))
    return items


def retrieve_and_deidentify(settings: Settings, run: NightlyRun, items: list[WorkItem], book: RunBook,
                            progress: "Progress | None" = None,
                            slot: Callable[[int], AbstractContextManager] | None = None) -> None:
    """Retrieve each study (at most max_associations at once: the nightly run holds that many
    slots of the global PACS limit, and waiting here costs nothing; a shard run takes one
    ``slot(studies)`` per retrieval task instead, held until it ends) and de-identify it as soon as it is
    complete."""
    for item in items:  # a fresh staging folder: stale files from an older attempt must not count
        remove_tree(run.staging.study_dir(item.study_uid))
    run.staging.expect(item.study_uid for item in items)  # objects of any other study are refused
    route = RetrieveRoute.from_settings(settings)
    retrieve = retrieve_study.with_options(
        retries=settings.retrieve_retries,
        retry_delay_seconds=[settings.retry_delay_s * (2**i) for i in range(max(settings.retrieve_retries, 1))],
    )
    # A study whose grouped retrieval failed transiently: that was its first try, the rest of its
    # tries (retrieve_retries in all, after the first) come in a task of its own.
    retry_alone = retrieve.with_options(
        retries=max(settings.retrieve_retries - 1, 0),
        retry_delay_seconds=[settings.retry_delay_s * (2**i) for i in range(1, max(settings.retrieve_retries, 2))],
    )
    progress = progress or Progress(None, len(items))
    processor = StudyProcessor(run.deid, settings.storage_root, settings.quarantine_dir, settings.deid_workers,
                               settings.storage)
    # De-identification tasks in flight: each holds a thread (and its Prefect state) while it waits
    # for the workers, so a fast retrieval must not start one per study; retrieved studies wait in
    # a queue instead (retrieval pauses once it is this long again: staging stays small), and the
    # small ones that wait together go to the workers as one task (:func:`group_size`).
    deid_slots, deid_tasks = max(2, 2 * settings.deid_workers), max(2, settings.deid_workers)
    queue, retrieved, tasks = deque(items), deque[tuple[WorkItem, Retrieved]](), _InFlight()
    alone: set[str] = set()  # studies whose grouped retrieval failed: tried again on their own
    with _receiver(settings, run.staging, items), processor, tasks:
        while queue or retrieved or tasks:
            while queue and tasks.retrieving < settings.max_associations and len(retrieved) < deid_slots:
                fetch = [queue.popleft() for _ in range(_retrieval_group(queue, alone, settings.commit_batch))]
                one = retry_alone if fetch[0].pseudo_uid in alone else retrieve
                tasks.add_retrieval(fetch, partial(_retrieve, fetch, one, route, run.staging), slot)
            while retrieved and tasks.deidentifying < deid_tasks:
                group = [retrieved.popleft() for _ in range(group_size([r.received for _, r in retrieved]))]
                tasks.add([item for item, _ in group], _deidentify(group, processor, str(run.rows_root)))
            done, retrieval = tasks.next_done()
            for item, result in done:
                if retrieval and len(done) > 1 and settings.retrieve_retries and _transient(result):
                    alone.add(item.pseudo_uid)  # the rest of its tries in a task of its own
                    queue.appendleft(item)
                    continue
                if retrieval:
                    run.staging.forget(item.study_uid)
                if isinstance(result, Retrieved):
                    book.retrieved(item, result)
                    retrieved.append((item, result))
                    continue
                if isinstance(result, StudyOutcome):
                    book.deidentified(item, result)
                else:
                    book.failed(item, _as_exception(result))
                progress.advance(failed=not isinstance(result, StudyOutcome))
            if book.uncommitted >= settings.commit_batch:  # a full batch goes in while retrieval goes on
                commit(settings, run, book)


def _transient(result: object) -> bool:
    return isinstance(result, Exception) and is_transient(result)


def _retrieval_group(queue: deque[WorkItem], alone: set[str], commit_batch: int) -> int:
    """How many of the next studies one retrieval task fetches: small studies (object counts the
    PACS reported) go several to a task, as their de-identification does, but never more than a
    commit batch, so that commits still go in while retrieval goes on."""
    sizes = []
    for item in itertools.islice(queue, min(GROUP_STUDIES, max(1, commit_batch))):
        if item.expected is None or item.pseudo_uid in alone:
            break
        sizes.append(item.expected)
    return max(1, group_size(sizes))


def _retrieve(fetch: list[WorkItem], retrieve: Any, route: RetrieveRoute, staging: StagingWriter) -> PrefectFuture:
    """One study's retrieval task (with the run's retries), or one for several small studies."""
    if len(fetch) == 1:
        return retrieve.submit(fetch[0], route, staging)
    name = f"retrieve {len(fetch)} studies ({fetch[0].label} and {len(fetch) - 1} more)"
    return retrieve_studies.with_options(task_run_name=name).submit(fetch, route, staging)


def _deidentify(group: list[tuple[WorkItem, Retrieved]], processor: StudyProcessor, rows_root: str) -> PrefectFuture:
    """One study's de-identification task, or one for several small studies (its name says how
    many, and which first); each study's outcome stays its own."""
    if len(group) == 1:
        [(item, done)] = group
        return deidentify_study.with_options(task_run_name=f"deidentify {item.label}").submit(done, processor,
                                                                                              rows_root)
    name = f"deidentify {len(group)} studies ({group[0][0].label} and {len(group) - 1} more)"
    return deidentify_studies.with_options(task_run_name=name).submit([done for _, done in group], processor,
                                                                      rows_root)


def commit(settings: Settings, run: NightlyRun, book: RunBook) -> None:
    """Commit what is complete and not committed yet, in batches; the ledger follows each commit,
    and a cataloged study's staged originals and row files go. A batch the catalog could not take
    for a reason that may pass (full disk, busy lock) fails its studies transiently: the next run
    retries them."""
    done = book.to_commit()
    for start in range(0, len(done), settings.commit_batch):
        batch = done[start : start + settings.commit_batch]
        try:
            commit_catalog([str(o.rows_dir) for _, o in batch], str(settings.catalog_root), settings.catalog)
        except Exception as exc:
            if not is_transient(exc):
                raise
            for w, _ in batch:
                book.failed(w, exc)
            continue
        book.cataloged(batch)
        for w, o in batch:
            remove_tree(run.staging.study_dir(w.study_uid))
            if o.rows_dir:
                remove_tree(Path(o.rows_dir))


def tidy(settings: Settings, run: NightlyRun, book: RunBook) -> None:
    remove_tree(run.work_dir)
    # Row folders of runs that were killed before their own tidy (a run lasts hours, not days).
    purge_older_than(run.work_dir.parent, STALE_RUN_DAYS)
    # PHI zones do not keep originals longer than the retention settings say.
    purge_older_than(settings.staging_dir, settings.deid.staging_retention_days)
    purge_older_than(settings.quarantine_dir, settings.deid.quarantine_retention_days)
    crosswalk = open_crosswalk(settings)
    if crosswalk is not None:
        crosswalk.add(book.crosswalk_rows())


def sync_fhir(settings: Settings, committed_uids: list[str], summary: RunSummary, logger: Logger) -> None:
    """ImagingStudy + Patient for what this run cataloged, plus every study whose FHIR sync
    failed before. Failures stay in the FHIR ledger for the next run; they never fail the night."""
    from pacsflow.flows.fhir_resync import publish_report
    from pacsflow.tasks.fhir.ledger import FhirSyncLedger
    from pacsflow.tasks.fhir.steps import sync_with_tasks

    try:
        owed = FhirSyncLedger.under(settings.state_root, settings.state.url).failed()
        report = sync_with_tasks(settings, sorted(set(committed_uids) | set(owed)), logger=logger)
    except Exception as exc:  # noqa: BLE001 - the FHIR copy must not fail the night; the ledger keeps what is owed
        logger.error("FHIR sync step failed: %s", error_text(exc))
        summary.fhir_failed = len(committed_uids)
        return
    summary.fhir_sent, summary.fhir_failed = report.sent, len(report.failed)
    summary.fhir_differences = len(report.differences)
    publish_report(report, key="nightly-fhir-sync", title="Nightly FHIR sync")


def publish_xdsi(settings: Settings, committed_uids: list[str], summary: RunSummary, logger: Logger) -> None:
    """A KOS manifest in the XDS.b repository for what this run cataloged, plus what earlier runs
    left (transient failures, studies pending consent or not attempted). Failures stay in the
    XDS-I.b ledger for the next run; they never fail the night."""
    from pacsflow.flows.xdsi_publish import publish_summary, publish_with_tasks
    from pacsflow.tasks.xdsi.ledger import XdsiLedger
    from pacsflow.tasks.xdsi.publish import owed_studies

    try:
        owed = owed_studies(XdsiLedger.under(settings.state_root, settings.state.url))
        report = publish_with_tasks(settings, sorted(set(committed_uids) | set(owed)), logger=logger)
    except Exception as exc:  # noqa: BLE001 - the XDS copy must not fail the night; the ledger keeps what is owed
        logger.error("XDS-I.b publish step failed: %s", error_text(exc))
        summary.xdsi_failed = len(committed_uids)
        return
    summary.xdsi_published, summary.xdsi_failed = report.published + report.replaced, len(report.failed)
    publish_summary(report, key="nightly-xdsi-publish", title="Nightly XDS-I.b publish")


def publish(summary: RunSummary, deid_manifest: dict | None, prefix: str = "nightly",
            missing: Iterable[MissingEntry] = ()) -> None:
    """Artifacts for the Prefect UI: pseudonymous UIDs and counts only. Written at the end of
    every run, including one that stopped early (no manifest then: nothing was de-identified).
    The run's other reports (HTML report, runs history) take ``summary`` here too."""
    try:
        if deid_manifest is not None:
            create_markdown_artifact(
                manifest_markdown(deid_manifest), key=f"{prefix}-deid-manifest",
                description="De-identification manifest: edition, recipe, options, actions, quarantine (objects "
                            f"listed: {_shown(deid_manifest['quarantined'], range(deid_manifest['quarantined_count']))})",
            )
        d = summary.as_dict()
        md = [
            f"# Ingest ({prefix}) {summary.run_id}: {summary.outcome}",
            "",
            summary.message,
            "",
            "| measure | value |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in d.items() if k not in ("run_id", "outcome", "message")],
        ]
        create_markdown_artifact("\n".join(md), key=f"{prefix}-ingest-summary", description="Ingest counts")
        if summary.studies:
            rows = table_rows(summary.studies)
            create_table_artifact(
                rows, key=f"{prefix}-ingest-studies",
                description="Per-study outcomes (pseudonymous UIDs), failed and partial first: "
                            + _shown(rows, summary.studies),
            )
        missing = list(missing)
        if missing:
            create_table_artifact(
                [m.__dict__ for m in missing[:STUDY_ROWS]], key=f"{prefix}-missing-objects",
                description="Objects the PACS listed but did not send: asked for again until given up (permanent); "
                            + _shown(missing[:STUDY_ROWS], missing),
            )
    except RuntimeError:
        # Outside a flow run (plain function call): there is no run to attach artifacts to.
        pass


def _shown(rows: Sized, of: Sized) -> str:
    if len(rows) == len(of):
        return f"all {len(of)}"
    return f"{len(rows)} of {len(of)} (the ledger has every one)"


class Progress:
    """The run's progress artifact (``key``): studies through retrieval and de-identification of
    those to process, moved as each ends (at most every ``PROGRESS_EVERY_S``); 100 once the
    catalog has them. Nothing outside a flow run, or without a key."""

    def __init__(self, key: str | None, total: int) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self._shown = time.monotonic()
        self._id: UUID | None = None
        if key and FlowRunContext.get() is not None:
            created = create_progress_artifact(0.0 if total else 100.0, key=key,
                                               description=f"0 of {total} studies done")
            self._id = created if isinstance(created, UUID) else None  # sync in a sync flow

    def advance(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        if self._id is not None and (self.done == self.total or time.monotonic() - self._shown >= PROGRESS_EVERY_S):
            self._show(100.0 * self.done / max(self.total, 1))

    def finish(self) -> None:
        if self._id is not None:
            self._show(100.0)

    def _show(self, percent: float) -> None:
        if self._id is None:
            return
        self._shown = time.monotonic()
        update_progress_artifact(self._id, min(percent, 100.0),
                                 description=f"{self.done} of {self.total} studies done ({self.failed} failed)")


# -- scheduling helpers -----------------------------------------------------------------------
def _receiver(settings: Settings, writer: StagingWriter, items: list[WorkItem]) -> AbstractContextManager:
    """Our Storage SCP for the run's C-MOVEs (none for C-GET, or when there is nothing to move)."""
    if settings.retrieve_method is not RetrieveMethod.C_MOVE or not items:
        return nullcontext()
    return StorageReceiver.for_run(settings, writer)


class _InFlight:
    """The run's task futures (retrievals and de-identifications), by task run id.

    A future is forgotten as soon as it ends, and so is what Prefect keeps of its task run in this
    process for the flow's length: the state linked to each result (``FlowRunContext.run_results``,
    which links a later task's inputs to it), the assets it hands downstream (an empty set per task
    run: ``task_run_assets``) and the thread runner's cancel event. A night of thousands of studies
    otherwise grows by each of them. A retrieval's are kept until its study's de-identification
    ends, so that task still names the retrieval as its input.
    """

    def __init__(self) -> None:
        self._futures: dict[Any, tuple[list[WorkItem], PrefectFuture]] = {}
        self._retrieving: set[Any] = set()
        self._retrieved: dict[str, Any] = {}  # a study's finished retrieval, by pseudonym
        self._slots: dict[Any, ExitStack] = {}  # a retrieval's PACS slot, given back when it ends

    def __bool__(self) -> bool:
        return bool(self._futures)

    def __enter__(self) -> "_InFlight":
        return self

    def __exit__(self, *exc: object) -> None:
        while self._slots:
            self._slots.popitem()[1].close()

    def add_retrieval(self, items: list[WorkItem], start: Callable[[], PrefectFuture],
                      slot: Callable[[int], AbstractContextManager] | None) -> None:
        """Start a retrieval task, holding ``slot(len(items))`` (when given) from before it starts to its end."""
        held = ExitStack()
        if slot is not None:
            held.enter_context(slot(len(items)))
        try:
            future = start()
        except BaseException:
            held.close()
            raise
        self.add(items, future, retrieving=True)
        self._slots[future.task_run_id] = held

    @property
    def retrieving(self) -> int:
        return len(self._retrieving)

    @property
    def deidentifying(self) -> int:
        return len(self._futures) - len(self._retrieving)

    def add(self, items: list[WorkItem], future: PrefectFuture, *, retrieving: bool = False) -> None:
        self._futures[future.task_run_id] = (items, future)
        if retrieving:
            self._retrieving.add(future.task_run_id)

    def next_done(self) -> tuple[list[tuple[WorkItem, object]], bool]:
        """Wait for the next future to end and forget it: (each of its studies with its result or
        exception, whether it was a retrieval). A task of several studies returned one result
        each; when it failed as a whole, its error is every study's."""
        future = next(as_completed([f for _, f in self._futures.values()]))
        items, _ = self._futures.pop(future.task_run_id)
        retrieval = future.task_run_id in self._retrieving
        self._retrieving.discard(future.task_run_id)
        if future.task_run_id in self._slots:
            self._slots.pop(future.task_run_id).close()
        result = future.result(raise_on_failure=False)
        if retrieval and not isinstance(result, BaseException):
            self._retrieved.update((item.pseudo_uid, future.task_run_id) for item in items)
        else:
            release_task_runs({future.task_run_id, *(self._retrieved.pop(i.pseudo_uid, None) for i in items)})
        results = result if len(items) > 1 and isinstance(result, list) else [result] * len(items)
        return list(zip(items, results)), retrieval


def release_task_runs(task_run_ids: set[Any]) -> None:
    """Drop what Prefect keeps in this process of finished task runs whose results were used:
    their linked states, their assets for downstream tasks and the thread runner's cancel events
    (a private dict: it has no public way to forget them, and would hold one per task run until
    the flow ends)."""
    ctx = FlowRunContext.get()
    if ctx is None:
        return
    stale = [key for key, (state, *_) in ctx.run_results.items() if state.state_details.task_run_id in task_run_ids]
    for key in stale:
        del ctx.run_results[key]
    for task_run_id in task_run_ids:
        ctx.task_run_assets.pop(task_run_id, None)
    cancel_events = getattr(ctx.task_runner, "_cancel_events", None)
    if isinstance(cancel_events, dict):
        for task_run_id in task_run_ids:
            cancel_events.pop(task_run_id, None)


@contextmanager
def recording_interruption(book: RunBook, logger: Logger) -> Iterator[None]:
    """Ctrl-C or SIGTERM (Prefect turns it into TerminationSignal) mid-retrieval: the unfinished
    studies go to the ledger as transient failures, so the next run retries them."""
    try:
        yield
    except (KeyboardInterrupt, TerminationSignal) as exc:
        what = f"signal {exc.signal}" if isinstance(exc, TerminationSignal) else "KeyboardInterrupt"
        interrupted = book.interrupted(f"run interrupted ({what})")
        logger.error("run %s interrupted (%s): %d unfinished studies recorded for the next run", book.run_id, what,
                     len(interrupted))
        raise


def _as_exception(result: object) -> BaseException:
    return result if isinstance(result, BaseException) else RuntimeError("task did not complete")
