"""The listener's study tracker: which received objects each study has, and which are routed.

SQLite in the listener's PHI zone (original UIDs and staged paths). A study is *stable* when it
has objects not yet handled and nothing of it arrived for the stability window; the objects
handed out together form a *generation*. Objects that arrive once a generation is handed out
belong to the next one, so a study that resumes after its window (a late series) is routed
again for its new objects only. Handled objects stay recorded: the same SOP Instance UID sent
again is counted as a duplicate and never routed twice.

Every update is one transaction, so a crash leaves the old or the new state; ``recover`` mends
what a crash between a file's rename and its row can leave behind.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from pydicom import dcmread

from pacsflow.tasks.core.sqlite import open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid     TEXT PRIMARY KEY,   -- original UID (PHI zone)
    generation    INTEGER NOT NULL,   -- the generation new objects join
    last_arrival  REAL NOT NULL       -- wall clock, seconds
);
CREATE TABLE IF NOT EXISTS objects (
    sop_uid       TEXT PRIMARY KEY,   -- original UID (PHI zone)
    study_uid     TEXT NOT NULL,
    path          TEXT NOT NULL,      -- the staged file
    calling_ae    TEXT NOT NULL,      -- empty when not known (found on disk after a crash)
    arrived_at    REAL NOT NULL,
    generation    INTEGER NOT NULL,
    handled       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS objects_unhandled ON objects(study_uid, handled, generation);
CREATE INDEX IF NOT EXISTS objects_path ON objects(path);
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
)
"""


PAGE = 1000  # objects of a stable study read at a time: a 20,000-image series is never held whole


@dataclass(frozen=True)
class StableStudy:
    """A study's objects to route now: those not yet handled (original UIDs: PHI zone only).
    ``objects()`` reads them from the tracker a page at a time, so memory does not follow the
    size of the study; ``paths``, ``sop_uids`` and ``senders`` are whole lists, for tests."""

    study_uid: str
    generation: int
    count: int
    pages: Callable[[], Iterator[list[tuple[str, Path, str]]]] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return self.count

    def objects(self) -> Iterator[tuple[str, Path, str]]:
        """(SOP Instance UID, staged path, calling AE or "") of each object, in pages."""
        for page in self.pages():
            yield from page

    def snapshot(self) -> "StableStudy":
        """A copy holding its objects in memory (for tests and small studies): it reads the same
        after the tracker handed the objects on or closed."""
        rows = list(self.objects())
        return StableStudy(self.study_uid, self.generation, len(rows), lambda: iter([rows]))

    @property
    def paths(self) -> list[Path]:
        return [path for _, path, _ in self.objects()]

    @property
    def sop_uids(self) -> list[str]:
        return [sop for sop, _, _ in self.objects()]

    @property
    def senders(self) -> list[str]:
        return [ae for _, _, ae in self.objects()]

    @property
    def calling_aes(self) -> frozenset[str]:
        return frozenset(ae for _, _, ae in self.objects() if ae)


@dataclass(frozen=True)
class Recovery:
    """What ``recover`` found: files on disk the tracker did not know, rows without a file."""

    registered: int
    dropped: int
    unreadable: int


