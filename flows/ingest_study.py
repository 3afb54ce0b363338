"""The ingest-study flow: one study handed off by ``pacsflow listen`` → de-identified lake → catalog → FHIR
(and the XDS-I.b repository when ``xdsi.repository_url`` is set).

The deployment ``ingest-study`` (``prefect.yaml``) runs it when the event ``pacsflow.study.stable``
arrives (:mod:`pacsflow.flows.events`). Its parameters are the study's keyed pseudonym and the
generation of the hand-off; the originals wait in
:func:`pacsflow.tasks.ingest.handoff.handoff_dir`. The steps are the nightly flow's for one
study: the same de-identification task and StudyProcessor, the same commit task, the same FHIR
and XDS-I.b steps. A generation after the first holds only the study's new objects: their rows are merged
with the study's cataloged ones before the commit (:mod:`pacsflow.tasks.lake.increment`).
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from pacsflow.flows.nightly import StudiesFailed, open_deid, publish_xdsi, sync_fhir
from pacsflow.flows.secrets import load_run_settings
from pacsflow.tasks.core.clock import new_run_id
from pacsflow.tasks.core.files import remove_tree
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.bookkeeping import RunSummary
from pacsflow.tasks.ingest.handoff import check_generation, check_study_ref, handoff_dir
from pacsflow.tasks.lake.increment import with_cataloged_rows
from pacsflow.tasks.lake.steps import commit_catalog, deidentify_study
from pacsflow.tasks.lake.study import SPLIT_ABOVE, StudyOutcome, StudyProcessor, staged_files
from pacsflow.tasks.pacs.models import Retrieved
from pacsflow.tasks.settings import Settings

log = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter

COMPLETED, PARTIAL, FAILED, SKIPPED = "completed", "partial", "failed", "skipped"
LOCK_FILE = "ingest-study.lock"


@dataclass
class IngestResult:
    """What one run did to its study: counts only, named by the study's pseudonym."""

    study: str
    generation: int
    outcome: str = "running"  # completed | partial (objects quarantined) | failed | skipped
    message: str = ""
    objects: int = 0  # handed off
    written: int = 0  # de-identified and stored in the lake
    quarantined: int = 0
    earlier_instances: int = 0  # the study's instances the catalog had before (earlier generations)
    catalog_version: int = 0
    fhir_sent: int = 0
    fhir_failed: int = 0
    xdsi_published: int = 0
    xdsi_failed: int = 0

    def conclude(self) -> None:
        if self.outcome == SKIPPED:
            return
        if not self.written:
            self.outcome = FAILED
            self.message = f"study {self.study}: none of {self.objects} objects could be ingested"
        else:
            self.outcome = PARTIAL if self.quarantined else COMPLETED
            self.message = (f"study {self.study} generation {self.generation}: {self.written} objects cataloged, "
                            f"{self.quarantined} quarantined, {self.earlier_instances} from earlier generations")


def run_name() -> str:
    """``ingest-study 2.25.… #2``; a parameter that is no study pseudonym is not shown (it came
    from an event and could hold anything)."""
    params = flow_run.parameters
    try:
        ref, generation = check_study_ref(str(params.get("study", ""))), check_generation(params.get("generation"))
    except ValueError:
        return "ingest-study (invalid parameters)"
    return f"ingest-study {ref} #{generation}"


@flow(name="ingest-study", flow_run_name=run_name, log_prints=False, persist_result=False)
def ingest_study(study: str, generation: int) -> Any:
    """De-identify, store and catalog the objects of one study handed off by the listener.

    study: the study's pseudonymous ref (``2.25.…``, or the event's resource id
    ``pacsflow.study.2.25.…``); generation: the round of the hand-off (1, 2, …).
    Returns the result dict; Failed (the dict in a :class:`StudiesFailed`) when nothing went in.
    """
    result = run_ingest(load_run_settings(), study, generation, get_run_logger())
    publish(result)
    return final_state(result)


