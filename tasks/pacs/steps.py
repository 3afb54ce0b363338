"""Prefect tasks of the PACS stage: thin wrappers that add retries, run names and logging over
the PACS client and the planning functions.

Tasks pass UIDs, paths and counts; never Datasets. Results are not persisted and inputs are
not hashed (NO_CACHE): a WorkItem holds an original UID that must stay in memory.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.tasks.core.errors import retry_if_transient
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.pacs.models import PacsPeer, Retrieved, RetrieveRoute, StudyInfo, check_complete
from pacsflow.tasks.pacs.planning import Discovery, Window, WorkItem, discover
from pacsflow.tasks.pacs.receiver import StagingWriter, count_staged
from pacsflow.tasks.settings import RetrieveMethod

# The global concurrency limit on PACS associations. A run takes max_associations slots for
# its PACS phase (discovery + retrieval) and keeps at most that many associations open;
# Prefect's slot polling (~2 s per acquisition measured here) is too slow to pay per study.
PACS_LIMIT = "pacs-associations"


@task(name="discover-studies", persist_result=False, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_if_transient)
def discover_studies(peer: PacsPeer, window: Window, retry_uids: list[str]) -> Discovery:
    """Study-level C-FIND over the window, day by day; plus a by-UID look-up of earlier
    failures that lie outside the window."""
    logger = get_run_logger()
    client = PacsClient(peer)
    queries = 0

    def find(date_range: str, time_range: str | None) -> list[StudyInfo]:
        nonlocal queries
        queries += 1
        return client.find_studies(date_range, time_range)

    with client.query_session():
        found, warnings = discover(find, window, peer.pacs.result_cap)
        known = {s.study_uid for s in found}
        for uid in retry_uids:
            if uid in known:
                continue
            queries += 1
            found.extend(client.find_study(uid))
        for i, s in enumerate(found):
            if s.n_instances is None:
                queries += 1  # one series-level C-FIND
                found[i] = StudyInfo(s.study_uid, s.study_date, client.count_instances(s.study_uid), s.n_series,
                                     s.modalities)
    logger.info("discovered %d studies in %s..%s (%d days, %d C-FIND requests)", len(found), window.start,
                window.end, len(window.days()), queries)
    for w in warnings:
        logger.warning(w)
    return Discovery(found, warnings, queries)


@task(name="retrieve-study", task_run_name="retrieve-{item.pseudo_uid}", persist_result=False,
      cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient, retry_jitter_factor=0.5)
def retrieve_study(item: WorkItem, route: RetrieveRoute, writer: StagingWriter) -> Retrieved:
    """C-MOVE (into the run's Storage SCP, which stages through ``writer``) or C-GET (staged
    through ``writer`` here) one study; complete only when every instance the PACS reported is
    on disk."""
    logger = get_run_logger()
    client = PacsClient(route.peer)
    if route.method is RetrieveMethod.C_MOVE:
        ops = client.move_study(item.study_uid, route.move_destination, item.pseudo_uid)
    else:
        ops = client.get_study(item.study_uid, writer.handle_store, item.pseudo_uid)
    folder = writer.study_dir(item.study_uid)
    received = count_staged(folder)
    check_complete(received, item.expected, item.pseudo_uid)
    logger.info("retrieved study %s: %d instances (%d sub-ops completed)", item.pseudo_uid, received, ops.completed)
    return Retrieved(item.pseudo_uid, str(folder), received)
