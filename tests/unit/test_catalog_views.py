"""pacsflow.catalog.views: real DuckDB over real Parquet written by the store."""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacsflow.catalog import views
from pacsflow.catalog.schema import SCHEMAS
from pacsflow.catalog.store import CatalogStore
from pacsflow.tasks.lake.rows import StudyExtractor

INGESTED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
TABLES = ("studies", "series", "instances")


@functools.lru_cache(maxsize=None)
def _sample(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def make_study(uid: str, date: str | None, modalities=("CT",), per_series: int = 2) -> dict[str, pa.Table]:
    source = {"CT": "CT_small.dcm", "MR": "MR_small.dcm"}
    ex = StudyExtractor()
    for s, modality in enumerate(modalities, start=1):
        for i in range(1, per_series + 1):
            ds = copy.deepcopy(_sample(source[modality]))
            ds.StudyInstanceUID = uid
            ds.SeriesInstanceUID = f"{uid}.{s}"
            ds.SOPInstanceUID = f"{uid}.{s}.{i}"
            ds.StudyDate = date or ""
            ex.add(ds, file_path=f"lake/{uid}/{s}/{i}.dcm", file_size=100,
                   sha256=hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest())
    return ex.tables(INGESTED)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "catalog"


@pytest.fixture
def filled(root: Path) -> Path:
    s = CatalogStore(root)
    s.commit(make_study("1.5.1", "20040119", ("CT",), 3))
    s.commit(make_study("1.5.2", "20040825", ("MR",), 2))
    s.commit(make_study("1.5.3", "20050301", ("CT", "MR"), 2))
    s.commit(make_study("1.5.4", None, ("CT",), 1))
    return root


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [r[0] for r in con.execute("SELECT column_name FROM (DESCRIBE " + view + ")").fetchall()]


def test_views_exist_and_are_typed_when_nothing_is_committed(root):
    con = views.connect(root)
    try:
        for t in TABLES:
            assert _columns(con, t) == [*SCHEMAS[t].names, "study_month"]
            assert con.execute("SELECT count(*) FROM " + t).fetchone()[0] == 0
        types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE studies)").fetchall())
        assert types["study_date"] == "DATE"
        assert types["modalities"] == "VARCHAR[]"
        assert types["number_of_instances"] == "INTEGER"
        assert con.execute("SELECT version FROM catalog_snapshot").fetchone()[0] == 0
        # typed empty views still answer the usual queries
        assert con.execute("SELECT count(*) FROM studies WHERE study_date >= ?", [dt.date(2004, 1, 1)]).fetchone() == (0,)
    finally:
        con.close()
    assert not root.exists()  # readers do not write


def test_views_have_schema_columns_after_commits(filled):
    con = views.connect(filled)
    try:
        for t in TABLES:
            assert _columns(con, t) == [*SCHEMAS[t].names, "study_month"]
        assert con.execute("SELECT version FROM catalog_snapshot").fetchone()[0] == 4
    finally:
        con.close()


def test_query_binds_positional_and_named_params(filled):
    t = views.query(filled, "SELECT study_uid FROM studies WHERE study_uid = ?", ["1.5.2"])
    assert t["study_uid"].to_pylist() == ["1.5.2"]
    t = views.query(filled, "SELECT count(*) AS n FROM instances WHERE study_uid = $uid", {"uid": "1.5.1"})
    assert t.to_pylist() == [{"n": 3}]
    hostile = "x' OR '1'='1"
    assert views.query(filled, "SELECT * FROM studies WHERE study_uid = ?", [hostile]).num_rows == 0
    assert isinstance(views.query(filled, "SELECT 1 AS one"), pa.Table)


def test_readme_queries(filled):
    per_modality = views.query(
        filled,
        "SELECT m AS modality, count(*) AS studies FROM studies, unnest(modalities) AS u(m) "
        "GROUP BY ALL ORDER BY modality",
    ).to_pylist()
    assert per_modality == [{"modality": "CT", "studies": 3}, {"modality": "MR", "studies": 2}]

    series_per_modality = views.query(
        filled, "SELECT modality, count(*) AS n, sum(number_of_instances) AS inst FROM series GROUP BY ALL ORDER BY 1"
    ).to_pylist()
    assert series_per_modality == [{"modality": "CT", "n": 3, "inst": 6}, {"modality": "MR", "n": 2, "inst": 4}]

    total = views.query(filled, "SELECT count(*) AS n FROM instances").to_pylist()
    assert total == [{"n": 10}]

    in_range = views.query(
        filled,
        "SELECT study_uid, number_of_instances FROM studies WHERE study_date BETWEEN ? AND ? ORDER BY study_date",
        [dt.date(2004, 1, 1), dt.date(2004, 12, 31)],
    ).to_pylist()
    assert in_range == [
        {"study_uid": "1.5.1", "number_of_instances": 3},
        {"study_uid": "1.5.2", "number_of_instances": 2},
    ]
    by_month = views.query(
        filled,
        "SELECT study_month, count(*) AS n FROM instances WHERE study_month >= ? GROUP BY ALL ORDER BY 1",
        ["2004-08"],
    ).to_pylist()
    assert by_month == [{"study_month": "2004-08", "n": 2}, {"study_month": "2005-03", "n": 4}]
    undated = views.query(filled, "SELECT study_uid FROM studies WHERE study_date IS NULL").to_pylist()
    assert undated == [{"study_uid": "1.5.4"}]

    joined = views.query(
        filled,
        "SELECT s.study_uid, count(DISTINCT se.series_uid) AS series, count(i.sop_instance_uid) AS inst "
        "FROM studies s JOIN series se USING (study_uid) JOIN instances i USING (study_uid, series_uid) "
        "GROUP BY ALL ORDER BY 1",
    ).to_pylist()
    assert [(r["series"], r["inst"]) for r in joined] == [(1, 3), (1, 2), (2, 4), (1, 1)]


