"""The crosswalk: pseudonym <-> original (patient IDs, study UIDs). PHI: never logged, outside the
lake, written only when asked for.

Two homes, one interface (:class:`Crosswalk`: ``add`` rows, read ``rows``):

- a CSV file (``deid.crosswalk_path``, owner-only 0600), one writer at a time: one machine;
- a table of its own PostgreSQL schema (``pacsflow_phi``) reached with its own role
  (``state.crosswalk_url``, by default ``state.url``), which many processes on many machines write
  at once: each row is an idempotent insert of a (kind, pseudonym, original) key, so a repeated or
  concurrent write neither duplicates nor loses a row. The role that owns the schema is the only one
  that can read it; :func:`crosswalk_role_sql` is the SQL an administrator runs to set that up.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol

from pacsflow.tasks.core.files import write_private_file
from pacsflow.tasks.core.statedb import StateDb, mask_url

if TYPE_CHECKING:
    from pacsflow.tasks.settings import Settings


CROSSWALK_HEADER = ["kind", "pseudonym", "original"]
SCHEMA_NAME = "pacsflow_phi"  # the PostgreSQL schema; also the default name of the role that owns it
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_CHUNK = 1000  # rows per INSERT statement batch

# Qualified, so a role without rights on the schema reads "permission denied for schema pacsflow_phi"
# rather than finding no schema on its search path.
_TABLE = f"{SCHEMA_NAME}.crosswalk"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    kind       TEXT NOT NULL,  -- 'patient' | 'study'
    pseudonym  TEXT NOT NULL,
    original   TEXT NOT NULL,
    PRIMARY KEY (kind, pseudonym, original)
);
"""

Row = tuple[str, str, str]


class Crosswalk(Protocol):
    """Where (kind, pseudonym, original) rows are kept."""

    @property
    def where(self) -> str: ...  # for summaries: a path, or the masked URL and schema (no PHI)

    def add(self, rows: Iterable[Row]) -> int: ...  # the number of rows now in the crosswalk

    def rows(self) -> list[Row]: ...


def update_crosswalk(path: Path | str, rows: Iterable[tuple[str, str, str]]) -> int:
    """Merge (kind, pseudonym, original) rows into the crosswalk CSV (PHI: owner-only 0600,
    outside the lake, never logged); returns the number of rows in it."""
    path = Path(path)
    known = set(_read_csv(path))
    known.update(tuple(r) for r in rows)  # type: ignore[misc]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CROSSWALK_HEADER)
    w.writerows(sorted(known))
    write_private_file(path, buf.getvalue())
    return len(known)


def _read_csv(path: Path) -> list[Row]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        return [(r[0], r[1], r[2]) for r in reader if len(r) == 3]


class CsvCrosswalk:
    """The crosswalk as one CSV file (one writer at a time)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def where(self) -> str:
        return str(self.path)

    def add(self, rows: Iterable[Row]) -> int:
        return update_crosswalk(self.path, rows)

    def rows(self) -> list[Row]:
        return sorted(set(_read_csv(self.path)))


class DbCrosswalk:
    """The crosswalk as the table ``crosswalk`` of the schema ``pacsflow_phi`` at ``url`` (PostgreSQL),
    created on first use by the role of ``url``, which should be the schema's owner and no other store's."""

    def __init__(self, url: str) -> None:
        # the SQLite path is never used: a PostgreSQL URL is required (check_url refuses anything else)
        self.db = StateDb(Path(os.devnull), url, SCHEMA_NAME, _SCHEMA)

    @property
    def where(self) -> str:
        return f"{mask_url(self.db.url or '')} schema {SCHEMA_NAME}"

    def add(self, rows: Iterable[Row]) -> int:
        # Sorted, so concurrent writers take the key locks in one order; ON CONFLICT DO NOTHING makes
        # a row written twice (a retried run, two machines on one patient) a no-op, never an error.
        todo = sorted({(str(k), str(p), str(o)) for k, p, o in rows})
        with self.db.tx() as tx:
            for i in range(0, len(todo), _CHUNK):
                tx.executemany(f"INSERT INTO {_TABLE}(kind, pseudonym, original) VALUES (?, ?, ?) "
                               "ON CONFLICT DO NOTHING", todo[i : i + _CHUNK])
            return int(tx.execute(f"SELECT count(*) FROM {_TABLE}").fetchone()[0])

    def rows(self) -> list[Row]:
        with self.db.tx(serialized=False) as tx:
            found = tx.execute(f"SELECT kind, pseudonym, original FROM {_TABLE} ORDER BY 1, 2, 3").fetchall()
        return [(r[0], r[1], r[2]) for r in found]


def crosswalk_url(settings: Settings) -> str | None:
    """The PostgreSQL URL of the crosswalk: ``state.crosswalk_url``, else ``state.url`` when the
    crosswalk is asked for (``deid.crosswalk_path`` set); None: the CSV file, or no crosswalk."""
    if settings.state.crosswalk_url:
        return settings.state.crosswalk_url
    return settings.state.url if settings.deid.crosswalk_path is not None else None


def open_crosswalk(settings: Settings) -> Crosswalk | None:
    """The deployment's crosswalk: in PostgreSQL (:func:`crosswalk_url`), else the CSV file at
    ``deid.crosswalk_path``, else None (no crosswalk is kept)."""
    url = crosswalk_url(settings)
    if url is not None:
        return DbCrosswalk(url)
    path = settings.deid.crosswalk_path
    return CsvCrosswalk(path) if path is not None else None


def crosswalk_role_sql(database: str, role: str = SCHEMA_NAME) -> str:
    """The SQL an administrator runs once, connected to ``database``: a login role ``role`` that owns
    the schema ``pacsflow_phi`` (no one else may use it; a superuser still can). Give the role its
    password apart (``\\password`` in psql), never in this script or a settings file."""
    for name in (database, role):
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain SQL identifier: {name!r}")
    return "\n".join([
        f"CREATE ROLE {role} LOGIN;",
        f"GRANT CONNECT ON DATABASE {database} TO {role};",
        f"CREATE SCHEMA IF NOT EXISTS {SCHEMA_NAME} AUTHORIZATION {role};",
        f"REVOKE ALL ON SCHEMA {SCHEMA_NAME} FROM PUBLIC;",
        "",
    ])
