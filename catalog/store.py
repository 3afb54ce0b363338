"""Atomic, idempotent Parquet commits of catalog rows (pure: no prefect, no sockets).

Layout under ``root``::

    studies -> _current/studies             the live tables: fixed links, never changed once made
    series -> _current/series
    instances -> _current/instances
    _current -> _snapshots/v000000000007    THE commit point: a symlink swapped with os.replace
    _snapshots/v000000000007/
        manifest.json                       version, parent, created_at, every file of every table
        studies/study_month=2004-01/part-000000000007-<random>.parquet
        studies/study_month=__HIVE_DEFAULT_PARTITION__/part-....parquet   (null study dates)
        series/...   instances/...
    _snapshots/v000000000006/               the previous snapshot, kept for vacuum's grace period
    _lock                                   fcntl.flock: committers, compact and vacuum serialize

Readers glob ``<root>/<table>/**/*.parquet`` (or ``<root>/_current/...``) and get exactly the live
rows of one table: the three table links resolve through ``_current``, so one swap of ``_current``
publishes all three tables at once. Everything else starts with ``_``, which hive-style dataset
readers (pyarrow.dataset, Spark) skip. DuckDB's ``**`` does not skip ``_`` folders (and does not
follow symlinks below the glob's start), so ``read_parquet('<root>/**/*.parquet')`` still reads
every kept snapshot of every table: the README says to name the table.

Partitioning: by study month (``study_month=YYYY-MM``) of the study's ``study_date``; studies without
a date go to the hive default (null) partition. A partition without rows has no file, with one
exception: a table with no rows at all keeps one zero-row file (in the null partition) so that its
glob matches a file and DuckDB can bind views over it. All rows of a study, in all three tables,
live in the partition of its ``studies`` row; the store sets ``study_date`` of series and instance
rows from the study row.

Commit (``commit(tables)``), under the lock:

1. validate and cast the incoming tables to :mod:`pacsflow.catalog.schema` (clear error otherwise), check
   primary keys are unique and every series/instance row belongs to a study in ``tables["studies"]``;
2. the study UIDs of ``tables["studies"]`` are the *replaced set*: find the partitions that hold them
   now (their old dates) and the partitions they go to (their new dates);
3. build the next snapshot in ``_snapshots/.build-<random>``: a commit appends. In each touched
   partition of each table the new rows become one new file (sorted by study_uid, series_uid,
   sop_instance_uid; zstd, row-group statistics, Bloom filters on the UID columns); only the
   files that hold a replaced study are read and written again without it; once a partition has
   more than ``MAX_SMALL_FILES`` files under ``SMALL_FILE_ROWS`` rows they are merged into the new
   one. Every other file is hard-linked from the current snapshot (files are immutable, their
   names unique; the manifest records each file's schema version). Files are merged and rewritten
   streaming (a slice of each input, one row group of the output at a time), so a commit's memory
   follows its batch and one row group, not the partitions it lands in or the files it merges;
   ``compact()`` makes one file of every partition the same way;
4. fsync, rename the build directory to ``_snapshots/v<N>``, then atomically replace ``_current``.

Readers resolve ``_current`` once and read only that snapshot's manifest and files, so they see a
commit entirely or not at all; a failure before step 4 leaves ``_current`` untouched (the
half-built directory is removed, or later by ``vacuum``). Re-committing a study replaces its rows,
never duplicates them, and yields identical files content for identical input. A partition holds
its large files plus at most ``MAX_SMALL_FILES`` small ones, so DuckDB never faces a small-file
pile-up; after ``compact()`` exactly one.

``vacuum(grace_s)`` deletes snapshot directories superseded more than ``grace_s`` ago (their
files, when no newer snapshot links them), unpublished leftovers of failed commits, and stray
temporary links. Readers pinned to a snapshot keep working for the grace period.

Older layout (``current -> snapshots/vN``, no table links, a zero-row null-partition file in every
table): readers still read it; the first write (commit, delete, compact, vacuum,
``ensure_initialized``) migrates it under the lock. The current snapshot is hard-linked into
``_snapshots/``, published as ``_current``, the table links made, then ``current`` and
``snapshots/`` (with the superseded snapshots) removed; the zero-row files go with the next
rewrite of their table (``compact`` rewrites every one). Readers pinned to an old-layout snapshot
must reconnect after the migration.

The store needs a local POSIX filesystem (hard links, symlinks, flock, atomic rename).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import fcntl
import inspect
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pacsflow.catalog.schema import PRIMARY_KEYS, SCHEMA_VERSION, SCHEMAS, SORT_KEYS
from pacsflow.catalog.errors import CatalogBusy, CatalogError, CatalogWriteError, IntegrityError, SchemaMismatch

logger = logging.getLogger(__name__)

TABLES: tuple[str, ...] = ("studies", "series", "instances")
PARTITION_COLUMN = "study_month"
NULL_PARTITION_DIR = "__HIVE_DEFAULT_PARTITION__"  # what DuckDB/Hive read back as NULL
SNAPSHOTS_DIR = "_snapshots"  # "_": hive-style dataset readers skip it
CURRENT_LINK = "_current"
LEGACY_SNAPSHOTS_DIR = "snapshots"  # the layout before the table links (migrated on first write)
LEGACY_CURRENT_LINK = "current"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "pacsflow-catalog/1"
# A commit appends a file per touched partition; once a partition has more than MAX_SMALL_FILES
# files under SMALL_FILE_ROWS rows, they are merged into the next commit's file (compact: one file).
# A file is small below one row group: a merge then holds at most MAX_SMALL_FILES row groups plus
# the commit's own rows, whatever the size of the partition (with 64k it grew with the partition
# up to a quarter of a million rows and set the nightly flow's peak memory).
MAX_SMALL_FILES = 4
SMALL_FILE_ROWS = 16 * 1024  # == ROW_GROUP_ROWS
ROW_GROUP_ROWS = 16 * 1024  # smaller row groups = finer skipping by study_uid/study_date (16k: README, 10M)
# Arrow's writer holds a row group whole until it is written: at 16k instance rows with real
# dicom_json (5-6 KB a row) that is ~100 MiB, reached only once a night had written that many rows
# (the flow's peak grew with the night's size). A row group ends at either bound: 8 MiB took a merge of
# 18,000 such rows from +174 to +135 MiB of resident memory (bench.commit_memory); 4 MiB gained nothing more.
ROW_GROUP_BYTES = 8 * 1024 * 1024
# Files are merged and rewritten streaming, a slice of this many rows per input at a time: a
# commit holds its batch, a slice per merged file and one row group being written, whatever the
# size of the files it merges (reading them whole lifted the flow's memory 150-300 MiB per merge).
MERGE_BATCH_ROWS = 512
READ_BUFFER_BYTES = 1 << 20  # read a column chunk in pieces, not whole (dicom_json: ~20 MiB a row group)
#: strftime pattern of the partition key; a coarser one (``%Y``) is what bench/catalog_scale.py compares.
PARTITION_FORMAT = "%Y-%m"
ZSTD_LEVEL = 3
#: Columns with a Parquet Bloom filter per row group: the keys analysts look rows up by. Row-group
#: statistics cannot skip a random UID (every month's file spans the whole UID range); the filter
#: lets DuckDB (1.2 and later) skip all but the row group that holds it, also for the UIDs a join
#: pushes down. About 2 % more bytes (bench/catalog_scale.py, README "The catalog at 10M instances").
BLOOM_FILTER_COLUMNS: dict[str, tuple[str, ...]] = {
    "studies": ("study_uid", "patient_pseudo_id"),
    "series": ("study_uid", "series_uid"),
    "instances": ("study_uid", "series_uid", "sop_instance_uid"),
}
BLOOM_FILTER_FPP = 0.01
# pyarrow writes Bloom filters from version 22 on; older ones write the files without them.
_WRITES_BLOOM = "bloom_filter_options" in inspect.signature(pq.write_table).parameters

_VERSION_DIR = re.compile(r"^v(\d{12})$")


# -- snapshots ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    table: str
    partition: str | None  # "YYYY-MM", or None for the null-date partition
    path: str  # relative to the snapshot directory
    rows: int
    bytes: int
    # The schema the file was written with; None in manifests written before it was recorded.
    # Readers need DuckDB's costly union_by_name only while some file has an older schema.
    schema_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"partition": self.partition, "path": self.path, "rows": self.rows, "bytes": self.bytes,
                "schema_version": self.schema_version}


@dataclass(frozen=True)
class Snapshot:
    """One immutable, consistent state of the catalog (version 0 = nothing committed yet)."""

    version: int
    directory: Path | None
    created_at: _dt.datetime | None
    parent: int | None
    schema_version: int
    entries: Mapping[str, tuple[FileEntry, ...]]

    def current_schema(self, table: str) -> bool:
        """Whether every file of ``table`` is known to have today's schema (no older file
        waiting for ``compact()`` after a schema change)."""
        return all(e.schema_version == SCHEMA_VERSION for e in self.entries.get(table, ()))

    def paths(self, table: str, *, include_empty: bool = True) -> list[str]:
        """Absolute paths of this snapshot's files of ``table`` (sorted by partition)."""
        if self.directory is None:
            return []
        return [
            str(self.directory / e.path) for e in self.entries.get(table, ()) if include_empty or e.rows > 0
        ]


