"""What to query and what to retrieve: pure functions, no Prefect, no sockets."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from tasks.ledger import LedgerEntry
from tasks.pacs import StudyInfo

DAY_SECONDS = 24 * 3600
MIN_SLICE_SECONDS = 60


@dataclass(frozen=True)
class Window:
    start: dt.date
    end: dt.date

    def days(self) -> list[dt.date]:
        n = (self.end - self.start).days
        return [self.start + dt.timedelta(days=i) for i in range(n + 1)]


def plan_window(
    *,
    watermark: dt.date | None,
    overlap_days: int,
    initial_since: dt.date,
    since: dt.date | None = None,
    until: dt.date | None = None,
    today: dt.date | None = None,
) -> Window:
    """The StudyDate window of a run: from the watermark minus the overlap (or ``since``,
    for backfills and replays) to ``until`` (default today)."""
    end = until or today or dt.date.today()
    if since is not None:
        start = since
    elif watermark is not None:
        start = watermark - dt.timedelta(days=overlap_days)
    else:
        start = initial_since
    if start > end:
        raise ValueError(f"window start {start} is after its end {end}")
    return Window(start, end)


def _fmt_time(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def discover(
    find: Callable[[str, str | None], list[StudyInfo]],
    window: Window,
    cap: int,
    on_day: Callable[[dt.date, int], None] | None = None,
) -> tuple[list[StudyInfo], list[str]]:
    """C-FIND one day at a time; a day (or time slice) whose answer reaches the PACS's cap is
    split by StudyTime until it fits. A range query over many years would hit the cap first.

    Returns the studies (deduplicated by UID) and warnings for slices that stayed capped.
    """
    found: dict[str, StudyInfo] = {}
    warnings: list[str] = []

    def query(day: str, lo: int | None, hi: int | None) -> None:
        time_range = None if lo is None else f"{_fmt_time(lo)}-{_fmt_time(hi)}"
        answer = find(day, time_range)
        capped = cap > 0 and len(answer) >= cap
        if capped:
            lo_, hi_ = (0, DAY_SECONDS - 1) if lo is None else (lo, hi)
            if hi_ - lo_ >= MIN_SLICE_SECONDS:
                mid = (lo_ + hi_) // 2
                query(day, lo_, mid)
                query(day, mid + 1, hi_)
                return
            warnings.append(f"{day} {time_range}: still {len(answer)} results at the PACS cap; some may be missing")
        for s in answer:
            found.setdefault(s.study_uid, s)

    for day in window.days():
        before = len(found)
        query(day.strftime("%Y%m%d"), None, None)
        if on_day:
            on_day(day, len(found) - before)
    return list(found.values()), warnings


@dataclass(frozen=True)
class WorkItem:
    """One study to retrieve. ``study_uid`` is the original (PHI zone); ``pseudo_uid`` names
    it everywhere else (run names, logs, artifacts, paths)."""

    study_uid: str
    pseudo_uid: str
    study_date: str
    expected: int | None
    reason: str  # new | grew | retry

    def __repr__(self) -> str:  # keep the original UID out of reprs that end up in logs
        return f"WorkItem({self.pseudo_uid}, {self.reason}, expected={self.expected})"


def worklist(
    studies: Iterable[StudyInfo],
    ledger: Mapping[str, LedgerEntry],
    pseudo: Callable[[str], str],
) -> list[WorkItem]:
    """New studies, studies that grew since we cataloged them, and earlier failures.

    A study that failed permanently is retried only when the PACS reports a different
    instance count (something changed); otherwise it stays quarantined until an operator
    asks for it.
    """
    items = []
    for s in studies:
        entry = ledger.get(s.study_uid)
        if entry is None:
            reason = "new"
        elif entry.status == "failed":
            if entry.permanent and entry.instances == s.n_instances:
                continue
            reason = "retry"
        elif s.n_instances is not None and (entry.instances is None or s.n_instances > entry.instances):
            reason = "grew"
        else:
            continue
        items.append(WorkItem(s.study_uid, pseudo(s.study_uid), s.study_date, s.n_instances, reason))
    items.sort(key=lambda w: (w.study_date, w.pseudo_uid))
    return items
