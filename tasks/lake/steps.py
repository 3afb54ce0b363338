"""Prefect tasks of the lake stage: de-identify and store a retrieved study, commit catalog rows.

Thin wrappers over :mod:`.study` and the catalog store that add retries, run names and logging.
De-identification runs in a spawn process pool so it does not share the GIL with the Storage SCP.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.catalog.store import CatalogStore
from pacsflow.tasks.core.errors import retry_if_transient
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.lake.storage import LakeStorage
from pacsflow.tasks.lake.study import StudyOutcome, process_study, read_rows
from pacsflow.tasks.pacs.models import Retrieved
from pacsflow.tasks.settings import Settings


@task(name="deidentify-study", task_run_name="deidentify-{retrieved.pseudo_uid}", persist_result=False,
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient)
def deidentify_study(retrieved: Retrieved, settings: Settings, key: bytes, rows_root: str) -> StudyOutcome:
    """De-identify every staged object, write it to the lake, extract its catalog rows."""
    logger = get_run_logger()
    args = (
        Path(retrieved.staged_dir),
        retrieved.pseudo_uid,
        Deidentifier.from_settings(key, settings.deid),
        LakeStorage(settings.storage_root),
        settings.quarantine_dir,
        Path(rows_root) / retrieved.pseudo_uid,
    )
    pool = worker_pool(settings.deid_workers)
    # In a worker process when there is one: parsing and re-encoding is CPU work that would
    # otherwise share one GIL with the Storage SCP receiving the next studies.
    outcome = pool.submit(process_study, *args).result() if pool else process_study(*args)
    if outcome.quarantined:
        logger.warning("study %s: %d objects quarantined", retrieved.pseudo_uid, len(outcome.quarantined))
    logger.info("study %s: %d objects de-identified and stored", retrieved.pseudo_uid, outcome.written)
    return outcome


@task(name="commit-catalog", persist_result=False, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def commit_catalog(rows_dirs: list[str], catalog_root: str) -> int:
    """One atomic catalog commit for a batch of studies; returns the snapshot version."""
    tables = read_rows(rows_dirs)
    result = CatalogStore(Path(catalog_root)).commit(tables)
    get_run_logger().info("catalog commit: %d studies", len(rows_dirs))
    return int(getattr(result, "version", 0) or 0)


_POOL: ProcessPoolExecutor | None = None


_POOL_LOCK = threading.Lock()


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """The run's process pool for de-identification (created on first use, ``spawn`` so no
    thread of this process is forked); None when ``workers`` is 0."""
    global _POOL
    if workers <= 0:
        return None
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        return _POOL


def shutdown_worker_pool() -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown(wait=True, cancel_futures=True)
            _POOL = None