_EMPTY_SNAPSHOT = Snapshot(0, None, None, None, SCHEMA_VERSION, {t: () for t in TABLES})


@dataclass(frozen=True)
class CommitResult:
    version: int
    studies_committed: int
    studies_replaced: int  # of the committed (or deleted) studies, how many were already there
    rows: dict[str, int]  # rows written by this commit, per table
    partitions_rewritten: tuple[str | None, ...]
    files_written: int
    files_linked: int
    seconds: float


@dataclass(frozen=True)
class VacuumResult:
    snapshots_removed: int
    files_removed: int
    bytes_freed: int
    kept_versions: tuple[int, ...] = field(default=())


# -- validation ---------------------------------------------------------------------------------
def conform(table: pa.Table, name: str, *, lenient: bool = False) -> pa.Table:
    """Reorder and cast ``table`` to the schema of catalog table ``name``.

    Strict (incoming data): extra or missing columns are errors. Lenient (files written under an
    older schema version): missing nullable columns are filled with nulls, unknown ones dropped.
    Casts are safe (no overflow, no truncation); nulls in non-null columns are errors.
    """
    schema = SCHEMAS[name]
    have = set(table.column_names)
    if len(have) != table.num_columns:
        raise SchemaMismatch(f"{name}: duplicate column names")
    extra = sorted(have - set(schema.names))
    if extra and not lenient:
        raise SchemaMismatch(f"{name}: unexpected columns {extra}")
    missing = [f.name for f in schema if f.name not in have]
    if missing and not lenient:
        raise SchemaMismatch(f"{name}: missing columns {missing}")
    columns = []
    for fld in schema:
        if fld.name not in have:
            if not fld.nullable:
                raise SchemaMismatch(f"{name}.{fld.name}: missing non-null column")
            columns.append(pa.nulls(table.num_rows, fld.type))
            continue
        col = table[fld.name]
        if not col.type.equals(fld.type):
            try:
                col = col.cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                # Arrow's message may quote a value: keep it out of ours.
                raise SchemaMismatch(f"{name}.{fld.name}: cannot cast {col.type} to {fld.type}") from None
        if not fld.nullable and col.null_count:
            raise SchemaMismatch(f"{name}.{fld.name}: {col.null_count} null(s) in a non-null column")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def prepare(tables: Mapping[str, pa.Table]) -> dict[str, pa.Table]:
    """A commit's tables checked and made ready for any store: every table present (missing = no
    rows) and conformed, keys unique, every series/instance row of a study in ``tables["studies"]``,
    their ``study_date`` set from the study row."""
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise SchemaMismatch(f"unknown tables {unknown}")
    if "studies" not in tables:
        raise SchemaMismatch("a commit needs a 'studies' table")
    incoming = {t: conform(tables[t], t) if t in tables else SCHEMAS[t].empty_table() for t in TABLES}
    return CatalogStore._normalize(incoming)


