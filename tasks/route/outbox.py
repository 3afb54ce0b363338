"""The durable outbox: one row per object per destination, from queued to delivered or dead.

SQLite in the listener's PHI zone (``Settings.listener_dir / "outbox.sqlite"``): rows hold original
SOP Instance UIDs so that an object re-enqueued after a crash is recognised and never forwarded
twice. For a destination with Storage Commitment, a stored row waits in ``committing`` (with its
transaction UID and a deadline) until the destination's report makes it delivered or failed. Logs and errors name the pseudonymous ``study_ref`` only. Delivery is at least once: a
claim that never came back (the process died while sending) is queued again by :meth:`Outbox.recover`.

Pure: sqlite3 and files, no sockets. Every change is one transaction; each call opens its own
connection, so any thread may use one ``Outbox``.
"""

from __future__ import annotations

import enum
import json
import random
import sqlite3
import time
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from pacsflow.tasks.core.clock import utc_timestamp
from pacsflow.tasks.core.errors import PermanentError
from pacsflow.tasks.core.sqlite import open_sqlite, sqlite_tx
from pacsflow.tasks.settings import ListenerSettings, Settings

SCHEMA_VERSION = 2  # 2: Storage Commitment (transaction_uid, sent_uid, commit_by)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    destination  TEXT NOT NULL,     -- the destination's name in the rules file
    sop_uid      TEXT NOT NULL,     -- original SOP Instance UID (PHI zone)
    study_ref    TEXT NOT NULL,     -- pseudonymous study id: what logs show
    file         TEXT NOT NULL,     -- the prepared copy to send
    state        TEXT NOT NULL,     -- DeliveryState
    attempts     INTEGER NOT NULL DEFAULT 0,  -- failed attempts since enqueue or retry
    next_at      REAL NOT NULL,     -- epoch seconds from which a queued row is due
    claimed_at   REAL,              -- when it went to 'sending'
    last_error   TEXT,              -- one line, no PHI
    created_at   TEXT NOT NULL,
    updated_at   REAL NOT NULL,
    transaction_uid TEXT,           -- Storage Commitment: the request it waits on ('committing')
    sent_uid     TEXT,              -- ... the SOP Instance UID of the copy sent (a de-identified one differs)
    commit_by    REAL,              -- ... when the wait ends: queued again without a report
    UNIQUE (destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(destination, state, next_at)
"""
# Version 1 -> 2: the Storage Commitment columns. Runs once, in the transaction that sets the version.
_MIGRATIONS = {
    1: ("ALTER TABLE deliveries ADD COLUMN transaction_uid TEXT",
        "ALTER TABLE deliveries ADD COLUMN sent_uid TEXT",
        "ALTER TABLE deliveries ADD COLUMN commit_by REAL"),
}
_COMMIT_INDEX = "CREATE INDEX IF NOT EXISTS deliveries_commit ON deliveries(transaction_uid)"
_ERROR_CHARS = 300
_COLUMNS = ("id, destination, sop_uid, study_ref, file, state, attempts, next_at, last_error, transaction_uid, "
            "sent_uid, commit_by")


class DeliveryState(str, enum.Enum):
    QUEUED = "queued"
    SENDING = "sending"
    COMMITTING = "committing"  # stored; waiting for the destination's Storage Commitment report
    DELIVERED = "delivered"
    DEAD = "dead"  # given up: after max_attempts, or a permanent failure; `route retry` queues it again
    DROPPED = "dropped"  # given up by the operator (`route drop`); its prepared file is deleted


# States whose rows may still need their prepared file.
_LIVE = (DeliveryState.QUEUED.value, DeliveryState.SENDING.value, DeliveryState.COMMITTING.value,
         DeliveryState.DEAD.value)


class OutboxVersionError(PermanentError):
    reason = "outbox-version"


@dataclass(frozen=True)
class Backoff:
    """Delays between delivery attempts: ``first_s`` doubling per failure up to ``max_s``, each
    drawn in its upper quarter so that destinations coming back are not hit by every row at once;
    ``max_attempts`` failures make a row dead."""

    first_s: float
    max_s: float
    max_attempts: int

    @classmethod
    def from_settings(cls, listener: ListenerSettings) -> "Backoff":
        return cls(listener.retry_backoff_s, listener.retry_max_delay_s, listener.max_attempts)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1, 2, ...)."""
        ceiling = min(self.max_s, self.first_s * 2 ** min(max(failures - 1, 0), 60))
        return ceiling * (rng or random).uniform(0.75, 1.0)


@dataclass(frozen=True)
class Delivery:
    """One object for one destination. ``sop_uid`` is the original (kept out of reprs); while
    ``committing``, ``transaction_uid`` names the commitment request, ``sent_uid`` the copy's SOP
    Instance UID it references and ``commit_by`` the deadline of its report."""

    id: int
    destination: str
    sop_uid: str = field(repr=False)
    study_ref: str
    file: Path
    state: DeliveryState
    attempts: int
    next_at: float
    last_error: str | None
    transaction_uid: str | None = None
    sent_uid: str | None = field(default=None, repr=False)
    commit_by: float | None = None

    @classmethod
    def from_row(cls, row: Sequence[object]) -> "Delivery":
        i, dest, sop, ref, file, state, attempts, next_at, error, transaction, sent, commit_by = row
        return cls(int(str(i)), str(dest), str(sop), str(ref), Path(str(file)), DeliveryState(state),
                   int(str(attempts)), float(str(next_at)), _text(error), _text(transaction), _text(sent),
                   None if commit_by is None else float(str(commit_by)))


def one_line(error: str) -> str:
    """An error as the outbox keeps it: its first line, shortened."""
    line = (error.strip().splitlines() or [""])[0]
    return line if len(line) <= _ERROR_CHARS else line[: _ERROR_CHARS - 1] + "…"


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        open_sqlite(self.path, _SCHEMA)
        with self._tx() as con:
            version = int(con.execute("PRAGMA user_version").fetchone()[0])
            if version in _MIGRATIONS:
                for statement in _MIGRATIONS[version]:
                    con.execute(statement)
                version = 0
            if version == 0:
                con.execute(_COMMIT_INDEX)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise OutboxVersionError(f"outbox {self.path} has schema version {version}; this pacsflow "
                                         f"reads version {SCHEMA_VERSION}")

    @classmethod
    def for_settings(cls, settings: Settings) -> "Outbox":
        return cls(settings.listener_dir / "outbox.sqlite")

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_tx(self.path)

    # -- the forwarder's side -----------------------------------------------------------------
    def enqueue(self, destination: str, sop_uid: str, study_ref: str, file: Path, now: float | None = None) -> bool:
        """Queue ``file`` for ``destination``. False, and nothing changes, when this object is
        already in the outbox for this destination, whatever its state."""
        return bool(self.enqueue_many([(destination, sop_uid, study_ref, file)], now))

    def enqueue_many(self, items: Iterable[tuple[str, str, str, Path]], now: float | None = None) -> Counter[str]:
        """Queue many (destination, sop_uid, study_ref, file) in one transaction, each as
        :meth:`enqueue` would; returns how many were new, per destination. One commit per object
        would wait for the disk each time (about 10 ms): a large study is queued in batches."""
        now = time.time() if now is None else now
        created = utc_timestamp()
        queued: Counter[str] = Counter()
        with self._tx() as con:
            for destination, sop_uid, study_ref, file in items:
                cur = con.execute(
                    """INSERT INTO deliveries(destination, sop_uid, study_ref, file, state, next_at, created_at,
                                              updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(destination, sop_uid) DO NOTHING""",
                    (destination, sop_uid, study_ref, str(file), DeliveryState.QUEUED.value, now, created, now),
                )
                queued[destination] += cur.rowcount
        return +queued

    def claim(self, destination: str, limit: int, now: float | None = None) -> list[Delivery]:
        """Up to ``limit`` due rows of ``destination``, oldest due first, now ``sending``."""
        now = time.time() if now is None else now
        with self._tx() as con:
            rows = con.execute(
                f"""SELECT {_COLUMNS} FROM deliveries WHERE destination = ? AND state = ? AND next_at <= ?
                    ORDER BY next_at, id LIMIT ?""",
                (destination, DeliveryState.QUEUED.value, now, limit),
            ).fetchall()
            con.executemany("UPDATE deliveries SET state = ?, claimed_at = ?, updated_at = ? WHERE id = ?",
                            [(DeliveryState.SENDING.value, now, now, r[0]) for r in rows])
        return [Delivery.from_row((*r[:5], DeliveryState.SENDING.value, *r[6:])) for r in rows]

    # -- Storage Commitment -----------------------------------------------------------------------
    def committing(self, sent: Mapping[int, str], transaction_uid: str, commit_by: float,
                   now: float | None = None) -> int:
        """Rows stored at a destination that commits (id -> the sent copy's SOP Instance UID) now
        wait for the report of ``transaction_uid`` until ``commit_by`` (epoch seconds)."""
        now = time.time() if now is None else now
        with self._tx() as con:
            return sum(con.execute(
                """UPDATE deliveries SET state = ?, transaction_uid = ?, sent_uid = ?, commit_by = ?, last_error = NULL,
                                         updated_at = ? WHERE id = ?""",
                (DeliveryState.COMMITTING.value, transaction_uid, uid, commit_by, now, row_id)).rowcount
                for row_id, uid in sent.items())

    def awaiting(self, transaction_uid: str) -> list[Delivery]:
        """The rows still ``committing`` under ``transaction_uid`` (none once reported or timed out)."""
        with self._tx() as con:
            return _select(con, "state = ? AND transaction_uid = ? ORDER BY id",
                           (DeliveryState.COMMITTING.value, transaction_uid))

    def committed(self, transaction_uid: str, sent_uids: Iterable[str], now: float | None = None) -> int:
        """Rows of ``transaction_uid`` still waiting whose copies the report says are committed: delivered."""
        now = time.time() if now is None else now
        with self._tx() as con:
            return con.execute(
                """UPDATE deliveries SET state = ?, last_error = NULL, updated_at = ?
                   WHERE state = ? AND transaction_uid = ? AND sent_uid IN (SELECT value FROM json_each(?))""",
                (DeliveryState.DELIVERED.value, now, DeliveryState.COMMITTING.value, transaction_uid,
                 json.dumps(list(sent_uids)))).rowcount

    def expire_commitments(self, destination: str, error: str, backoff: Backoff, now: float | None = None,
                           rng: random.Random | None = None) -> list[Delivery]:
        """Rows of ``destination`` whose report did not come by their deadline: a transient
        failure (queued again with backoff, dead after ``backoff.max_attempts``). Returns them."""
        now = time.time() if now is None else now
        with self._tx() as con:
            ids = [int(r[0]) for r in con.execute(
                "SELECT id FROM deliveries WHERE destination = ? AND state = ? AND commit_by <= ?",
                (destination, DeliveryState.COMMITTING.value, now))]
        return self.failed(ids, error, permanent=False, backoff=backoff, now=now, rng=rng) if ids else []

    def delivered(self, ids: Iterable[int], now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._tx() as con:
            return _update(con, ids, "state = ?, last_error = NULL, updated_at = ?",
                           (DeliveryState.DELIVERED.value, now))

    def failed(self, ids: Iterable[int], error: str, *, permanent: bool, backoff: Backoff,
               now: float | None = None, rng: random.Random | None = None) -> list[Delivery]:
        """Record a failed attempt. Transient: queued again after ``backoff`` (dead once
        ``backoff.max_attempts`` attempts failed); permanent: dead at once. Returns the rows as
        they are now."""
        now = time.time() if now is None else now
        text = one_line(error)
        ids = list(ids)
        with self._tx() as con:
            for row_id, attempts in _attempts(con, ids):
                attempts += 1
                dead = permanent or attempts >= backoff.max_attempts
                state = DeliveryState.DEAD if dead else DeliveryState.QUEUED
                next_at = now if dead else now + backoff.delay(attempts, rng)
                con.execute("""UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, last_error = ?,
                                                     updated_at = ? WHERE id = ?""",
                            (state.value, attempts, next_at, text, now, row_id))
            return _select(con, "id IN (SELECT value FROM json_each(?))", (_json_ids(ids),))

    def recover(self, lease_s: float = 0.0, now: float | None = None) -> int:
        """Queue again, due at once, every row claimed more than ``lease_s`` ago and never reported
        (the process died while sending). At startup: ``lease_s=0``. Attempts are not counted."""
        now = time.time() if now is None else now
        with self._tx() as con:
            return con.execute(
                "UPDATE deliveries SET state = ?, next_at = ?, updated_at = ? WHERE state = ? AND claimed_at <= ?",
                (DeliveryState.QUEUED.value, now, now, DeliveryState.SENDING.value, now - lease_s),
            ).rowcount

    def next_due(self, destination: str) -> float | None:
        """When the earliest queued row of ``destination`` is due (epoch seconds), None when none is queued."""
        with self._tx() as con:
            value = con.execute("SELECT min(next_at) FROM deliveries WHERE destination = ? AND state = ?",
                                (destination, DeliveryState.QUEUED.value)).fetchone()[0]
        return None if value is None else float(value)

    # -- the operator's side (`pacsflow route retry|drop|status`) ------------------------------
    def retry(self, destination: str | None = None, ids: Iterable[int] | None = None,
              now: float | None = None) -> int:
        """Dead rows (of ``destination``, or these ``ids``) queued again, due now, attempts reset."""
        now = time.time() if now is None else now
        where, params = _dead_rows(destination, ids)
        with self._tx() as con:
            return con.execute(
                f"UPDATE deliveries SET state = ?, attempts = 0, next_at = ?, last_error = NULL, updated_at = ? "
                f"WHERE {where}", (DeliveryState.QUEUED.value, now, now, *params)).rowcount

    def drop(self, destination: str | None = None, ids: Iterable[int] | None = None,
             now: float | None = None) -> int:
        """Dead rows given up for good: ``dropped``, their prepared files deleted (unless another
        row still needs the same file)."""
        now = time.time() if now is None else now
        where, params = _dead_rows(destination, ids)
        with self._tx() as con:
            files = [r[0] for r in con.execute(f"SELECT file FROM deliveries WHERE {where}", params)]
            count = con.execute(f"UPDATE deliveries SET state = ?, updated_at = ? WHERE {where}",
                                (DeliveryState.DROPPED.value, now, *params)).rowcount
            unused = _unused_files(con, files)
        _delete(unused)
        return count

    def purge_delivered(self, older_than_s: float, now: float | None = None) -> int:
        """Delete rows delivered more than ``older_than_s`` seconds ago, and their prepared files
        (unless another row still needs the same file). Returns the rows deleted."""
        now = time.time() if now is None else now
        condition = "state = ? AND updated_at <= ?"
        params = (DeliveryState.DELIVERED.value, now - older_than_s)
        with self._tx() as con:
            files = [r[0] for r in con.execute(f"SELECT file FROM deliveries WHERE {condition}", params)]
            count = con.execute(f"DELETE FROM deliveries WHERE {condition}", params).rowcount
            unused = _unused_files(con, files)
        _delete(unused)
        return count

    def depth(self) -> dict[str, dict[DeliveryState, int]]:
        """Rows per destination and state (every state, zeros included): metrics and `route status`."""
        with self._tx() as con:
            rows = con.execute("SELECT destination, state, count(*) FROM deliveries GROUP BY destination, state")
            found = [(str(d), DeliveryState(s), int(n)) for d, s, n in rows]
        out: dict[str, dict[DeliveryState, int]] = {}
        for dest, state, n in found:
            out.setdefault(dest, dict.fromkeys(DeliveryState, 0))[state] = n
        return out

    def rows(self, destination: str | None = None, state: DeliveryState | None = None,
             limit: int | None = None) -> list[Delivery]:
        """Rows, oldest first, e.g. the dead ones `route status` lists with their errors."""
        clauses = ["(? IS NULL OR destination = ?)", "(? IS NULL OR state = ?)"]
        value = state.value if state is not None else None
        with self._tx() as con:
            return _select(con, " AND ".join(clauses) + " ORDER BY id LIMIT ?",
                           (destination, destination, value, value, -1 if limit is None else limit))


def format_status(depth: dict[str, dict[DeliveryState, int]], dead: Iterable[Delivery] = ()) -> str:
    """What `pacsflow route status` prints: a count per destination and state, then the dead rows
    (id, study ref, attempts, last error; no PHI)."""
    states = list(DeliveryState)
    width = max([len("destination"), *(len(d) for d in depth)])
    cell = max(len(s.value) for s in states)
    lines = ["  ".join([f"{'destination':<{width}}", *(f"{s.value:>{cell}}" for s in states)])]
    for dest in sorted(depth):
        lines.append("  ".join([f"{dest:<{width}}", *(f"{depth[dest][s]:>{cell}}" for s in states)]))
    dead = list(dead)
    if dead:
        lines.append("")
        lines.append("dead (pacsflow route retry | drop):")
        lines += [f"  #{d.id} {d.destination} study {d.study_ref} after {d.attempts} attempt(s): {d.last_error}"
                  for d in dead]
    return "\n".join(lines)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _json_ids(ids: Iterable[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


def _update(con: sqlite3.Connection, ids: Iterable[int], assignments: str, params: tuple[object, ...]) -> int:
    return con.execute(f"UPDATE deliveries SET {assignments} WHERE id IN (SELECT value FROM json_each(?))",
                       (*params, _json_ids(ids))).rowcount


def _attempts(con: sqlite3.Connection, ids: list[int]) -> list[tuple[int, int]]:
    return [(int(i), int(a)) for i, a in con.execute(
        "SELECT id, attempts FROM deliveries WHERE id IN (SELECT value FROM json_each(?))", (_json_ids(ids),))]


def _select(con: sqlite3.Connection, where: str, params: tuple[object, ...]) -> list[Delivery]:
    return [Delivery.from_row(r) for r in con.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE {where}", params)]


def _dead_rows(destination: str | None, ids: Iterable[int] | None) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause for the dead rows an operator names: all, one destination's, or some ids."""
    where = "state = ? AND (? IS NULL OR destination = ?)"
    params: tuple[object, ...] = (DeliveryState.DEAD.value, destination, destination)
    if ids is not None:
        where += " AND id IN (SELECT value FROM json_each(?))"
        params += (_json_ids(ids),)
    return where, params


def _unused_files(con: sqlite3.Connection, files: Iterable[str]) -> list[str]:
    """Those of ``files`` no row in a live state (queued, sending, dead) refers to."""
    marks = ",".join("?" * len(_LIVE))
    return [f for f in set(files)
            if con.execute(f"SELECT 1 FROM deliveries WHERE file = ? AND state IN ({marks}) LIMIT 1",
                           (f, *_LIVE)).fetchone() is None]


def _delete(files: Iterable[str]) -> None:
    for f in files:
        Path(f).unlink(missing_ok=True)
