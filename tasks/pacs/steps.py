"""Prefect tasks of the PACS stage: thin wrappers that add retries, run names and logging over
the PACS client and the planning functions.

Tasks pass UIDs, paths and counts; never Datasets. Results are not persisted and inputs are
not hashed (NO_CACHE): a WorkItem holds an original UID that must stay in memory.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from logging import Logger, LoggerAdapter

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.tasks.core.errors import PacsflowError, error_text, retry_if_transient
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.pacs.models import (
    MissingObject,
    Objects,
    PacsPeer,
    Retrieved,
    RetrieveRoute,
    StudyInfo,
    check_complete,
)
from pacsflow.tasks.pacs.planning import Discovery, Window, WorkItem, discover
from pacsflow.tasks.pacs.receiver import StagingWriter, count_staged
from pacsflow.tasks.pacs.retrieval import OtherWay, Send, describe_refusal, retrieve_listed
from pacsflow.tasks.pacs.status import raise_for_status
from pacsflow.tasks.settings import RetrieveMethod

# The global concurrency limit on PACS associations. A run takes max_associations slots for
# its PACS phase (discovery + retrieval) and keeps at most that many associations open;
# Prefect's slot polling (~2 s per acquisition measured here) is too slow to pay per study.
PACS_LIMIT = "pacs-associations"
_OURS = 0x0000  # the status of an object our receiver refused: the PACS was not refused it


@task(name="discover-studies", persist_result=False, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_if_transient)
def discover_studies(peer: PacsPeer, window: Window | None, retry_uids: list[str]) -> Discovery:
    """Study-level C-FIND over the window, day by day (none without one); plus a by-UID look-up
    of earlier failures that lie outside the window."""
    logger = get_run_logger()
    client = PacsClient(peer)
    queries = 0

    def find(date_range: str, time_range: str | None) -> list[StudyInfo]:
        nonlocal queries
        queries += 1
        return client.find_studies(date_range, time_range)

    with client.query_session():
        found, warnings = discover(find, window, peer.pacs.result_cap) if window else ([], [])
        known = {s.study_uid for s in found}
        for uid in retry_uids:
            if uid in known:
                continue
            queries += 1
            found.extend(client.find_study(uid))
        for i, s in enumerate(found):
            if s.n_instances is None:
                queries += 1  # one series-level C-FIND
                found[i] = replace(s, n_instances=client.count_instances(s.study_uid))
    logger.info("discovered %d studies in %s (%d days, %d C-FIND requests)", len(found), window or "no window",
                len(window.days()) if window else 0, queries)
    for w in warnings:
        logger.warning(w)
    return Discovery(found, warnings, queries)


@task(name="retrieve-study", task_run_name="retrieve {item.label}", persist_result=False,
      cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient, retry_jitter_factor=0.5)
def retrieve_study(item: WorkItem, route: RetrieveRoute, writer: StagingWriter) -> Retrieved:
    """C-MOVE (into the run's Storage SCP, which stages through ``writer``) or C-GET (staged
    through ``writer`` here) one study. The PACS first lists the study's objects: only those are
    accepted, and the study is complete when each is on disk or the PACS refused to send it
    (the rest of the study goes on; the refused ones are recorded by the run)."""
    logger = get_run_logger()
    logger.info("retrieving study %s (%s, %s)", item.pseudo_uid, item.label, item.reason)
    retrieved = _retrieve(item, route, writer, logger)
    logger.info("retrieved study %s: %d objects", item.pseudo_uid, retrieved.received)
    return retrieved


@task(name="retrieve-studies", persist_result=False, cache_policy=NO_CACHE)
def retrieve_studies(items: list[WorkItem], route: RetrieveRoute, writer: StagingWriter) -> list[Retrieved | Exception]:
    """:func:`retrieve_study` for several small studies in one task run (Prefect's cost is per
    task run), one after another: each study's result, or the error that ended it, is its own.
    A study that failed here is tried again by the flow on its own, as a ``retrieve-study`` with
    that task's retries; the others are not fetched again."""
    logger = get_run_logger()
    results: list[Retrieved | Exception] = []
    for item in items:
        try:
            results.append(_retrieve(item, route, writer, logger))
        except Exception as exc:  # noqa: BLE001 - the study's own outcome; the group goes on
            logger.warning("study %s: retrieval failed (%s): %s", item.pseudo_uid, item.label, error_text(exc))
            results.append(exc)
    # One record for the group: each log record is a row the server writes.
    logger.info("retrieved %d of %d studies: %s", sum(isinstance(r, Retrieved) for r in results), len(items),
                ", ".join(f"{r.pseudo_uid} ({r.received} objects)" for r in results if isinstance(r, Retrieved)))
    return results


