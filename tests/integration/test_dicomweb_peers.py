"""DICOMweb against real peers: ``pacsflow serve``'s app under uvicorn on a free port, over a lake
built by the ingest functions. The dicomweb-client library searches and retrieves; Orthanc's
DICOMweb plugin queries our server and retrieves a study into itself; OHIF's request pattern
(study list, series metadata, frames with its combined Accept header, CORS preflight)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from pacsflow.catalog.views import query
from pacsflow.deployments.local.orthanc import DICOMWEB_PLUGIN
from pacsflow.flows.serve import build_app
from tests.dicomweb_lake import WebLake, bearer, build_lake, parse_multipart
from tests.helpers import free_port
from tests.integration.conftest import orthanc_factory  # noqa: F401  (fixture re-export)

VIEWER = "http://viewer.example.org"
OHIF_FRAMES = ("multipart/related; type=application/octet-stream; transfer-syntax=*, "
               "multipart/related; type=image/jpeg; q=0.9, multipart/related; type=image/jls; q=0.8")


class Served:
    def __init__(self, lake: WebLake, url: str) -> None:
        self.lake, self.url = lake, url


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    port = free_port()
    lake = build_lake(tmp_path_factory.mktemp("peers"), studies=3, extra=("SC_rgb_jpeg_dcmtk.dcm",),
                      host="127.0.0.1", port=port, cors_origins=[VIEWER])
    server = uvicorn.Server(uvicorn.Config(build_app(lake.settings), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield Served(lake, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(10)


def rows(lake: WebLake, sql: str, *params: object) -> list[dict]:
    return query(lake.catalog, sql, list(params)).to_pylist()


def test_dicomweb_client_searches_and_retrieves_what_the_catalog_and_lake_hold(served):
    client = DICOMwebClient(f"{served.url}/dicom-web", headers=bearer(served.lake.token))
    studies = client.search_for_studies()
    catalog = rows(served.lake, "SELECT study_uid, number_of_instances FROM studies")
    assert sorted(s["0020000D"]["Value"][0] for s in studies) == sorted(r["study_uid"] for r in catalog)
    study = catalog[0]["study_uid"]
    series = client.search_for_series(study_instance_uid=study)
    assert sorted(s["0020000E"]["Value"][0] for s in series) == sorted(
        r["series_uid"] for r in rows(served.lake, "SELECT series_uid FROM series WHERE study_uid = ?", study))
    files = rows(served.lake, "SELECT sop_instance_uid, file_path, file_sha256 FROM instances WHERE study_uid = ?", study)
    retrieved = client.retrieve_study(study)
    assert len(retrieved) == len(files)
    on_disk = {f["sop_instance_uid"]: Path(f["file_path"]).read_bytes() for f in files}
    for ds in retrieved:  # the library parsed each part; the raw body below is compared byte for byte
        assert ds.SOPInstanceUID in on_disk
    raw = httpx.get(f"{served.url}/dicom-web/studies/{study}", headers=bearer(served.lake.token))
    parts = parse_multipart(raw.headers["content-type"], raw.content)
    assert sorted(hashlib.sha256(b).hexdigest() for _, b in parts) == sorted(f["file_sha256"] for f in files)
    for uid, data in on_disk.items():
        assert dcmread(DicomBytesIO(data)).SOPInstanceUID == uid
    metadata = client.retrieve_study_metadata(study)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(on_disk)
    instances = client.search_for_instances(study_instance_uid=study)
    assert len(instances) == len(files)


def test_orthanc_queries_our_server_and_retrieves_a_study_into_itself(served, orthanc_factory):  # noqa: F811
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed")
    orthanc = orthanc_factory(extra={"DicomWeb": {
        "Enable": True, "Root": "/dicom-web/",
        "Servers": {"pacsflow": {"Url": f"{served.url}/dicom-web/",
                                 "HttpHeaders": {"Authorization": f"Bearer {served.lake.token}"}}},
    }})
    rest = orthanc.rest_url
    found = httpx.post(f"{rest}/dicom-web/servers/pacsflow/get", json={"Uri": "/studies"}, timeout=60)
    assert found.status_code == 200, found.text
    catalog = rows(served.lake, "SELECT study_uid, number_of_instances FROM studies ORDER BY study_uid")
    assert sorted(s["0020000D"]["Value"][0] for s in found.json()) == [r["study_uid"] for r in catalog]
    study = catalog[0]
    job = httpx.post(f"{rest}/dicom-web/servers/pacsflow/retrieve",
                     json={"Resources": [{"Study": study["study_uid"]}], "Synchronous": True}, timeout=120)
    assert job.status_code == 200, job.text
    files = rows(served.lake, "SELECT sop_instance_uid, file_sha256 FROM instances WHERE study_uid = ?",
                 study["study_uid"])
    ids = httpx.get(f"{rest}/instances", timeout=30).json()
    assert len(ids) == study["number_of_instances"] == len(files)
    stored = {hashlib.sha256(httpx.get(f"{rest}/instances/{i}/file", timeout=30).content).hexdigest() for i in ids}
    assert stored == {f["file_sha256"] for f in files}  # Orthanc keeps the bytes it was sent


def test_ohifs_request_pattern_with_cors(served):
    headers = {**bearer(served.lake.token), "Origin": VIEWER}
    with httpx.Client(base_url=f"{served.url}/dicom-web", headers=headers, timeout=30) as http:
        preflight = http.options("/studies", headers={"Access-Control-Request-Method": "GET",
                                                      "Access-Control-Request-Headers": "authorization,accept"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == VIEWER
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        listing = http.get("/studies", params={"limit": 101, "offset": 0, "fuzzymatching": "false",
                                               "includefield": "00081030,00080060"})
        assert listing.status_code == 200 and listing.headers["access-control-allow-origin"] == VIEWER
        assert len(listing.json()) == len(rows(served.lake, "SELECT study_uid FROM studies"))
        jpeg = rows(served.lake, "SELECT * FROM instances WHERE transfer_syntax_uid = '1.2.840.10008.1.2.4.50'")[0]
        base = f"/studies/{jpeg['study_uid']}/series/{jpeg['series_uid']}"
        series = http.get(f"{base}/metadata")
        [meta] = series.json()
        frame_url = meta["7FE00010"]["BulkDataURI"]
        assert frame_url == f"{served.url}/dicom-web{base}/instances/{jpeg['sop_instance_uid']}/frames/1"
        frames = http.get(frame_url, headers={"Accept": OHIF_FRAMES})
        assert frames.status_code == 200
        [(part, body)] = parse_multipart(frames.headers["content-type"], frames.content)
        assert part["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50"
        assert body[:2] == b"\xff\xd8"
    assert httpx.get(f"{served.url}/dicom-web/studies").status_code == 401
    assert httpx.get(f"{served.url}/health").status_code == 200


def _sendfile_calls(monkeypatch) -> list[int]:
    """Bytes asked of each ``os.sendfile`` the server (a thread of this process) makes."""
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    return calls


def _http10_get(url: str, path: str, token: str) -> tuple[dict[str, str], bytes]:
    """One HTTP/1.0 request on a raw socket: the answer's headers and its body, read to the close."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        data = b"".join(iter(lambda: sock.recv(1 << 16), b""))
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    return {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}, body