class StudyTracker:
    """The tracker's database (``listener_dir/tracker.sqlite``). Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        open_sqlite(path, _SCHEMA)
        # One connection, serialised by a lock: the receiver calls ``arrived`` once per object.
        # synchronous=NORMAL in WAL mode loses no commit to a killed process, only to a power cut.
        self._con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def arrived(self, study_uid: str, sop_uid: str, path: Path, calling_ae: str, now: float) -> bool:
        """Record an object in staging; False when it was handled already (a duplicate: counted, ignored)."""
        with self._tx() as con:
            row = con.execute("SELECT handled FROM objects WHERE sop_uid = ?", (sop_uid,)).fetchone()
            if row is not None and row[0]:
                _bump(con, "duplicates")
                return False
            con.execute("INSERT INTO studies (study_uid, generation, last_arrival) VALUES (?, 1, ?) "
                        "ON CONFLICT (study_uid) DO UPDATE SET last_arrival = MAX(last_arrival, excluded.last_arrival)",
                        (study_uid, now))
            if row is None:
                con.execute("INSERT INTO objects (sop_uid, study_uid, path, calling_ae, arrived_at, generation) "
                            "SELECT ?, ?, ?, ?, ?, generation FROM studies WHERE study_uid = ?",
                            (sop_uid, study_uid, str(path), calling_ae, now, study_uid))
            else:  # sent again before its study was handled: the same object, the newest bytes
                con.execute("UPDATE objects SET path = ?, calling_ae = ?, arrived_at = ? WHERE sop_uid = ?",
                            (str(path), calling_ae, now, sop_uid))
        return True

    def stable(self, now: float, window_s: float) -> list[StableStudy]:
        """Studies with unhandled objects and no arrival for ``window_s``. Each is handed out as a
        generation: objects arriving from now on join the next one."""
        with self._tx() as con:
            uids = [r[0] for r in con.execute(
                "SELECT study_uid FROM studies s WHERE last_arrival <= ? AND EXISTS "
                "(SELECT 1 FROM objects o WHERE o.study_uid = s.study_uid AND NOT o.handled) ORDER BY last_arrival",
                (now - window_s,))]
            found = [self._hand_out(con, uid) for uid in uids]
        return found

    def handled(self, study_uid: str, generation: int) -> int:
        """The study's objects up to ``generation`` are routed and handed off; how many were marked."""
        with self._tx() as con:
            done = con.execute("UPDATE objects SET handled = 1 WHERE study_uid = ? AND NOT handled AND generation <= ?",
                               (study_uid, generation)).rowcount
        return done

    def pending(self) -> int:
        """Objects received and not yet handled."""
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM objects WHERE NOT handled").fetchone()[0])

    def duplicates(self) -> int:
        with self._lock:
            row = self._con.execute("SELECT value FROM counters WHERE name = 'duplicates'").fetchone()
        return int(row[0]) if row else 0

    def recover(self, folder: Path, now: float) -> Recovery:
        """At start, after a crash: staged files under ``folder`` the tracker does not know (killed
        between the rename and the insert) are registered as arrived ``now``; unhandled objects
        whose file is gone are dropped. Handled rows stay: they keep duplicates out."""
        registered = unreadable = 0
        for path in _staged_files(folder):
            with self._lock:
                known = self._con.execute("SELECT 1 FROM objects WHERE path = ?", (str(path),)).fetchone()
            if known:
                continue
            uids = _header_uids(path)
            if uids is None:
                unreadable += 1
                continue
            registered += self.arrived(uids[0], uids[1], path, "", now)
        dropped = 0
        for sop_uid, name in self._unhandled_paths():
            if not Path(name).exists():
                with self._tx() as con:
                    dropped += con.execute("DELETE FROM objects WHERE sop_uid = ?", (sop_uid,)).rowcount
        return Recovery(registered, dropped, unreadable)

    def _hand_out(self, con: sqlite3.Connection, study_uid: str) -> StableStudy:
        generation = int(con.execute("SELECT generation FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()[0])
        con.execute("UPDATE studies SET generation = ? WHERE study_uid = ?", (generation + 1, study_uid))
        # The unhandled objects of earlier generations (their routing failed) join this one.
        count = con.execute("UPDATE objects SET generation = ? WHERE study_uid = ? AND NOT handled AND generation <= ?",
                            (generation, study_uid, generation)).rowcount
        return StableStudy(study_uid, generation, int(count), lambda: self._pages(study_uid, generation))

    def _pages(self, study_uid: str, generation: int) -> Iterator[list[tuple[str, Path, str]]]:
        """The generation's objects by SOP Instance UID, ``PAGE`` at a time (keyset paging: objects
        arriving meanwhile belong to the next generation and are not in it)."""
        after = ""
        while True:
            with self._lock:
                rows = self._con.execute(
                    "SELECT sop_uid, path, calling_ae FROM objects WHERE study_uid = ? AND generation = ? "
                    "AND sop_uid > ? ORDER BY sop_uid LIMIT ?", (study_uid, generation, after, PAGE)).fetchall()
            if not rows:
                return
            yield [(sop, Path(path), ae or "") for sop, path, ae in rows]
            after = rows[-1][0]

    def _unhandled_paths(self) -> list[tuple[str, str]]:
        with self._lock:
            return self._con.execute("SELECT sop_uid, path FROM objects WHERE NOT handled").fetchall()

    def _tx(self) -> "_Transaction":
        return _Transaction(self._con, self._lock)


class _Transaction:
    """BEGIN IMMEDIATE on the shared connection, under its lock: committed, or rolled back on error."""

    def __init__(self, con: sqlite3.Connection, lock: threading.Lock) -> None:
        self.con, self.lock = con, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.con.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.con

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            self.con.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self.lock.release()


def _bump(con: sqlite3.Connection, name: str) -> None:
    con.execute("INSERT INTO counters (name, value) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1", (name,))


def _staged_files(folder: Path) -> Iterator[Path]:
    """Staged objects: ``<study folder>/<name>.dcm``; a writer's leftover temp file is removed."""
    if not folder.is_dir():
        return
    for study in os.scandir(folder):
        if not study.is_dir():
            continue
        for entry in os.scandir(study.path):
            if entry.name.startswith("."):
                Path(entry.path).unlink(missing_ok=True)  # a temp file the crash left: never acknowledged
            elif entry.name.endswith(".dcm") and entry.is_file():
                yield Path(entry.path)


def _header_uids(path: Path) -> tuple[str, str] | None:
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
        return str(header.StudyInstanceUID), str(header.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - the writer only stages decodable objects; a damaged file is left alone
        return None
