"""STOW-RS in process: the multipart reader over every chunking, the request's checks and answers,
the hand-off folders and generations it makes, and STOW's 503 without a Prefect API. The
announcement is recorded instead of emitted (tests/integration/test_stow.py emits it to a real
Prefect server and waits for the catalog)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydicom import dcmread

from pacsflow.deployments.local import sampledata
from pacsflow.flows.serve import build_app
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.handoff import handoff_dir, handoff_root
from pacsflow.tasks.settings import load_settings
from pacsflow.tasks.web.app import create_app
from pacsflow.tasks.web.multipart_reader import (
    MalformedMultipart,
    MultipartReader,
    PartData,
    PartEnd,
    PartHeaders,
)
from pacsflow.tasks.web.stow import STOW_GENERATION_BASE, StowIngest, enable_stow
from pacsflow.tasks.web.tokens import Scope, TokenStore

KEY = b"stow-unit-key-0123456789"
BOUNDARY = "stow-boundary-1"
CTYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def body(*parts: bytes, media: str = "application/dicom") -> bytes:
    out = b"".join(f"--{BOUNDARY}\r\nContent-Type: {media}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return out + f"--{BOUNDARY}--\r\n".encode()


def read_parts(data: bytes, chunk: int) -> list[tuple[dict[str, str], bytes]]:
    reader, parts, ends = MultipartReader(BOUNDARY), [], 0
    for i in range(0, len(data), chunk):
        for event in reader.feed(data[i:i + chunk]):
            if isinstance(event, PartHeaders):
                parts.append((event.headers, b""))
            elif isinstance(event, PartData):
                parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
            else:
                assert isinstance(event, PartEnd)
                ends += 1
    reader.close()
    assert ends == len(parts)
    return parts


@pytest.mark.parametrize("chunk", [1, 2, 5, 17, 64, 4096])
def test_the_reader_gives_each_part_whole_however_the_body_is_cut(chunk):
    tricky = b"x" * 300 + f"\r\n--{BOUNDARY[:-1]}".encode() + b"\r\n--" + b"y" * 10
    data = b"preamble\r\n" + body(tricky, b"", b"second") + b"epilogue"
    parts = read_parts(data, chunk)
    assert [p for _, p in parts] == [tricky, b"", b"second"]
    assert parts[0][0] == {"content-type": "application/dicom"}


@pytest.mark.parametrize("data", [body(b"abc")[:-10], b"--" + BOUNDARY.encode() + b"junk\r\n\r\nabc",
                                  b"no boundary at all", b"--" + BOUNDARY.encode() + b"\r\nno colon\r\n\r\nx"])
def test_the_reader_refuses_broken_bodies(data):
    with pytest.raises(MalformedMultipart):
        read_parts(data, 7)


class Stow:
    def __init__(self, root: Path, max_upload_mb: int = 2048) -> None:
        self.settings = load_settings(storage_root=str(root / "lake"), catalog_root=root / "catalog",
                                      state_root=root / "state", serve={"max_upload_mb": max_upload_mb})
        self.deid = Deidentifier(KEY)
        self.announced: list[tuple[str, int, int, list[str]]] = []
        app = create_app(self.settings)
        enable_stow(app, StowIngest(self.deid.uid, self.deid.study_ref, lambda *a: self.announced.append(a)))
        tokens = TokenStore(self.settings.tokens_path)
        self.client = TestClient(app)
        self.writer = {"Authorization": f"Bearer {tokens.add('w', {Scope.WRITE})}"}
        self.reader = {"Authorization": f"Bearer {tokens.add('r', {Scope.READ})}"}

    def post(self, data: bytes, path: str = "/dicom-web/studies", ctype: str = CTYPE, **headers: str):
        return self.client.post(path, content=data, headers={**self.writer, "Content-Type": ctype, **headers})


@pytest.fixture
def stow(tmp_path) -> Stow:
    return Stow(tmp_path)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Path]]:
    made = sampledata.generate(tmp_path_factory.mktemp("src"), studies=2, series_per_study=(2, 2),
                               instances_per_series=(2, 2), modalities=("CT",), end_date=dt.date(2026, 1, 5),
                               seed=3, rows=16, cols=16)
    return [sorted(s.path.rglob("*.dcm")) for s in made]


def uid_of(path: Path, keyword: str) -> str:
    return str(dcmread(path, stop_before_pixels=True)[keyword].value)


def test_a_study_is_handed_off_whole_under_a_stow_generation(stow, studies):
    files = studies[0]
    answer = stow.post(body(*(f.read_bytes() for f in files)))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom+json"
    study = uid_of(files[0], "StudyInstanceUID")
    ref = stow.deid.study_ref(study)
    assert stow.announced == [(ref, STOW_GENERATION_BASE + 1, 4, ["CT"])]
    folder = handoff_dir(stow.settings, ref, STOW_GENERATION_BASE + 1)
    assert sorted(p.read_bytes() for p in folder.iterdir()) == sorted(f.read_bytes() for f in files)
    referenced = answer.json()["00081199"]["Value"]
    assert sorted(i["00081155"]["Value"][0] for i in referenced) == sorted(
        stow.deid.uid(uid_of(f, "SOPInstanceUID")) for f in files)
    assert all(i["00081150"]["Value"] == [uid_of(files[0], "SOPClassUID")] for i in referenced)
    assert answer.json()["00081190"]["Value"] == [f"http://testserver/dicom-web/studies/{stow.deid.uid(study)}"]
    assert study not in answer.text  # the answer names the lake's UIDs only

    again = stow.post(body(files[0].read_bytes()), path=f"/dicom-web/studies/{study}")
    assert again.status_code == 200
    assert stow.announced[-1] == (ref, STOW_GENERATION_BASE + 2, 1, ["CT"])  # a new generation per request
    assert not list((stow.settings.listener_dir / "stow" / "spool").iterdir())  # nothing left in the spool


def test_parts_that_cannot_be_stored_are_listed_with_their_reasons(stow, studies):
    mine, other = studies[0][0], studies[1][0]
    study = uid_of(mine, "StudyInstanceUID")
    answer = stow.post(body(mine.read_bytes(), other.read_bytes(), b"not dicom"), path=f"/dicom-web/studies/{study}")
    assert answer.status_code == 202
    failed = answer.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xA900], [0xC000]]
    assert failed[0]["00081155"]["Value"] == [stow.deid.uid(uid_of(other, "SOPInstanceUID"))]
    assert len(answer.json()["00081199"]["Value"]) == 1
    [(ref, _, objects, _)] = stow.announced
    assert ref == stow.deid.study_ref(study) and objects == 1

    none = stow.post(body(other.read_bytes()), path=f"/dicom-web/studies/{study}")
    assert none.status_code == 409 and "00081199" not in none.json()
    assert len(stow.announced) == 1


def test_refusals_before_anything_is_stored(tmp_path, studies):
    stow = Stow(tmp_path, max_upload_mb=1)
    data = body(studies[0][0].read_bytes())
    assert stow.post(data, ctype="application/dicom").status_code == 415
    assert stow.post(data, ctype='multipart/related; type="application/dicom+json"; boundary=x').status_code == 415
    assert stow.post(data, ctype='multipart/related; type="application/dicom"').status_code == 400
    assert stow.post(data, ctype=f'multipart/related; type="application/dicom"; boundary={"b" * 71}').status_code == 400
    assert stow.post(data[:-20]).status_code == 400
    assert stow.post(body()).status_code == 400
    assert stow.post(body(b"\0" * (1024 * 1024 + 1))).status_code == 413
    assert stow.post(data, path="/dicom-web/studies/1.2.x").status_code == 400
    assert stow.client.post("/dicom-web/studies", content=data, headers={"Content-Type": CTYPE}).status_code == 401
    assert stow.client.post("/dicom-web/studies", content=data,
                            headers={**stow.reader, "Content-Type": CTYPE}).status_code == 403
    assert stow.announced == []
    assert not handoff_root(stow.settings).exists() or not list(handoff_root(stow.settings).iterdir())


def test_without_a_prefect_api_stow_answers_503_naming_it(tmp_path, studies):
    settings = load_settings(storage_root=str(tmp_path / "lake"), catalog_root=tmp_path / "catalog",
                             state_root=tmp_path / "state", deid_key=KEY.decode())
    token = TokenStore(settings.tokens_path).add("w", {Scope.WRITE})
    with temporary_settings(updates={PREFECT_API_URL: ""}):
        client = TestClient(build_app(settings))
    answer = client.post("/dicom-web/studies", content=body(studies[0][0].read_bytes()),
                         headers={"Authorization": f"Bearer {token}", "Content-Type": CTYPE})
    assert answer.status_code == 503 and "PREFECT_API_URL" in answer.json()["detail"]
