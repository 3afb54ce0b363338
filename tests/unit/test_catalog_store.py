"""pacsflow.catalog.store: real Parquet files on disk, queried with real DuckDB."""

from __future__ import annotations

import copy
import errno
import datetime as dt
import fcntl
import functools
import hashlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacsflow.catalog import store as store_mod
from pacsflow.catalog import views
from pacsflow.catalog.schema import SCHEMA_VERSION, SCHEMAS
from pacsflow.catalog.errors import CatalogBusy, CatalogWriteError, IntegrityError, SchemaMismatch
from pacsflow.catalog.store import MAX_SMALL_FILES, CatalogStore
from pacsflow.tasks.core.errors import is_transient
from pacsflow.tasks.lake.rows import StudyExtractor

INGESTED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
TABLES = ("studies", "series", "instances")


@functools.lru_cache(maxsize=1)
def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)


def make_study(
    uid: str,
    date: str | None = "20040119",
    *,
    series: int = 1,
    per_series: int = 2,
    description: str = "CT HEAD",
    modality: str = "CT",
) -> dict[str, pa.Table]:
    """Catalog tables of a synthetic study built from CT_small.dcm through the real extractor."""
    ex = StudyExtractor()
    for s in range(1, series + 1):
        for i in range(1, per_series + 1):
            ds = copy.deepcopy(_ct())
            ds.StudyInstanceUID = uid
            ds.SeriesInstanceUID = f"{uid}.{s}"
            ds.SOPInstanceUID = f"{uid}.{s}.{i}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyDate = date or ""
            ds.StudyDescription = description
            ds.Modality = modality
            ds.SeriesNumber = s
            ds.InstanceNumber = i
            ex.add(
                ds,
                file_path=f"lake/{uid}/{s}/{i}.dcm",
                file_size=1000 + i,
                sha256=hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest(),
            )
    return ex.tables(INGESTED)


def read_all(root: Path, table: str) -> pa.Table:
    """The table as DuckDB sees it, sorted by key, without the hive column."""
    keys = {"studies": "study_uid", "series": "study_uid, series_uid", "instances": "sop_instance_uid"}[table]
    t = views.query(root, "SELECT * EXCLUDE (study_month) FROM " + table + " ORDER BY " + keys)
    return t


def counts(root: Path) -> dict[str, int]:
    con = views.connect(root)
    try:
        return {t: con.execute("SELECT count(*) FROM " + t).fetchone()[0] for t in TABLES}
    finally:
        con.close()


def files_per_partition(store: CatalogStore) -> dict[tuple[str, str], int]:
    """Counts the .parquet files in every partition directory of the current snapshot on disk."""
    snap = store.snapshot()
    out = {}
    for t in TABLES:
        for d in (snap.directory / t).iterdir():
            out[(t, d.name)] = len(list(d.glob("*.parquet")))
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "catalog"


# -- basics ---------------------------------------------------------------------------------------
def test_reading_an_uncommitted_catalog_creates_nothing(root):
    s = CatalogStore(root)
    assert s.snapshot_version == 0
    assert s.files("instances") == [] and s.study_uids() == set()
    assert s.stats()["tables"]["studies"]["rows"] == 0
    assert not root.exists()


def test_commit_then_query(root):
    s = CatalogStore(root)
    result = s.commit(make_study("1.2.1", series=2, per_series=3))
    assert result.version == 1 and s.snapshot_version == 1
    assert result.studies_committed == 1 and result.studies_replaced == 0
    assert result.rows == {"studies": 1, "series": 2, "instances": 6}
    assert result.partitions_rewritten == ("2004-01",)
    assert s.study_uids() == {"1.2.1"}
    assert counts(root) == {"studies": 1, "series": 2, "instances": 6}
    row = views.query(root, "SELECT study_uid, study_date, study_month, modalities FROM studies").to_pylist()
    assert row == [{"study_uid": "1.2.1", "study_date": dt.date(2004, 1, 19), "study_month": "2004-01",
                    "modalities": ["CT"]}]
    for t in TABLES:
        (path,) = s.files(t)
        assert "study_month=2004-01" in path
        assert pq.ParquetFile(path).schema_arrow.equals(SCHEMAS[t])


