"""What makes lookups cheap at scale: Bloom filters on the key columns, and views that need not
open every file's footer to bind (the manifest records each file's schema). Real files, real DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pacsflow.catalog import store as store_mod
from pacsflow.catalog import views
from pacsflow.catalog.schema import SCHEMA_VERSION
from pacsflow.catalog.store import CURRENT_LINK, MANIFEST, CatalogStore
from tests.unit.test_catalog_views import make_study, root  # noqa: F401  (root: a fixture)


def test_a_study_uid_is_found_by_the_bloom_filter_of_one_row_group(root, monkeypatch):
    monkeypatch.setattr(store_mod, "ROW_GROUP_ROWS", 2)
    s = CatalogStore(root)
    uids = [f"1.9.{n}" for n in range(1, 5)]
    studies = [make_study(uid, "20040119", ("CT",), 2) for uid in uids]
    s.commit({t: pa.concat_tables([st[t] for st in studies]) for t in studies[0]})  # one month, one file
    (path,) = s.files("instances")
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    probe = duckdb.sql(
        "SELECT row_group_id, bloom_filter_excludes FROM parquet_bloom_probe(?, 'study_uid', ?) ORDER BY 1",
        params=[path, "1.9.3"],
    ).fetchall()
    assert [excluded for _, excluded in probe] == [True, True, False, True]  # sorted by study: the third
    studies = pq.ParquetFile(s.files("studies")[0]).metadata
    with_filter = {
        studies.row_group(0).column(c).path_in_schema
        for c in range(studies.num_columns)
        if studies.row_group(0).column(c).bloom_filter_length
    }
    assert with_filter == {"study_uid", "patient_pseudo_id"}  # the keys analysts look studies up by, only


def _make_older(root: Path) -> None:
    """Turn the current snapshot's instances file into one written before ``dicom_json`` existed, with
    the manifest an older store wrote (no schema per file)."""
    current = root / CURRENT_LINK
    manifest_path = current.resolve() / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for entries in manifest["tables"].values():
        for entry in entries:
            entry.pop("schema_version", None)
    manifest_path.write_text(json.dumps(manifest))
    (path,) = CatalogStore(root).files("instances")
    older = pq.read_table(path).drop_columns(["dicom_json"])
    Path(path).unlink()  # a hard link shared with no other snapshot here: write a new file in its place
    pq.write_table(older, path)


def test_views_read_files_of_an_older_schema_until_compaction(root):
    s = CatalogStore(root)
    s.commit(make_study("1.9.1", "20040119", ("CT",), 2))
    assert s.snapshot().current_schema("instances")
    _make_older(root)
    s.commit(make_study("1.9.2", "20050301", ("CT",), 2))  # another month: the older file is kept as is
    snap = s.snapshot()
    assert not snap.current_schema("instances") and snap.current_schema("series") is False
    sql = "SELECT study_uid, count(*) AS n, count(dicom_json) AS with_json FROM instances GROUP BY 1 ORDER BY 1"
    assert views.query(root, sql).to_pylist() == [
        {"study_uid": "1.9.1", "n": 2, "with_json": 0},
        {"study_uid": "1.9.2", "n": 2, "with_json": 2},
    ]
    s.compact()
    assert all(s.snapshot().current_schema(t) for t in store_mod.TABLES)
    assert all(e["schema_version"] == SCHEMA_VERSION
               for entries in json.loads((root / CURRENT_LINK / MANIFEST).read_text())["tables"].values()
               for e in entries)
    assert views.query(root, sql).num_rows == 2


@pytest.mark.parametrize("table", store_mod.TABLES)
def test_a_fresh_catalog_binds_without_reading_schemas_by_name(root, table):
    CatalogStore(root).commit(make_study("1.9.1", "20040119", ("CT",), 2))
    con = views.connect(root)
    try:
        sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ?", [table]).fetchone()
    finally:
        con.close()
    assert sql is not None and "union_by_name = false" in sql[0]
