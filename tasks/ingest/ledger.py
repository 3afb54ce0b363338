"""The ledger: what has been cataloged, what failed and why, and the watermark.

SQLite under ``state_root``, or the schema ``ingest`` of the PostgreSQL database at ``state.url``
when several machines share the work (a PHI zone either way: it holds original StudyInstanceUIDs
so that the next run can compare the PACS's answer with what we have). One transaction per update,
so a crash leaves either the old or the new state.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from pacsflow.tasks.core.clock import utc_timestamp
from pacsflow.tasks.core.statedb import StateDb

SCHEMA_NAME = "ingest"  # the PostgreSQL schema of these tables
WATERMARK = "watermark"  # the state row of the watermark (of the PACS in ``pacs``; a named source's has its own)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid     TEXT PRIMARY KEY,  -- original UID (PHI zone)
    pseudo_uid    TEXT NOT NULL,
    study_date    TEXT,
    instances     INTEGER,           -- cataloged: PACS count when retrieved, failed: PACS count at failure
    status        TEXT NOT NULL,     -- 'cataloged' | 'failed'
    reason        TEXT,              -- failure class and message (no PHI)
    permanent     INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    updated_at    TEXT NOT NULL,
    run_id        TEXT
);
CREATE INDEX IF NOT EXISTS studies_status ON studies(status);
CREATE TABLE IF NOT EXISTS state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pseudo_uid  TEXT NOT NULL,      -- study
    object_ref  TEXT,               -- file name in the quarantine folder, or empty for a whole study
    reason      TEXT NOT NULL,
    run_id      TEXT,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS missing_objects (
    study_uid   TEXT NOT NULL,      -- original UIDs (PHI zone)
    sop_uid     TEXT NOT NULL,
    pseudo_uid  TEXT NOT NULL,      -- the study's pseudonym
    object_ref  TEXT NOT NULL,      -- the object's pseudonym
    reason      TEXT NOT NULL,      -- why the PACS did not send it (no PHI)
    attempts    INTEGER NOT NULL,   -- runs that asked for it in vain
    permanent   INTEGER NOT NULL,   -- 1: no longer asked for (max_attempts reached)
    updated_at  TEXT NOT NULL,
    run_id      TEXT,
    PRIMARY KEY (study_uid, sop_uid)
);
"""


@dataclass(frozen=True)
class LedgerEntry:
    study_uid: str
    pseudo_uid: str
    study_date: str | None
    instances: int | None
    status: str
    reason: str | None
    permanent: bool
    attempts: int
    missing: int = 0  # objects the PACS did not send that later runs still ask for


@dataclass(frozen=True)
class MissingEntry:
    """An object the PACS listed but did not send (pseudonyms only)."""

    pseudo_uid: str
    object_ref: str
    reason: str
    attempts: int
    permanent: bool


