"""Prefect tasks of the lake stage: de-identify and store a retrieved study, commit catalog rows.

Thin wrappers over :mod:`.study` and the catalog store that add retries, run names and logging.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.catalog.store import CatalogStore
from pacsflow.tasks.core.errors import retry_if_transient
from pacsflow.tasks.lake.study import StudyOutcome, StudyProcessor, read_rows
from pacsflow.tasks.pacs.models import Retrieved


@task(name="deidentify-study", task_run_name="deidentify-{retrieved.pseudo_uid}", persist_result=False,
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient)
def deidentify_study(retrieved: Retrieved, processor: StudyProcessor, rows_root: str) -> StudyOutcome:
    """De-identify every staged object, write it to the lake, extract its catalog rows (under
    ``rows_root/<pseudonymous study UID>``)."""
    logger = get_run_logger()
    outcome = processor.process(Path(retrieved.staged_dir), retrieved.pseudo_uid,
                                Path(rows_root) / retrieved.pseudo_uid)
    if outcome.quarantined:
        logger.warning("study %s: %d objects quarantined", retrieved.pseudo_uid, len(outcome.quarantined))
    logger.info("study %s: %d objects de-identified and stored", retrieved.pseudo_uid, outcome.written)
    return outcome


@task(name="commit-catalog", persist_result=False, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5],
      retry_condition_fn=retry_if_transient)
def commit_catalog(rows_dirs: list[str], catalog_root: str) -> int:
    """One atomic catalog commit for a batch of studies; returns the snapshot version."""
    tables = read_rows(rows_dirs)
    result = CatalogStore(Path(catalog_root)).commit(tables)
    get_run_logger().info("catalog commit: %d studies", len(rows_dirs))
    return int(getattr(result, "version", 0) or 0)
