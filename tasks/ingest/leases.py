"""Study leases: which worker works on which study, for how long.

Studies are added in shards (a StudyDate day, or part of one). A worker ``claim``s up to n studies
that nobody holds: never claimed, released, or whose lease has expired. Its lease lasts
``lease_s`` seconds by the database's clock; it ``renew``s the lease while it works and marks the
study ``done`` (or ``release``s it) at the end. A worker that dies stops renewing, so its studies
become claimable again once the lease runs out; a study is never claimed by a second worker while a
lease on it lives.

Worker names must be unique per claimant process (host, PID and a random part): renew, release and
done act only on studies whose last claim was by that name, so a worker that lost a study to
another after its lease expired cannot mark it.

On PostgreSQL claims take rows with ``FOR UPDATE SKIP LOCKED``, so workers claiming at once never
wait on each other; on SQLite (one machine) ``BEGIN IMMEDIATE`` makes them take turns.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pacsflow.tasks.core.clock import utc_timestamp
from pacsflow.tasks.core.statedb import StateDb

LEASES_NAME = "leases.sqlite"
SCHEMA_NAME = "leases"  # the PostgreSQL schema of these tables
_CHUNK = 500  # UIDs per IN (...) list


@dataclass(frozen=True)
class ShardProgress:
    """A shard's studies: how many, how many done, how many held by a live lease."""

    shard: str
    day: dt.date | None
    studies: int
    done: int
    held: int
    expired: int = 0  # open studies whose lease ran out without a release: their claimant is gone

    @property
    def finished(self) -> bool:
        return self.done == self.studies


