"""Issue 15: ``pacsflow catalog query`` reads the catalog and nothing else.

Each test sends one escape attempt through the real command line (typer's runner on the real app)
against a catalog built by the real pipeline pieces, and checks what is on disk afterwards.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pacsflow.catalog.store import CatalogStore
from pacsflow.flows.cli import app
from tests.helpers import build_catalog

runner = CliRunner()
LEDGER_MARKER = "DOE^JANE-ledger-marker"  # stands for the PHI the state zone holds


@pytest.fixture(scope="module")
def zones(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("escapes")
    build_catalog(root, studies=3, days=10, end_date=dt.date(2026, 11, 27), seed=3, modalities=("CT", "MR"))
    state = root / "state"
    state.mkdir()
    with sqlite3.connect(state / "ledger.sqlite") as db:
        db.execute("CREATE TABLE received (patient_name TEXT)")
        db.execute("INSERT INTO received VALUES (?)", [LEDGER_MARKER])
    return {"root": root, "catalog": root / "catalog", "ledger": state / "ledger.sqlite"}


@pytest.fixture
def cli(zones, monkeypatch):
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(zones["catalog"]))
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(zones["ledger"].parent))

    def run(sql: str, *params: str):
        args = ["catalog", "query", sql]
        for p in params:
            args += ["-p", p]
        return runner.invoke(app, args)

    return run


def _refused(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("query refused: "), result.output
    for text in expected:
        assert text in lines[0], result.output


def _count(cli, table: str) -> int:
    result = cli(f"SELECT count(*) AS n FROM {table}")
    assert result.exit_code == 0, result.output
    return int(re.findall(r"│\s*(\d+)\s*│", result.output)[0])


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("options", ["FORMAT parquet", "FORMAT parquet, USE_TMP_FILE false", "FORMAT csv"])
def test_copy_over_a_live_catalog_file_changes_nothing(cli, zones, options):
    live = CatalogStore(zones["catalog"]).files("studies")
    before = {p: _digest(p) for p in live}
    rows = _count(cli, "studies")
    assert rows == 3
    _refused(cli(f"COPY (SELECT 'x' AS x) TO '{live[0]}' ({options})"), "COPY", "only one SELECT")
    assert {p: _digest(p) for p in live} == before
    assert _count(cli, "studies") == rows


def test_copy_elsewhere_creates_no_file(cli, zones, tmp_path):
    for target in (tmp_path / "out.parquet", tmp_path / "out.csv"):
        _refused(cli(f"COPY (SELECT * FROM studies) TO '{target}'"), "COPY")
        assert not target.exists()
    _refused(cli(f"EXPORT DATABASE '{tmp_path / 'dump'}'"), "EXPORT")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("function", ["read_text", "read_blob", "read_csv"])
def test_reading_the_ledger_is_refused(cli, zones, function):
    result = cli(f"SELECT * FROM {function}('{zones['ledger']}')")
    _refused(result, "enable_external_access=false", "allowed_paths")
    assert LEDGER_MARKER not in result.output


def test_read_csv_of_etc_passwd_is_refused(cli):
    result = cli("SELECT * FROM read_csv('/etc/passwd')")
    _refused(result, "/etc/passwd", "enable_external_access=false")
    assert "root:" not in result.output


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_csv('file:///etc/passwd')",
        "SELECT * FROM read_json('https://example.invalid/x.json')",
    ],
)
def test_file_functions_outside_the_catalog_are_refused(cli, sql):
    _refused(cli(sql), "enable_external_access=false")


def test_files_outside_the_snapshot_are_refused_even_inside_the_catalog_root(cli, zones):
    # read_parquet itself is allowed on the snapshot's files, not on a Parquet file dropped beside them
    stray = zones["catalog"] / "stray.parquet"
    live = CatalogStore(zones["catalog"]).files("series")[0]
    stray.write_bytes(Path(live).read_bytes())
    try:
        assert cli(f"SELECT count(*) AS n FROM read_parquet('{live}')").exit_code == 0
        _refused(cli(f"SELECT * FROM read_parquet('{stray}')"), "allowed_paths")
    finally:
        stray.unlink()


def test_attach_install_load_are_refused(cli, tmp_path):
    db = tmp_path / "other.duckdb"
    _refused(cli(f"ATTACH '{db}' AS other"), "ATTACH")
    assert not db.exists()
    _refused(cli("INSTALL httpfs"), "LOAD")  # DuckDB files INSTALL under LOAD statements
    _refused(cli("LOAD httpfs"), "LOAD")
    _refused(cli(f"SELECT * FROM read_duckdb('{db}')"), "enable_external_access=false")
    assert not db.exists()


@pytest.mark.parametrize(
    "sql",
    [
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "SET lock_configuration = false",
        "SET allowed_directories = ['/']",
        "SET enable_external_access = true; SELECT * FROM read_csv('/etc/passwd')",
    ],
)
def test_settings_cannot_be_loosened(cli, sql):
    result = cli(sql)
    _refused(result, "only one SELECT")
    assert "root:" not in result.output


def test_settings_changing_table_functions_hit_the_lock(cli):
    _refused(cli("SELECT * FROM enable_logging()"), "locked", "lock_configuration=true")


@pytest.mark.parametrize(
    "sql",
    ["CREATE TABLE t AS SELECT * FROM studies", "DELETE FROM studies", "DROP VIEW studies", "CALL checkpoint()"],
)
def test_writes_and_ddl_are_refused(cli, sql):
    _refused(cli(sql), "only one SELECT")
    assert _count(cli, "studies") == 3


def test_analyst_queries_still_work(cli):
    result = cli(
        "SELECT se.modality, count(DISTINCT s.study_uid) AS studies, count(*) AS instances "
        "FROM studies s JOIN series se USING (study_uid) JOIN instances i USING (series_uid) "
        "WHERE se.modality = $1 GROUP BY ALL",
        "CT",
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"│ CT\s*│\s*\d+\s*│\s*\d+\s*│", result.output), result.output
    for sql in ("DESCRIBE studies", "SUMMARIZE series", "SELECT version FROM catalog_snapshot"):
        assert cli(sql).exit_code == 0, sql
    assert _count(cli, "instances") > _count(cli, "series") >= _count(cli, "studies") == 3
