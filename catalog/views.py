"""DuckDB over the catalog: views ``studies``, ``series``, ``instances`` (+ ``catalog_snapshot``).

Every view has the columns of :mod:`pacsflow.catalog.schema` plus ``study_month`` (VARCHAR 'YYYY-MM', NULL
for studies without a date), the hive partition column: filtering on it skips whole files
without opening them, filtering on ``study_date``/``study_uid`` skips row groups.

Two ways to get them, chosen for their consistency/staleness trade-off:

* :func:`connect` / :func:`query` (Python): TEMP views pinned to the snapshot that was current when
  the connection was made (or last :func:`refresh`-ed). :func:`query` (``pacsflow catalog query``) is
  the read-only path for SQL from people: see its docstring for what it refuses. Every query on the
  connection sees one consistent snapshot, even while commits land; the connection does not see
  later commits until ``refresh(con, root)``, and must be refreshed within the vacuum grace period
  (the store deletes superseded snapshots after it). The file lists live in DuckDB variables, so refreshing is
  cheap and the views never need rebinding by hand.
* :func:`write_views_database` (one ``.duckdb`` file for trusted analysts, not a sandbox: see its
  docstring): persistent views over ``<root>/<table>/*/*.parquet``, the store's fixed table links
  through ``_current``, the symlink it swaps atomically on commit. These views are *live*: each
  query lists the files of the newest snapshot; the file never needs rewriting after commits.
  Trade-off: a query that starts within milliseconds of a commit may list the files of one
  snapshot and open them after the next is published (a rewritten partition's file is then
  missing), and a query running longer than the vacuum grace period may fail on a deleted file.
  Rerun the query in either case. Write the file again only if the catalog root moves. The file
  is written in DuckDB's v1.0.0 storage format (:data:`VIEWS_STORAGE_VERSION`), so DuckDB 1.x
  opens it as well as the DuckDB pacsflow runs with.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pacsflow.catalog.backends import CatalogBackend, CatalogSnapshot
from pacsflow.catalog.errors import CatalogError, CatalogNotFound
from pacsflow.catalog.schema import SCHEMAS
from pacsflow.catalog.store import (
    CURRENT_LINK,
    MANIFEST,
    NULL_PARTITION_DIR,
    PARTITION_COLUMN,
    TABLES,
    CatalogStore,
)

#: Where the views read from: a catalog root (the snapshot store's folder) or an opened store
#: (:func:`pacsflow.catalog.backends.open_store`, whatever its backend).
Catalog = Path | str | CatalogBackend


def _store(catalog: Catalog) -> CatalogBackend:
    return catalog if isinstance(catalog, CatalogBackend) else CatalogStore(catalog)

VIEW_NAMES: tuple[str, ...] = TABLES
# The oldest storage format the installed DuckDB writes: DuckDB 1.0 and later read it (1.x refuses
# the default format of DuckDB 2, "database file with version number 69").
VIEWS_STORAGE_VERSION = "v1.0.0"

# DuckDB cannot bind parameters in DDL; these statements are constants and the file lists are
# bound separately through SET VARIABLE ... = ? (see refresh()).
_SET_FILES = {
    "studies": "SET VARIABLE pacsflow_files_studies = ?",
    "series": "SET VARIABLE pacsflow_files_series = ?",
    "instances": "SET VARIABLE pacsflow_files_instances = ?",
}


def _hive_select(files: str, union_by_name: bool = True) -> str:
    """SELECT over Parquet ``files`` (a SQL expression) with the partition column. DuckDB 2 reads the
    null partition's folder as NULL; DuckDB 1.x returns its name, so the name is mapped to NULL here
    (filters on study_month still skip whole files in both, measured with 1.1.3 and 2.0.1).

    ``union_by_name`` reads files written before a schema change (columns matched by name, the new
    ones NULL), at a price: DuckDB then opens every file's footer when the view is bound, on every
    query (0.1–1 s at 84 files per table on a busy machine, more than many queries themselves)."""
    return (
        f"SELECT * REPLACE (nullif({PARTITION_COLUMN}, '{NULL_PARTITION_DIR}') AS {PARTITION_COLUMN}) "
        f"FROM read_parquet({files}, hive_partitioning = true, "
        f"hive_types = {{'{PARTITION_COLUMN}': 'VARCHAR'}}, union_by_name = {str(union_by_name).lower()})"
    )


# Pinned views know their files' schemas (the manifest records them): union_by_name only when a
# file still has an older one.
_PINNED_VIEW = {
    (name, mixed): f"CREATE OR REPLACE TEMP VIEW {name} AS "
    + _hive_select(f"getvariable('pacsflow_files_{name}')", union_by_name=mixed)
    for name in TABLES
    for mixed in (False, True)
}
_EMPTY_VIEW = {
    "studies": "CREATE OR REPLACE TEMP VIEW studies AS SELECT * FROM _pacsflow_empty_studies",
    "series": "CREATE OR REPLACE TEMP VIEW series AS SELECT * FROM _pacsflow_empty_series",
    "instances": "CREATE OR REPLACE TEMP VIEW instances AS SELECT * FROM _pacsflow_empty_instances",
}
_SNAPSHOT_VARS = (
    "SET VARIABLE pacsflow_snapshot_version = ?",
    "SET VARIABLE pacsflow_snapshot_created_at = ?",
    "SET VARIABLE pacsflow_snapshot_schema_version = ?",
)
_PINNED_SNAPSHOT_VIEW = (
    "CREATE OR REPLACE TEMP VIEW catalog_snapshot AS SELECT "
    "CAST(getvariable('pacsflow_snapshot_version') AS BIGINT) AS version, "
    "CAST(getvariable('pacsflow_snapshot_created_at') AS TIMESTAMPTZ) AS created_at, "
    "CAST(getvariable('pacsflow_snapshot_schema_version') AS INTEGER) AS schema_version"
)


def _empty_with_partition(table: str) -> pa.Table:
    empty = SCHEMAS[table].empty_table()
    return empty.append_column(pa.field(PARTITION_COLUMN, pa.string()), pa.array([], pa.string()))


def refresh(con: duckdb.DuckDBPyConnection, root: Catalog) -> int:
    """Point ``con``'s TEMP views at the catalog's current snapshot; returns its version."""
    return _bind(con, _store(root).snapshot())


def _bind(con: duckdb.DuckDBPyConnection, snap: CatalogSnapshot) -> int:
    filesystem = getattr(snap, "filesystem", None)  # remote files: read through fsspec, no DuckDB extension
    if filesystem is not None and not con.filesystem_is_registered(filesystem.protocol[0]):
        con.register_filesystem(filesystem)
    for name in VIEW_NAMES:
        files = snap.paths(name)
        if files:
            con.execute(_SET_FILES[name], [files])
            con.execute(_PINNED_VIEW[name, not snap.current_schema(name)])
        else:  # nothing committed yet: typed, empty
            con.register(f"_pacsflow_empty_{name}", _empty_with_partition(name))
            con.execute(_EMPTY_VIEW[name])
    created = snap.created_at.isoformat() if snap.created_at else None
    for stmt, value in zip(_SNAPSHOT_VARS, (snap.version, created, snap.schema_version), strict=True):
        con.execute(stmt, [value])
    con.execute(_PINNED_SNAPSHOT_VIEW)
    return snap.version


def connect(
    root: Catalog, database: str = ":memory:", read_only: bool = False
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with TEMP views over the current snapshot (see the module docstring).

    ``database`` may be an analyst's own DuckDB file; the views are TEMP, so nothing is written to
    it (and ``read_only=True`` works).
    """
    con = duckdb.connect(database, read_only=read_only)
    try:
        refresh(con, root)
    except BaseException:
        con.close()
        raise
    return con


