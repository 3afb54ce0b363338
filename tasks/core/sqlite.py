"""SQLite for the ledgers in the PHI zone: WAL mode, one write transaction per update."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from pacsflow.tasks.core.files import PRIVATE_FILE_MODE, ensure_private_dir


def open_sqlite(path: Path, schema: str) -> None:
    """Create (if needed) a WAL-mode SQLite database with ``schema``.

    Several runs or threads may open a new database at once: switching to WAL does not wait
    for the busy timeout, so it is retried; the schema is created under a write lock, which does.
    """
    ensure_private_dir(path.parent)
    # Owner-only before SQLite first opens it: its -wal and -shm files take the database's mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    os.chmod(path, PRIVATE_FILE_MODE)
    for attempt in range(100):
        try:
            with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as con:
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    con.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.02)
    with sqlite_tx(path) as con:
        for statement in schema.split(";"):
            if statement.strip():
                con.execute(statement)


@contextmanager
def sqlite_tx(path: Path) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error."""
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")