def _check_keys(name: str, table: pa.Table) -> None:
    keys = list(PRIMARY_KEYS[name])
    if table.num_rows and table.group_by(keys).aggregate([]).num_rows != table.num_rows:
        raise IntegrityError(f"{name}: duplicate {'/'.join(keys)} in one commit")


def _partition_keys(study_date: pa.ChunkedArray | pa.Array) -> pa.Array:
    months = pc.strftime(study_date, format=PARTITION_FORMAT)
    return months.combine_chunks() if isinstance(months, pa.ChunkedArray) else months


def _partition_dir(partition: str | None) -> str:
    return f"{PARTITION_COLUMN}={NULL_PARTITION_DIR if partition is None else partition}"


def _sort_key(partition: str | None) -> tuple[int, str]:
    return (1, "") if partition is None else (0, partition)


def _split_by_partition(table: pa.Table) -> dict[str | None, pa.Table]:
    """The rows of ``table`` grouped by their partition key (from study_date; None when it has none)."""
    keys = _partition_keys(table["study_date"])
    months = set(keys.to_pylist())
    if len(months) == 1:  # the usual night: no filtered copy of the batch
        return {months.pop(): table}
    groups: dict[str | None, pa.Table] = {}
    for p in months:
        mask = pc.is_null(keys) if p is None else pc.fill_null(pc.equal(keys, p), False)
        groups[p] = table.filter(mask)
    return groups