def run_ingest(settings: Settings, study: str, generation: int, logger: Logger | None = None) -> IngestResult:
    """The steps of one run (see the module docstring). The hand-off folder goes once its objects
    are in the lake or quarantined; when a step fails it stays, for a new run of the flow."""
    logger = logger or log
    result = IngestResult(check_study_ref(study), check_generation(generation))
    folder = handoff_dir(settings, result.study, result.generation)
    if not folder.is_dir():  # the listener emitted again what was ingested, or the folder was removed
        result.outcome, result.message = SKIPPED, f"study {result.study}: nothing handed off (ingested already?)"
        logger.warning(result.message)
        return result
    result.objects = len(staged_files(folder))
    _, deid = open_deid(settings)
    outcome = deidentify(settings, deid, result, folder)
    if outcome.written and settings.fhir.base_url:
        fhir = RunSummary(result.study, "")
        sync_fhir(settings, outcome.study_uids, fhir, logger)
        result.fhir_sent, result.fhir_failed = fhir.fhir_sent, fhir.fhir_failed
    if outcome.written and settings.xdsi.enabled:
        xdsi = RunSummary(result.study, "")
        publish_xdsi(settings, outcome.study_uids, xdsi, logger)
        result.xdsi_published, result.xdsi_failed = xdsi.xdsi_published, xdsi.xdsi_failed
    remove_tree(folder)
    result.conclude()
    (logger.info if result.written else logger.error)(result.message)
    return result


def deidentify(settings: Settings, deid: Deidentifier, result: IngestResult, folder: Path) -> StudyOutcome:
    """The nightly flow's de-identification task over the hand-off folder, then one commit of the
    study's rows merged with what the catalog has of it."""
    work = settings.state_root / "runs" / new_run_id()
    # A small hand-off is de-identified in this process: starting worker processes would cost more.
    workers = settings.deid_workers if result.objects > SPLIT_ABOVE else 0
    retrieved = Retrieved(pseudo_uid=result.study, staged_dir=str(folder), received=result.objects)
    try:
        with StudyProcessor(deid, settings.storage_root, settings.quarantine_dir, workers,
                            settings.storage) as processor:
            outcome = deidentify_study(retrieved, processor, str(work / "rows"))
        result.written, result.quarantined = outcome.written, len(outcome.quarantined)
        if outcome.written:
            with catalog_turn(settings):
                earlier = with_cataloged_rows(outcome, settings.catalog.reader(settings.catalog_root))
                result.earlier_instances = earlier
                result.catalog_version = commit_catalog([str(outcome.rows_dir)], str(settings.catalog_root),
                                                        settings.catalog)
    finally:
        remove_tree(work)
    return outcome


@contextmanager
def catalog_turn(settings: Settings) -> Iterator[None]:
    """One read-merge-commit at a time on this host: two generations of a study ingested at once
    would each commit the cataloged rows without the other's new ones."""
    fd = os.open(settings.state_root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def final_state(result: IngestResult) -> State:
    """Failed when none of the study's objects went in (so alerts on Failed runs fire);
    Completed named ``Partial`` or ``Skipped`` otherwise, as the case may be."""
    data = asdict(result)
    if result.outcome == FAILED:
        return Failed(message=result.message, data=StudiesFailed(result.message, data))
    name = {PARTIAL: "Partial", SKIPPED: "Skipped"}.get(result.outcome, "Completed")
    return Completed(message=result.message, data=data, name=name)


def publish(result: IngestResult) -> None:
    """The run's counts as an artifact (``ingest-study-summary``): operators see in the Prefect UI
    which pushed studies went in."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in asdict(result).items() if k not in ("outcome", "message"))
    create_markdown_artifact(f"# Ingest of a pushed study: {result.outcome}\n\n{result.message}\n\n"
                             f"| measure | value |\n|---|---|\n{rows}", key="ingest-study-summary",
                             description="Ingest of one study handed off by the listener (pseudonymous UID)")
