"""The run history: one row of counts per finished run, for the run report's trend charts.

Counts only (no UIDs, no dates of studies): the run's id, when it ran, its window, the
:class:`~pacsflow.tasks.ingest.bookkeeping.RunSummary` counters and what it cataloged by modality.
SQLite under ``state_root`` (created owner-only like every file there). The counters are kept
as one JSON object, so a counter added to the summary later needs no schema change and old rows
simply lack it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from pacsflow.catalog.views import Catalog, query
from pacsflow.tasks.core.clock import utc_now
from pacsflow.tasks.core.sqlite import open_sqlite, sqlite_tx
from pacsflow.tasks.ingest.bookkeeping import RunSummary

HISTORY_FILE = "run-history.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    flow         TEXT NOT NULL,     -- 'nightly' | 'sweep'
    started_at   TEXT NOT NULL,     -- UTC, ISO 8601
    finished_at  TEXT NOT NULL,
    run_window   TEXT NOT NULL,     -- 'YYYY-MM-DD..YYYY-MM-DD'
    counts       TEXT NOT NULL      -- JSON: the RunSummary counters
);
CREATE INDEX IF NOT EXISTS runs_started ON runs(started_at);
CREATE TABLE IF NOT EXISTS run_modalities (
    run_id     TEXT NOT NULL,
    modality   TEXT NOT NULL,
    studies    INTEGER NOT NULL,
    series     INTEGER NOT NULL,
    instances  INTEGER NOT NULL,
    PRIMARY KEY (run_id, modality)
)
"""

# Studies of this run with a series of each modality (a study with CT and PT counts under both).
_BY_MODALITY_SQL = """
SELECT coalesce(nullif(trim(modality), ''), '?') AS modality,
       count(DISTINCT study_uid) AS studies,
       count(*) AS series,
       coalesce(sum(number_of_instances), 0) AS instances
FROM series
WHERE study_uid IN (SELECT unnest(CAST(? AS VARCHAR[])))
GROUP BY 1
ORDER BY instances DESC, modality
"""


@dataclass(frozen=True)
class ModalityCount:
    modality: str
    studies: int
    series: int
    instances: int


@dataclass(frozen=True)
class RunRecord:
    """One finished run as the history holds it."""

    run_id: str
    flow: str
    started_at: dt.datetime
    finished_at: dt.datetime
    window: str
    counts: dict[str, float] = field(default_factory=dict)
    modalities: tuple[ModalityCount, ...] = ()

    def count(self, name: str) -> float:
        """A counter of the summary; 0 for one this row predates."""
        return self.counts.get(name, 0)

    @property
    def seconds(self) -> float:
        return float(self.count("seconds"))

    @property
    def instances_per_second(self) -> float:
        return round(self.count("instances") / self.seconds, 1) if self.seconds else 0.0


def counters(summary: RunSummary) -> dict[str, float]:
    """The summary's numeric counters (what the history keeps of it)."""
    return {k: v for k, v in summary.as_dict().items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "instances_per_second"}


def history_path(state_root: Path) -> Path:
    return Path(state_root) / HISTORY_FILE


class RunHistory:
    """The history file of one ``state_root``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        open_sqlite(self.path, _SCHEMA)

    def record(self, summary: RunSummary, by_modality: Iterable[ModalityCount] = (), *, flow: str = "nightly",
               finished_at: dt.datetime | None = None) -> RunRecord:
        """Add (or replace) the row of the run ``summary`` describes; returns it as read back."""
        finished = (finished_at or utc_now()).replace(microsecond=0)
        started = (finished - dt.timedelta(seconds=summary.seconds)).replace(microsecond=0)
        modalities = tuple(by_modality)
        with sqlite_tx(self.path) as con:
            con.execute(
                "INSERT OR REPLACE INTO runs (run_id, flow, started_at, finished_at, run_window, counts) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (summary.run_id, flow, started.isoformat(), finished.isoformat(), summary.window,
                 json.dumps(counters(summary))),
            )
            con.execute("DELETE FROM run_modalities WHERE run_id = ?", (summary.run_id,))
            con.executemany(
                "INSERT INTO run_modalities (run_id, modality, studies, series, instances) VALUES (?, ?, ?, ?, ?)",
                [(summary.run_id, m.modality, m.studies, m.series, m.instances) for m in modalities],
            )
        return RunRecord(summary.run_id, flow, started, finished, summary.window, counters(summary), modalities)

    def last(self, n: int, *, flow: str | None = None) -> list[RunRecord]:
        """The ``n`` most recent runs (of ``flow``, or of every flow), oldest first."""
        if n <= 0:
            return []
        with sqlite_tx(self.path) as con:
            rows = con.execute(
                "SELECT run_id, flow, started_at, finished_at, run_window, counts FROM runs "
                "WHERE ? IS NULL OR flow = ? ORDER BY started_at DESC, run_id DESC LIMIT ?", [flow, flow, n],
            ).fetchall()
            by_run = _modalities(con, [r[0] for r in rows])
        return [RunRecord(r[0], r[1], _parse(r[2]), _parse(r[3]), r[4], json.loads(r[5]), by_run.get(r[0], ()))
                for r in reversed(rows)]


def _modalities(con: Any, run_ids: Sequence[str]) -> dict[str, tuple[ModalityCount, ...]]:
    found: dict[str, list[ModalityCount]] = {}
    for run_id in run_ids:
        found[run_id] = [ModalityCount(*row) for row in con.execute(
            "SELECT modality, studies, series, instances FROM run_modalities WHERE run_id = ? "
            "ORDER BY instances DESC, modality", [run_id])]
    return {k: tuple(v) for k, v in found.items() if v}


def _parse(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def cataloged_by_modality(catalog: Catalog, study_uids: Sequence[str]) -> list[ModalityCount]:
    """What the catalog (a root or an opened store) holds of ``study_uids`` (the studies one run
    committed), by modality."""
    if not study_uids:
        return []
    table = query(catalog, _BY_MODALITY_SQL, [sorted(set(study_uids))])
    return [ModalityCount(str(r["modality"]), int(r["studies"]), int(r["series"]), int(r["instances"]))
            for r in table.to_pylist()]