def release_memory() -> None:
    """Hand the memory a commit freed back to the OS. Arrow's allocator (mimalloc, jemalloc) and
    glibc's arenas keep freed pages for reuse: without this a long-running process (the nightly
    flow) kept a commit's high-water mark resident until a later commit happened to reuse it."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has none
    except OSError:
        return None


_LIBC = _load_libc()


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _os_reason(exc: OSError) -> str:
    """``No space left on device``: the OS's words for the errno (Arrow wraps them in its own)."""
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CatalogStore:
    """The catalog under ``root``: see the module docstring."""

    def __init__(self, root: Path | str, *, lock_timeout_s: float | None = 600.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s

    # -- reading (lock-free) -------------------------------------------------------------------
    # Locations under the root, one property each (the same shape as Settings' derived folders).
    @property
    def _current_link(self) -> Path:
        return self.root / CURRENT_LINK

    @property
    def _snapshots_dir(self) -> Path:
        return self.root / SNAPSHOTS_DIR

    def table_path(self, table: str) -> Path:
        """``<root>/<table>``: the fixed link through which every glob reads the live rows of ``table``."""
        if table not in TABLES:
            raise KeyError(table)
        return self.root / table

    def _current_target(self) -> str | None:
        """Where the commit point links to (the older layout's ``current`` until it is migrated)."""
        for link in (self._current_link, self.root / LEGACY_CURRENT_LINK):
            try:
                return os.readlink(link)
            except FileNotFoundError:
                continue
        return None

    def snapshot(self) -> Snapshot:
        """The current snapshot, read consistently (one readlink, one manifest)."""
        for _attempt in range(5):
            target = self._current_target()
            if target is None:
                return _EMPTY_SNAPSHOT
            directory = (self.root / target).resolve()
            try:
                return self._load(directory)
            except FileNotFoundError:  # vacuumed between readlink and read: look again
                continue
        raise CatalogError("could not read a stable snapshot")

    def _load(self, directory: Path) -> Snapshot:
        data = json.loads((directory / MANIFEST).read_text("utf-8"))
        if data.get("format") != MANIFEST_FORMAT:
            raise CatalogError(f"unknown manifest format in snapshot {directory.name}")
        entries = {
            t: tuple(
                FileEntry(t, e["partition"], e["path"], int(e["rows"]), int(e["bytes"]), e.get("schema_version"))
                for e in data["tables"].get(t, [])
            )
            for t in TABLES
        }
        return Snapshot(
            version=int(data["version"]),
            directory=directory,
            created_at=_dt.datetime.fromisoformat(data["created_at"]),
            parent=data.get("parent"),
            schema_version=int(data.get("schema_version", 0)),
            entries=entries,
        )

    @property
    def snapshot_version(self) -> int:
        return self.snapshot().version

    def files(self, table: str) -> list[str]:
        """Absolute paths of the current data files of ``table`` (zero-row placeholders excluded)."""
        if table not in TABLES:
            raise KeyError(table)
        return self.snapshot().paths(table, include_empty=False)

    def study_uids(self) -> set[str]:
        out: set[str] = set()
        for path in self.snapshot().paths("studies", include_empty=False):
            out.update(pq.ParquetFile(path).read(columns=["study_uid"])["study_uid"].to_pylist())
        return out

    def stats(self) -> dict[str, Any]:
        snap = self.snapshot()
        tables: dict[str, Any] = {}
        for t in TABLES:
            entries = snap.entries.get(t, ())
            per_partition: dict[str | None, int] = {}
            for e in entries:
                per_partition[e.partition] = per_partition.get(e.partition, 0) + 1
            tables[t] = {
                "files": sum(1 for e in entries if e.rows > 0),
                "partitions": len({e.partition for e in entries if e.rows > 0}),
                "rows": sum(e.rows for e in entries),
                "bytes": sum(e.bytes for e in entries),
                "max_files_per_partition": max(per_partition.values(), default=0),
            }
        snapshots_on_disk = (
            sum(1 for p in self._snapshots_dir.iterdir() if _VERSION_DIR.match(p.name))
            if self._snapshots_dir.is_dir()
            else 0
        )
        return {
            "version": snap.version,
            "created_at": snap.created_at.isoformat() if snap.created_at else None,
            "schema_version": snap.schema_version,
            "snapshots_on_disk": snapshots_on_disk,
            "tables": tables,
        }

    # -- writing (under the lock) --------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "_lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CatalogWriteError(f"catalog_root: cannot open {self.root}/_lock ({_os_reason(exc)})") from None
        try:
            if self.lock_timeout_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + self.lock_timeout_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise CatalogBusy(f"catalog lock not acquired within {self.lock_timeout_s}s") from None
                        time.sleep(0.02)
            self._settle_layout()
            yield
        finally:
            os.close(fd)  # releases the flock

    def _settle_layout(self) -> None:
        """Under the lock, before any write: migrate the older layout, make the table links."""
        try:
            self._migrate_legacy()
            for t in TABLES:
                self._link_table(t)
        except OSError as exc:
            raise CatalogWriteError(
                f"catalog_root: cannot lay out {self.root} ({_os_reason(exc)}); the current snapshot is unchanged"
            ) from None

    def _migrate_legacy(self) -> None:
        """``current -> snapshots/vN`` becomes ``_current -> _snapshots/vN`` (see the module docstring).
        Each step can be repeated, so a migration cut short finishes on the next write."""
        legacy_link = self.root / LEGACY_CURRENT_LINK
        legacy_dir = self.root / LEGACY_SNAPSHOTS_DIR
        if not legacy_link.is_symlink() and not legacy_dir.is_dir():
            return
        if not self._current_link.is_symlink() and legacy_link.is_symlink():
            old = (self.root / os.readlink(legacy_link)).resolve()
            final = self._snapshots_dir / old.name
            if not final.is_dir():
                self._snapshots_dir.mkdir(exist_ok=True)
                build = self._snapshots_dir / f".build-{uuid.uuid4().hex}"
                shutil.copytree(old, build, copy_function=os.link)  # files are immutable: share them
                for d in sorted((p for p in build.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    _fsync(d, directory=True)
                os.rename(build, final)
                _fsync(self._snapshots_dir, directory=True)
            self._point_current_at(final)
            _fsync(self.root, directory=True)
        legacy_link.unlink(missing_ok=True)
        shutil.rmtree(legacy_dir, ignore_errors=True)
        logger.info("catalog: migrated to the _current/_snapshots layout")

    def _link_table(self, table: str) -> None:
        link = self.table_path(table)
        target = f"{CURRENT_LINK}/{table}"
        if link.is_symlink() and os.readlink(link) == target:
            return
        if link.exists() or link.is_symlink():
            raise CatalogError(f"catalog_root: {link} is in the way of the {table} table's link; move it away")
        tmp_link = self.root / f".link-{uuid.uuid4().hex}"
        os.symlink(target, tmp_link)
        os.replace(tmp_link, link)

    def commit(self, tables: Mapping[str, pa.Table]) -> CommitResult:
        """Replace every row of the studies in ``tables["studies"]`` by the given rows, atomically.

        ``tables`` maps "studies" (required), "series" and "instances" (missing = no rows) to Arrow
        tables with the catalog schema (compatible types are cast).
        """
        incoming = prepare(tables)
        replaced = set(incoming["studies"]["study_uid"].to_pylist())
        return self._write(incoming, replaced)

    def delete(self, study_uids: Iterable[str]) -> CommitResult:
        """Remove every row of these studies (e.g. a retracted study), atomically."""
        uids = {study_uids} if isinstance(study_uids, str) else {str(u) for u in study_uids}
        return self._write({t: SCHEMAS[t].empty_table() for t in TABLES}, uids)

    def compact(self) -> CommitResult:
        """Rewrite every partition of every table as one sorted file under the current schema."""
        return self._write({t: SCHEMAS[t].empty_table() for t in TABLES}, set(), rewrite_all=True)

    def ensure_initialized(self) -> int:
        """Publish an empty first snapshot if nothing was committed yet; returns the version."""
        if self.snapshot().version:
            return self.snapshot().version
        return self._write({t: SCHEMAS[t].empty_table() for t in TABLES}, set(), only_if_empty=True).version

    @staticmethod
    def _normalize(incoming: dict[str, pa.Table]) -> dict[str, pa.Table]:
        studies = incoming["studies"]
        for t in TABLES:
            _check_keys(t, incoming[t])
        out = {"studies": studies}
        for t in ("series", "instances"):
            table = incoming[t]
            idx = pc.index_in(table["study_uid"], value_set=studies["study_uid"])
            if idx.null_count:
                raise IntegrityError(f"{t}: {idx.null_count} row(s) of studies not in tables['studies']")
            dates = studies["study_date"].take(idx)
            pos = table.schema.get_field_index("study_date")
            out[t] = table.set_column(pos, table.schema.field(pos), dates)
        return out

    def _locate(self, base: Snapshot, uids: set[str]) -> tuple[set[str | None], int]:
        """Partitions of ``base`` holding any of ``uids``, and how many of the uids exist."""
        if not uids:
            return set(), 0
        value_set = pa.array(sorted(uids), pa.string())
        partitions: set[str | None] = set()
        found = 0
        for e in base.entries["studies"]:
            if e.rows == 0:
                continue
            assert base.directory is not None
            col = pq.ParquetFile(base.directory / e.path).read(columns=["study_uid"])["study_uid"]
            hits = pc.sum(pc.is_in(col, value_set=value_set)).as_py() or 0
            if hits:
                partitions.add(e.partition)
                found += hits
        return partitions, found

    def _write(
        self,
        incoming: dict[str, pa.Table],
        replaced: set[str],
        *,
        rewrite_all: bool = False,
        only_if_empty: bool = False,
    ) -> CommitResult:
        started = time.monotonic()
        with self._locked():
            base = self.snapshot()
            unchanged = CommitResult(base.version, 0, 0, {t: 0 for t in TABLES}, (), 0, 0, 0.0)
            if only_if_empty and base.version:
                return unchanged
            old_partitions, existing = self._locate(base, replaced)
            new_parts = {t: _split_by_partition(incoming[t]) for t in TABLES}
            touched: set[str | None] = set(old_partitions) | set(new_parts["studies"])
            if rewrite_all:
                touched |= {e.partition for t in TABLES for e in base.entries[t]}
            if not touched and base.version:  # nothing to change: no new snapshot
                return unchanged
            present = replaced if existing else set()  # all new studies: no file needs reading
            version, written, linked, rows, rewritten = self._publish(base, new_parts, present, touched, rewrite_all)
        release_memory()
        result = CommitResult(
            version=version,
            studies_committed=incoming["studies"].num_rows,
            studies_replaced=existing,
            rows=rows,
            partitions_rewritten=tuple(sorted(rewritten | touched, key=_sort_key)),
            files_written=written,
            files_linked=linked,
            seconds=round(time.monotonic() - started, 6),
        )
        logger.info(
            "catalog v%d: %d studies committed (%d replaced), %d partition(s) rewritten",
            version,
            result.studies_committed,
            existing,
            len(result.partitions_rewritten),
        )
        return result

    def _publish(
        self,
        base: Snapshot,
        new_parts: dict[str, dict[str | None, pa.Table]],
        replaced: set[str],
        touched: set[str | None],
        rewrite_all: bool = False,
    ) -> tuple[int, int, int, dict[str, int], set[str | None]]:
        """Build the next snapshot in a hidden folder, rename it into place and swap ``current``
        to it (the commit point). Nothing of a failed build stays behind; an OSError (full disk)
        becomes a one-line :class:`CatalogWriteError`."""
        version = self._next_version(base)
        build = self._snapshots_dir / f".build-{uuid.uuid4().hex}"
        final = self._snapshots_dir / f"v{version:012d}"
        published = False
        try:
            self._snapshots_dir.mkdir(parents=True, exist_ok=True)
            build.mkdir()
            manifest_tables, written, linked, rows, rewritten = self._build(
                base, build, version, new_parts, replaced, touched, rewrite_all
            )
            _write_manifest(build / MANIFEST, {
                "format": MANIFEST_FORMAT,
                "version": version,
                "parent": base.version or None,
                "schema_version": SCHEMA_VERSION,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "tables": manifest_tables,
            })
            _fsync(build, directory=True)
            os.rename(build, final)
            _fsync(self._snapshots_dir, directory=True)
            self._point_current_at(final)
            published = True
            _fsync(self.root, directory=True)
        except OSError as exc:
            raise self._write_error(exc, build, version, base.version, published) from None
        finally:
            if not published:
                shutil.rmtree(build, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
        return version, written, linked, rows, rewritten

    def _write_error(self, exc: OSError, build: Path, version: int, current: int,
                     published: bool) -> CatalogWriteError:
        """``catalog_root``, the place (relative to the build, else to the root: pseudonymous paths
        only) and the OS reason, in one line."""
        place = Path(exc.filename) if isinstance(exc.filename, (str, os.PathLike)) else build
        for top in (build, self.root):
            if place.is_relative_to(top) and place != top:
                place = place.relative_to(top)
                break
        outcome = f"snapshot v{version} is current" if published else f"the current snapshot v{current} is unchanged"
        return CatalogWriteError(f"catalog_root: cannot write snapshot v{version} under {self.root} "
                                 f"({place.as_posix()}: {_os_reason(exc)}); {outcome}")

    def _point_current_at(self, snapshot_dir: Path) -> None:
        tmp_link = self.root / f".current-{uuid.uuid4().hex}"
        os.symlink(f"{SNAPSHOTS_DIR}/{snapshot_dir.name}", tmp_link)
        try:
            os.replace(tmp_link, self._current_link)  # the commit point
        except BaseException:
            tmp_link.unlink(missing_ok=True)
            raise

    def _next_version(self, base: Snapshot) -> int:
        versions = [base.version]
        for p in self._snapshots_dir.iterdir() if self._snapshots_dir.is_dir() else ():
            m = _VERSION_DIR.match(p.name)
            if m:
                versions.append(int(m.group(1)))
        return max(versions) + 1

    def _build(
        self,
        base: Snapshot,
        build: Path,
        version: int,
        new_parts: dict[str, dict[str | None, pa.Table]],
        replaced: set[str],
        touched: set[str | None],
        rewrite_all: bool = False,
    ) -> tuple[dict[str, list[dict[str, Any]]], int, int, dict[str, int], set[str | None]]:
        value_set = pa.array(sorted(replaced), pa.string())
        manifest: dict[str, list[dict[str, Any]]] = {}
        written = linked = 0
        rewritten: set[str | None] = set()
        rows_written = {t: 0 for t in TABLES}
        for t in TABLES:
            by_partition: dict[str | None, list[FileEntry]] = {}
            for e in base.entries.get(t, ()):
                by_partition.setdefault(e.partition, []).append(e)
            entries: list[FileEntry] = []
            for p in sorted(set(by_partition) | touched, key=_sort_key):
                olds = [e for e in by_partition.get(p, []) if e.rows]  # zero-row placeholders: re-made below
                new = new_parts[t].get(p)
                if new is not None and new.num_rows:
                    rows_written[t] += new.num_rows
                groups: list[list[Source]] = []
                if p not in touched:
                    keep = olds
                else:
                    keep, groups = self._partition_plan(base, olds, new, value_set, rewrite_all)
                    rewritten.add(p)
                for old in keep:
                    assert base.directory is not None
                    (build / Path(old.path).parent).mkdir(parents=True, exist_ok=True)
                    os.link(base.directory / old.path, build / old.path)
                    entries.append(old)
                    linked += 1
                for sources in groups:
                    entry = _write_partition(build, t, p, version, sources)
                    if entry is not None:  # None: every row of its files was replaced
                        entries.append(entry)
                        written += 1
            if not entries:  # a table without rows keeps one zero-row file: its glob must match
                empty = Source(None, 0, table=SCHEMAS[t].empty_table())
                placeholder = _write_partition(build, t, None, version, [empty], keep_empty=True)
                assert placeholder is not None
                entries.append(placeholder)
                written += 1
            manifest[t] = [e.to_json() for e in entries]
        for d in sorted({p for p in build.rglob("*") if p.is_dir()}, key=lambda p: -len(p.parts)):
            _fsync(d, directory=True)
        return manifest, written, linked, rows_written, rewritten

    @staticmethod
    def _partition_plan(base: Snapshot, olds: list[FileEntry], new: pa.Table | None, value_set: pa.Array,
                        rewrite_all: bool) -> tuple[list[FileEntry], list[list[Source]]]:
        """A touched partition: which of its files stay as they are (linked), and the sources of
        each new file. A commit appends: its rows become a new file, only the files holding a
        replaced study are rewritten without it, and small files are merged into the new one once
        there are more than ``MAX_SMALL_FILES`` of them. Files are only opened here to find the
        replaced studies (their ``study_uid`` column); the new files are written streaming
        (:func:`_write_partition`). ``compact`` (``rewrite_all``) makes one file of each partition."""
        directory = base.directory or Path()  # no files without a directory
        keep: list[FileEntry] = []
        merged = [Source(None, new.num_rows, table=new)] if new is not None and new.num_rows else []
        rewrites: list[list[Source]] = []
        for old in olds:
            path = directory / old.path
            hits = 0
            if len(value_set):  # only the study_uid column: which files hold a replaced study
                uids = pq.read_table(path, columns=["study_uid"])["study_uid"]
                hits = pc.sum(pc.is_in(uids, value_set=value_set)).as_py() or 0
                if hits == len(uids):  # every row replaced: the file just goes
                    continue
            holds_replaced = hits > 0
            if not holds_replaced and not rewrite_all:
                keep.append(old)
                continue
            source = Source(path, old.rows, value_set if holds_replaced else None)
            if rewrite_all:
                merged.append(source)
            else:
                rewrites.append([source])
        small = [e for e in keep if e.rows < SMALL_FILE_ROWS]
        if len(small) + bool(merged) > MAX_SMALL_FILES:
            keep = [e for e in keep if e not in small]
            merged += [Source(directory / e.path, e.rows) for e in small]
        return keep, ([merged] if merged else []) + rewrites

    # -- maintenance ---------------------------------------------------------------------------
    def vacuum(self, grace_s: float = 3600.0) -> VacuumResult:
        """Delete what no reader may still need: see the module docstring."""
        now = _dt.datetime.now(_dt.timezone.utc)
        with self._locked():
            current = self.snapshot()
            keep: set[int] = set()
            if current.version:
                keep.add(current.version)
                child = current
                while child.parent:
                    parent_dir = self._snapshots_dir / f"v{child.parent:012d}"
                    if not parent_dir.is_dir():
                        break
                    assert child.created_at is not None
                    if (now - child.created_at).total_seconds() >= grace_s:
                        break  # superseded long enough ago, and so are all its ancestors
                    keep.add(child.parent)
                    try:
                        child = self._load(parent_dir)
                    except (OSError, ValueError, KeyError):
                        break
            doomed: list[Path] = []
            if self._snapshots_dir.is_dir():
                for p in self._snapshots_dir.iterdir():
                    m = _VERSION_DIR.match(p.name)
                    if (m and int(m.group(1)) not in keep) or p.name.startswith(".build-"):
                        doomed.append(p)
            for pattern in (".current-*", ".link-*"):
                for p in self.root.glob(pattern):
                    p.unlink(missing_ok=True)
            # A file's space is freed when its last link goes: count those.
            links: dict[tuple[int, int], list[int]] = {}
            files_removed = 0
            for d in doomed:
                for f in d.rglob("*.parquet"):
                    st = f.stat()
                    entry = links.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0, st.st_size])
                    entry[1] += 1
                    files_removed += 1
            freed = sum(size for nlink, removed, size in links.values() if removed >= nlink)
            for d in doomed:
                shutil.rmtree(d)
        logger.info("catalog vacuum: %d snapshot(s), %d file link(s) removed", len(doomed), files_removed)
        return VacuumResult(len(doomed), files_removed, freed, tuple(sorted(keep)))


def _write_partition(build: Path, name: str, partition: str | None, version: int, sources: list[Source],
                     *, keep_empty: bool = False) -> FileEntry | None:
    """Write the rows of ``sources`` as one sorted file of ``partition`` in the snapshot being
    built; None (and no file) when they have no rows, unless ``keep_empty``."""
    rel_dir = Path(name) / _partition_dir(partition)
    rel = rel_dir / f"part-{version:012d}-{uuid.uuid4().hex[:12]}.parquet"
    (build / rel_dir).mkdir(parents=True, exist_ok=True)
    path = build / rel
    try:
        rows = _write_parquet(Merge(tuple(sources), name), name, path)
    except OSError as exc:  # Arrow's errors do not name the file: the commit's message will
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    if not rows and not keep_empty:
        path.unlink()
        return None
    _fsync(path)
    return FileEntry(name, partition, rel.as_posix(), rows, path.stat().st_size, SCHEMA_VERSION)


@dataclass(frozen=True)
class Source:
    """One input of a file being written: a file of the base snapshot (without the studies of
    ``drop``) or, with ``table``, the commit's own rows. Each is sorted by the table's sort keys."""

    path: Path | None
    rows: int  # an upper bound of the rows it yields
    drop: pa.Array | None = None
    table: pa.Table | None = None


@dataclass(frozen=True)
class Merge:
    """The rows of ``sources`` as sorted chunks, read and merged streaming."""

    sources: tuple[Source, ...]
    name: str

    @property
    def upper_rows(self) -> int:
        return sum(s.rows for s in self.sources)

    def __iter__(self) -> Iterator[pa.Table]:
        return _merge_sorted([_batches(s, self.name) for s in self.sources], self.name)


def _batches(source: Source, name: str) -> Iterator[pa.Table]:
    """The rows of ``source`` in slices of ``MERGE_BATCH_ROWS``, conformed to today's schema."""
    if source.table is not None:
        yield from _sorted_slices(source.table, name)
        return
    assert source.path is not None
    # ParquetFile, not pq.read_table: the latter would add the hive column from the path.
    with pq.ParquetFile(source.path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False) as pf:
        for batch in pf.iter_batches(batch_size=MERGE_BATCH_ROWS, use_threads=False):
            chunk = conform(pa.Table.from_batches([batch]), name, lenient=True)
            if source.drop is not None and len(source.drop):
                chunk = chunk.filter(pc.invert(pc.is_in(chunk["study_uid"], value_set=source.drop)))
            if chunk.num_rows:
                yield chunk


def _sorted_slices(table: pa.Table, name: str) -> Iterator[pa.Table]:
    """``table`` sorted, a slice at a time, without a sorted copy of it whole. Arrow's ``take``
    on a table of many chunks (the commit's batch: a chunk per study) first concatenates them,
    a copy of the whole batch per call: each slice is taken from the chunks it needs instead."""
    order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in SORT_KEYS[name]]).to_numpy().astype(np.int64)
    batches = table.to_batches()
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    for first in range(0, len(order), MERGE_BATCH_ROWS):
        idx = order[first : first + MERGE_BATCH_ROWS]
        chunk = np.searchsorted(starts, idx, side="right") - 1
        used = np.unique(chunk)
        picked = pa.Table.from_batches([batches[c].take(idx[chunk == c] - starts[c]) for c in used])
        came_from = np.concatenate([np.flatnonzero(chunk == c) for c in used])
        yield picked.combine_chunks().take(np.argsort(came_from, kind="stable"))