def test_wado_rs_sends_the_lakes_files_with_sendfile_over_plain_http11_and_reads_them_otherwise(served, monkeypatch):
    study = rows(served.lake, "SELECT study_uid FROM studies ORDER BY study_uid")[0]["study_uid"]
    files = rows(served.lake, "SELECT file_path, file_sha256 FROM instances WHERE study_uid = ?", study)
    calls = _sendfile_calls(monkeypatch)
    answer = httpx.get(f"{served.url}/dicom-web/studies/{study}", headers=bearer(served.lake.token), timeout=60)
    assert answer.status_code == 200 and answer.headers["transfer-encoding"] == "chunked"
    parts = parse_multipart(answer.headers["content-type"], answer.content)
    assert sorted(hashlib.sha256(b).hexdigest() for _, b in parts) == sorted(f["file_sha256"] for f in files)
    assert all(int(h["content-length"]) == len(b) for h, b in parts)
    # Every file went out of the page cache by sendfile(2), none through Python.
    assert len(calls) >= len(files) and sum(calls) >= sum(Path(f["file_path"]).stat().st_size for f in files)

    calls.clear()  # an HTTP/1.0 client cannot take chunks: the same bytes, read and sent as before
    headers, body = _http10_get(served.url, f"/dicom-web/studies/{study}", served.lake.token)
    parts = parse_multipart(headers["content-type"], body)
    assert sorted(hashlib.sha256(b).hexdigest() for _, b in parts) == sorted(f["file_sha256"] for f in files)
    assert calls == []