def test_parquet_files_are_zstd_sorted_with_statistics(root):
    s = CatalogStore(root)
    for uid in ("1.2.9", "1.2.1", "1.2.5"):
        s.commit(make_study(uid, series=2, per_series=2))
    s.compact()  # each commit appended a file; compaction makes one sorted file of the partition
    (path,) = s.files("instances")
    f = pq.ParquetFile(path)
    md = f.metadata
    assert md.metadata[b"pacsflow.schema_version"] == str(SCHEMA_VERSION).encode()
    rg = md.row_group(0)
    sorted_by = [md.schema.column(sc.column_index).path for sc in rg.sorting_columns]
    assert sorted_by == ["study_uid", "series_uid", "sop_instance_uid"]
    assert {rg.column(i).compression for i in range(rg.num_columns)} == {"ZSTD"}
    uid_col = rg.column(0)
    assert uid_col.path_in_schema == "study_uid"
    assert uid_col.statistics.has_min_max
    assert (uid_col.statistics.min, uid_col.statistics.max) == ("1.2.1", "1.2.9")
    table = f.read()
    assert table["sop_instance_uid"].to_pylist() == sorted(table["sop_instance_uid"].to_pylist())


# -- replacement semantics ------------------------------------------------------------------------
def test_recommit_same_study_is_idempotent(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1"))
    s.commit(make_study("1.2.2"))
    before = {t: read_all(root, t) for t in TABLES}
    result = s.commit(make_study("1.2.1"))
    assert result.studies_replaced == 1
    after = {t: read_all(root, t) for t in TABLES}
    for t in TABLES:
        assert after[t].equals(before[t]), t
    assert counts(root) == {"studies": 2, "series": 2, "instances": 4}
    dup = views.query(root, "SELECT sop_instance_uid, count(*) n FROM instances GROUP BY 1 HAVING n > 1")
    assert dup.num_rows == 0


def test_changed_study_replaces_all_its_rows(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1", series=2, per_series=3, description="first"))
    s.commit(make_study("1.2.2"))
    s.commit(make_study("1.2.1", series=1, per_series=1, description="second"))
    assert counts(root) == {"studies": 2, "series": 2, "instances": 3}
    rows = views.query(
        root, "SELECT study_description, number_of_series, number_of_instances FROM studies WHERE study_uid = ?",
        ["1.2.1"],
    ).to_pylist()
    assert rows == [{"study_description": "second", "number_of_series": 1, "number_of_instances": 1}]
    sops = views.query(root, "SELECT sop_instance_uid FROM instances WHERE study_uid = ?", ["1.2.1"])
    assert sops["sop_instance_uid"].to_pylist() == ["1.2.1.1.1"]


def test_study_moving_partition(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1", "20040119"))
    s.commit(make_study("1.2.2", "20040120"))  # stays behind in 2004-01
    result = s.commit(make_study("1.2.1", "20050301"))
    assert set(result.partitions_rewritten) == {"2004-01", "2005-03"}
    got = views.query(
        root,
        "SELECT s.study_uid, s.study_month, count(i.sop_instance_uid) n, min(i.study_date) d, "
        "min(i.study_month) m FROM studies s JOIN instances i USING (study_uid) GROUP BY ALL ORDER BY 1",
    ).to_pylist()
    assert got == [
        {"study_uid": "1.2.1", "study_month": "2005-03", "n": 2, "d": dt.date(2005, 3, 1), "m": "2005-03"},
        {"study_uid": "1.2.2", "study_month": "2004-01", "n": 2, "d": dt.date(2004, 1, 20), "m": "2004-01"},
    ]
    assert counts(root) == {"studies": 2, "series": 2, "instances": 4}
    # move the last study out of 2004-01: the partition disappears
    s.commit(make_study("1.2.2", "20050302"))
    for t in TABLES:
        assert all("2004-01" not in p for p in s.files(t))
        assert len(s.files(t)) == 2  # 2005-03: one file per commit that added to it
    assert counts(root) == {"studies": 2, "series": 2, "instances": 4}


def test_two_studies_in_different_partitions_and_null_dates(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1", "20040119"))
    s.commit(make_study("1.2.2", "20230607"))
    s.commit(make_study("1.2.3", None))
    for t in TABLES:
        parts = sorted(Path(p).parent.name for p in s.files(t))
        assert parts == ["study_month=2004-01", "study_month=2023-06", "study_month=__HIVE_DEFAULT_PARTITION__"]
    got = views.query(root, "SELECT study_uid, study_month FROM studies ORDER BY 1").to_pylist()
    assert [g["study_month"] for g in got] == ["2004-01", "2023-06", None]
    assert s.stats()["tables"]["instances"]["partitions"] == 3


def test_few_files_per_partition_after_many_commits_and_one_after_compact(root):
    s = CatalogStore(root)
    dates = ["20040101", "20040215", "20040220", None, "20040102"]
    for n in range(20):
        s.commit(make_study(f"1.2.{n % 7}", dates[n % len(dates)]))
    stats = s.stats()
    for t in TABLES:
        assert 1 < stats["tables"][t]["max_files_per_partition"] <= MAX_SMALL_FILES
    assert max(files_per_partition(s).values()) <= MAX_SMALL_FILES
    assert counts(root)["studies"] == 7
    assert stats["version"] == 20
    s.compact()
    assert set(files_per_partition(s).values()) == {1} and counts(root)["studies"] == 7


def test_a_commit_appends_and_rewrites_only_the_files_of_replaced_studies(root):
    s = CatalogStore(root)

    def names(t: str) -> set[str]:  # a linked file keeps its name from snapshot to snapshot
        return {Path(p).name for p in s.files(t)}

    s.commit(make_study("1.2.1"))
    s.commit(make_study("1.2.2"))
    before = {t: names(t) for t in TABLES}
    added = s.commit(make_study("1.2.3"))  # a new study: every file there stays as it is
    assert (added.files_written, added.files_linked) == (3, 6)
    for t in TABLES:
        assert before[t] < names(t)
    kept = {t: names(t) for t in TABLES}
    again = s.commit(make_study("1.2.2", per_series=3))  # reprocessed: only its own file is rewritten
    assert again.studies_replaced == 1
    for t in TABLES:
        assert len(kept[t] & names(t)) == 2 and len(names(t)) == 3
    assert counts(root) == {"studies": 3, "series": 3, "instances": 7}


def _sorted_in_row_groups(path: str, table: str, most: int) -> list[str]:
    """The file's sort-key tuples, checked sorted, every row group holding at most ``most`` rows."""
    f = pq.ParquetFile(path)
    assert all(f.metadata.row_group(i).num_rows <= most for i in range(f.metadata.num_row_groups))
    keys = {"studies": ["study_uid"], "series": ["study_uid", "series_uid"],
            "instances": ["study_uid", "series_uid", "sop_instance_uid"]}[table]
    rows = [tuple(r.values()) for r in f.read(columns=keys).to_pylist()]
    assert rows == sorted(rows)
    return rows


def test_row_groups_end_at_a_byte_bound_before_the_row_bound(root, monkeypatch):
    # Instance rows carry their whole header as DICOM JSON: a row group is bounded by its bytes
    # too, so what the writer holds does not grow with the rows a night has written.
    monkeypatch.setattr(store_mod, "MERGE_BATCH_ROWS", 2)
    monkeypatch.setattr(store_mod, "ROW_GROUP_ROWS", 1000)
    study = make_study("1.7.1", series=2, per_series=6)
    row_bytes = study["instances"].nbytes // study["instances"].num_rows
    monkeypatch.setattr(store_mod, "ROW_GROUP_BYTES", 3 * row_bytes)
    s = CatalogStore(root)
    s.commit(study)
    (path,) = s.files("instances")
    groups = pq.ParquetFile(path).metadata
    assert groups.num_row_groups >= 3  # 12 rows, about 3 to a group
    assert len(_sorted_in_row_groups(path, "instances", 4)) == 12
    (path,) = s.files("studies")  # small rows: one group
    assert pq.ParquetFile(path).metadata.num_row_groups == 1


def test_merges_stream_slices_into_sorted_row_groups(root, monkeypatch):
    # Slices of 2 rows, row groups and small files of 4: studies of 3 instances span slices,
    # merges interleave studies of several files, and a replaced study leaves the merge.
    monkeypatch.setattr(store_mod, "MERGE_BATCH_ROWS", 2)
    monkeypatch.setattr(store_mod, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(store_mod, "SMALL_FILE_ROWS", 4)
    s = CatalogStore(root)
    for n in (5, 1, 8, 3, 9, 2, 7, 4, 6):
        s.commit(make_study(f"1.6.{n}", per_series=3))
    s.commit(make_study("1.6.3", per_series=2, description="again"))
    s.delete(["1.6.9"])
    expected = {f"1.6.{n}.1.{i}" for n in (1, 2, 4, 5, 6, 7, 8) for i in (1, 2, 3)} | {"1.6.3.1.1", "1.6.3.1.2"}
    files = s.files("instances")
    assert max(pq.ParquetFile(f).metadata.num_rows for f in files) > 3  # some file holds a merge
    seen = [k for f in files for k in _sorted_in_row_groups(f, "instances", 4)]
    assert sorted(k[2] for k in seen) == sorted(expected)
    assert views.query(root, "SELECT DISTINCT study_description FROM studies WHERE study_uid = '1.6.3'"
                       ).to_pylist() == [{"study_description": "again"}]
    s.compact()
    for t in TABLES:
        (only,) = s.files(t)
        _sorted_in_row_groups(only, t, 4)
    assert sorted(k[2] for k in _sorted_in_row_groups(s.files("instances")[0], "instances", 4)) == sorted(expected)
    assert counts(root) == {"studies": 8, "series": 8, "instances": 23}


def test_delete_and_compact(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1"))
    s.commit(make_study("1.2.2", "20050505"))
    r = s.delete(["1.2.1", "9.9.9"])
    assert r.studies_replaced == 1
    assert s.study_uids() == {"1.2.2"}
    assert counts(root) == {"studies": 1, "series": 1, "instances": 2}
    version = s.snapshot_version
    assert s.delete("7.7.7").version == version  # nothing to delete: no new snapshot
    assert s.snapshot_version == version
    before = {t: read_all(root, t) for t in TABLES}
    old_files = {t: s.files(t) for t in TABLES}
    r = s.compact()
    assert r.files_written == 3 and r.files_linked == 0  # one partition per table, no empty files
    for t in TABLES:
        assert read_all(root, t).equals(before[t])
        assert s.files(t) != old_files[t]
    assert set(files_per_partition(s).values()) == {1}


# -- validation -----------------------------------------------------------------------------------
def test_compatible_types_are_cast(root):
    tables = make_study("1.2.1")
    studies = tables["studies"]
    i = studies.schema.get_field_index("number_of_series")
    studies = studies.set_column(i, "number_of_series", studies["number_of_series"].cast(pa.int64()))
    j = studies.schema.get_field_index("study_date")
    studies = studies.set_column(j, "study_date", pa.array([dt.datetime(2004, 1, 19)], pa.timestamp("s")))
    # also columns out of order
    studies = studies.select(list(reversed(studies.column_names)))
    CatalogStore(root).commit({**tables, "studies": studies})
    assert counts(root)["studies"] == 1


def test_incompatible_tables_are_refused_without_values_in_the_message(root):
    s = CatalogStore(root)
    tables = make_study("1.2.1")
    st = tables["studies"]
    bad = st.set_column(st.schema.get_field_index("study_date"), "study_date", pa.array(["Doe^John"]))
    with pytest.raises(SchemaMismatch, match=r"studies\.study_date") as err:
        s.commit({**tables, "studies": bad})
    assert "Doe" not in str(err.value)
    with pytest.raises(SchemaMismatch, match="missing columns"):
        s.commit({**tables, "studies": st.drop_columns(["study_time"])})
    with pytest.raises(SchemaMismatch, match="unexpected columns"):
        s.commit({**tables, "studies": st.append_column("patient_name", pa.array(["x"]))})
    nulls = st.set_column(0, "study_uid", pa.array([None], pa.string()))
    with pytest.raises(SchemaMismatch, match="non-null"):
        s.commit({**tables, "studies": nulls})
    with pytest.raises(SchemaMismatch, match="unknown tables"):
        s.commit({**tables, "patients": st})
    with pytest.raises(IntegrityError, match="duplicate"):
        s.commit({**tables, "studies": pa.concat_tables([st, st])})
    other = make_study("1.2.2")
    with pytest.raises(IntegrityError, match="not in"):
        s.commit({"studies": st, "series": tables["series"], "instances": other["instances"]})
    assert s.snapshot_version == 0 and not (root / "_current").exists()


# -- atomicity ------------------------------------------------------------------------------------
def _spy_writes(monkeypatch) -> list[Path]:
    written: list[Path] = []
    real = store_mod._write_parquet

    def spy(table, name, path):  # table: what the store writes (a Merge of sorted sources)
        written.append(path)
        return real(table, name, path)

    monkeypatch.setattr(store_mod, "_write_parquet", spy)
    return written


def _assert_only_snapshot(root: Path, version: int) -> None:
    names = sorted(p.name for p in (root / "_snapshots").iterdir())
    assert names == [f"v{version:012d}"]
    assert not list(root.glob(".current-*")) and not list(root.glob(".link-*"))


def test_failure_at_the_commit_point_leaves_previous_snapshot(root, monkeypatch):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1"))
    before = {t: read_all(root, t) for t in TABLES}
    files_before = {t: s.files(t) for t in TABLES}
    pinned = views.connect(root)
    written = _spy_writes(monkeypatch)

    def crash(src, dst):
        raise OSError("simulated crash at the commit point")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CatalogWriteError, match="catalog_root: cannot write snapshot v2 .*unchanged"):
        s.commit(make_study("1.2.2", "20050505"))
    monkeypatch.undo()
    assert written, "data files were written before the failure"
    assert s.snapshot_version == 1
    assert {t: s.files(t) for t in TABLES} == files_before
    for t in TABLES:
        assert read_all(root, t).equals(before[t])
    assert pinned.execute("SELECT count(*) FROM instances").fetchone()[0] == 2
    pinned.close()
    _assert_only_snapshot(root, 1)
    assert s.commit(make_study("1.2.2", "20050505")).version == 2
    assert s.study_uids() == {"1.2.1", "1.2.2"}


def test_failure_while_writing_data_files_leaves_previous_snapshot(root, monkeypatch):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1"))
    before = {t: read_all(root, t) for t in TABLES}
    real = store_mod._write_parquet
    calls = []

    calls_paths = []

    def flaky(table, name, path):
        calls.append(name)
        calls_paths.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "disk full (simulated)", str(path))
        return real(table, name, path)

    monkeypatch.setattr(store_mod, "_write_parquet", flaky)
    with pytest.raises(CatalogWriteError) as err:
        s.commit(make_study("1.2.1", description="changed"))
    monkeypatch.undo()
    # one line: the setting, the root, the place under the build (pseudonymous), the OS's words
    place = "/".join(Path(calls_paths[-1]).parts[-3:])
    assert place.startswith("instances/study_month=")
    assert str(err.value) == (f"catalog_root: cannot write snapshot v2 under {root} ({place}: "
                              "No space left on device); the current snapshot v1 is unchanged")
    assert is_transient(err.value)  # the next run retries the studies
    assert s.snapshot_version == 1
    for t in TABLES:
        assert read_all(root, t).equals(before[t])
    _assert_only_snapshot(root, 1)


def test_readers_never_see_half_a_commit(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.0", per_series=3))
    stop = threading.Event()
    seen: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []

    def reader():
        try:
            while not stop.is_set():
                c = counts(root)
                seen.append((c["studies"], c["series"], c["instances"]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    th = threading.Thread(target=reader)
    th.start()
    try:
        for n in range(1, 12):  # alternate partitions so studies move around too
            s.commit(make_study(f"1.2.{n}", "20040101" if n % 2 else "20050101", per_series=3))
            s.commit(make_study(f"1.2.{n - 1}", "20050101" if n % 2 else "20040101", per_series=3))
    finally:
        stop.set()
        th.join()
    assert not errors
    assert len(set(seen)) > 1, "the reader ran while commits landed"
    for studies, series, instances in seen:
        assert series == studies and instances == 3 * studies


# -- vacuum ---------------------------------------------------------------------------------------
def test_vacuum_respects_grace_then_removes_unreferenced_files(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1"))
    s.commit(make_study("1.2.2", "20050505"))
    old = {t: s.files(t) for t in TABLES}
    pinned = views.connect(root)  # pinned to v2
    s.commit(make_study("1.2.1", description="changed"))  # v3 rewrites 2004-01
    s.commit(make_study("1.2.3", "20060606"))  # v4
    r = s.vacuum(grace_s=3600)
    assert r.snapshots_removed == 0 and r.kept_versions == (1, 2, 3, 4)
    assert all(Path(p).exists() for t in TABLES for p in old[t])
    assert pinned.execute("SELECT count(*) FROM studies").fetchone()[0] == 2

    # leftovers of a crashed commit are removed too
    (root / "_snapshots" / ".build-deadbeef" / "studies").mkdir(parents=True)
    (root / "_snapshots" / "v000000000099").mkdir()  # never published
    os.symlink("_snapshots/v000000000099", root / ".current-deadbeef")
    os.symlink("_current/studies", root / ".link-deadbeef")

    r = s.vacuum(grace_s=0)
    assert r.kept_versions == (4,)
    assert r.snapshots_removed == 3 + 2
    assert r.files_removed > 0 and r.bytes_freed > 0
    assert not any(Path(p).exists() for t in TABLES for p in old[t])
    _assert_only_snapshot(root, 4)
    assert all(Path(p).exists() for t in TABLES for p in s.files(t))
    assert counts(root) == {"studies": 3, "series": 3, "instances": 6}
    assert s.stats()["snapshots_on_disk"] == 1
    # files the current snapshot shares with vacuumed ones survive (hard links)
    assert read_all(root, "studies")["study_uid"].to_pylist() == ["1.2.1", "1.2.2", "1.2.3"]
    pinned.close()


# -- concurrency ----------------------------------------------------------------------------------
def test_concurrent_commits_from_threads_all_land(root):
    s = CatalogStore(root)
    studies = {f"1.3.{t}.{k}": make_study(f"1.3.{t}.{k}", "20040101" if k % 2 else None)
               for t in range(4) for k in range(3)}
    uids = sorted(studies)
    errors = []

    def worker(mine):
        try:
            for uid in mine:
                CatalogStore(root).commit(studies[uid])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(uids[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert s.study_uids() == set(uids)
    assert s.snapshot_version == len(uids)
    assert counts(root) == {"studies": 12, "series": 12, "instances": 24}
    assert max(files_per_partition(s).values()) <= MAX_SMALL_FILES


_CHILD = textwrap.dedent(
    """
    import copy, sys, datetime as dt
    import pydicom
    from pydicom.data import get_testdata_file
    from pacsflow.tasks.lake.rows import StudyExtractor
    from pacsflow.catalog.store import CatalogStore

    root, prefix = sys.argv[1], sys.argv[2]
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    store = CatalogStore(root)
    for n in range(5):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = f"{prefix}.{n}"
        ds.SeriesInstanceUID = f"{prefix}.{n}.1"
        ds.SOPInstanceUID = f"{prefix}.{n}.1.1"
        ex = StudyExtractor()
        ex.add(ds, file_path="x", file_size=1, sha256="0" * 64)
        store.commit(ex.tables(dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)))
    """
)


def test_concurrent_commits_from_processes_all_land(root):
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(root), prefix], stderr=subprocess.PIPE)
        for prefix in ("1.4.1", "1.4.2")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    s = CatalogStore(root)
    assert s.study_uids() == {f"{p}.{n}" for p in ("1.4.1", "1.4.2") for n in range(5)}
    assert s.snapshot_version == 10
    assert max(files_per_partition(s).values()) <= MAX_SMALL_FILES


def test_lock_timeout_raises_transient_busy(root):
    root.mkdir(parents=True)
    fd = os.open(root / "_lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CatalogBusy):
            CatalogStore(root, lock_timeout_s=0.1).commit(make_study("1.2.1"))
    finally:
        os.close(fd)
    assert CatalogStore(root, lock_timeout_s=0.1).commit(make_study("1.2.1")).version == 1


def test_files_and_stats(root):
    s = CatalogStore(root)
    s.commit(make_study("1.2.1", series=2, per_series=2))
    s.commit(make_study("1.2.2", None))
    st = s.stats()
    assert st["version"] == 2 and st["schema_version"] == SCHEMA_VERSION
    assert st["tables"]["instances"]["rows"] == 6
    assert st["tables"]["instances"]["files"] == 2
    assert st["tables"]["instances"]["bytes"] == sum(os.path.getsize(p) for p in s.files("instances"))
    with pytest.raises(KeyError):
        s.files("patients")
    total = pc.sum(pq.ParquetFile(s.files("studies")[0]).read()["number_of_instances"]).as_py()
    assert total in (1, 4)