def _merge_sorted(streams: list[Iterator[pa.Table]], name: str) -> Iterator[pa.Table]:
    """Merge sorted streams into sorted chunks, holding about one slice per stream.

    Each round emits, from every buffer, the rows of studies before the smallest last study of
    the streams not yet exhausted: no later slice can hold rows of those studies. The stream(s)
    whose buffer ends at that study read their next slice (a study longer than a slice stays
    buffered whole)."""
    keys = [(k, "ascending") for k in SORT_KEYS[name]]
    heads: list[pa.Table] = []
    live: list[Iterator[pa.Table] | None] = []
    for stream in streams:
        first = next(stream, None)
        if first is not None:
            heads.append(first)
            live.append(stream)
    while heads:
        lasts = [h["study_uid"][-1].as_py() for h, s in zip(heads, live) if s is not None and h.num_rows]
        bound = min(lasts) if lasts else None
        out = []
        for i, head in enumerate(heads):
            n = head.num_rows if bound is None else pc.sum(pc.less(head["study_uid"], bound)).as_py() or 0
            out.append(head.slice(0, n))
            heads[i] = head.slice(n)
        for i, pending in enumerate(live):
            if pending is not None and (not heads[i].num_rows or heads[i]["study_uid"][-1].as_py() == bound):
                more = next(pending, None)
                if more is None:
                    live[i] = None
                else:
                    heads[i] = pa.concat_tables([heads[i], more])
        kept = [i for i, (h, s) in enumerate(zip(heads, live)) if h.num_rows or s is not None]
        heads, live = [heads[i] for i in kept], [live[i] for i in kept]
        chunk = pa.concat_tables(out)
        if chunk.num_rows:
            yield chunk.sort_by(keys)  # a copy: the slices' batches can go


