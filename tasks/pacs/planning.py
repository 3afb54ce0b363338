"""What to query and what to retrieve: pure functions, no Prefect, no sockets."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from pacsflow.tasks.ingest.ledger import LedgerEntry
from pacsflow.tasks.pacs.models import StudyInfo

DAY_SECONDS = 24 * 3600
MIN_SLICE_SECONDS = 60


@dataclass(frozen=True)
class Window:
    start: dt.date
    end: dt.date

    def __str__(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}"

    def days(self) -> list[dt.date]:
        n = (self.end - self.start).days
        return [self.start + dt.timedelta(days=i) for i in range(n + 1)]


def plan_window(
    *,
    watermark: dt.date | None,
    overlap_days: int,
    initial_since: dt.date | None,
    initial_days: int = 30,
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
    elif initial_since is not None:
        start = initial_since
    else:
        start = end - dt.timedelta(days=initial_days)
    if start > end:
        raise ValueError(f"window start {start} is after its end {end}")
    return Window(start, end)


def _fmt_time(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def discover(
    find: Callable[[str, str | None], list[StudyInfo]],
    window: Window,
    cap: int | None,
    on_day: Callable[[dt.date, int], None] | None = None,
) -> tuple[list[StudyInfo], list[str]]:
    """Find every study in the window on a PACS that may cap its C-FIND answers.

    ``cap``: None when the PACS's limit is unknown: ask one day at a time (the safe default);
    0 when it has none: ask for the whole window at once; N: ask for the whole window and
    bisect any date range whose answer reaches N. A single day that is still capped is split
    by StudyTime down to one minute. An answer the PACS marks as capped (final status Cancel
    after pending results, as Orthanc does) is treated the same whatever ``cap`` says.

    Returns the studies (deduplicated by UID) and warnings for slices that stayed capped.
    """
    found: dict[str, StudyInfo] = {}
    warnings: list[str] = []

    def is_capped(answer: list[StudyInfo]) -> bool:
        return bool(getattr(answer, "capped", False)) or (bool(cap) and len(answer) >= cap)  # type: ignore[operator]

    def query_day_time(day: str, span: tuple[int, int] | None) -> None:
        """One day, or a StudyTime slice of it (seconds since midnight, inclusive)."""
        time_range = None if span is None else f"{_fmt_time(span[0])}-{_fmt_time(span[1])}"
        answer = find(day, time_range)
        if is_capped(answer):
            lo, hi = span or (0, DAY_SECONDS - 1)
            if hi - lo >= MIN_SLICE_SECONDS:
                mid = (lo + hi) // 2
                query_day_time(day, (lo, mid))
                query_day_time(day, (mid + 1, hi))
                return
            warnings.append(f"{day} {time_range}: still {len(answer)} results at the PACS cap; some may be missing")
        for s in answer:
            found.setdefault(s.study_uid, s)

    def query_days(lo: dt.date, hi: dt.date) -> None:
        if lo == hi:
            before = len(found)
            query_day_time(lo.strftime("%Y%m%d"), None)
            if on_day:
                on_day(lo, len(found) - before)
            return
        answer = find(f"{lo:%Y%m%d}-{hi:%Y%m%d}", None)
        if is_capped(answer):
            mid = lo + (hi - lo) // 2
            query_days(lo, mid)
            query_days(mid + dt.timedelta(days=1), hi)
            return
        for s in answer:
            found.setdefault(s.study_uid, s)

    if cap is None:
        for day in window.days():
            query_days(day, day)
    else:
        query_days(window.start, window.end)
    return list(found.values()), warnings


@dataclass(frozen=True)
class Discovery:
    """What the PACS reported for a window: the studies, warnings for slices that stayed capped,
    and what it cost (C-FIND requests, cap splitting included)."""

    found: list[StudyInfo]
    warnings: list[str]
    queries: int


@dataclass(frozen=True)
class WorkItem:
    """One study to retrieve. ``study_uid`` and ``study_date`` are originals (PHI zone);
    ``pseudo_uid`` names it everywhere else (logs, artifacts, paths), and ``label`` in task run
    names, with the date as de-identified (``shifted_date``)."""

    study_uid: str
    pseudo_uid: str
    study_date: str
    expected: int | None
    reason: str  # new | grew | retry | missing
    modalities: tuple[str, ...] = ()
    shifted_date: str = ""  # YYYYMMDD as the lake has it; empty when de-identification removes dates

    def __repr__(self) -> str:  # keep the original UID out of reprs that end up in logs
        return f"WorkItem({self.pseudo_uid}, {self.reason}, expected={self.expected})"

    @property
    def short_ref(self) -> str:
        """8 hex digits of a hash of the pseudonymous UID: short enough for a timeline bar."""
        return hashlib.sha256(self.pseudo_uid.encode()).hexdigest()[:8]

    @property
    def label(self) -> str:
        """``CT/SR 2019-03-04 1a2b3c4d``: modalities, the de-identified study date, ``short_ref``."""
        d = self.shifted_date
        day = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) >= 8 and d[:8].isdigit() else ""
        return " ".join(p for p in ("/".join(self.modalities), day, self.short_ref) if p)


def worklist(
    studies: Iterable[StudyInfo],
    ledger: Mapping[str, LedgerEntry],
    pseudo: Callable[[str], str],
    shifted_date: Callable[[StudyInfo], str] = lambda s: "",
) -> list[WorkItem]:
    """New studies, studies that grew since we cataloged them, earlier failures, and cataloged
    studies with objects the PACS did not send (until those are given up). ``shifted_date``: a
    study's date as de-identification leaves it (for names; never the original).

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
        elif entry.missing:
            reason = "missing"  # the PACS did not send some objects last time: ask again
        else:
            continue
        items.append(WorkItem(s.study_uid, pseudo(s.study_uid), s.study_date, s.n_instances, reason,
                              s.modalities, shifted_date(s)))
    items.sort(key=lambda w: (w.study_date, w.pseudo_uid))
    return items