class Ledger:
    """The SQLite file ``path``, or the schema ``ingest`` at ``url`` (``state.url``) when it is set."""

    def __init__(self, path: Path, url: str | None = None) -> None:
        self.path = Path(path)
        self.db = StateDb(self.path, url, SCHEMA_NAME, _SCHEMA)

    def _tx(self):
        return self.db.tx()

    def entries(self, study_uids: Iterable[str] | None = None) -> dict[str, LedgerEntry]:
        with self._tx() as con:
            rows = con.execute(
                """SELECT s.study_uid, pseudo_uid, study_date, instances, status, reason, permanent, attempts,
                          (SELECT count(*) FROM missing_objects m WHERE m.study_uid = s.study_uid AND m.permanent = 0)
                   FROM studies s"""
            ).fetchall()
        wanted = set(study_uids) if study_uids is not None else None
        return {
            r[0]: LedgerEntry(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8])
            for r in rows
            if wanted is None or r[0] in wanted
        }

    def failed(self) -> list[LedgerEntry]:
        return [e for e in self.entries().values() if e.status == "failed"]

    def to_retry(self) -> list[LedgerEntry]:
        """Studies a run asks for by UID whatever its window: transient failures, and cataloged
        studies with objects the PACS has not sent yet."""
        return [e for e in self.entries().values() if (e.status == "failed" and not e.permanent) or e.missing]

    def mark_cataloged(self, items: Iterable[tuple[str, str, str | None, int]], run_id: str) -> None:
        now = utc_timestamp()
        with self._tx() as con:
            con.executemany(
                """INSERT INTO studies(study_uid, pseudo_uid, study_date, instances, status, reason, permanent,
                                       attempts, updated_at, run_id)
                   VALUES (?, ?, ?, ?, 'cataloged', NULL, 0, 1, ?, ?)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     pseudo_uid=excluded.pseudo_uid, study_date=excluded.study_date,
                     instances=excluded.instances, status='cataloged', reason=NULL, permanent=0,
                     attempts=studies.attempts + 1, updated_at=excluded.updated_at, run_id=excluded.run_id""",
                [(uid, pseudo, date, n, now, run_id) for uid, pseudo, date, n in items],
            )

    def mark_failed(
        self,
        study_uid: str,
        pseudo_uid: str,
        study_date: str | None,
        expected: int | None,
        reason: str,
        permanent: bool,
        run_id: str,
        *,
        attempted: bool = True,
    ) -> None:
        """A failure never erases what was cataloged before: a study that grew and failed keeps
        its old count, so the next run sees it grew again and retries. ``attempted=False`` (a run
        interrupted before it got to the study) records the reason without counting an attempt."""
        with self._tx() as con:
            con.execute(
                """INSERT INTO studies(study_uid, pseudo_uid, study_date, instances, status, reason, permanent,
                                       attempts, updated_at, run_id)
                   VALUES (?, ?, ?, ?, 'failed', ?, ?, ?, ?, ?)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     instances=CASE WHEN studies.status='cataloged' THEN studies.instances ELSE excluded.instances END,
                     status=CASE WHEN studies.status='cataloged' AND studies.instances IS NOT NULL
                                 THEN 'cataloged' ELSE 'failed' END,
                     reason=excluded.reason, permanent=excluded.permanent,
                     attempts=studies.attempts + excluded.attempts, updated_at=excluded.updated_at,
                     run_id=excluded.run_id""",
                (study_uid, pseudo_uid, study_date, expected, reason, int(permanent), int(attempted), utc_timestamp(),
                 run_id),
            )
            if permanent:
                con.execute(
                    "INSERT INTO quarantine(pseudo_uid, object_ref, reason, run_id, created_at) VALUES (?, '', ?, ?, ?)",
                    (pseudo_uid, reason, run_id, utc_timestamp()),
                )

    def record_missing(self, study_uid: str, pseudo_uid: str, missing: Iterable[tuple[str, str, str]],
                       run_id: str, max_attempts: int) -> list[MissingEntry]:
        """After a study is cataloged: its objects the PACS did not send this time, as
        (original SOP Instance UID, pseudonym, reason). Each counts one more attempt and is given
        up (permanent) at ``max_attempts``; objects that arrived are forgotten. Returns the study's
        missing objects as recorded."""
        now = utc_timestamp()
        missing = list(missing)
        with self._tx() as con:
            arrived = {r[0] for r in con.execute("SELECT sop_uid FROM missing_objects WHERE study_uid = ?",
                                                  (study_uid,))} - {uid for uid, _, _ in missing}
            con.executemany("DELETE FROM missing_objects WHERE study_uid = ? AND sop_uid = ?",
                            [(study_uid, uid) for uid in arrived])
            con.executemany(
                """INSERT INTO missing_objects(study_uid, sop_uid, pseudo_uid, object_ref, reason, attempts, permanent,
                                               updated_at, run_id)
                   VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)
                   ON CONFLICT(study_uid, sop_uid) DO UPDATE SET
                     reason=excluded.reason, attempts=missing_objects.attempts + 1,
                     permanent=CASE WHEN missing_objects.attempts + 1 >= ? THEN 1 ELSE 0 END,
                     updated_at=excluded.updated_at, run_id=excluded.run_id""",
                [(study_uid, uid, pseudo_uid, ref, reason, int(max_attempts <= 1), now, run_id, max_attempts)
                 for uid, ref, reason in missing],
            )
        return [e for e in self.missing_entries() if e.pseudo_uid == pseudo_uid]

    def missing_entries(self) -> list[MissingEntry]:
        """Every object the PACS did not send, pending or given up (pseudonyms only)."""
        with self._tx() as con:
            rows = con.execute(
                "SELECT pseudo_uid, object_ref, reason, attempts, permanent FROM missing_objects "
                "ORDER BY pseudo_uid, object_ref"
            ).fetchall()
        return [MissingEntry(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def quarantine(self, pseudo_uid: str, object_ref: str, reason: str, run_id: str) -> None:
        self.quarantine_many(pseudo_uid, [(object_ref, reason)], run_id)

    def quarantine_many(self, pseudo_uid: str, objects: Sequence[tuple[str, str]], run_id: str) -> None:
        """A study's quarantined objects, ``(object_ref, reason)`` each, in one transaction (an
        ultrasound study quarantines every object it has)."""
        if not objects:
            return
        now = utc_timestamp()
        with self._tx() as con:
            con.executemany(
                "INSERT INTO quarantine(pseudo_uid, object_ref, reason, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
                [(pseudo_uid, ref, reason, run_id, now) for ref, reason in objects],
            )

    def quarantine_entries(self) -> list[dict]:
        with self._tx() as con:
            rows = con.execute(
                "SELECT pseudo_uid, object_ref, reason, run_id, created_at FROM quarantine ORDER BY id"
            ).fetchall()
        return [dict(zip(("pseudo_uid", "object_ref", "reason", "run_id", "created_at"), r)) for r in rows]

    # -- watermark ------------------------------------------------------------------------
    def get_state(self, name: str) -> str | None:
        with self._tx() as con:
            row = con.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_state(self, name: str, value: str) -> None:
        with self._tx() as con:
            con.execute(
                "INSERT INTO state(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                (name, value),
            )

    @property
    def watermark(self) -> dt.date | None:
        return self.watermark_of(WATERMARK)

    def watermark_of(self, name: str) -> dt.date | None:
        """The watermark kept in the state row ``name`` (one per PACS)."""
        value = self.get_state(name)
        return dt.date.fromisoformat(value) if value else None

    def advance_watermark(self, value: dt.date, name: str = WATERMARK) -> None:
        """Moves the watermark (the state row ``name``) to ``value`` unless it is already later (ISO
        dates sort as text): one statement, so two runs finishing at once cannot move it back."""
        with self._tx() as con:
            con.execute(
                "INSERT INTO state(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                "SET value=excluded.value WHERE state.value < excluded.value",
                (name, value.isoformat()),
            )
