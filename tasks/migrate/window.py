"""When a migration may talk to the legacy PACS: a daily time window, optionally all weekend.

A legacy PACS serves its hospital by day; a migration takes what it can spare at night. The
window is local wall-clock time, the PACS's: ``19:00-06:00`` runs over midnight, ``00:00-24:00``
(or ``always``) is always open. With ``weekends``, Saturday and Sunday are open all day.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

MINUTES_A_DAY = 24 * 60


class WindowError(ValueError):
    pass


def _minutes(text: str) -> int:
    try:
        hours, minutes = (int(p) for p in text.split(":"))
    except ValueError:
        raise WindowError(f"migrate window: {text!r} is not HH:MM") from None
    value = hours * 60 + minutes
    if not (0 <= hours <= 24 and 0 <= minutes < 60 and value <= MINUTES_A_DAY):
        raise WindowError(f"migrate window: {text!r} is not a time of day")
    return value


@dataclass(frozen=True)
class MigrationWindow:
    start: int  # minutes after midnight
    end: int
    weekends: bool = False

    @classmethod
    def parse(cls, text: str, *, weekends: bool = False) -> "MigrationWindow":
        """``HH:MM-HH:MM`` (or ``always``)."""
        if text.strip().lower() == "always":
            return cls(0, MINUTES_A_DAY, weekends)
        first, sep, second = text.strip().partition("-")
        if not sep:
            raise WindowError(f"migrate window: {text!r} is not HH:MM-HH:MM")
        start, end = _minutes(first), _minutes(second)
        if start == end:
            raise WindowError(f"migrate window: {text!r} is empty (use 00:00-24:00 for always)")
        return cls(start, end, weekends)

    def is_open(self, at: dt.datetime) -> bool:
        if self.weekends and at.weekday() >= 5:
            return True
        now = at.hour * 60 + at.minute
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end  # over midnight

    def next_change(self, at: dt.datetime) -> dt.datetime:
        """The next minute at which the window opens or closes (for a run waiting on it)."""
        probe = at.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        state = self.is_open(at)
        for _ in range(8 * MINUTES_A_DAY):  # a week and a day covers every weekly pattern
            if self.is_open(probe) != state:
                return probe
            probe += dt.timedelta(minutes=1)
        return probe  # always open (or never): no change ahead

    def __str__(self) -> str:
        text = f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        return text + (" and weekends" if self.weekends else "")