def _retrieve(item: WorkItem, route: RetrieveRoute, writer: StagingWriter, logger: Logger | LoggerAdapter) -> Retrieved:
    client = PacsClient(route.peer)
    send = _sender(client, route, writer, item)
    listed = client.find_instances(item.study_uid)
    folder = writer.study_dir(item.study_uid)
    if listed is None:  # the PACS lists no objects: compare counts, as the PACS reported them
        raise_for_status(send(None), _operation(route), item.pseudo_uid, route.destination)
        on_disk = count_staged(folder)
        check_complete(on_disk, item.expected, item.pseudo_uid)
        return Retrieved(item.pseudo_uid, str(folder), on_disk)
    writer.announce(item.study_uid, listed)
    other_way = _by_c_get(client, writer, item) if route.method is RetrieveMethod.C_MOVE else None
    refused = retrieve_listed(send, listed, partial(writer.settled, item.study_uid), _operation(route),
                              item.pseudo_uid, other_way=other_way, destination=route.destination)
    # Objects our receiver refused for good count as settled above: a native receiver told the
    # PACS success for them, so only the writer knows they are missing.
    refused = {**dict.fromkeys(writer.refused_for_good(listed), _OURS), **refused}
    missing = tuple(MissingObject(uid, writer.ref(uid), _why_missing(writer.refusal(uid), code))
                    for uid, code in sorted(refused.items()))
    received = count_staged(folder)
    if missing:
        logger.warning("study %s: %d of %d listed object(s) not sent by the PACS: %s", item.pseudo_uid, len(missing),
                       len(listed), "; ".join(f"{m.ref} ({m.reason})" for m in missing[:5])
                       + (" ..." if len(missing) > 5 else ""))
    unlisted = writer.unlisted(item.study_uid)
    if unlisted:
        logger.warning("study %s: refused %d object(s) the PACS had not listed", item.pseudo_uid, unlisted)
    return Retrieved(item.pseudo_uid, str(folder), received, missing, unlisted)


def _operation(route: RetrieveRoute) -> str:
    return "C-MOVE" if route.method is RetrieveMethod.C_MOVE else "C-GET"


def _sender(client: PacsClient, route: RetrieveRoute, writer: StagingWriter, item: WorkItem) -> Send:
    """One retrieve of the study, or of some of its objects, by the route's method: its final status."""
    def send(objects: Objects | None) -> int:
        what = f"{_operation(route)} for study {item.pseudo_uid}"
        if route.method is RetrieveMethod.C_MOVE:
            status = client.move(item.study_uid, objects, route.move_destination, what)[0]
            writer.settle(item.study_uid)
            return status
        return client.get(item.study_uid, objects, writer.handle_store, what)[0]

    return send


def _by_c_get(client: PacsClient, writer: StagingWriter, item: WorkItem) -> OtherWay:
    """Whether objects the PACS would not C-MOVE come by C-GET (no move destination involved)."""
    def other_way(objects: Objects) -> bool:
        try:
            client.get(item.study_uid, objects, writer.handle_store, f"C-GET probe for study {item.pseudo_uid}")
        except PacsflowError:  # no C-GET at this PACS, or no answer: it tells nothing
            return False
        return bool(writer.staged(item.study_uid, objects[1]))

    return other_way


def _why_missing(refusal: str | None, code: int) -> str:
    if refusal == "too_large":
        return "refused by our receiver: larger than receiver.max_object_mb"
    if refusal:
        return f"refused by our receiver ({refusal.replace('_', ' ')})"
    return describe_refusal(code)
