"""The ingest-shard flow: the studies of one shard that the ``plan`` flow cut (a StudyDate day, or
part of one), retrieved, de-identified, cataloged and marked, on whichever worker of the pool
takes the run.

The shard key is the only parameter (no PHI); its studies are in the leases table (PHI zone), and
its PACS is the one the key names (``b/2026-11-01``: ``settings.sources['b']``; no name: ``pacs``),
for the C-FIND of its studies' counts and their retrieval alike. The run claims every unheld study
of the shard and renews the leases while it works, so a second run of the same shard finds nothing
to do, and the studies of a run that dies become claimable once its leases run out. A study
already cataloged with its PACS's instance count is skipped (the ledger says so). PACS slots are
taken per C-FIND and per retrieval task, one each, so runs on several workers share
``max_associations`` (one limit over every PACS). The watermark is the planner's to move.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import uuid
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger

from pacsflow.flows.concurrency import hold_slots
from pacsflow.flows.nightly import (
    Logger,
    Progress,
    RunParts,
    check_free_space,
    commit,
    discover_work,
    final_state,
    open_run,
    recording_interruption,
    retrieve_and_deidentify,
    run_summarised,
    tidy,
)
from pacsflow.flows.migrate import migration_gate
from pacsflow.flows.secrets import load_run_settings
from pacsflow.tasks.core.errors import PermanentError
from pacsflow.tasks.deid.manifest import object_id
from pacsflow.tasks.ingest.bookkeeping import RunBook
from pacsflow.tasks.ingest.leases import Leases
from pacsflow.tasks.ingest.shards import settled_claims, source_of
from pacsflow.tasks.pacs.planning import Window
from pacsflow.tasks.pacs.steps import PACS_LIMIT
from pacsflow.tasks.pacs.tls import check_tls_files
from pacsflow.tasks.settings import Settings

CLAIM_ALL = 1_000_000  # a shard's studies are claimed at once: the shard is the unit of work


class UnknownShard(PermanentError):
    """The leases table has no such shard: a run started by hand with a wrong key."""

    reason = "unknown-shard"


@flow(name="ingest-shard", flow_run_name="ingest-shard {shard}", log_prints=False, persist_result=False)
def ingest_shard(shard: str) -> Any:
    """Retrieve, de-identify and catalog the studies of ``shard`` (a key of the leases table)."""
    logger = get_run_logger()
    summary = run_summarised(lambda parts: shard_steps(load_run_settings(), parts, shard, logger), logger,
                             "ingest-shard")
    return final_state(summary, summary.as_dict())


def worker_settings(settings: Settings) -> Settings:
    """``settings`` with this worker's receiver (``shards.worker``: its AE title and port)."""
    return settings.model_copy(update={"receiver": settings.shards.receiver_of(settings.receiver)})


def claimant_name(settings: Settings) -> str:
    """Unique per process: renew, release and done act only on this name's claims."""
    worker = "-" if settings.shards.worker is None else str(settings.shards.worker)
    return f"{socket.gethostname()}/{worker}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def shard_steps(settings: Settings, parts: RunParts, shard: str, logger: Logger) -> None:
    """claim → C-FIND the shard's day (and the rest by UID) → worklist → retrieve + de-identify →
    commit → ledger → leases done (or given back)."""
    settings = parts.settings = worker_settings(settings).for_source(source_of(shard))
    check_free_space(settings)
    check_tls_files(settings)
    run = parts.run = open_run(settings, parts.run_id)
    leases = Leases.under(settings.state_root, settings.state.url)
    known = {p.shard: p for p in leases.shards()}
    if shard not in known:
        raise UnknownShard(f"no shard {shard!r} in the leases table (plan cuts them)")
    day = known[shard].day
    window = Window(day, day) if day else None
    book = parts.book = RunBook(run.ledger, run.run_id, window or Window(dt.date.today(), dt.date.today()),
                                max_attempts=settings.max_attempts, object_id=partial(object_id, run.key))
    worker, lease_s = claimant_name(settings), settings.shards.lease_s
    claimed = leases.claim(worker, CLAIM_ALL, lease_s, shard=shard)
    logger.info("shard %s: %d of %d studies claimed (%d done, %d held by others)", shard, len(claimed),
                known[shard].studies, known[shard].done, known[shard].held)
    if not claimed:
        return
    slot = slot_of(settings, run.run_id, logger)
    with renewing(leases, worker, claimed, lease_s, logger), _giving_back(leases, worker, claimed):
        with slot(len(claimed)):
            items = discover_work(settings, run, window, book, logger, only=claimed)
        progress = Progress("ingest-shard-progress", len(items))
        with recording_interruption(book, logger):
            # One retrieval at a time: a run that held a slot while it waited for a second would,
            # with other shards doing the same, hold every slot while none could start (the slot
            # of a finished retrieval comes back only once the loop looks at it again).
            one_at_a_time = settings.model_copy(update={"max_associations": 1})
            retrieve_and_deidentify(one_at_a_time, run, items, book, progress, slot=slot)
        commit(settings, run, book)
        progress.finish()
        for item, verdict in book.settle(watermark=False):
            logger.warning("study %s (%s) failed (%s): %s", item.pseudo_uid, item.label,
                           "permanent" if verdict.permanent else "transient", verdict.reason)
        done, back = settled_claims(claimed, [i.study_uid for i in items], run.ledger.entries(claimed))
        leases.done(worker, done)
        logger.info("shard %s: %d studies done, %d given back for a later run", shard, len(done), len(back))
    tidy(settings, run, book)


@contextmanager
def renewing(leases: Leases, worker: str, study_uids: list[str], lease_s: float, logger: Logger) -> Iterator[None]:
    """Renew ``worker``'s leases every third of ``lease_s`` while the block runs (a thread: a
    process that dies renews nothing)."""
    stopped = threading.Event()

    def renew() -> None:
        while not stopped.wait(lease_s / 3):
            try:
                leases.renew(worker, study_uids, lease_s)
            except Exception as exc:  # noqa: BLE001 - the next renewal may pass; a lost lease is the cost
                logger.warning("lease renewal failed (%s)", type(exc).__name__)

    thread = threading.Thread(target=renew, daemon=True, name="shard-leases")
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join(timeout=30)


@contextmanager
def _giving_back(leases: Leases, worker: str, study_uids: list[str]) -> Iterator[None]:
    """Whatever of ``study_uids`` is not done when the block ends (failed, interrupted) is released:
    claimable at once by the next run of the shard, rather than after the lease."""
    try:
        yield
    finally:
        leases.release(worker, study_uids)


def slot_of(settings: Settings, run_id: str, logger: Logger, *,
            gated: bool = True) -> Callable[[int], AbstractContextManager]:
    """``slot(studies)``: one slot of the global PACS limit (of ``max_associations`` slots) per
    use, taken once a migration's gate lets that many studies go (:func:`migration_gate`: its
    window, pause and rate; nothing when no migration is configured). A closed window or a pause
    ends the shard run with its studies given back: the next plan starts it again in the window.
    ``gated=False``: the slot only (the plan's C-FIND, which ``migrate-run`` gates itself)."""

    @contextmanager
    def slot(studies: int = 1) -> Iterator[None]:
        if gated:
            migration_gate(studies, settings=settings)
        with hold_slots(PACS_LIMIT, 1, run_id=run_id, max_wait_s=settings.slot_wait_s, logger=logger,
                        size=settings.max_associations):
            yield

    return slot
