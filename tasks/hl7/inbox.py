"""The HL7 inbox: every accepted ADT message, durable before its AA, until it is applied to FHIR.

SQLite in the HL7 PHI zone (``Settings.hl7_dir / "inbox.sqlite"``, owner-only): a row holds the raw
message as received (PHI), its control id (MSH-10, unique: a repeat is recognised and never written
twice), the patient it is about and its event. States: ``pending`` (due at ``next_attempt``),
``applied``, ``failed`` (for good, with a one-line reason; ``replay`` queues it again).

Messages of one patient are handed out in arrival order: a patient's next message only after the
one before it is applied or failed for good, so an A08 never overtakes the A01 it updates, and a
message waiting for a retry holds back the patient's later ones (not the other patients'). An A40
belongs to both its patients: it waits behind the earlier messages of either, and the later
messages of either wait behind it.

Message time: each row keeps its EVN-2 (else MSH-7) as epoch seconds, and ``patients`` the newest
time applied per patient. A message older than that is handed out marked :attr:`InboxMessage.older`
(the drain lets it only fill what the Patient lacks). A time without an offset counts as UTC: a
sender's times compare among themselves.

Pure: sqlite3 only. Each call is one transaction on its own connection, so any thread may share one
``Inbox``; the MLLP server accepts while the drain loop applies.
"""

from __future__ import annotations

