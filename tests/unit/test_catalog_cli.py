"""``pacsflow catalog query --format table|csv|json`` on a real catalog, called as a user would."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from pacsflow.catalog.store import CatalogStore
from pacsflow.flows.cli import app
from tests.unit.test_catalog_views import make_study

runner = CliRunner()
SQL = ("SELECT i.sop_instance_uid, i.file_path, s.study_date, s.study_month, s.modalities, "
       "i.pixel_spacing, NULL AS nothing FROM instances i JOIN studies s USING (study_uid) "
       "ORDER BY i.sop_instance_uid")
# long enough that any terminal-width table would have to cut them
UID = "2.25." + "1234567890" * 3 + "123456789"


@pytest.fixture
def catalog(tmp_path, monkeypatch):
    root = tmp_path / "catalog"
    CatalogStore(root).commit(make_study(UID, "20040119", ("CT",), 2))
    CatalogStore(root).commit(make_study("1.9.2", None, ("MR",), 1))
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(root))
    monkeypatch.setenv("COLUMNS", "60")
    return root


def _query(*args: str):
    result = runner.invoke(app, ["catalog", "query", SQL, *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_json_has_every_value_whole(catalog):
    rows = json.loads(_query("--format", "json"))
    assert [r["sop_instance_uid"] for r in rows] == ["1.9.2.1.1", f"{UID}.1.1", f"{UID}.1.2"]
    assert rows[1]["file_path"] == f"lake/{UID}/1/1.dcm"
    assert rows[1]["study_date"] == "2004-01-19" and rows[1]["study_month"] == "2004-01"
    assert rows[1]["modalities"] == ["CT"] and len(rows[1]["pixel_spacing"]) == 2
    assert rows[0]["study_date"] is None and rows[0]["study_month"] is None and rows[0]["nothing"] is None
    assert "…" not in _query("-f", "json")


def test_csv_has_a_header_and_every_value_whole(catalog):
    text = _query("--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["sop_instance_uid", "file_path", "study_date", "study_month", "modalities",
                             "pixel_spacing", "nothing"]
    assert [r["sop_instance_uid"] for r in rows] == ["1.9.2.1.1", f"{UID}.1.1", f"{UID}.1.2"]
    assert rows[2]["file_path"] == f"lake/{UID}/1/2.dcm"
    assert rows[1]["study_date"] == "2004-01-19" and json.loads(rows[1]["modalities"]) == ["CT"]
    assert rows[0]["study_date"] == "" and rows[0]["nothing"] == ""
    assert "…" not in text


def test_table_is_the_default_and_wraps_long_values_instead_of_cutting_them(catalog):
    result = runner.invoke(app, ["catalog", "query", "SELECT sop_instance_uid, file_path FROM instances "
                                 "WHERE study_uid = $1 ORDER BY 1 LIMIT 1", "-p", UID])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "┃ sop_instance_uid" in text and "…" not in text
    # the table is narrower than the values: each cell wraps over several lines, every character kept
    body = [line.split("│")[1:3] for line in text.splitlines() if line.startswith("│")]
    assert len(body) > 1
    assert "".join(cell.strip() for cell, _ in body) == f"{UID}.1.1"
    assert "".join(cell.strip() for _, cell in body) == f"lake/{UID}/1/1.dcm"
    bad = runner.invoke(app, ["catalog", "query", "SELECT 1", "--format", "xml"])
    assert bad.exit_code == 2
