"""The nightly ingest flow: PACS → de-identified lake → Parquet catalog.

Parameters are dates only (no PHI). Settings are read at run time from the environment or
``PACSFLOW_CONFIG`` (a YAML file); see ``tasks/settings.py``.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.futures import as_completed

from pacsflow.flows.concurrency import ensure_concurrency_limit
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier
from pacsflow.tasks.deid.manifest import QuarantinedObject, build_manifest, manifest_markdown, object_id
from pacsflow.tasks.core.files import purge_older_than
from pacsflow.tasks.deid.crosswalk import update_crosswalk
from pacsflow.tasks.core.errors import is_transient
from pacsflow.tasks.pacs.steps import PACS_LIMIT, discover_studies, retrieve_study
from pacsflow.tasks.pacs.models import Retrieved
from pacsflow.tasks.lake.steps import commit_catalog, deidentify_study, shutdown_worker_pool
from pacsflow.tasks.core.files import remove_tree
from pacsflow.tasks.fhir.sync import catalog_study_uids
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.pacs.client import quiet_pynetdicom
from pacsflow.tasks.pacs.planning import WorkItem, plan_window, worklist
from pacsflow.tasks.lake.study import StudyOutcome
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver
from pacsflow.tasks.core.files import ensure_private_dir
from pacsflow.flows.secrets import load_run_settings
from pacsflow.tasks.settings import RetrieveMethod, Settings


@dataclass
class StudyReport:
    pseudo_uid: str
    reason: str
    outcome: str = "pending"  # cataloged | failed | quarantined
    instances: int = 0
    quarantined: int = 0
    error: str = ""


@dataclass
class RunSummary:
    run_id: str
    window: str
    found: int = 0
    queued: int = 0
    retrieved: int = 0
    deidentified: int = 0
    cataloged: int = 0
    failed: int = 0
    instances: int = 0
    quarantined_objects: int = 0
    fhir_sent: int = 0
    fhir_failed: int = 0
    fhir_differences: int = 0
    seconds: float = 0.0
    studies: list[StudyReport] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "studies"}
        d["instances_per_second"] = round(self.instances / self.seconds, 1) if self.seconds else 0.0
        return d


def _error_text(exc: BaseException) -> str:
    # Our errors carry pseudonymous UIDs and counts only; anything else is named by type.
    from pacsflow.tasks.core.errors import PacsflowError

    return f"{type(exc).__name__}: {exc}" if isinstance(exc, PacsflowError) else type(exc).__name__


@flow(name="nightly-ingest", log_prints=False, persist_result=False)
def nightly_ingest(since: dt.date | None = None, until: dt.date | None = None) -> dict:
    """C-FIND new and changed studies, retrieve, de-identify, store and catalog them.

    since/until: StudyDate window (default: last watermark minus the overlap .. today).
    """
    logger = get_run_logger()
    settings = load_run_settings()
    return run_nightly(settings, since=since, until=until, logger=logger)


def run_nightly(settings: Settings, *, since=None, until=None, logger: logging.Logger | None = None) -> dict:
    logger = logger or logging.getLogger(__name__)
    started = time.monotonic()
    quiet_pynetdicom()
    key = settings.resolve_deid_key()
    deid = Deidentifier.from_settings(key, settings.deid)
    ensure_private_dir(settings.state_root)
    ensure_private_dir(settings.staging_dir)
    ensure_private_dir(settings.quarantine_dir)
    ledger = Ledger(settings.ledger_path)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    window = plan_window(
        watermark=ledger.watermark,
        overlap_days=settings.overlap_days,
        initial_since=_parse_date(settings.initial_since),
        initial_days=settings.initial_days,
        since=since,
        until=until,
    )
    summary = RunSummary(run_id, f"{window.start.isoformat()}..{window.end.isoformat()}")
    ensure_concurrency_limit(PACS_LIMIT, settings.max_associations)

    with concurrency(PACS_LIMIT, occupy=settings.max_associations, strict=False):
        retry_uids = [e.study_uid for e in ledger.failed() if not e.permanent]
        found, _warnings = discover_studies(settings, window, retry_uids)
        summary.found = len(found)
        items = worklist(found, ledger.entries(), deid.study_ref)
        summary.queued = len(items)
        logger.info("run %s: window %s, %d studies found, %d to process", run_id, summary.window, len(found),
                    len(items))
        rows_root = settings.state_root / "runs" / run_id / "rows"
        try:
            outcomes, failures = _retrieve_and_deidentify(settings, key, deid, items, rows_root, summary)
        finally:
            shutdown_worker_pool()
    reports = {w.pseudo_uid: StudyReport(w.pseudo_uid, w.reason) for w in items}

    # Commit what is complete, in batches; the ledger follows each commit.
    done = [(w, o) for w, o in outcomes.values() if o.rows_dir]
    for start in range(0, len(done), settings.commit_batch):
        batch = done[start : start + settings.commit_batch]
        commit_catalog([o.rows_dir for _, o in batch], str(settings.catalog_root))
        ledger.mark_cataloged([(w.study_uid, w.pseudo_uid, w.study_date, w.expected or o.written) for w, o in batch],
                              run_id)
        for w, o in batch:
            rep = reports[w.pseudo_uid]
            rep.outcome, rep.instances, rep.quarantined = "cataloged", o.written, len(o.quarantined)
            summary.cataloged += 1
            summary.instances += o.written
            remove_tree(settings.staging_dir / w.pseudo_uid)
    # The catalog's UIDs (not our pseudonyms: under Retain UIDs they differ), read before rows_root goes.
    committed_uids = catalog_study_uids([o.rows_dir for _, o in done])
    deid_report, quarantined_objects, written = DeidReport(), [], 0
    for w, o in outcomes.values():
        summary.deidentified += 1
        summary.quarantined_objects += len(o.quarantined)
        deid_report.merge(DeidReport(dict(o.actions)))
        written += o.written
        for name, reason in o.quarantined:
            ledger.quarantine(w.pseudo_uid, name, reason, run_id)
            # Staged names are hashes of original UIDs: the manifest gets a keyed id instead.
            quarantined_objects.append(QuarantinedObject(object_id(key, f"{w.pseudo_uid}/{name}"), reason))
        if not o.rows_dir:  # every object quarantined
            reports[w.pseudo_uid].outcome = "quarantined"
            ledger.mark_failed(w.study_uid, w.pseudo_uid, w.study_date, w.expected, "all objects quarantined",
                               True, run_id)
            summary.failed += 1
    known = ledger.entries([w.study_uid for w, _ in failures.values()])
    for pseudo, (w, exc) in failures.items():
        transient = is_transient(exc)
        text = _error_text(exc)
        prior = known.get(w.study_uid)
        attempts = (prior.attempts if prior else 0) + 1
        if transient and attempts >= settings.max_attempts:
            # Retried on max_attempts runs: stop holding the watermark and wait for an operator.
            transient = False
            text = f"gave up after {attempts} runs: {text}"
        ledger.mark_failed(w.study_uid, w.pseudo_uid, w.study_date, w.expected, text, not transient, run_id)
        rep = reports[pseudo]
        rep.outcome, rep.error = "failed", text
        summary.failed += 1
        logger.warning("study %s failed (%s): %s", pseudo, "transient" if transient else "permanent", text)

    # The watermark moves over completed days only: a transient failure holds it at that study's day.
    held = [_parse_date(r.study_date) for r in ledger.entries([w.study_uid for w, _ in failures.values()]).values()
            if r.status == "failed" and not r.permanent]
    held = [d for d in held if d is not None]
    ledger.advance_watermark(min([window.end, *held]))
    shutil.rmtree(rows_root.parent, ignore_errors=True)
    # PHI zones do not keep originals longer than the retention settings say.
    purge_older_than(settings.staging_dir, settings.deid.staging_retention_days)
    purge_older_than(settings.quarantine_dir, settings.deid.quarantine_retention_days)
    if settings.deid.crosswalk_path:
        update_crosswalk(settings.deid.crosswalk_path,
                         [("study", w.pseudo_uid, w.study_uid) for w, _ in outcomes.values()])

    if settings.fhir.base_url:
        _sync_fhir(settings, committed_uids, summary, logger)

    summary.seconds = round(time.monotonic() - started, 2)
    summary.studies = list(reports.values())
    _publish(summary, build_manifest(deid, deid_report, quarantined_objects, written))
    logger.info(
        "run %s done: %d found, %d cataloged (%d instances), %d failed in %.1fs",
        run_id, summary.found, summary.cataloged, summary.instances, summary.failed, summary.seconds,
    )
    return summary.as_dict()


def _retrieve_and_deidentify(settings: Settings, key: bytes, deid: Deidentifier, items: list[WorkItem],
                             rows_root: Path, summary: "RunSummary"):
    """Retrieve each study (at most max_associations at once) and de-identify it as soon as it
    is complete. Returns outcomes and failures by pseudonymous UID."""
    outcomes: dict[str, tuple[WorkItem, StudyOutcome]] = {}
    failures: dict[str, tuple[WorkItem, BaseException]] = {}
    for item in items:  # a fresh staging folder: stale files from an older attempt must not count
        remove_tree(settings.staging_dir / item.pseudo_uid)
    receiver = (
        StorageReceiver(
            settings.receiver.ae_title,
            settings.receiver.host,
            settings.receiver.port,
            StagingWriter(settings.staging_dir, deid.study_ref),
        )
        if settings.retrieve_method is RetrieveMethod.C_MOVE and items
        else nullcontext()
    )
    retrieve = retrieve_study.with_options(
        retries=settings.retrieve_retries,
        retry_delay_seconds=[settings.retry_delay_s * (2**i) for i in range(max(settings.retrieve_retries, 1))],
    )
    with receiver:
        # At most max_associations retrieves in flight: the run holds that many slots of the
        # global PACS limit, and waiting here costs nothing.
        pending = list(items)
        running: dict = {}
        owner: dict = {}
        deid_futures = []
        while pending or running:
            while pending and len(running) < settings.max_associations:
                item = pending.pop(0)
                fut = retrieve.submit(item, settings, key)
                owner[fut.task_run_id] = item
                running[fut.task_run_id] = fut
            fut = next(as_completed(list(running.values())))
            del running[fut.task_run_id]
            item = owner[fut.task_run_id]
            res = fut.result(raise_on_failure=False)
            if isinstance(res, Retrieved):
                summary.retrieved += 1
                deid_fut = deidentify_study.submit(res, settings, key, str(rows_root))
                owner[deid_fut.task_run_id] = item
                deid_futures.append(deid_fut)
            else:
                failures[item.pseudo_uid] = (item, _as_exception(res))
        for fut in as_completed(deid_futures):
            item = owner[fut.task_run_id]
            res = fut.result(raise_on_failure=False)
            if isinstance(res, StudyOutcome):
                outcomes[item.pseudo_uid] = (item, res)
            else:
                failures[item.pseudo_uid] = (item, _as_exception(res))
    return outcomes, failures


def _sync_fhir(settings: Settings, committed_uids: list[str], summary: RunSummary, logger) -> None:
    """ImagingStudy + Patient for what this run cataloged, plus every study whose FHIR sync
    failed before. Failures stay in the FHIR ledger for the next run; they never fail the night."""
    from pacsflow.flows.fhir_resync import publish_report
    from pacsflow.tasks.fhir.ledger import FhirSyncLedger
    from pacsflow.tasks.fhir.steps import sync_with_tasks

    try:
        owed = FhirSyncLedger.for_settings(settings).failed()
        report = sync_with_tasks(settings, sorted(set(committed_uids) | set(owed)), logger=logger)
    except Exception as exc:  # noqa: BLE001 - the FHIR copy must not fail the night; the ledger keeps what is owed
        logger.error("FHIR sync step failed: %s", _error_text(exc))
        summary.fhir_failed = len(committed_uids)
        return
    summary.fhir_sent, summary.fhir_failed = report.sent, len(report.failed)
    summary.fhir_differences = len(report.differences)
    publish_report(report, key="nightly-fhir-sync", title="Nightly FHIR sync")


def _as_exception(result: object) -> BaseException:
    return result if isinstance(result, BaseException) else RuntimeError("task did not complete")


def _parse_date(value: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime((value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _publish(summary: RunSummary, deid_manifest: dict) -> None:
    """Artifacts for the Prefect UI: pseudonymous UIDs and counts only."""
    try:
        create_markdown_artifact(
            manifest_markdown(deid_manifest), key="nightly-deid-manifest",
            description="De-identification manifest: edition, recipe, options, actions, quarantine",
        )
        d = summary.as_dict()
        md = [
            f"# Nightly ingest {summary.run_id}",
            "",
            "| measure | value |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in d.items() if k != "run_id"],
        ]
        create_markdown_artifact("\n".join(md), key="nightly-ingest-summary", description="Nightly ingest counts")
        if summary.studies:
            create_table_artifact(
                [s.__dict__ for s in summary.studies], key="nightly-ingest-studies",
                description="Per-study outcomes (pseudonymous UIDs)",
            )
    except RuntimeError:
        # Outside a flow run (plain function call): there is no run to attach artifacts to.
        pass
