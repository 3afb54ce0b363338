"""The catalog index of ``pacsflow serve``: searches and retrievals scoped to a study read only its
month's partition, and still answer every row, for dated studies and for a study without a date
(the null partition)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import query
from pacsflow.tasks.lake.study import read_rows
from pacsflow.tasks.web.app import create_app
from tests.dicomweb_lake import bearer, build_lake, parse_multipart

DW = "/dicom-web"


def _undated(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    out = {}
    for name, table in tables.items():
        pos = table.schema.get_field_index("study_date")
        fld = table.schema.field(pos)
        out[name] = table.set_column(pos, fld, pa.nulls(table.num_rows, fld.type))
    return out


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    lake = build_lake(root, studies=3, modalities=("CT", "MR"))
    first = sorted(str(p) for p in (root / "rows").iterdir())[:1]
    CatalogStore(lake.catalog).commit(_undated(read_rows(first)))  # the same study again, now without a date
    return lake


@pytest.fixture(scope="module")
def client(lake):
    return TestClient(create_app(lake.settings), headers=bearer(lake.token))


def _studies(lake):
    found = query(lake.catalog, "SELECT study_uid, study_date FROM studies ORDER BY study_uid").to_pylist()
    assert sum(r["study_date"] is None for r in found) == 1 and len(found) == 3
    return [r["study_uid"] for r in found]


def test_every_study_s_series_and_instances_are_found_dated_or_not(client, lake):
    for study in _studies(lake):
        series = query(lake.catalog, "SELECT series_uid FROM series WHERE study_uid = ?", [study]).to_pylist()
        instances = query(lake.catalog, "SELECT sop_instance_uid FROM instances WHERE study_uid = ?",
                          [study]).to_pylist()
        found = client.get(f"{DW}/studies/{study}/series").json()
        assert sorted(a["0020000E"]["Value"][0] for a in found) == sorted(r["series_uid"] for r in series)
        found = client.get(f"{DW}/studies/{study}/instances").json()
        assert sorted(a["00080018"]["Value"][0] for a in found) == sorted(r["sop_instance_uid"] for r in instances)
        meta = client.get(f"{DW}/studies/{study}/metadata").json()
        assert sorted(m["00080018"]["Value"][0] for m in meta) == sorted(r["sop_instance_uid"] for r in instances)


def test_a_series_of_the_undated_study_is_retrieved_byte_for_byte(client, lake):
    [study] = [r["study_uid"] for r in query(lake.catalog, "SELECT study_uid FROM studies WHERE study_date IS NULL")
               .to_pylist()]
    files = query(lake.catalog, "SELECT series_uid, file_path FROM instances WHERE study_uid = ? "
                  "ORDER BY series_uid, instance_number", [study]).to_pylist()
    series = files[0]["series_uid"]
    r = client.get(f"{DW}/studies/{study}/series/{series}")
    assert r.status_code == 200
    parts = parse_multipart(r.headers["content-type"], r.content)
    expected = [Path(f["file_path"].removeprefix("file://")).read_bytes() for f in files if f["series_uid"] == series]
    assert [body for _, body in parts] == expected


def test_an_unknown_study_is_no_match_and_not_found(client):
    unknown = "2.25.1234567890"
    assert client.get(f"{DW}/studies/{unknown}/series").status_code == 204
    assert client.get(f"{DW}/studies/{unknown}/series/2.25.1").status_code == 404