_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    shard       TEXT PRIMARY KEY,   -- a key free of PHI, e.g. 2026-11-01 or 2026-11-01.2of3
    day         TEXT,               -- the StudyDate its studies share (ISO), NULL when undated
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    study_uid    TEXT PRIMARY KEY,             -- original UID (PHI zone)
    shard        TEXT NOT NULL,
    status       TEXT NOT NULL,                -- 'open' | 'done'
    worker       TEXT,                         -- the last claimant (NULL: never claimed or released)
    lease_until  DOUBLE PRECISION,             -- epoch seconds by the database clock, NULL: not held
    claims       INTEGER NOT NULL DEFAULT 0,   -- times claimed: more than one means a lease ran out or was released
    updated_at   DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS shard_runs (
    shard       TEXT PRIMARY KEY,   -- the shard's latest flow run
    flow_run    TEXT NOT NULL,      -- its Prefect flow-run id
    started_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_open ON claims(status, shard, study_uid);
CREATE INDEX IF NOT EXISTS claims_worker ON claims(worker);
"""


class Leases:
    """The shards and study claims of a deployment: ``path`` (SQLite) or the schema ``leases`` at ``url``."""

    def __init__(self, path: Path, url: str | None = None) -> None:
        self.db = StateDb(path, url, SCHEMA_NAME, _SCHEMA)

    @classmethod
    def under(cls, state_root: Path, url: str | None = None) -> Leases:
        return cls(Path(state_root) / LEASES_NAME, url)

    def add(self, shard: str, study_uids: Iterable[str], day: dt.date | None = None, *,
            reopen: bool = False) -> None:
        """Studies to work on, in ``shard`` (of StudyDate ``day``). A study already known keeps its
        shard and state (done stays done), unless ``reopen``: then a done study is open again, in
        ``shard`` (a planner that finds work on it again: it grew, or failed since)."""
        now = self.db.now
        again = (f"DO UPDATE SET status = 'open', shard = excluded.shard, worker = NULL, lease_until = NULL, "
                 f"updated_at = {now} WHERE claims.status = 'done'") if reopen else "DO NOTHING"
        with self.db.tx() as tx:
            tx.execute("INSERT INTO shards(shard, day, created_at) VALUES (?, ?, ?) ON CONFLICT(shard) DO NOTHING",
                       (shard, day, utc_timestamp()))
            tx.executemany(f"INSERT INTO claims(study_uid, shard, status, updated_at) VALUES (?, ?, 'open', {now}) "
                           f"ON CONFLICT(study_uid) {again}", [(uid, shard) for uid in study_uids])

    def open_studies(self, study_uids: Iterable[str]) -> set[str]:
        """Those of ``study_uids`` that are in a shard and not done (planned already)."""
        return {r[0] for r in self._claims_of("SELECT study_uid FROM claims WHERE status = 'open' AND", study_uids)}

    def shards_of(self, study_uids: Iterable[str]) -> dict[str, str]:
        """Study UID -> the shard it was last planned in, for those of ``study_uids`` in one (its
        key names the PACS it came from)."""
        return {r[0]: r[1] for r in self._claims_of("SELECT study_uid, shard FROM claims WHERE", study_uids)}

    def _claims_of(self, select: str, study_uids: Iterable[str]) -> list[tuple[str, ...]]:
        """Rows of ``select`` ending in ``WHERE [...] AND`` or ``WHERE``, for ``study_uids`` (chunked)."""
        uids = list(dict.fromkeys(study_uids))
        rows: list[tuple[str, ...]] = []
        with self.db.tx(serialized=False) as tx:
            for i in range(0, len(uids), _CHUNK):
                part = uids[i : i + _CHUNK]
                rows += tx.execute(f"{select} study_uid IN ({', '.join('?' * len(part))})", part).fetchall()
        return rows

    def started(self, shard: str, flow_run: str) -> None:
        """``shard``'s newest flow run (what the next planner checks)."""
        with self.db.tx() as tx:
            tx.execute("INSERT INTO shard_runs(shard, flow_run, started_at) VALUES (?, ?, ?) ON CONFLICT(shard) "
                       "DO UPDATE SET flow_run = excluded.flow_run, started_at = excluded.started_at",
                       (shard, flow_run, utc_timestamp()))

    def runs(self) -> dict[str, str]:
        """Shard -> its newest flow-run id."""
        with self.db.tx(serialized=False) as tx:
            return {r[0]: r[1] for r in tx.execute("SELECT shard, flow_run FROM shard_runs").fetchall()}

    def forget_expired(self, shard: str) -> int:
        """Open studies of ``shard`` whose lease ran out become plain unclaimed ones (their
        claimant is gone and its successor is being started): how many."""
        now = self.db.now
        with self.db.tx() as tx:
            rows = tx.execute(f"UPDATE claims SET worker = NULL, lease_until = NULL, updated_at = {now} "
                              f"WHERE shard = ? AND status = 'open' AND lease_until <= {now} RETURNING study_uid",
                              (shard,)).fetchall()
        return len(rows)

    def claim(self, worker: str, n: int, lease_s: float, shard: str | None = None) -> list[str]:
        """Up to ``n`` studies nobody holds (of ``shard``, or any), held by ``worker`` for ``lease_s`` seconds."""
        if n <= 0:
            return []
        now = self.db.now
        in_shard = "" if shard is None else " AND shard = ?"
        sql = (f"UPDATE claims SET worker = ?, lease_until = {now} + ?, claims = claims + 1, updated_at = {now} "
               "WHERE study_uid IN (SELECT study_uid FROM claims "
               f"WHERE status = 'open' AND (lease_until IS NULL OR lease_until <= {now}){in_shard} "
               f"ORDER BY shard, study_uid LIMIT ?{self.db.skip_locked}) RETURNING study_uid")
        params: tuple[object, ...] = (worker, float(lease_s), *(() if shard is None else (shard,)), int(n))
        with self.db.tx(serialized=False) as tx:
            return sorted(r[0] for r in tx.execute(sql, params).fetchall())

    def renew(self, worker: str, study_uids: Sequence[str], lease_s: float) -> list[str]:
        """Extend ``worker``'s leases by ``lease_s`` from now; returns the studies it still holds."""
        now = self.db.now
        return self._update(f"lease_until = {now} + ?, updated_at = {now}", (float(lease_s),), worker, study_uids)

    def release(self, worker: str, study_uids: Sequence[str]) -> list[str]:
        """Give studies back unfinished: claimable at once. Returns those ``worker`` held."""
        return self._update(f"worker = NULL, lease_until = NULL, updated_at = {self.db.now}", (), worker, study_uids)

    def done(self, worker: str, study_uids: Sequence[str]) -> list[str]:
        """Mark ``worker``'s studies finished (never claimed again). Returns those it held; a study
        another worker claimed after this one's lease ran out is not among them."""
        return self._update(f"status = 'done', lease_until = NULL, updated_at = {self.db.now}", (), worker,
                            study_uids)

    def _update(self, assignments: str, values: tuple[object, ...], worker: str, study_uids: Sequence[str]) -> list[str]:
        uids = list(dict.fromkeys(study_uids))
        out: list[str] = []
        with self.db.tx(serialized=False) as tx:
            for i in range(0, len(uids), _CHUNK):
                part = uids[i : i + _CHUNK]
                marks = ", ".join("?" * len(part))
                rows = tx.execute(f"UPDATE claims SET {assignments} WHERE worker = ? AND status = 'open' "
                                  f"AND study_uid IN ({marks}) RETURNING study_uid", (*values, worker, *part))
                out += [r[0] for r in rows.fetchall()]
        return sorted(out)

    def shards(self) -> list[ShardProgress]:
        """Every shard with its studies done and held now, in shard order."""
        now = self.db.now
        with self.db.tx(serialized=False) as tx:
            rows = tx.execute(
                "SELECT s.shard, s.day, count(c.study_uid), "
                "coalesce(sum(CASE WHEN c.status = 'done' THEN 1 ELSE 0 END), 0), "
                f"coalesce(sum(CASE WHEN c.status = 'open' AND c.lease_until > {now} THEN 1 ELSE 0 END), 0), "
                f"coalesce(sum(CASE WHEN c.status = 'open' AND c.lease_until <= {now} THEN 1 ELSE 0 END), 0) "
                "FROM shards s LEFT JOIN claims c ON c.shard = s.shard GROUP BY s.shard, s.day ORDER BY s.shard"
            ).fetchall()
        return [ShardProgress(r[0], dt.date.fromisoformat(r[1]) if r[1] else None, int(r[2]), int(r[3]), int(r[4]),
                              int(r[5]))
                for r in rows]

    def holders(self) -> dict[str, str]:
        """Study UID -> worker, for every lease that lives now."""
        with self.db.tx(serialized=False) as tx:
            rows = tx.execute(f"SELECT study_uid, worker FROM claims WHERE status = 'open' "
                              f"AND lease_until > {self.db.now}").fetchall()
        return {r[0]: r[1] for r in rows}