class QueryRefused(CatalogError, ValueError):
    """SQL given to :func:`query` that would do more than read the catalog; the message is one line."""

    reason = "catalog-query-refused"


# Settings that confine a connection to the files it was given. Order matters: the access limits
# first, the lock last (after it, no SET or RESET from the SQL can loosen them).
_CONFINE = (
    "SET allowed_directories = []",
    "SET enable_external_access = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET python_enable_replacements = false",
    "SET lock_configuration = true",
)
_ALLOWED = (
    "queries may read only the current snapshot's Parquet files "
    "(enable_external_access=false, allowed_paths=those files, lock_configuration=true)"
)


def _confine(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """Leave ``con`` able to read ``files`` and nothing else on disk or the network."""
    con.execute("SET allowed_paths = ?", [files])
    for stmt in _CONFINE:
        con.execute(stmt)


def _single_select(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    """The one SELECT in ``sql``. allowed_paths lets DuckDB *write* the files it may read (COPY
    over a live catalog file would succeed), so statements other than SELECT never run."""
    statements = con.extract_statements(sql)
    kinds = [st.type.name for st in statements]
    if kinds != ["SELECT"]:
        got = ", ".join(kinds) or "no statement"
        raise QueryRefused(
            f"only one SELECT statement may run (got {got}); "
            "SELECT, WITH, VALUES, DESCRIBE, SUMMARIZE and SHOW read the catalog, nothing else runs here"
        )
    return statements[0]


def confined(root: Catalog) -> tuple[duckdb.DuckDBPyConnection, int]:
    """An in-memory connection with TEMP views pinned to the current snapshot that may read that
    snapshot's Parquet files and nothing else (the sandbox of :func:`query`), and the snapshot's
    version. For services that run their own parameterized SELECTs many times on one connection:
    open another when the version changes. Raises :class:`CatalogNotFound` like :func:`query`."""
    folder = root.root if isinstance(root, CatalogStore) else None if isinstance(root, CatalogBackend) else root
    if folder is not None and not Path(folder).is_dir():
        raise CatalogNotFound(f"catalog_root: no catalog folder at {folder}")
    snap = _store(root).snapshot()
    con = duckdb.connect(":memory:")
    try:
        _bind(con, snap)
        _confine(con, [path for name in VIEW_NAMES for path in snap.paths(name)])
    except BaseException:
        con.close()
        raise
    return con, snap.version


def query(root: Catalog, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
    """Run one parameterized SELECT over the current snapshot; ``?`` / ``$name`` placeholders.

    Read-only and confined, for SQL typed by people: exactly one SELECT (WITH, DESCRIBE, SUMMARIZE,
    SHOW, VALUES are SELECTs too) on an in-memory connection that may read the snapshot's Parquet
    files and nothing else. COPY, ATTACH, INSTALL/LOAD, EXPORT, SET/RESET, DDL and DML, file
    functions on other paths (``read_text``, ``read_csv``, ``glob``, URLs) and setting-changing
    table functions raise :class:`QueryRefused`; other DuckDB errors propagate as ``duckdb.Error``.
    A ``root`` that is no folder raises :class:`CatalogNotFound` (an empty catalog is a folder).
    """
    con, _version = confined(root)
    try:
        statement = _single_select(con, sql)
        try:
            return con.sql(statement, params=params).to_arrow_table()
        except (duckdb.PermissionException, duckdb.InvalidInputException) as exc:
            if isinstance(exc, duckdb.InvalidInputException) and "configuration has been locked" not in str(exc):
                raise
            raise QueryRefused(f"{_first_line(exc)}; {_ALLOWED}") from None
    finally:
        con.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _sql_string(value: str) -> str:
    """A SQL string literal, for DDL only (DuckDB cannot bind parameters in CREATE VIEW)."""
    if "\x00" in value:
        raise ValueError("path contains NUL")
    return "'" + value.replace("'", "''") + "'"


def _storage_option() -> str:
    """``(STORAGE_VERSION ...)`` where the installed DuckDB takes it (1.2 and later); DuckDB 1.0 and
    1.1 write a format every 1.x reads anyway."""
    major, minor = (int(part) for part in duckdb.__version__.split(".")[:2])
    return f" (STORAGE_VERSION '{VIEWS_STORAGE_VERSION}')" if (major, minor) >= (1, 2) else ""


def write_views_database(root: Catalog, db_path: Path | str) -> Path:
    """Write (or update) a DuckDB file whose views always read the newest snapshot.

    The views are live (see the module docstring): no refresh is needed after commits. Publishes
    an empty first snapshot if nothing was committed yet, so the views bind. The paths inside the
    views are absolute: write the file again if the catalog root moves. A store of another backend
    (Delta: no folder always holds exactly the live files) gets views pinned to the files its
    library lists now: write the file again after commits to see them.

    A convenience for trusted analysts, not a sandbox: DuckDB settings live in the process that
    opens a file, not in the file, so whoever opens it (duckdb CLI, a BI tool) keeps all the access
    their own OS user has (COPY, ATTACH, read_text on any path they can read). The file holds view
    definitions only, no data, and every path in them lies under the catalog root
    (``<root>/<table>/...`` and ``<root>/_current/manifest.json``). SQL from people who may only read the catalog goes through
    :func:`query` (``pacsflow catalog query``) instead.
    """
    if isinstance(root, CatalogBackend) and not isinstance(root, CatalogStore):
        root.ensure_initialized()
        return _write_views(Path(db_path), _pinned_views(root.snapshot()))
    root = Path(root.root if isinstance(root, CatalogStore) else root).resolve()
    if any(c in str(root) for c in "*?[]{}"):
        raise ValueError("catalog root path must not contain glob characters")
    store = CatalogStore(root)
    store.ensure_initialized()
    statements = [
        "CREATE VIEW " + name + " AS " + _hive_select(_sql_string(str(store.table_path(name) / "*" / "*.parquet")))
        for name in VIEW_NAMES
    ]
    manifest = _sql_string(str(root / CURRENT_LINK / MANIFEST))
    statements.append(
        "CREATE VIEW catalog_snapshot AS SELECT CAST(version AS BIGINT) AS version, "
        "CAST(created_at AS TIMESTAMPTZ) AS created_at, CAST(schema_version AS INTEGER) AS schema_version "
        "FROM read_json(" + manifest + ", columns = {'version': 'BIGINT', 'created_at': 'VARCHAR', "
        "'schema_version': 'INTEGER'})"
    )
    return _write_views(Path(db_path), statements)


def _pinned_views(snap: CatalogSnapshot) -> list[str]:
    """Views over the snapshot's files named one by one; an empty table becomes an empty TABLE."""
    statements = []
    for name in VIEW_NAMES:
        files = snap.paths(name)
        if files:
            listed = "[" + ", ".join(_sql_string(f) for f in files) + "]"
            statements.append("CREATE VIEW " + name + " AS " + _hive_select(listed, union_by_name=False))
        else:
            statements.append(f"CREATE TABLE {name} AS SELECT * FROM _pacsflow_empty_{name}")
    created = _sql_string(snap.created_at.isoformat()) if snap.created_at else "NULL"
    statements.append(f"CREATE VIEW catalog_snapshot AS SELECT CAST({int(snap.version)} AS BIGINT) AS version, "
                      f"CAST({created} AS TIMESTAMPTZ) AS created_at, "
                      f"CAST({int(snap.schema_version)} AS INTEGER) AS schema_version")
    return statements


def _write_views(db_path: Path, statements: list[str]) -> Path:
    # Written beside the target and renamed over it: an older file (another storage format, or
    # views of an earlier layout) is replaced whole, and a reader never sees half a file.
    tmp = db_path.with_name(f".{db_path.name}.{uuid.uuid4().hex}.tmp")
    con = duckdb.connect(":memory:")
    try:
        for name in VIEW_NAMES:
            con.register(f"_pacsflow_empty_{name}", _empty_with_partition(name))
        con.execute(f"ATTACH {_sql_string(str(tmp))} AS views_file{_storage_option()}")
        con.execute("USE views_file")
        for statement in statements:
            con.execute(statement)
        con.execute("CHECKPOINT views_file")
        con.execute("USE memory")
        con.execute("DETACH views_file")
        os.replace(tmp, db_path)
    finally:
        con.close()
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return db_path