import enum
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pacsflow.tasks.core.errors import PermanentError
from pacsflow.tasks.core.sqlite import open_sqlite, sqlite_tx
from pacsflow.tasks.route.outbox import Backoff, one_line
from pacsflow.tasks.settings import Hl7Settings, Settings

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    control_id   TEXT NOT NULL UNIQUE,  -- MSH-10: what logs and the operator name
    raw          BLOB NOT NULL,         -- the message as received (PHI)
    patient_key  TEXT NOT NULL,         -- the patient it is about: orders a patient's messages (PHI)
    merged_key   TEXT,                  -- A40: the merged patient (MRG-1), ordered with it too (PHI)
    message_time REAL,                  -- EVN-2, else MSH-7 (epoch seconds), NULL when the message has none
    event        TEXT NOT NULL,         -- trigger event, e.g. A08
    received_at  REAL NOT NULL,         -- epoch seconds
    state        TEXT NOT NULL,         -- InboxState
    attempts     INTEGER NOT NULL DEFAULT 0,  -- failed attempts since accepted or replayed
    next_attempt REAL NOT NULL,         -- a pending row is due from then (epoch seconds)
    reason       TEXT,                  -- last failure, one line, no PHI
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_patient ON messages(patient_key, state, id);
CREATE INDEX IF NOT EXISTS messages_due ON messages(state, next_attempt);
CREATE TABLE IF NOT EXISTS patients (
    patient_key    TEXT PRIMARY KEY,     -- as in messages (PHI)
    newest_applied REAL NOT NULL,        -- the newest message time applied to this patient
    updated_at     REAL NOT NULL
)
"""
# Added in version 2; a version 1 inbox gets them by ALTER TABLE (see Inbox.__init__).
_V2_COLUMNS = ("merged_key TEXT", "message_time REAL")
_V2_INDEX = "CREATE INDEX IF NOT EXISTS messages_merged ON messages(merged_key, state, id)"
# A patient's head: its oldest pending message (only it may be handed out). An A40 is about two
# patients (patient_key and merged_key): it is a head of both, and waits for both.
# One NOT EXISTS per pair of keys, each a lookup in an index: an OR of them would scan every pending
# row for each pending row.
_EARLIER = "NOT EXISTS (SELECT 1 FROM messages p WHERE p.{0} = m.{1} AND p.state = ? AND p.id < m.id)"
_HEADS = (f"m.state = ? AND {_EARLIER.format('patient_key', 'patient_key')} "
          f"AND {_EARLIER.format('merged_key', 'patient_key')} AND (m.merged_key IS NULL OR "
          f"({_EARLIER.format('patient_key', 'merged_key')} AND {_EARLIER.format('merged_key', 'merged_key')}))")
_HEAD_PARAMS = ("pending",) * 5
_COLUMNS = """m.id, m.control_id, m.raw, m.patient_key, m.merged_key, m.event, m.received_at, m.state, m.attempts,
    m.next_attempt, m.reason, m.message_time,
    (SELECT t.newest_applied FROM patients t WHERE t.patient_key = m.patient_key)"""


class InboxState(str, enum.Enum):
    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"  # for good: a permanent error or the retries spent


class InboxVersionError(PermanentError):
    reason = "hl7-inbox-version"


@dataclass(frozen=True)
class InboxMessage:
    """One stored message; ``raw``, ``patient_key`` and ``merged_key`` are PHI and stay out of reprs.

    ``message_time``: its EVN-2 / MSH-7; ``newest_applied``: the newest message time applied to
    its patient so far (when read)."""

    id: int
    control_id: str
    raw: bytes = field(repr=False)
    patient_key: str = field(repr=False)
    event: str
    received_at: float
    state: InboxState
    attempts: int
    next_attempt: float
    reason: str | None
    merged_key: str | None = field(default=None, repr=False)
    message_time: float | None = None
    newest_applied: float | None = None

    @property
    def older(self) -> bool:
        """Older than a message already applied to its patient: it may only fill what is missing."""
        return (self.message_time is not None and self.newest_applied is not None
                and self.message_time < self.newest_applied)

    @classmethod
    def from_row(cls, row: Sequence[object]) -> "InboxMessage":
        i, control_id, raw, key, merged, event, received, state, attempts, next_attempt, reason, at, newest = row
        return cls(int(str(i)), str(control_id), bytes(raw) if isinstance(raw, (bytes, memoryview)) else b"",
                   str(key), str(event), float(str(received)), InboxState(state), int(str(attempts)),
                   float(str(next_attempt)), None if reason is None else str(reason),
                   None if merged is None else str(merged), _float(at), _float(newest))


def _float(value: object) -> float | None:
    return None if value is None else float(str(value))


@dataclass(frozen=True)
class ReplaySelection:
    """Which stored messages ``replay`` queues again: these control ids, those received since
    ``since`` (epoch seconds), or, with neither, every message failed for good."""

    control_ids: tuple[str, ...] = ()
    since: float | None = None

    def where(self) -> tuple[str, tuple[object, ...]]:
        clauses: list[str] = []
        params: list[object] = []
        if self.control_ids:
            clauses.append(f"control_id IN ({','.join('?' * len(self.control_ids))})")
            params += self.control_ids
        if self.since is not None:
            clauses.append("received_at >= ?")
            params.append(self.since)
        if not clauses:
            clauses.append("state = ?")
            params.append(InboxState.FAILED.value)
        return " AND ".join(clauses), tuple(params)


def backoff_of(hl7: Hl7Settings) -> Backoff:
    """The apply retries' delays: ``apply_retries`` retries after the first attempt."""
    return Backoff(hl7.apply_backoff_s, hl7.apply_max_delay_s, hl7.apply_retries + 1)


