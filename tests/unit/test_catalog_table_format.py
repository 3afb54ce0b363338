"""The catalog as Delta Lake tables (catalog.backend=delta): the store's surface, read by the DuckDB views."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from pacsflow.catalog import views
from pacsflow.catalog.backends import CatalogBackend, open_store
from pacsflow.catalog.errors import IntegrityError, SchemaMismatch
from pacsflow.catalog.schema import SCHEMAS
from pacsflow.catalog.store import TABLES, CatalogStore
from pacsflow.catalog.table_format import DeltaCatalogStore
from pacsflow.tasks.settings import CatalogBackendName, Settings
from tests.unit.test_catalog_store import make_study


def batch(*studies: dict[str, pa.Table]) -> dict[str, pa.Table]:
    return {t: pa.concat_tables([s[t] for s in studies]) for t in TABLES}


def table_counts(store: CatalogBackend) -> dict[str, int]:
    con = views.connect(store)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        con.close()


@pytest.fixture
def store(tmp_path: Path) -> DeltaCatalogStore:
    made = open_store(tmp_path / "catalog", "delta")
    assert isinstance(made, DeltaCatalogStore)
    return made


def test_default_settings_open_the_snapshot_store(tmp_path):
    settings = Settings(catalog_root=tmp_path)
    assert settings.catalog.backend is CatalogBackendName.SNAPSHOT
    assert type(settings.catalog.open_store(tmp_path)) is CatalogStore
    assert settings.catalog.reader(tmp_path) == tmp_path  # the readers' path as before
    delta = Settings(catalog_root=tmp_path, catalog={"backend": "delta"}).catalog.open_store(tmp_path)
    assert isinstance(delta, DeltaCatalogStore) and delta.root == str(tmp_path / "delta")


def test_empty_catalog_reads_as_typed_empty_tables(store):
    assert store.ensure_initialized() == 0
    assert table_counts(store) == {"studies": 0, "series": 0, "instances": 0}
    described = views.query(store, "DESCRIBE instances")["column_name"].to_pylist()
    assert described == SCHEMAS["instances"].names + ["study_month"]


def test_commit_replace_delete_seen_by_duckdb(store):
    a, b = make_study("1.2.3.1", series=2, per_series=3), make_study("1.2.3.2", date=None)
    store.commit(batch(a, b))
    assert table_counts(store) == {"studies": 2, "series": 3, "instances": 8}
    months = views.query(store, "SELECT study_uid, study_month FROM studies ORDER BY study_uid").to_pylist()
    assert months == [{"study_uid": "1.2.3.1", "study_month": "2004-01"}, {"study_uid": "1.2.3.2", "study_month": None}]

    smaller = make_study("1.2.3.1", date="20050302", series=1, per_series=1, description="CT AGAIN")
    result = store.commit(smaller)
    assert result.studies_replaced == 1
    rows = views.query(store, "SELECT study_uid, study_description, number_of_instances, study_month FROM studies "
                              "ORDER BY study_uid").to_pylist()
    assert rows[0] == {"study_uid": "1.2.3.1", "study_description": "CT AGAIN", "number_of_instances": 1,
                       "study_month": "2005-03"}
    assert table_counts(store) == {"studies": 2, "series": 2, "instances": 3}

    store.commit(smaller)  # a re-commit of the same rows changes nothing
    assert table_counts(store) == {"studies": 2, "series": 2, "instances": 3}
    store.delete(["1.2.3.2"])
    assert table_counts(store) == {"studies": 1, "series": 1, "instances": 1}
    assert store.study_uids() == {"1.2.3.1"}


def test_snapshot_paths_hold_exactly_the_rows(store):
    studies = [make_study(f"1.2.4.{i}", date=f"2004{1 + i % 3:02d}10") for i in range(6)]
    for i in range(0, 6, 2):
        store.commit(batch(studies[i], studies[i + 1]))
    store.commit(batch(studies[0], studies[3]))
    snap = store.snapshot()
    con = duckdb.connect()
    for t in TABLES:
        direct = con.execute("SELECT count(*) FROM read_parquet(?)", [snap.paths(t)]).fetchone()[0]
        assert direct == table_counts(store)[t]
    assert con.execute("SELECT count(*) - count(DISTINCT sop_instance_uid) FROM read_parquet(?)",
                       [snap.paths("instances")]).fetchone()[0] == 0
    con.close()
    assert table_counts(store) == {"studies": 6, "series": 6, "instances": 12}


def test_compact_and_vacuum_keep_the_rows(store):
    for i in range(4):
        store.commit(make_study(f"1.2.5.{i}"))
    before = store.stats()["tables"]["instances"]
    assert before["max_files_per_partition"] == 4
    store.compact()
    removed = store.vacuum(grace_s=0)
    after = store.stats()["tables"]["instances"]
    assert after["max_files_per_partition"] == 1 and after["rows"] == before["rows"] == 8
    assert removed.files_removed >= 4
    assert all(Path(p).exists() for t in TABLES for p in store.snapshot().paths(t))
    assert table_counts(store)["instances"] == 8


def test_invalid_batches_are_refused_and_leave_the_tables(store):
    store.commit(make_study("1.2.6.1"))
    orphan = make_study("1.2.6.2")
    with pytest.raises(IntegrityError):
        store.commit({"studies": make_study("1.2.6.3")["studies"], "instances": orphan["instances"]})
    with pytest.raises(SchemaMismatch):
        store.commit({"series": orphan["series"]})
    assert table_counts(store) == {"studies": 1, "series": 1, "instances": 2}


def test_views_database_is_pinned_to_the_listed_files(store, tmp_path):
    store.commit(make_study("1.2.7.1", series=2))
    db = views.write_views_database(store, tmp_path / "views.duckdb")
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM instances").fetchone()[0] == 4
        assert con.execute("SELECT version FROM catalog_snapshot").fetchone()[0] == store.snapshot().version
    finally:
        con.close()


def test_pacsflow_catalog_commands_read_the_delta_backend(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pacsflow.flows.cli import app

    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(tmp_path / "catalog"))
    monkeypatch.setenv("PACSFLOW_CATALOG__BACKEND", "delta")
    open_store(tmp_path / "catalog", "delta").commit(make_study("1.2.8.1", series=2))
    runner = CliRunner()
    result = runner.invoke(app, ["catalog", "query", "SELECT count(*) AS n FROM instances", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"n": 4}]
    db = tmp_path / "views.duckdb"
    assert runner.invoke(app, ["catalog", "views", str(db)]).exit_code == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM series").fetchone()[0] == 2
    finally:
        con.close()
    stats = runner.invoke(app, ["catalog", "stats"])
    assert stats.exit_code == 0 and "backend: delta" in stats.stdout
