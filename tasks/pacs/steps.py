"""Prefect tasks of the nightly ingest: thin wrappers that add retries, run names,
concurrency and logging over the plain modules (pacs, planning, process, catalog).

Tasks pass UIDs, paths and counts; never Datasets. Results are not persisted and inputs are
not hashed (NO_CACHE): a WorkItem holds an original UID that must stay in memory.
"""

from __future__ import annotations

from functools import partial

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.tasks.deid.deidentifier import pseudonymize_uid
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.pacs.models import StudyInfo, check_complete
from pacsflow.tasks.pacs.planning import Window, WorkItem, discover
from pacsflow.tasks.pacs.receiver import StagingWriter, count_staged
from pacsflow.tasks.settings import RetrieveMethod, Settings

from pacsflow.tasks.core.errors import retry_if_transient
from pacsflow.tasks.pacs.models import Retrieved
# The global concurrency limit on PACS associations. A run takes max_associations slots for
# its PACS phase (discovery + retrieval) and keeps at most that many associations open;
# Prefect's slot polling (~2 s per acquisition measured here) is too slow to pay per study.
PACS_LIMIT = "pacs-associations"


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


