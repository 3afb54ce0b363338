"""Whether a migration may talk to the legacy PACS now: its window, its pace, paused or not.

Plain code. The operator's choices (``pacsflow migrate run|pause|resume``) are one
:class:`MigrationConfig`, kept in the state database (:mod:`pacsflow.tasks.migrate.store`) so that
every worker reads the same one; :func:`decide` turns it and a clock reading into go or wait.
The errors say why a shard must stop: both are transient (the window opens again, an operator
resumes), but a shard should stop and leave its studies to the next plan, not retry in seconds.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, replace

from pacsflow.tasks.core.errors import TransientError
from pacsflow.tasks.migrate.window import MigrationWindow


class MigrationHeld(TransientError):
    """The migration may not talk to the PACS now; the next plan run tries again."""

    reason = "migration-held"


class MigrationWindowClosed(MigrationHeld):
    reason = "migration-window-closed"


class MigrationPaused(MigrationHeld):
    reason = "migration-paused"


@dataclass(frozen=True)
class MigrationConfig:
    """``window`` as ``MigrationWindow.parse`` reads it; ``rate_per_min``: studies a minute over all
    workers (None: no limit but the PACS associations)."""

    window: str = "always"
    weekends: bool = False
    rate_per_min: float | None = None
    paused: bool = False

    def __post_init__(self) -> None:
        MigrationWindow.parse(self.window, weekends=self.weekends)  # WindowError (a ValueError) if malformed
        if self.rate_per_min is not None and self.rate_per_min <= 0:
            raise ValueError("migrate: the rate must be a positive number of studies a minute")

    @property
    def parsed_window(self) -> MigrationWindow:
        return MigrationWindow.parse(self.window, weekends=self.weekends)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MigrationConfig:
        data = json.loads(text)
        return cls(str(data["window"]), bool(data["weekends"]), data.get("rate_per_min"), bool(data["paused"]))

    def paused_as(self, paused: bool) -> MigrationConfig:
        return replace(self, paused=paused)

    def describe(self) -> str:
        rate = f", at most {self.rate_per_min:g} studies a minute" if self.rate_per_min else ""
        return f"window {self.parsed_window}{rate}{' (paused)' if self.paused else ''}"


@dataclass(frozen=True)
class Decision:
    go: bool
    status: str  # "open", "paused" or "window closed until HH:MM"

    def raise_if_held(self) -> None:
        if self.go:
            return
        kind = MigrationPaused if self.status == "paused" else MigrationWindowClosed
        raise kind(f"migration {self.status}: no retrieval now (pacsflow migrate status)")


def decide(config: MigrationConfig, now: dt.datetime) -> Decision:
    """``now`` is the PACS's local wall-clock time."""
    if config.paused:
        return Decision(False, "paused")
    window = config.parsed_window
    if window.is_open(now):
        return Decision(True, "open")
    opens = window.next_change(now)
    day = "" if opens.date() == now.date() else f" on {opens:%a %Y-%m-%d}"
    return Decision(False, f"window closed until {opens:%H:%M}{day}")


def window_hours_a_day(config: MigrationConfig | None) -> float:
    """The window's average open hours a day over a week (24 without a migration configured)."""
    if config is None:
        return 24.0
    window = config.parsed_window
    monday = dt.datetime(2026, 11, 30)  # any Monday: the pattern repeats weekly
    minutes = sum(window.is_open(monday + dt.timedelta(minutes=m)) for m in range(7 * 24 * 60))
    return max(minutes / 60 / 7, 1 / 60)