def test_connection_is_pinned_until_refresh(filled):
    con = views.connect(filled)
    try:
        CatalogStore(filled).commit(make_study("1.5.9", "20040119"))
        assert con.execute("SELECT count(*) FROM studies").fetchone()[0] == 4
        assert views.refresh(con, filled) == 5
        assert con.execute("SELECT count(*) FROM studies").fetchone()[0] == 5
        assert con.execute("SELECT version FROM catalog_snapshot").fetchone()[0] == 5
    finally:
        con.close()


def test_connect_on_an_analyst_database_read_only(filled, tmp_path):
    db = tmp_path / "analyst.duckdb"
    c = duckdb.connect(str(db))
    c.execute("CREATE TABLE cohort AS SELECT '1.5.1' AS study_uid")
    c.close()
    con = views.connect(filled, str(db), read_only=True)
    try:
        n = con.execute("SELECT count(*) FROM instances JOIN cohort USING (study_uid)").fetchone()[0]
        assert n == 3
    finally:
        con.close()
    c = duckdb.connect(str(db), read_only=True)  # nothing was persisted into the analyst's file
    try:
        names = {r[0] for r in c.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert names.isdisjoint({"studies", "series", "instances"})
    finally:
        c.close()


def test_views_database_is_live_across_commits(root, tmp_path):
    db = views.write_views_database(root, tmp_path / "catalog.duckdb")  # before any commit
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM studies").fetchone()[0] == 0
        for t in TABLES:
            assert _columns(con, t) == [*SCHEMAS[t].names, "study_month"]
        store = CatalogStore(root)
        store.commit(make_study("1.6.1", "20040119"))
        assert con.execute("SELECT count(*) FROM instances").fetchone()[0] == 2  # same connection, no refresh
        store.commit(make_study("1.6.1", "20070707", per_series=3))  # moved and changed
        store.commit(make_study("1.6.2", None))
        rows = con.execute(
            "SELECT study_uid, study_month, number_of_instances FROM studies ORDER BY 1"
        ).fetchall()
        assert rows == [("1.6.1", "2007-07", 3), ("1.6.2", None, 2)]
        assert con.execute("SELECT count(*) FROM instances WHERE study_uid = ?", ["1.6.1"]).fetchone()[0] == 3
        assert con.execute("SELECT version FROM catalog_snapshot").fetchone()[0] == store.snapshot_version
        store.vacuum(grace_s=0)
        assert con.execute("SELECT count(*) FROM instances").fetchone()[0] == 5
    finally:
        con.close()
    # a fresh session on the same file, after more commits, sees them too
    CatalogStore(root).delete(["1.6.2"])
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT list(study_uid) FROM studies").fetchone()[0] == ["1.6.1"]
    finally:
        con.close()


def test_views_database_refuses_glob_characters(tmp_path):
    with pytest.raises(ValueError):
        views.write_views_database(tmp_path / "cat[1]", tmp_path / "x.duckdb")


def test_views_database_names_only_paths_inside_the_catalog(filled, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    db = views.write_views_database(filled, tmp_path / "elsewhere" / "catalog.duckdb")
    con = duckdb.connect(str(db), read_only=True)
    try:
        definitions = [r[0] for r in con.execute("SELECT sql FROM duckdb_views() WHERE NOT internal").fetchall()]
    finally:
        con.close()
    literals = [lit for sql in definitions for lit in re.findall(r"'([^']*)'", sql) if "/" in lit]
    assert len(definitions) == 4 and len(literals) == 4
    inside = str(filled.resolve()) + "/"
    assert all(lit.startswith(inside) and ".." not in lit for lit in literals), literals
    assert sorted(lit[len(inside):] for lit in literals) == [
        "_current/manifest.json", "instances/*/*.parquet", "series/*/*.parquet", "studies/*/*.parquet"]


def test_query_reads_the_snapshot_and_refuses_the_rest(filled, tmp_path):
    files = CatalogStore(filled).files("instances")
    before = [Path(f).read_bytes() for f in files]
    with pytest.raises(views.QueryRefused, match="got COPY"):
        views.query(filled, f"COPY (SELECT 1 AS x) TO '{files[0]}' (FORMAT parquet, USE_TMP_FILE false)")
    assert [Path(f).read_bytes() for f in files] == before
    outside = tmp_path / "notes.txt"
    outside.write_text("not catalog")
    with pytest.raises(views.QueryRefused, match="enable_external_access=false"):
        views.query(filled, "SELECT * FROM read_text(?)", [str(outside)])
    with pytest.raises(views.QueryRefused, match="got SELECT, SELECT"):
        views.query(filled, "SELECT 1; SELECT 2")
    with pytest.raises(duckdb.Error):  # not a refusal: an ordinary mistake keeps DuckDB's error
        views.query(filled, "SELECT no_such_column FROM studies")
    blobs = views.query(filled, "SELECT count(*) AS n FROM read_blob(?)", [files[0]]).to_pylist()
    assert blobs == [{"n": 1}]  # the catalog's own files stay readable, by any reader
    assert views.query(filled, "SELECT count(*) AS n FROM instances").to_pylist() == [{"n": 10}]
