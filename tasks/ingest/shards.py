"""Cutting a night's (or a backfill's) work into shards that separate flow runs can take on.

Plain code: no Prefect, no sockets, no database. A shard is the studies of one StudyDate day,
cut further into parts of at most ``max_studies`` when the day holds more. Its key names the day
and the part only ("2026-11-30", "2026-11-30.2of3"; "undated" for studies without a usable
date), so it may appear in run names and parameters; the study UIDs it holds are originals and
stay in the state database (PHI zone).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from pacsflow.tasks.core.clock import parse_dicom_date
from pacsflow.tasks.pacs.models import StudyInfo

UNDATED = "undated"


@dataclass(frozen=True)
class ShardPlan:
    key: str
    day: dt.date | None
    study_uids: tuple[str, ...]  # originals: PHI zone only


def shard_key(day: dt.date | None, part: int = 1, parts: int = 1) -> str:
    base = day.isoformat() if day is not None else UNDATED
    return base if parts == 1 else f"{base}.{part}of{parts}"


def cut_shards(studies: Iterable[StudyInfo], max_studies: int) -> list[ShardPlan]:
    """One shard per day, in day order (undated last); a day of more than ``max_studies`` studies
    is cut into that many even parts. The same answer from the PACS always cuts the same way
    (studies sorted by UID), so planning again names the same shards."""
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
            plans.append(ShardPlan(shard_key(day, part + 1, parts), day, chunk))
    return plans


def shard_watermark(window_end: dt.date, unfinished_days: Iterable[dt.date | None]) -> dt.date:
    """Where the watermark may go once the shards are run: over every day whose shards are all
    done, and no further than the first day that still has an unfinished shard (the next
    window, the watermark minus the overlap, covers it again). Undated shards hold nothing:
    their studies are retried by UID, as a single run does (``bookkeeping.next_watermark``, on
    dates rather than study records)."""
    return min([window_end, *(d for d in unfinished_days if d is not None)])