class Inbox:
    def __init__(self, path: Path, backoff: Backoff = Backoff(5.0, 600.0, 11)) -> None:
        self.path = Path(path)
        self.backoff = backoff
        self._lock = threading.Lock()
        open_sqlite(self.path, _SCHEMA)
        with self._tx() as con:  # a new file (version 0) takes ours, version 1 is upgraded, another is refused
            version = int(con.execute("PRAGMA user_version").fetchone()[0])
            columns = {row[1] for row in con.execute("PRAGMA table_info(messages)")}
            if version in (0, 1):
                for column in _V2_COLUMNS:
                    if column.split()[0] not in columns:
                        con.execute(f"ALTER TABLE messages ADD COLUMN {column}")
                con.execute(_V2_INDEX)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if version not in (0, 1, SCHEMA_VERSION):
            raise InboxVersionError(f"HL7 inbox {self.path} has schema version {version}; this pacsflow reads "
                                    f"version {SCHEMA_VERSION}")

    @classmethod
    def for_settings(cls, settings: Settings) -> "Inbox":
        return cls(settings.hl7_dir / "inbox.sqlite", backoff_of(settings.hl7))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # Every transaction of this process waits its turn here: a thread blocked on a lock wakes
        # when it is released, whereas SQLite's busy handler sleeps in steps of up to 100 ms, which
        # an ACK waiting behind the drain's write would pay. Other processes (replay) still
        # meet SQLite's lock.
        with self._lock, sqlite_tx(self.path) as con:
            yield con

    # -- the MLLP side ------------------------------------------------------------------------
    def accept(self, control_id: str, raw: bytes, patient_key: str, event: str,
               received_at: float | None = None, *, merged_key: str | None = None,
               message_time: float | None = None) -> bool:
        """Store a message, pending and due now; committed when this returns (the AA may go).
        False, and nothing is written, when ``control_id`` is already stored (a repeat).
        ``merged_key``: an A40's merged patient; ``message_time``: EVN-2 / MSH-7 (epoch seconds)."""
        now = time.time() if received_at is None else received_at
        with self._tx() as con:
            cur = con.execute(
                """INSERT INTO messages(control_id, raw, patient_key, merged_key, message_time, event, received_at,
                                        state, next_attempt, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(control_id) DO NOTHING""",
                (control_id, raw, patient_key, merged_key, message_time, event, now, InboxState.PENDING.value,
                 now, now))
            return cur.rowcount == 1

    # -- the drain loop's side ----------------------------------------------------------------
    def next_batch(self, limit: int = 50, now: float | None = None) -> list[InboxMessage]:
        """Due messages, oldest first, at most one per patient: each patient's oldest pending one,
        and only when it is due (a patient whose head waits for a retry waits as a whole)."""
        now = time.time() if now is None else now
        with self._tx() as con:
            rows = con.execute(f"SELECT {_COLUMNS} FROM messages m WHERE {_HEADS} AND m.next_attempt <= ? "
                               "ORDER BY m.id LIMIT ?", (*_HEAD_PARAMS, now, limit)).fetchall()
        return [InboxMessage.from_row(r) for r in rows]

    def mark_applied(self, control_id: str, now: float | None = None) -> bool:
        """Applied; its message time becomes its patient's newest applied one if it is newer."""
        now = time.time() if now is None else now
        with self._tx() as con:
            done = con.execute("UPDATE messages SET state = ?, reason = NULL, updated_at = ? WHERE control_id = ?",
                               (InboxState.APPLIED.value, now, control_id)).rowcount == 1
            con.execute("""INSERT INTO patients(patient_key, newest_applied, updated_at)
                           SELECT patient_key, message_time, ? FROM messages
                           WHERE control_id = ? AND message_time IS NOT NULL
                           ON CONFLICT(patient_key) DO UPDATE SET
                               newest_applied = max(newest_applied, excluded.newest_applied),
                               updated_at = excluded.updated_at""", (now, control_id))
            return done

    def mark_failed(self, control_id: str, reason: str, *, transient: bool, now: float | None = None,
                    rng: random.Random | None = None) -> InboxMessage | None:
        """Record a failed attempt. Transient: pending again after the backoff, failed for good once
        the retries are spent; permanent: failed for good at once. Returns the row as it is now."""
        now = time.time() if now is None else now
        with self._tx() as con:
            found = con.execute("SELECT attempts FROM messages WHERE control_id = ?", (control_id,)).fetchone()
            if found is None:
                return None
            attempts = int(found[0]) + 1
            dead = not transient or attempts >= self.backoff.max_attempts
            state = InboxState.FAILED if dead else InboxState.PENDING
            due = now if dead else now + self.backoff.delay(attempts, rng)
            con.execute("""UPDATE messages SET state = ?, attempts = ?, next_attempt = ?, reason = ?, updated_at = ?
                           WHERE control_id = ?""", (state.value, attempts, due, one_line(reason), now, control_id))
            return _select(con, "control_id = ?", (control_id,))[0]

    def next_due(self) -> float | None:
        """When the next message may be handed out (epoch seconds; a patient's head waiting for its
        retry decides for the patient's later ones); None when none is pending."""
        with self._tx() as con:
            value = con.execute(f"SELECT min(m.next_attempt) FROM messages m WHERE {_HEADS}", _HEAD_PARAMS).fetchone()[0]
        return None if value is None else float(value)

    def oldest_pending(self) -> float | None:
        """When the oldest pending message was received (epoch seconds); None when none is pending."""
        with self._tx() as con:
            value = con.execute("SELECT min(received_at) FROM messages WHERE state = ?",
                                (InboxState.PENDING.value,)).fetchone()[0]
        return None if value is None else float(value)

    # -- the operator's side (`pacsflow hl7 replay | status`) ----------------------------------
    def replay(self, selection: ReplaySelection = ReplaySelection(), now: float | None = None) -> int:
        """Queue the selected messages again (pending, due now, attempts reset), whatever their
        state; they keep their arrival order. Returns how many."""
        now = time.time() if now is None else now
        where, params = selection.where()
        with self._tx() as con:
            return con.execute(
                f"""UPDATE messages SET state = ?, attempts = 0, next_attempt = ?, reason = NULL, updated_at = ?
                    WHERE {where}""", (InboxState.PENDING.value, now, now, *params)).rowcount

    def purge(self, retention_days: float, now: float | None = None) -> int:
        """Delete applied and failed messages received more than ``retention_days`` ago (pending
        ones are kept whatever their age). A control id repeated after its purge is new again. A
        patient's newest applied time goes too once none of its messages is left and it is as old."""
        now = time.time() if now is None else now
        cutoff = now - retention_days * 86400
        with self._tx() as con:
            count = con.execute("DELETE FROM messages WHERE state IN (?, ?) AND received_at < ?",
                                (InboxState.APPLIED.value, InboxState.FAILED.value, cutoff)).rowcount
            con.execute("""DELETE FROM patients WHERE updated_at < ? AND NOT EXISTS
                           (SELECT 1 FROM messages m WHERE m.patient_key = patients.patient_key)""", (cutoff,))
            return count

    def counts(self) -> dict[InboxState, int]:
        """Messages per state (every state, zeros included)."""
        out = dict.fromkeys(InboxState, 0)
        with self._tx() as con:
            for state, n in con.execute("SELECT state, count(*) FROM messages GROUP BY state"):
                out[InboxState(state)] = int(n)
        return out

    def messages(self, state: InboxState | None = None, limit: int | None = None) -> list[InboxMessage]:
        """Stored messages, oldest first (of one state when given)."""
        value = None if state is None else state.value
        with self._tx() as con:
            return _select(con, "(? IS NULL OR state = ?) ORDER BY id LIMIT ?",
                           (value, value, -1 if limit is None else limit))

    def get(self, control_id: str) -> InboxMessage | None:
        with self._tx() as con:
            found = _select(con, "control_id = ?", (control_id,))
        return found[0] if found else None


def format_status(counts: dict[InboxState, int], failed: Iterable[InboxMessage] = (),
                  oldest_pending: float | None = None, now: float | None = None) -> str:
    """What `pacsflow hl7 status` prints: a count per state, the age of the oldest pending message,
    then the messages failed for good (control id, event, attempts, reason; no PHI)."""
    lines = [f"{state.value:>8}: {counts.get(state, 0)}" for state in InboxState]
    if oldest_pending is not None:
        age = (time.time() if now is None else now) - oldest_pending
        lines.append(f"oldest pending: received {age:.0f} s ago")
    failed = list(failed)
    if failed:
        lines += ["", "failed (pacsflow hl7 replay --control-id ID):"]
        lines += [f"  {m.control_id} {m.event} after {m.attempts} attempt(s): {m.reason}" for m in failed]
    return "\n".join(lines)


def _select(con: sqlite3.Connection, where: str, params: tuple[object, ...]) -> list[InboxMessage]:
    return [InboxMessage.from_row(r) for r in con.execute(f"SELECT {_COLUMNS} FROM messages m WHERE {where}", params)]
