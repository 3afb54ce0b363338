"""WADO-RS over a real lake: instances byte for byte as stored, metadata from the catalog, frames
(uncompressed, JPEG baseline, multi-frame JPEG 2000) with Accept negotiation, and confinement."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.encaps import generate_frames

from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import query
from pacsflow.tasks.web.app import create_app
from tests.dicomweb_lake import bearer, build_lake, parse_multipart

DW = "/dicom-web"
OHIF_FRAMES = ("multipart/related; type=application/octet-stream; transfer-syntax=*, "
               "multipart/related; type=image/jls; q=0.9, multipart/related; type=image/jpeg; q=0.8")
JPEG, J2K = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90"


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    return build_lake(tmp_path_factory.mktemp("wado"), studies=2, modalities=("CT", "MR"),
                      extra=("SC_rgb_jpeg_dcmtk.dcm", "emri_small_jpeg_2k_lossless.dcm"))


@pytest.fixture(scope="module")
def client(lake):
    return TestClient(create_app(lake.settings), headers=bearer(lake.token))


def rows(lake, sql, *params):
    return query(lake.catalog, sql, list(params)).to_pylist()


def instance(lake, syntax="1.2.840.10008.1.2.1"):
    return rows(lake, "SELECT * FROM instances WHERE transfer_syntax_uid = ? ORDER BY sop_instance_uid LIMIT 1",
                syntax)[0]


def url(row):
    return f"{DW}/studies/{row['study_uid']}/series/{row['series_uid']}/instances/{row['sop_instance_uid']}"


def test_a_study_comes_back_as_the_lake_holds_it(client, lake):
    [study] = rows(lake, "SELECT study_uid, number_of_instances FROM studies ORDER BY study_uid LIMIT 1")
    files = rows(lake, "SELECT file_path, file_sha256, transfer_syntax_uid FROM instances WHERE study_uid = ?",
                 study["study_uid"])
    r = client.get(f"{DW}/studies/{study['study_uid']}")
    assert r.status_code == 200 and r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    parts = parse_multipart(r.headers["content-type"], r.content)
    assert len(parts) == study["number_of_instances"]
    assert sorted(hashlib.sha256(body).hexdigest() for _, body in parts) == sorted(f["file_sha256"] for f in files)
    assert {Path(f["file_path"]).read_bytes() for f in files} == {body for _, body in parts}
    for headers, body in parts:
        assert headers["content-length"] == str(len(body))
        syntax = {f["transfer_syntax_uid"] for f in files if Path(f["file_path"]).read_bytes() == body}
        assert headers["content-type"] == f"application/dicom; transfer-syntax={syntax.pop()}"


def test_series_and_instance_retrieval_and_transfer_syntax_negotiation(client, lake):
    row = instance(lake)
    series = client.get(f"{DW}/studies/{row['study_uid']}/series/{row['series_uid']}")
    n = rows(lake, "SELECT number_of_instances AS n FROM series WHERE series_uid = ?", row["series_uid"])[0]["n"]
    assert len(parse_multipart(series.headers["content-type"], series.content)) == n
    stored = Path(row["file_path"]).read_bytes()
    for accept in ('multipart/related; type="application/dicom"; transfer-syntax=*',
                   "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.1", "*/*"):
        r = client.get(url(row), headers={"Accept": accept})
        [(_, body)] = parse_multipart(r.headers["content-type"], r.content)
        assert body == stored, accept
    wrong = client.get(url(row), headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JPEG}'})
    assert wrong.status_code == 406
    assert client.get(url(row), headers={"Accept": "application/pdf"}).status_code == 406


def test_metadata_is_the_catalogs_dicom_json_with_a_bulkdata_uri(client, lake):
    row = instance(lake)
    r = client.get(f"{DW}/studies/{row['study_uid']}/series/{row['series_uid']}/metadata")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    answers = {a["00080018"]["Value"][0]: a for a in r.json()}
    assert len(answers) == rows(lake, "SELECT number_of_instances AS n FROM series WHERE series_uid = ?",
                                row["series_uid"])[0]["n"]
    mine = answers[row["sop_instance_uid"]]
    assert mine["7FE00010"]["BulkDataURI"] == f"http://testserver{url(row)}/frames/1"
    assert mine["00083002"] == {"vr": "UI", "Value": [row["transfer_syntax_uid"]]}
    import json
    stored = json.loads(row["dicom_json"])
    assert {k: v for k, v in mine.items() if k not in ("7FE00010", "00083002")} == stored
    one = client.get(f"{url(row)}/metadata").json()
    assert one == [mine]
    assert len(client.get(f"{DW}/studies/{row['study_uid']}/metadata").json()) >= len(answers)


def test_uncompressed_frames_with_ohifs_accept_header(client, lake):
    row = instance(lake)
    pixels = dcmread(row["file_path"]).PixelData
    r = client.get(f"{url(row)}/frames/1", headers={"Accept": OHIF_FRAMES})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    [(headers, body)] = parse_multipart(r.headers["content-type"], r.content)
    assert body == pixels and headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.1")
    assert client.get(f"{url(row)}/frames/1", headers={"Accept": "multipart/related; type=image/jpeg"}).status_code == 406
    assert client.get(f"{url(row)}/frames/2").status_code == 400
    assert client.get(f"{url(row)}/frames/1,x").status_code == 400


def test_jpeg_frames_as_image_jpeg_or_as_octet_stream_with_their_syntax(client, lake):
    row = instance(lake, JPEG)
    [expected] = list(generate_frames(dcmread(row["file_path"]).PixelData, number_of_frames=1))
    r = client.get(f"{url(row)}/frames/1", headers={"Accept": "multipart/related; type=image/jpeg"})
    [(headers, body)] = parse_multipart(r.headers["content-type"], r.content)
    assert body == expected and body[:2] == b"\xff\xd8" and headers["content-type"] == f"image/jpeg; transfer-syntax={JPEG}"
    ohif = client.get(f"{url(row)}/frames/1", headers={"Accept": OHIF_FRAMES})
    [(headers, body)] = parse_multipart(ohif.headers["content-type"], ohif.content)
    assert body == expected and headers["content-type"] == f"application/octet-stream; transfer-syntax={JPEG}"
    plain = client.get(f"{url(row)}/frames/1", headers={"Accept": "multipart/related; type=application/octet-stream"})
    assert plain.status_code == 406  # uncompressed asked for: nothing is transcoded


def test_multiframe_jpeg2000_frames_are_cut_from_the_file(client, lake):
    row = instance(lake, J2K)
    expected = list(generate_frames(dcmread(row["file_path"]).PixelData, number_of_frames=row["number_of_frames"]))
    r = client.get(f"{url(row)}/frames/2,4,10", headers={"Accept": "multipart/related; type=image/jp2"})
    assert [body for _, body in parse_multipart(r.headers["content-type"], r.content)] == [expected[1], expected[3],
                                                                                          expected[9]]
    assert client.get(f"{url(row)}/frames/11", headers={"Accept": "multipart/related; type=image/jp2"}).status_code == 400


def test_traversal_malformed_uids_and_unknown_resources(client, lake):
    row = instance(lake)
    assert client.get(f"{DW}/studies/..%2F..%2Fetc%2Fpasswd").status_code == 400
    assert client.get(f"{DW}/studies/{row['study_uid']}/series/..%2F..").status_code == 400
    assert client.get(f"{DW}/studies/1.2.3;rm/metadata").status_code == 400
    assert client.get(f"{DW}/studies/1.2.3").status_code == 404
    assert TestClient(create_app(lake.settings)).get(url(row)).status_code == 401


def test_a_tampered_catalog_row_reads_nothing_outside_the_storage_root(tmp_path):
    lake = build_lake(tmp_path, studies=1, modalities=("CT",))
    secret = tmp_path / "outside.dcm"
    secret.write_bytes(b"SECRET-OUTSIDE-THE-LAKE")
    [study] = rows(lake, "SELECT study_uid FROM studies")
    tables = {name: query(lake.catalog, f"SELECT * EXCLUDE (study_month) FROM {name}").to_pylist()
              for name in ("studies", "series", "instances")}
    victim = tables["instances"][0]
    (Path(lake.storage) / "link.dcm").symlink_to(secret)  # a file inside the lake that leads out of it
    (Path(lake.storage) / "linked-folder").symlink_to(tmp_path)  # a folder inside the lake that does
    for path in (str(secret), f"{lake.storage}/../outside.dcm", f"{lake.storage}/{study['study_uid']}/../../outside.dcm",
                 f"{lake.storage}/link.dcm", f"{lake.storage}/linked-folder/outside.dcm"):
        victim["file_path"] = path
        CatalogStore(lake.catalog).commit({n: pa.Table.from_pylist(t) for n, t in tables.items()})
        client = TestClient(create_app(lake.settings), headers=bearer(lake.token))
        for target in (f"{DW}/studies/{study['study_uid']}", f"{url(victim)}", f"{url(victim)}/frames/1"):
            r = client.get(target)
            assert r.status_code == 400 and b"SECRET" not in r.content, (path, target)
