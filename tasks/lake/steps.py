"""Prefect tasks of the lake stage: de-identify and store a retrieved study, commit catalog rows.

Thin wrappers over :mod:`.study` and the catalog store that add retries, run names and logging.
"""

from __future__ import annotations

import time
from logging import Logger, LoggerAdapter
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.tasks.core.errors import error_text, is_transient, retry_if_transient
from pacsflow.tasks.lake.study import StudyOutcome, StudyProcessor, read_rows
from pacsflow.tasks.pacs.models import Retrieved
from pacsflow.tasks.settings import CatalogSettings

DEID_RETRY_DELAYS_S = (2, 10)  # a study's retries after a transient failure, as a task's retries


@task(name="deidentify-study", task_run_name="deidentify-{retrieved.pseudo_uid}", persist_result=False,
      cache_policy=NO_CACHE, retries=len(DEID_RETRY_DELAYS_S), retry_delay_seconds=list(DEID_RETRY_DELAYS_S),
      retry_condition_fn=retry_if_transient)
def deidentify_study(retrieved: Retrieved, processor: StudyProcessor, rows_root: str) -> StudyOutcome:
    """De-identify every staged object, write it to the lake, extract its catalog rows (under
    ``rows_root/<pseudonymous study UID>``)."""
    outcome = processor.process(Path(retrieved.staged_dir), retrieved.pseudo_uid,
                                Path(rows_root) / retrieved.pseudo_uid)
    _log_outcome(get_run_logger(), outcome)
    return outcome


@task(name="deidentify-studies", persist_result=False, cache_policy=NO_CACHE)
def deidentify_studies(retrieved: list[Retrieved], processor: StudyProcessor,
                       rows_root: str) -> list[StudyOutcome | Exception]:
    """:func:`deidentify_study` for several small studies in one task run (Prefect's cost is per
    task run): all go to the workers at once, and each study's outcome, or the error that ended
    it, is its own. A study that failed transiently is tried again alone, as the one-study task's
    retries would; the others are not redone."""
    logger = get_run_logger()
    studies = [(Path(r.staged_dir), r.pseudo_uid, Path(rows_root) / r.pseudo_uid) for r in retrieved]
    results = processor.process_many(studies)
    for delay in DEID_RETRY_DELAYS_S:
        again = [i for i, r in enumerate(results) if isinstance(r, Exception) and is_transient(r)]
        if not again:
            break
        logger.warning("%d of %d studies failed transiently, tried again in %d s", len(again), len(studies), delay)
        time.sleep(delay)
        for i, result in zip(again, processor.process_many([studies[i] for i in again])):
            results[i] = result
    written = [r for r in results if isinstance(r, StudyOutcome)]
    for study, result in zip(studies, results):
        if isinstance(result, Exception):
            logger.error("study %s failed: %s", study[1], error_text(result))
        elif result.quarantined:
            logger.warning("study %s: %d objects quarantined", result.pseudo_uid, len(result.quarantined))
    # One record for the group: each log record is a row the server writes.
    logger.info("%d of %d studies de-identified and stored: %s", len(written), len(studies),
                ", ".join(f"{o.pseudo_uid} ({o.written} objects)" for o in written))
    return results


def _log_outcome(logger: Logger | LoggerAdapter, outcome: StudyOutcome) -> None:
    if outcome.quarantined:
        logger.warning("study %s: %d objects quarantined", outcome.pseudo_uid, len(outcome.quarantined))
    logger.info("study %s: %d objects de-identified and stored", outcome.pseudo_uid, outcome.written)


@task(name="commit-catalog", persist_result=False, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5],
      retry_condition_fn=retry_if_transient)
def commit_catalog(rows_dirs: list[str], catalog_root: str, catalog: CatalogSettings | None = None) -> int:
    """One atomic catalog commit for a batch of studies; returns the snapshot version."""
    tables = read_rows(rows_dirs)
    result = (catalog or CatalogSettings()).open_store(Path(catalog_root)).commit(tables)
    get_run_logger().info("catalog commit: %d studies", len(rows_dirs))
    return int(getattr(result, "version", 0) or 0)
