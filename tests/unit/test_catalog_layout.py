"""The catalog's folder layout as analysts' tools see it: globs, hive-style readers, the migration
from the older ``current -> snapshots/vN`` layout. Real files, real DuckDB and pyarrow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pacsflow.catalog import views
from pacsflow.catalog.errors import CatalogError
from pacsflow.catalog.store import CatalogStore
from tests.unit.test_catalog_views import make_study, root  # noqa: F401  (root: a fixture)

TABLES = ("studies", "series", "instances")
KEYS = {"studies": "study_uid", "series": "series_uid", "instances": "sop_instance_uid"}


@pytest.fixture
def churned(root: Path) -> Path:
    """A catalog after commits that replace, move, delete and add studies (several snapshots kept)."""
    s = CatalogStore(root)
    s.commit(make_study("1.7.1", "20040119", ("CT",), 3))
    s.commit(make_study("1.7.2", "20040825", ("MR",), 2))
    s.commit(make_study("1.7.3", None, ("CT",), 1))
    s.commit(make_study("1.7.1", "20050301", ("CT", "MR"), 2))  # moves to another month, more series
    s.commit(make_study("1.7.4", "20040825", ("CT",), 2))
    s.delete(["1.7.2"])
    s.commit(make_study("1.7.3", None, ("MR",), 3))  # replaced in the null partition
    assert s.snapshot_version == 7
    return root


def _live(root: Path, table: str) -> list:
    """The live rows of ``table`` as the pinned, manifest-driven reader sees them."""
    return sorted(views.query(root, f"SELECT {KEYS[table]} FROM {table}").column(0).to_pylist())


def _glob_rows(pattern: str, table: str) -> list:
    con = duckdb.connect()
    try:
        return sorted(r[0] for r in con.execute(
            f"SELECT {KEYS[table]} FROM read_parquet(?, hive_partitioning = true)", [pattern]).fetchall())
    finally:
        con.close()


def test_table_globs_return_exactly_the_live_rows_after_many_commits(churned):
    assert len(list((churned / "_snapshots").iterdir())) == 7  # superseded snapshots are still there
    expected_studies = ["1.7.1", "1.7.3", "1.7.4"]
    assert _live(churned, "studies") == expected_studies
    for table in TABLES:
        live = _live(churned, table)
        assert live, table
        for pattern in (f"{churned}/{table}/**/*.parquet", f"{churned}/{table}/*/*.parquet",
                        f"{churned}/_current/{table}/**/*.parquet"):
            assert _glob_rows(pattern, table) == live, pattern
    # the hive column comes back from the path, NULL for the null-date partition
    con = duckdb.connect()
    months = con.execute(
        "SELECT study_uid, study_month FROM read_parquet(?, hive_partitioning = true) ORDER BY 1",
        [f"{churned}/studies/**/*.parquet"]).fetchall()
    con.close()
    assert months == [("1.7.1", "2005-03"), ("1.7.3", None), ("1.7.4", "2004-08")]


def test_globs_under_the_current_path_read_only_the_current_snapshot(churned):
    store = CatalogStore(churned)
    current = {str(Path(p).relative_to(store.snapshot().directory)) for t in TABLES for p in store.files(t)}
    con = duckdb.connect()
    seen = {r[0] for r in con.execute("SELECT file FROM glob(?)", [f"{churned}/_current/**/*.parquet"]).fetchall()}
    con.close()
    assert {str(Path(f).relative_to(churned / "_current")) for f in seen} == current


def test_hive_style_readers_skip_the_snapshots(churned):
    """pyarrow.dataset over the whole catalog sees the three live tables once, no snapshot."""
    dataset = ds.dataset(churned, format="parquet", partitioning="hive")
    files = [Path(f).relative_to(churned) for f in dataset.files]
    assert {f.parts[0] for f in files} == set(TABLES)
    store = CatalogStore(churned)
    assert len(files) == sum(len(store.files(t)) for t in TABLES)
    studies = ds.dataset(churned / "studies", format="parquet", partitioning="hive")
    assert sorted(studies.to_table(columns=["study_uid"])["study_uid"].to_pylist()) == _live(churned, "studies")


def test_no_zero_row_files_in_tables_that_have_rows(churned):
    for table in TABLES:
        files = list((churned / table).rglob("*.parquet"))
        assert files and all(pq.ParquetFile(f).metadata.num_rows > 0 for f in files), table
        assert "study_month=__HIVE_DEFAULT_PARTITION__" in {f.parent.name for f in files}  # 1.7.3 has no date


def test_an_empty_catalog_still_binds_its_globs(root):
    store = CatalogStore(root)
    store.ensure_initialized()
    for table in TABLES:
        (only,) = list((root / table).rglob("*.parquet"))
        assert pq.ParquetFile(only).metadata.num_rows == 0
        assert _glob_rows(f"{root}/{table}/**/*.parquet", table) == []
    store.commit(make_study("1.7.9", "20040119", ("CT",), 1))
    store.delete(["1.7.9"])  # empty again: the placeholder comes back
    assert [pq.ParquetFile(f).metadata.num_rows for f in (root / "studies").rglob("*.parquet")] == [0]


def _to_legacy_layout(root: Path) -> None:
    """Rewrite a catalog into the layout before the table links, as the older store left it: ``current`` and
    ``snapshots/``, a zero-row file in the null partition of every table, listed in the manifest."""
    version = CatalogStore(root).snapshot_version
    for table in TABLES:
        (root / table).unlink()
    (root / "_current").unlink()
    os.rename(root / "_snapshots", root / "snapshots")
    snap = root / "snapshots" / f"v{version:012d}"
    manifest = json.loads((snap / "manifest.json").read_text())
    for table in TABLES:
        template = next((snap / table).rglob("*.parquet"))
        empty = pq.read_table(template).schema.empty_table()
        rel = f"{table}/study_month=__HIVE_DEFAULT_PARTITION__/part-{version:012d}-000000000000.parquet"
        (snap / rel).parent.mkdir(exist_ok=True)
        pq.write_table(empty, snap / rel)
        manifest["tables"][table].append({"partition": None, "path": rel, "rows": 0, "bytes": 1})
    (snap / "manifest.json").write_text(json.dumps(manifest))
    os.symlink(f"snapshots/v{version:012d}", root / "current")


def test_an_old_layout_is_read_then_migrated_on_the_first_write(root, tmp_path):
    s = CatalogStore(root)
    s.commit(make_study("1.8.1", "20040119", ("CT",), 2))
    s.commit(make_study("1.8.2", "20050301", ("MR",), 1))
    _to_legacy_layout(root)
    assert s.snapshot_version == 2 and s.study_uids() == {"1.8.1", "1.8.2"}  # readers read the old layout
    assert views.query(root, "SELECT count(*) AS n FROM instances").to_pylist() == [{"n": 3}]
    old_file = next(p for p in (root / "snapshots" / "v000000000002" / "studies").rglob("*.parquet")
                    if "2004-01" in str(p))
    inode = old_file.stat().st_ino

    s.commit(make_study("1.8.3", "20050301", ("CT",), 1))  # the first write migrates

    assert not (root / "current").exists() and not (root / "snapshots").exists()
    assert sorted(p.name for p in (root / "_snapshots").iterdir()) == ["v000000000002", "v000000000003"]
    assert os.readlink(root / "_current") == "_snapshots/v000000000003"
    assert {t: os.readlink(root / t) for t in TABLES} == {t: f"_current/{t}" for t in TABLES}
    moved = next(p for p in (root / "studies").rglob("*.parquet") if "2004-01" in str(p))
    assert moved.stat().st_ino == inode  # hard-linked, not copied
    assert _glob_rows(f"{root}/studies/**/*.parquet", "studies") == ["1.8.1", "1.8.2", "1.8.3"]
    # the zero-row files of the old layout went with the commit, which rewrote no null partition
    for table in TABLES:
        assert all(pq.ParquetFile(f).metadata.num_rows > 0 for f in (root / table).rglob("*.parquet")), table


def test_compact_migrates_an_old_layout_and_drops_its_zero_row_files(root):
    s = CatalogStore(root)
    s.commit(make_study("1.8.1", "20040119", ("CT",), 2))
    _to_legacy_layout(root)
    before = _live(root, "instances")
    s.compact()
    s.vacuum(grace_s=0)
    assert sorted(p.name for p in root.iterdir()) == ["_current", "_lock", "_snapshots", *sorted(TABLES)]
    assert [p.name for p in (root / "_snapshots").iterdir()] == ["v000000000002"]
    for table in TABLES:
        files = list((root / table).rglob("*.parquet"))
        assert len(files) == 1 and pq.ParquetFile(files[0]).metadata.num_rows > 0
    assert _glob_rows(f"{root}/instances/**/*.parquet", "instances") == before


def test_a_migration_cut_short_finishes_on_the_next_write(root, monkeypatch):
    s = CatalogStore(root)
    s.commit(make_study("1.8.1", "20040119", ("CT",), 2))
    _to_legacy_layout(root)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name == "snapshots":
            raise KeyboardInterrupt  # the process dies after publishing _current
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        s.commit(make_study("1.8.2", "20050301", ("CT",), 1))
    monkeypatch.undo()
    assert s.study_uids() == {"1.8.1"}  # the commit did not land; the migrated snapshot reads the same
    s.commit(make_study("1.8.2", "20050301", ("CT",), 1))
    assert not (root / "snapshots").exists() and not (root / "current").exists()
    assert _glob_rows(f"{root}/studies/**/*.parquet", "studies") == ["1.8.1", "1.8.2"]


def test_a_folder_in_the_way_of_a_table_link_is_named(root):
    root.mkdir()
    (root / "series").mkdir()
    with pytest.raises(CatalogError, match="series"):
        CatalogStore(root).commit(make_study("1.8.1", "20040119", ("CT",), 1))
    assert not (root / "_current").exists()
