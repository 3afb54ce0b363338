"""Prefect tasks of the nightly ingest: thin wrappers that add retries, run names,
concurrency and logging over the plain modules (pacs, planning, process, catalog).

Tasks pass UIDs, paths and counts; never Datasets. Results are not persisted and inputs are
not hashed (NO_CACHE): a WorkItem holds an original UID that must stay in memory.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import shutil
import threading
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from catalog.store import CatalogStore
from tasks.deid import Deidentifier, pseudonymize_uid
from tasks.errors import is_transient
from tasks.pacs import PacsClient, StudyInfo, check_complete
from tasks.planning import Window, WorkItem, discover
from tasks.process import StudyOutcome, process_study, read_rows
from tasks.receiver import StagingWriter, count_staged
from tasks.settings import RetrieveMethod, Settings
from tasks.storage import LakeStorage

# The global concurrency limit on PACS associations. A run takes max_associations slots for
# its PACS phase (discovery + retrieval) and keeps at most that many associations open;
# Prefect's slot polling (~2 s per acquisition measured here) is too slow to pay per study.
PACS_LIMIT = "pacs-associations"


def retry_if_transient(task, task_run, state) -> bool:
    """Retry only errors that may go away (network, busy PACS, short counts)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, Prefect records the failure
        return is_transient(exc)
    return False


@task(name="discover-studies", persist_result=False, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_if_transient)
def discover_studies(settings: Settings, window: Window, retry_uids: list[str]) -> tuple[list[StudyInfo], list[str]]:
    """Study-level C-FIND over the window, day by day; plus a by-UID look-up of earlier
    failures that lie outside the window."""
    logger = get_run_logger()
    client = PacsClient(settings)
    with client.query_session():
        found, warnings = discover(client.find_studies, window, settings.pacs.result_cap)
        known = {s.study_uid for s in found}
        for uid in retry_uids:
            if uid in known:
                continue
            found.extend(client.find_study(uid))
        for i, s in enumerate(found):
            if s.n_instances is None:
                found[i] = StudyInfo(s.study_uid, s.study_date, client.count_instances(s.study_uid), s.n_series,
                                     s.modalities)
    logger.info("discovered %d studies in %s..%s (%d days)", len(found), window.start, window.end,
                len(window.days()))
    for w in warnings:
        logger.warning(w)
    return found, warnings


@dataclass(frozen=True)
class Retrieved:
    pseudo_uid: str
    staged_dir: str
    received: int


@task(name="retrieve-study", task_run_name="retrieve-{item.pseudo_uid}", persist_result=False,
      cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient, retry_jitter_factor=0.5)
def retrieve_study(item: WorkItem, settings: Settings, key: bytes) -> Retrieved:
    """C-MOVE (into the flow's Storage SCP) or C-GET one study; complete only when every
    instance the PACS reported is on disk."""
    logger = get_run_logger()
    client = PacsClient(settings)
    folder = settings.staging_dir / item.pseudo_uid
    if settings.retrieve_method is RetrieveMethod.C_MOVE:
        ops = client.move_study(item.study_uid, settings.receiver.ae_title, item.pseudo_uid)
    else:
        writer = StagingWriter(settings.staging_dir, partial(pseudonymize_uid, key))
        ops = client.get_study(item.study_uid, writer.handle_store, item.pseudo_uid)
    received = count_staged(folder)
    check_complete(received, item.expected, item.pseudo_uid)
    logger.info("retrieved study %s: %d instances (%d sub-ops completed)", item.pseudo_uid, received, ops.completed)
    return Retrieved(item.pseudo_uid, str(folder), received)


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


def purge_staging(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def today() -> dt.date:
    return dt.date.today()
