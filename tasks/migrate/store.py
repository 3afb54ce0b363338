"""The migration's own tables in the state database: inventory passes and the operator's settings.

SQLite ``migrate.sqlite`` under ``state_root`` (one machine), or the schema ``migrate`` of the
PostgreSQL database at ``state.url``, which every worker shares: then ``pacsflow migrate pause``
on one machine holds the shards of all. A PHI zone either way: inventory rows hold original study
and series UIDs, so that a later pass can be compared with this one and with the ledger.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pacsflow.tasks.core.clock import utc_timestamp
from pacsflow.tasks.core.statedb import StateDb
from pacsflow.tasks.migrate.control import MigrationConfig
from pacsflow.tasks.migrate.inventory import InventoryStudy, SeriesCount

MIGRATE_NAME = "migrate.sqlite"
SCHEMA_NAME = "migrate"
CONFIG_KEY = "config"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS passes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    since        TEXT NOT NULL,      -- StudyDate range asked (ISO)
    until        TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,               -- NULL: the pass broke off, later passes ignore it
    studies      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS inventory (
    pass_id     INTEGER NOT NULL,
    study_uid   TEXT NOT NULL,       -- original UIDs (PHI zone)
    series_uid  TEXT NOT NULL,       -- '' for a study the PACS listed no series of
    study_date  TEXT NOT NULL,       -- as the PACS answered (YYYYMMDD)
    modality    TEXT NOT NULL,
    instances   INTEGER NOT NULL,
    PRIMARY KEY (pass_id, study_uid, series_uid)
);
CREATE TABLE IF NOT EXISTS settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class InventoryPass:
    id: int
    since: dt.date
    until: dt.date
    started_at: str
    studies: int


class MigrationStore:
    """The file ``path`` (SQLite) or the schema ``migrate`` at ``url``."""

    def __init__(self, path: Path, url: str | None = None, schema: str = SCHEMA_NAME) -> None:
        self.db = StateDb(Path(path), url, schema, _SCHEMA)

    @classmethod
    def under(cls, state_root: Path, url: str | None = None, source: str | None = None) -> MigrationStore:
        """``source``: the inventory passes of that named PACS (``settings.sources``), apart from
        the first PACS's; the operator's settings are read from the first's store only."""
        if source is None:
            return cls(Path(state_root) / MIGRATE_NAME, url)
        return cls(Path(state_root) / f"migrate-{source}.sqlite", url, f"{SCHEMA_NAME}_{source.replace('-', '_')}")

    # -- inventory passes ---------------------------------------------------------------
    def record_pass(self, since: dt.date, until: dt.date, studies: Iterable[InventoryStudy]) -> InventoryPass:
        """One finished pass and what it found, in one transaction."""
        found = list(studies)
        rows = [(s.study_uid, c.series_uid, s.study_date, c.modality, c.instances)
                for s in found for c in (s.series or (SeriesCount("", 0),))]
        started = utc_timestamp()
        with self.db.tx() as tx:
            pass_id = tx.execute(
                "INSERT INTO passes(since, until, started_at, finished_at, studies) VALUES (?, ?, ?, ?, ?) RETURNING id",
                (since.isoformat(), until.isoformat(), started, utc_timestamp(), len(found))).fetchone()[0]
            tx.executemany("INSERT INTO inventory(pass_id, study_uid, series_uid, study_date, modality, instances) "
                           "VALUES (?, ?, ?, ?, ?, ?)", [(pass_id, *r) for r in rows])
        return InventoryPass(int(pass_id), since, until, started, len(found))

    def passes(self) -> list[InventoryPass]:
        """Finished passes, oldest first."""
        with self.db.tx() as tx:
            rows = tx.execute("SELECT id, since, until, started_at, studies FROM passes "
                              "WHERE finished_at IS NOT NULL ORDER BY id").fetchall()
        return [InventoryPass(int(r[0]), dt.date.fromisoformat(r[1]), dt.date.fromisoformat(r[2]), r[3], int(r[4]))
                for r in rows]

    def latest(self) -> InventoryPass | None:
        found = self.passes()
        return found[-1] if found else None

    def studies(self, pass_id: int) -> list[InventoryStudy]:
        with self.db.tx() as tx:
            rows = tx.execute("SELECT study_uid, study_date, series_uid, modality, instances FROM inventory "
                              "WHERE pass_id = ? ORDER BY study_uid, series_uid", (pass_id,)).fetchall()
        by_study: dict[tuple[str, str], list[SeriesCount]] = defaultdict(list)
        for uid, date, series_uid, modality, n in rows:
            series = by_study[(uid, date)]
            if series_uid:
                series.append(SeriesCount(modality, int(n), series_uid))
        return [InventoryStudy(uid, date, tuple(series)) for (uid, date), series in by_study.items()]

    # -- the operator's settings ------------------------------------------------------
    def config(self) -> MigrationConfig | None:
        """None when no migration was started here (``pacsflow migrate run``)."""
        with self.db.tx() as tx:
            row = tx.execute("SELECT value FROM settings WHERE name = ?", (CONFIG_KEY,)).fetchone()
        return None if row is None else MigrationConfig.from_json(row[0])

    def save_config(self, config: MigrationConfig) -> None:
        with self.db.tx() as tx:
            tx.execute("INSERT INTO settings(name, value) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (CONFIG_KEY, config.to_json()))

    def set_paused(self, paused: bool) -> MigrationConfig:
        """Pause or resume in one transaction; LookupError when no migration is configured."""
        with self.db.tx() as tx:
            row = tx.execute("SELECT value FROM settings WHERE name = ?", (CONFIG_KEY,)).fetchone()
            if row is None:
                raise LookupError("no migration configured: start one with pacsflow migrate run --window ...")
            config = MigrationConfig.from_json(row[0]).paused_as(paused)
            tx.execute("UPDATE settings SET value = ? WHERE name = ?", (config.to_json(), CONFIG_KEY))
        return config
