"""Cutting a night's (or a backfill's) work into shards that separate flow runs can take on.

Plain code: no Prefect, no sockets, no database. A shard is the studies of one StudyDate day,
cut further into parts of at most ``max_studies`` when the day holds more, of one PACS. Its key
names the PACS, the day and the part only ("2026-11-30", "2026-11-30.2of3"; "undated" for studies
without a usable date; "b/2026-11-30" for the named source ``b`` of ``settings.sources``, while the
PACS in ``settings.pacs`` keeps the bare keys), so it may appear in run names and parameters; the
study UIDs it holds are originals and stay in the state database (PHI zone).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Protocol

from pacsflow.tasks.core.clock import parse_dicom_date
from pacsflow.tasks.ingest.leases import ShardProgress
from pacsflow.tasks.ingest.ledger import WATERMARK, LedgerEntry

UNDATED = "undated"
SOURCE_SEP = "/"  # never in a source name (settings.SOURCE_NAME) nor in a day's key


class DatedStudy(Protocol):
    """What a shard is cut by: a C-FIND answer (StudyInfo) or a work item (WorkItem)."""

    @property
    def study_uid(self) -> str: ...

    @property
    def study_date(self) -> str: ...


@dataclass(frozen=True)
class ShardPlan:
    key: str
    day: dt.date | None
    study_uids: tuple[str, ...]  # originals: PHI zone only


def shard_key(day: dt.date | None, part: int = 1, parts: int = 1, source: str | None = None) -> str:
    """``source``: the named PACS the shard's studies come from (None: the one in ``settings.pacs``)."""
    base = day.isoformat() if day is not None else UNDATED
    base = base if source is None else f"{source}{SOURCE_SEP}{base}"
    return base if parts == 1 else f"{base}.{part}of{parts}"


def source_of(key: str) -> str | None:
    """The named source whose PACS holds a shard's studies (``settings.for_source`` takes it);
    None: the PACS in ``settings.pacs``."""
    source, sep, _ = key.partition(SOURCE_SEP)
    return source if sep else None


def watermark_name(source: str | None) -> str:
    """The ledger's state row of a source's watermark: the default PACS keeps the one a single
    PACS always had, so a deployment that adds a source keeps its own."""
    return WATERMARK if source is None else f"{WATERMARK}:{source}"


def cut_shards(studies: Iterable[DatedStudy], max_studies: int, source: str | None = None) -> list[ShardPlan]:
    """One shard per day, in day order (undated last); a day of more than ``max_studies`` studies
    is cut into that many even parts. The same answer from the PACS always cuts the same way
    (studies sorted by UID), so planning again names the same shards. ``source``: the named PACS
    that gave the answer (in the keys)."""
    if max_studies < 1:
        raise ValueError("shard_max_studies must be at least 1")
    by_day: dict[dt.date | None, set[str]] = defaultdict(set)
    for study in studies:
        by_day[parse_dicom_date(study.study_date)].add(study.study_uid)
    plans: list[ShardPlan] = []
    for day in sorted(by_day, key=lambda d: (d is None, d or dt.date.min)):
        uids = sorted(by_day[day])
        parts = math.ceil(len(uids) / max_studies)
        size = math.ceil(len(uids) / parts)
        for part in range(parts):
            chunk = tuple(uids[part * size : (part + 1) * size])
            plans.append(ShardPlan(shard_key(day, part + 1, parts, source), day, chunk))
    return plans


def shard_watermark(window_end: dt.date, unfinished_days: Iterable[dt.date | None]) -> dt.date:
    """Where the watermark may go once the shards are run: over every day whose shards are all
    done, and no further than the first day that still has an unfinished shard (the next
    window, the watermark minus the overlap, covers it again). Undated shards hold nothing:
    their studies are retried by UID, as a single run does (``bookkeeping.next_watermark``, on
    dates rather than study records)."""
    return min([window_end, *(d for d in unfinished_days if d is not None)])


def source_watermarks(window_ends: Mapping[str | None, dt.date],
                      unfinished: Iterable[ShardProgress]) -> dict[str | None, dt.date]:
    """:func:`shard_watermark` of each planned source (``window_ends``: source -> its window's last
    day): a source's unfinished shards hold its own watermark, never another's."""
    days: dict[str | None, list[dt.date | None]] = defaultdict(list)
    for p in unfinished:
        days[source_of(p.shard)].append(p.day)
    return {source: shard_watermark(end, days[source]) for source, end in window_ends.items()}


# Prefect state types (their names), as plain strings: a run in one of these will not work on its shard again.
ENDED = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
# A worker has taken the run: past these, a live run holds leases on its shard's studies.
TAKEN = frozenset({"PENDING", "RUNNING"})


class RunSeen(NamedTuple):
    """A shard's newest flow run as the server reports it: its state type, and for how long."""

    state: str
    for_s: float


@dataclass(frozen=True)
class ShardStart:
    """A shard the planner starts a flow run for, and why: ``new`` (no run yet), ``gone`` (its run
    is unknown to the server), ``failed``/``crashed``/``cancelled``/``completed`` (its run ended with
    studies left), ``stale`` (its run looks taken by a worker but holds no lease)."""

    shard: str
    why: str


def shards_to_start(progress: Iterable[ShardProgress], runs: Mapping[str, RunSeen | None],
                    lease_s: float) -> list[ShardStart]:
    """Which unfinished shards get a (new) flow run. ``runs``: shard -> its newest flow run (None:
    the server does not know it); a shard absent never had one. A run that ended while some of
    its studies are still leased waits for the leases (a second run would find nothing to
    claim). A run still PENDING or RUNNING is left alone while it holds a lease; without one, it
    is stale once a lease it took ran out, or once it has been in that state longer than a lease
    lasts (a live run claims as it starts): what a killed worker and its flow-run process leave
    behind. A run waiting for a worker (SCHEDULED, LATE) is left alone."""
    starts = []
    for p in progress:
        if p.finished:
            continue
        if p.shard not in runs:
            starts.append(ShardStart(p.shard, "new"))
            continue
        run = runs[p.shard]
        if run is None:
            starts.append(ShardStart(p.shard, "gone"))
        elif run.state in ENDED:
            if p.held == 0:
                starts.append(ShardStart(p.shard, run.state.lower()))
        elif run.state in TAKEN and p.held == 0 and (p.expired > 0 or run.for_s > lease_s):
            starts.append(ShardStart(p.shard, "stale"))
    return starts


def settled_claims(claimed: Iterable[str], planned: Iterable[str],
                   ledger: Mapping[str, LedgerEntry]) -> tuple[list[str], list[str]]:
    """After a shard run: which of its claimed studies are done, and which go back unfinished.
    Done: what it did not plan (cataloged already with the PACS's count, or gone from the PACS),
    what it cataloged, and what failed for good; a transient failure goes back, for a later run."""
    worked_on = set(planned)
    done: list[str] = []
    back: list[str] = []
    for uid in claimed:
        entry = ledger.get(uid)
        finished = entry is not None and (entry.status == "cataloged" or entry.permanent)
        (done if uid not in worked_on or finished else back).append(uid)
    return done, back