def _write_parquet(merge: Merge, name: str, path: Path) -> int:
    """Write the sorted chunks of ``merge`` as one Parquet file, holding at most one row group;
    returns the rows written."""
    schema = SCHEMAS[name]
    metadata = dict(schema.metadata or {})
    metadata[b"pacsflow.schema_version"] = str(SCHEMA_VERSION).encode()
    schema = schema.with_metadata(metadata)
    rows = 0
    with pq.ParquetWriter(path, schema, **_writer_options(name, merge.upper_rows)) as writer:
        for group in _row_groups(merge):
            writer.write_table(group, row_group_size=group.num_rows)
            rows += group.num_rows
        if not rows:
            writer.write_table(schema.empty_table())
    return rows


def _row_groups(chunks: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """``chunks`` regrouped into row groups of ``ROW_GROUP_ROWS`` rows, or fewer where they
    reach ``ROW_GROUP_BYTES`` first."""
    pending: list[pa.Table] = []
    rows = size = 0
    for chunk in chunks:
        pending.append(chunk)
        rows += chunk.num_rows
        size += chunk.nbytes
        while rows >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
            group = pa.concat_tables(pending)
            take = min(rows, ROW_GROUP_ROWS, max(1, rows * ROW_GROUP_BYTES // size))
            yield group.slice(0, take)
            rest = group.slice(take)
            pending, rows, size = [rest], rest.num_rows, rest.nbytes
    if rows:
        yield pa.concat_tables(pending)


def _writer_options(name: str, rows: int) -> dict[str, Any]:
    schema = SCHEMAS[name]
    options: dict[str, Any] = {}
    if _WRITES_BLOOM:
        ndv = max(1, min(rows, ROW_GROUP_ROWS))
        options["bloom_filter_options"] = {c: {"ndv": ndv, "fpp": BLOOM_FILTER_FPP} for c in BLOOM_FILTER_COLUMNS[name]}
    return dict(
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        write_statistics=True,
        sorting_columns=pq.SortingColumn.from_ordering(schema, [(k, "ascending") for k in SORT_KEYS[name]]),
        **options,
    )
