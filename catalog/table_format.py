"""The catalog as Delta Lake tables (delta-rs): commits from many processes and machines.

Layout under ``location`` (a folder, or ``s3://bucket/prefix``)::

    studies/_delta_log/00000000000000000007.json    the table's commit log: THE commit point
    studies/study_month=2004-01/part-...parquet     data files, hive-style partitions
    studies/study_month=__HIVE_DEFAULT_PARTITION__/ (studies without a date)
    series/...   instances/...

Same three tables and Arrow schemas as :mod:`pacsflow.catalog.schema` (plus the partition column
``study_month``, which Delta keeps in the folder names, not in the files), partitioned by study
month like the snapshot store, so :mod:`pacsflow.catalog.views` reads the live files with the
DuckDB we already use: the store lists them with the Delta library (:meth:`DeltaCatalogStore.snapshot`)
and the view builder gets those paths; no DuckDB extension is needed.

A commit replaces whole studies: per table, one Delta transaction removes the files' rows of the
batch's studies and adds the new rows (``write_deltalake(mode="overwrite", predicate="study_uid
IN (...)")``, a replaceWhere: files that hold other studies too are rewritten without them). A
transaction that loses the race against another writer fails with ``CommitFailedError``; it is
re-applied on the newest version after a jittered back-off, at most ``attempts`` times, then
:class:`CatalogBusy` (transient) is raised. Because every attempt replaces the batch's studies
whole, a retry, a re-commit or a crashed and repeated commit never duplicates rows: the key is the
study UID (and within it the series and instance UIDs, checked per commit).

Delta has no transaction across tables: the tables are committed children first (instances,
series, studies), so a study row is published after its instance and series rows. A reader that
lists the tables while a commit is under way can see a batch's new instance rows beside the old
study row; a commit that fails half-way leaves the earlier tables replaced and the error raised,
and committing the batch again (the task's retry) completes it. The snapshot version readers see
is the sum of the three tables' versions (it grows with every table commit).

On S3 the commit point needs conditional writes (``If-None-Match``): delta-rs 1.x uses them
(``aws_conditional_put=etag`` in the storage options for S3-compatible servers); no DynamoDB lock.
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import BloomFilterProperties, ColumnProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from pacsflow.catalog.errors import CatalogBusy, CatalogWriteError
from pacsflow.catalog.schema import SCHEMA_VERSION, SCHEMAS, SORT_KEYS
from pacsflow.catalog.store import (
    BLOOM_FILTER_COLUMNS,
    BLOOM_FILTER_FPP,
    PARTITION_COLUMN,
    PARTITION_FORMAT,
    ROW_GROUP_ROWS,
    TABLES,
    ZSTD_LEVEL,
    CommitResult,
    VacuumResult,
    prepare,
)

logger = logging.getLogger(__name__)

WRITE_ORDER: tuple[str, ...] = ("instances", "series", "studies")  # children first: see the docstring
ATTEMPTS = 10
BACKOFF_S = 0.05  # the first retry waits up to this, doubling to 32x
T = TypeVar("T")


@dataclass(frozen=True)
class TableSnapshot:
    """The live data files of the three tables, each as the Delta library lists them."""

    version: int
    created_at: _dt.datetime | None
    files: Mapping[str, tuple[str, ...]]
    versions: Mapping[str, int] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    #: The fsspec file system DuckDB reads remote files through (None: local files); registered on
    #: the connection by the views, so no DuckDB extension (httpfs) is needed for ``s3://``.
    filesystem: Any = None

    def paths(self, table: str, *, include_empty: bool = True) -> list[str]:
        """Absolute paths (or ``s3://`` URLs) of the live data files of ``table``."""
        return list(self.files.get(table, ()))

    def current_schema(self, table: str) -> bool:
        return True  # Delta enforces the table's schema on every write


def _in_predicate(uids: Iterable[str]) -> str:
    quoted = ("'" + u.replace("'", "''") + "'" for u in uids)
    return f"study_uid IN ({', '.join(quoted)})"


def _with_month(table: pa.Table) -> pa.Table:
    """Sorted like the snapshot store's files, with the partition column (from study_date)."""
    table = table.sort_by([(k, "ascending") for k in SORT_KEYS[_name(table)]]) if table.num_rows else table
    return table.append_column(pa.field(PARTITION_COLUMN, pa.string()),
                               pc.strftime(table["study_date"], format=PARTITION_FORMAT))


def _name(table: pa.Table) -> str:
    return (table.schema.metadata or {})[b"pacsflow.table"].decode()


def _writer_properties(table: str) -> WriterProperties:
    bloom = ColumnProperties(bloom_filter_properties=BloomFilterProperties(True, fpp=BLOOM_FILTER_FPP, ndv=ROW_GROUP_ROWS))
    return WriterProperties(compression="ZSTD", compression_level=ZSTD_LEVEL, max_row_group_size=ROW_GROUP_ROWS,
                            column_properties={c: bloom for c in BLOOM_FILTER_COLUMNS[table]})


class DeltaCatalogStore:
    """The catalog as three Delta tables under ``location``: see the module docstring."""

    def __init__(self, location: str, *, storage_options: Mapping[str, str] | None = None,
                 attempts: int = ATTEMPTS) -> None:
        self.root = location.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.attempts = attempts
        self._ready = False  # the three tables exist (checked once per store object)
        self.retries = 0  #: transactions this object re-applied after losing a race

    def table_uri(self, table: str) -> str:
        if table not in TABLES:
            raise KeyError(table)
        return f"{self.root}/{table}"

    def _table(self, table: str) -> DeltaTable | None:
        try:
            return DeltaTable(self.table_uri(table), storage_options=self.storage_options or None)
        except TableNotFoundError:
            return None

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        """``action()`` until it commits: a lost race is re-applied on the newest version."""
        for attempt in range(self.attempts):
            try:
                return action()
            except CommitFailedError:
                if attempt + 1 == self.attempts:
                    break
                logger.info("catalog %s: concurrent commit, retry %d", what, attempt + 1)
                self.retries += 1
                time.sleep(random.uniform(0, BACKOFF_S * 2 ** min(attempt, 5)))
            except OSError as exc:
                raise CatalogWriteError(f"catalog: cannot commit {what} under {self.root} ({exc.strerror or exc})") from None
        raise CatalogBusy(f"catalog {what}: {self.attempts} attempts lost to concurrent commits")

    # -- reading -----------------------------------------------------------------------------
    def snapshot(self) -> TableSnapshot:
        """The live files of each table (children first, as they are written)."""
        files: dict[str, tuple[str, ...]] = {}
        versions: dict[str, int] = {}
        created: _dt.datetime | None = None
        for t in WRITE_ORDER:
            dt = self._table(t)
            if dt is None:
                files[t] = ()
                continue
            files[t] = tuple(sorted(dt.file_uris()))
            versions[t] = dt.version()
            stamp = (dt.history(1) or [{}])[0].get("timestamp")
            if stamp is not None:
                when = _dt.datetime.fromtimestamp(stamp / 1000, _dt.timezone.utc)
                created = max(created, when) if created else when
        return TableSnapshot(sum(versions.values()), created, files, versions, filesystem=self.filesystem())

    def filesystem(self) -> Any:
        """An s3fs file system for an ``s3://`` location (endpoint and region from the storage
        options, credentials from the environment); None for a local folder."""
        if not self.root.startswith("s3://"):
            return None
        import fsspec

        opts = {k.upper(): v for k, v in self.storage_options.items()}
        region = opts.get("AWS_REGION") or opts.get("AWS_DEFAULT_REGION")
        return fsspec.filesystem("s3", endpoint_url=opts.get("AWS_ENDPOINT_URL"),
                                 client_kwargs={"region_name": region} if region else {})

    def study_uids(self) -> set[str]:
        dt = self._table("studies")
        return set() if dt is None else set(dt.to_pyarrow_table(columns=["study_uid"])["study_uid"].to_pylist())

    def stats(self) -> dict[str, Any]:
        snap = self.snapshot()
        tables: dict[str, Any] = {}
        for t in TABLES:
            dt = self._table(t)
            actions = pa.table(dt.get_add_actions(flatten=True)) if dt is not None else None
            if actions is None or not actions.num_rows:
                tables[t] = {"files": 0, "partitions": 0, "rows": 0, "bytes": 0, "max_files_per_partition": 0}
                continue
            parts = actions[f"partition.{PARTITION_COLUMN}"].value_counts()
            tables[t] = {"files": actions.num_rows, "partitions": len(parts),
                         "rows": pc.sum(actions["num_records"]).as_py(), "bytes": pc.sum(actions["size_bytes"]).as_py(),
                         "max_files_per_partition": max(c.as_py() for c in parts.field("counts"))}
        return {"backend": "delta", "location": self.root, "version": snap.version,
                "table_versions": dict(snap.versions),
                "created_at": snap.created_at.isoformat() if snap.created_at else None,
                "schema_version": SCHEMA_VERSION, "tables": tables}

    # -- writing -----------------------------------------------------------------------------
    def ensure_initialized(self) -> int:
        """Create the three tables if they are missing (several processes may race: fine)."""
        for t in TABLES:
            if self._table(t) is None:
                schema = _with_month(SCHEMAS[t].empty_table()).schema
                self._retrying(f"create {t}", lambda: DeltaTable.create(
                    self.table_uri(t), schema, mode="ignore", partition_by=[PARTITION_COLUMN],
                    storage_options=self.storage_options or None))
        self._ready = True
        return self.snapshot().version

    def commit(self, tables: Mapping[str, pa.Table]) -> CommitResult:
        """Replace every row of the studies in ``tables["studies"]`` by the given rows (see the
        module docstring for what "atomic" means across the three tables)."""
        incoming = prepare(tables)
        uids = sorted(set(incoming["studies"]["study_uid"].to_pylist()))
        return self._replace(uids, incoming, "commit")

    def delete(self, study_uids: Iterable[str]) -> CommitResult:
        """Remove every row of these studies."""
        uids = sorted({study_uids} if isinstance(study_uids, str) else {str(u) for u in study_uids})
        return self._replace(uids, {t: SCHEMAS[t].empty_table() for t in TABLES}, "delete")

    def _replace(self, uids: list[str], incoming: Mapping[str, pa.Table], what: str) -> CommitResult:
        started = time.monotonic()
        if not self._ready:
            self.ensure_initialized()
        existing, versions = 0, {}
        for t in WRITE_ORDER if uids else ():
            data = _with_month(incoming[t])
            versions[t], found = self._retrying(f"{what} {t}", lambda: self._apply(t, data, uids))
            existing = found if t == "studies" else existing
        version = sum(versions.values()) if versions else self.snapshot().version
        logger.info("catalog (delta) v%d: %d studies %sed (%d replaced)", version, len(uids), what, existing)
        return CommitResult(version=version, studies_committed=incoming["studies"].num_rows, studies_replaced=existing,
                            rows={t: incoming[t].num_rows for t in TABLES}, partitions_rewritten=(),
                            files_written=0, files_linked=0, seconds=round(time.monotonic() - started, 6))

    def _apply(self, table: str, data: pa.Table, uids: list[str]) -> tuple[int, int]:
        """One attempt: on the table's newest version, replace the studies ``uids`` by ``data``
        in one transaction; the version it made and how many of the studies it had (studies only)."""
        dt = self._table(table)
        assert dt is not None  # ensure_initialized made it
        found = 0
        if table == "studies":  # row-group statistics skip most of it: the files are sorted by study_uid
            found = dt.to_pyarrow_dataset().count_rows(filter=pc.field("study_uid").isin(uids))
        predicate, props = _in_predicate(uids), _writer_properties(table)
        if data.num_rows:
            write_deltalake(dt, data, mode="overwrite", predicate=predicate, writer_properties=props,
                            storage_options=self.storage_options or None)
        else:
            dt.delete(predicate, writer_properties=props)
        return dt.version(), found

    def compact(self) -> CommitResult:
        """Merge each partition's small files (Delta's optimize), retried like a commit."""
        started = time.monotonic()
        self.ensure_initialized()
        written = 0
        for t in TABLES:
            props = _writer_properties(t)
            metrics = self._retrying(f"compact {t}", lambda: DeltaTable(
                self.table_uri(t), storage_options=self.storage_options or None).optimize.compact(writer_properties=props))
            written += int(metrics.get("numFilesAdded", 0))
        return CommitResult(self.snapshot().version, 0, 0, {t: 0 for t in TABLES}, (), written, 0,
                            round(time.monotonic() - started, 6))

    def vacuum(self, grace_s: float = 3600.0) -> VacuumResult:
        """Delete data files no version younger than ``grace_s`` (whole hours) still names."""
        removed = 0
        for t in TABLES:
            dt = self._table(t)
            if dt is not None:
                removed += len(dt.vacuum(retention_hours=int(grace_s // 3600), dry_run=False,
                                         enforce_retention_duration=False))
        return VacuumResult(0, removed, 0)
