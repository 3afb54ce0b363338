"""DuckDB over the catalog: views ``studies``, ``series``, ``instances`` (+ ``catalog_snapshot``).

Every view has the columns of :mod:`pacsflow.catalog.schema` plus ``study_month`` (VARCHAR 'YYYY-MM', NULL
for studies without a date), the hive partition column: filtering on it skips whole files
without opening them, filtering on ``study_date``/``study_uid`` skips row groups.

Two ways to get them, chosen for their consistency/staleness trade-off:

* :func:`connect` / :func:`query` (Python): TEMP views pinned to the snapshot that was current when
  the connection was made (or last :func:`refresh`-ed). Every query on the connection sees one
  consistent snapshot, even while commits land; the connection does not see later commits until
  ``refresh(con, root)``, and must be refreshed within the vacuum grace period (the store deletes
  superseded snapshots after it). The file lists live in DuckDB variables, so refreshing is
  cheap and the views never need rebinding by hand.
* :func:`write_views_database` (one ``.duckdb`` file for analysts): persistent views over
  ``<root>/current/<table>/*/*.parquet``. ``current`` is the symlink the store swaps atomically on
  commit, so these views are *live*: each query lists the files of the newest snapshot; the file
  never needs rewriting after commits. Trade-off: a query that starts within milliseconds of a
  commit may combine files of two consecutive snapshots (each file is complete; a study that just
  moved partition could appear twice or not at all), and a query running longer than the vacuum
  grace period may fail on a deleted file. Rerun the query in either case. Write the file again
  only if the catalog root moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pacsflow.catalog.schema import SCHEMAS
from pacsflow.catalog.store import PARTITION_COLUMN, TABLES, CatalogStore

VIEW_NAMES: tuple[str, ...] = TABLES

# DuckDB cannot bind parameters in DDL; these statements are constants and the file lists are
# bound separately through SET VARIABLE ... = ? (see refresh()).
_SET_FILES = {
    "studies": "SET VARIABLE pacsflow_files_studies = ?",
    "series": "SET VARIABLE pacsflow_files_series = ?",
    "instances": "SET VARIABLE pacsflow_files_instances = ?",
}
_PINNED_VIEW = {
    "studies": "CREATE OR REPLACE TEMP VIEW studies AS SELECT * FROM read_parquet("
    "getvariable('pacsflow_files_studies'), hive_partitioning = true, "
    "hive_types = {'study_month': 'VARCHAR'}, union_by_name = true)",
    "series": "CREATE OR REPLACE TEMP VIEW series AS SELECT * FROM read_parquet("
    "getvariable('pacsflow_files_series'), hive_partitioning = true, "
    "hive_types = {'study_month': 'VARCHAR'}, union_by_name = true)",
    "instances": "CREATE OR REPLACE TEMP VIEW instances AS SELECT * FROM read_parquet("
    "getvariable('pacsflow_files_instances'), hive_partitioning = true, "
    "hive_types = {'study_month': 'VARCHAR'}, union_by_name = true)",
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


def refresh(con: duckdb.DuckDBPyConnection, root: Path | str) -> int:
    """Point ``con``'s TEMP views at the catalog's current snapshot; returns its version."""
    snap = CatalogStore(root).snapshot()
    for name in VIEW_NAMES:
        files = snap.paths(name)
        if files:
            con.execute(_SET_FILES[name], [files])
            con.execute(_PINNED_VIEW[name])
        else:  # nothing committed yet: typed, empty
            con.register(f"_pacsflow_empty_{name}", _empty_with_partition(name))
            con.execute(_EMPTY_VIEW[name])
    created = snap.created_at.isoformat() if snap.created_at else None
    for stmt, value in zip(_SNAPSHOT_VARS, (snap.version, created, snap.schema_version), strict=True):
        con.execute(stmt, [value])
    con.execute(_PINNED_SNAPSHOT_VIEW)
    return snap.version


def connect(
    root: Path | str, database: str = ":memory:", read_only: bool = False
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


def query(root: Path | str, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
    """Run one parameterized query over the current snapshot; ``?`` / ``$name`` placeholders."""
    con = connect(root)
    try:
        return con.sql(sql, params=params).to_arrow_table()
    finally:
        con.close()


def _sql_string(value: str) -> str:
    """A SQL string literal, for DDL only (DuckDB cannot bind parameters in CREATE VIEW)."""
    if "\x00" in value:
        raise ValueError("path contains NUL")
    return "'" + value.replace("'", "''") + "'"


def write_views_database(root: Path | str, db_path: Path | str) -> Path:
    """Write (or update) a DuckDB file whose views always read the newest snapshot.

    The views are live (see the module docstring): no refresh is needed after commits. Publishes
    an empty first snapshot if nothing was committed yet, so the views bind. The paths inside the
    views are absolute: write the file again if the catalog root moves.
    """
    root = Path(root).resolve()
    if any(c in str(root) for c in "*?[]{}"):
        raise ValueError("catalog root path must not contain glob characters")
    CatalogStore(root).ensure_initialized()
    db_path = Path(db_path)
    con = duckdb.connect(str(db_path))
    try:
        for name in VIEW_NAMES:
            pattern = _sql_string(str(root / "current" / name / "*" / "*.parquet"))
            con.execute(
                "CREATE OR REPLACE VIEW " + name + " AS SELECT * FROM read_parquet(" + pattern
                + ", hive_partitioning = true, hive_types = {'study_month': 'VARCHAR'}, union_by_name = true)"
            )
        manifest = _sql_string(str(root / "current" / "manifest.json"))
        con.execute(
            "CREATE OR REPLACE VIEW catalog_snapshot AS SELECT CAST(version AS BIGINT) AS version, "
            "CAST(created_at AS TIMESTAMPTZ) AS created_at, CAST(schema_version AS INTEGER) AS schema_version "
            "FROM read_json(" + manifest + ", columns = {'version': 'BIGINT', 'created_at': 'VARCHAR', "
            "'schema_version': 'INTEGER'})"
        )
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return db_path
