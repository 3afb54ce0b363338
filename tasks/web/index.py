"""What the catalog says, for the web routes: a pool of sandboxed read-only DuckDB connections over
the current snapshot, and the lookups QIDO-RS and WADO-RS make.

Every statement is a constant of the calling module with ``?`` placeholders; values from requests
are only ever bound. A connection comes from :func:`pacsflow.catalog.views.confined` (it may read
the snapshot's Parquet files and nothing else), holds the small ``studies`` table in memory, and
is pooled per snapshot: opening one costs 50-120 ms at 1M instances (reading the manifest, binding
the views, confining, reading ``studies``), a study search on a pooled one about 3 ms. Each request checks the ``_current`` link (one readlink); when a commit has moved
it, the idle connections of the older snapshot are closed and new ones bind the new snapshot, so a
request never mixes two snapshots and never holds a vacuumed one for long.

Another backend (``catalog.backend: delta``) has no such link to check cheaply: every request
binds the tables' current files on a connection of its own (no pool), so it too sees each commit
at once and never mixes two versions.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb

from pacsflow.catalog.store import CURRENT_LINK
from pacsflow.catalog.views import Catalog, confined

IDLE_CONNECTIONS = 8
# The studies table is small (a row per study: about 3,400 at 1M instances, 33,000 at 10M) but
# spread over a file per study month like the others; reading it from Parquet opens every month's
# file on each query (about 30 ms at 84 months, against 3 ms in memory), which every QIDO-RS
# search pays. Each pooled connection holds it in memory instead (a few MB at 10M), read once
# when the connection is opened, so still the connection's snapshot.
_HOLD_STUDIES = (
    "CREATE TEMP TABLE _studies_held AS SELECT * FROM studies",
    "DROP VIEW studies",
    "ALTER TABLE _studies_held RENAME TO studies",
)
# All rows of a study, in all three tables, live in its study month's partition (the store's
# layout): bound as a constant, it lets DuckDB open that month's file of series or instances
# instead of all of them (at 84 months and 1M instances: 8 ms against 68 for a study's series).
_MONTH = "SELECT study_month FROM studies WHERE study_uid = ?"

_INSTANCE_FILES = (
    "SELECT study_uid, series_uid, sop_instance_uid, transfer_syntax_uid, file_path, file_size, "
    "number_of_frames, rows, columns, samples_per_pixel, bits_allocated "
    "FROM instances WHERE study_uid = ? AND study_month IS NOT DISTINCT FROM ? "
    "AND (? IS NULL OR series_uid = ?) AND (? IS NULL OR sop_instance_uid = ?) "
    "ORDER BY series_uid, instance_number NULLS LAST, sop_instance_uid"
)
_INSTANCE_JSON = (
    "SELECT i.study_uid, i.series_uid, i.sop_instance_uid, i.transfer_syntax_uid, i.number_of_frames, "
    "i.dicom_json, s.number_of_series, s.number_of_instances "
    "FROM instances i JOIN studies s USING (study_uid) "
    "WHERE i.study_uid = ? AND i.study_month IS NOT DISTINCT FROM ? "
    "AND (? IS NULL OR i.series_uid = ?) AND (? IS NULL OR i.sop_instance_uid = ?) "
    "ORDER BY i.series_uid, i.instance_number NULLS LAST, i.sop_instance_uid"
)


def study_month(con: duckdb.DuckDBPyConnection, study: str) -> tuple[bool, str | None]:
    """Whether ``study`` is in the catalog, and the study month (partition) holding all its rows
    (None: the partition of studies without a date)."""
    row = con.execute(_MONTH, [study]).fetchone()
    return row is not None, (row[0] if row else None)


def _dicts(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _open(root: Catalog) -> duckdb.DuckDBPyConnection:
    con, _version = confined(root)
    try:
        for statement in _HOLD_STUDIES:
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con


@dataclass(frozen=True)
class InstanceFile:
    """One instance's lake file and what frame extraction needs to know about it."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str | None
    file_path: str
    file_size: int
    number_of_frames: int | None
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None


class CatalogIndex:
    """The catalog under ``root`` (a snapshot store's folder, or an opened store of any backend)
    as the web routes query it (thread-safe)."""

    def __init__(self, root: Catalog, idle: int = IDLE_CONNECTIONS) -> None:
        self.root: Catalog = Path(root) if isinstance(root, str) else root
        self.idle = idle
        self._lock = threading.Lock()
        self._stamp: str | None = None
        self._pool: list[duckdb.DuckDBPyConnection] = []

    def _current_stamp(self) -> str | None:
        if not isinstance(self.root, Path):
            return None  # not the snapshot store's folder: bind the current files on every request
        try:
            return os.readlink(self.root / CURRENT_LINK)
        except OSError:  # no commit yet, or an older layout: bind whatever is current, every time
            return None

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one request, pinned to the current snapshot, returned to the pool after."""
        stamp = self._current_stamp()
        con = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                stale, self._pool, self._stamp = self._pool, [], stamp
                for old in stale:
                    old.close()
            if self._pool:
                con = self._pool.pop()
        if con is None:
            con = _open(self.root)
        try:
            yield con
        except BaseException:
            con.close()
            raise
        with self._lock:
            if stamp is not None and stamp == self._stamp and len(self._pool) < self.idle:
                self._pool.append(con)
                return
        con.close()

    def close(self) -> None:
        with self._lock:
            stale, self._pool = self._pool, []
        for con in stale:
            con.close()

    def rows(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        """The rows of one parameterized SELECT, as dicts."""
        with self.connection() as con:
            return _dicts(con.execute(sql, list(params)))

    def _of_study(self, sql: str, study: str, series: str | None, instance: str | None) -> list[dict[str, Any]]:
        with self.connection() as con:
            found, month = study_month(con, study)
            return _dicts(con.execute(sql, [study, month, series, series, instance, instance])) if found else []

    def instance_files(self, study: str, series: str | None = None,
                       instance: str | None = None) -> list[InstanceFile]:
        """The lake files of a study, one of its series or one instance, in series and instance order."""
        found = self._of_study(_INSTANCE_FILES, study, series, instance)
        return [InstanceFile(**row) for row in found]

    def instance_json(self, study: str, series: str | None = None,
                      instance: str | None = None) -> list[dict[str, Any]]:
        """Rows with each instance's ``dicom_json`` (text) and its study's counts, in the same order."""
        return self._of_study(_INSTANCE_JSON, study, series, instance)
