"""STOW-RS end to end: the dicomweb-client library stores instances into ``pacsflow serve`` (its
app under uvicorn on a free port) with a real `prefect server`, the ingest-study deployment and a
process worker; the studies appear in the catalog and through QIDO-RS. Parts of another study,
a read token, no token, an oversized and a malformed body are refused."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.serve import build_app
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.handoff import handoff_root
from pacsflow.tasks.settings import Settings, load_settings
from pacsflow.tasks.web.stow import STOW_GENERATION_BASE
from pacsflow.tasks.web.tokens import Scope, TokenStore
from prefect.blocks.system import Secret
from pydicom import dcmread

from tests.dicomweb_lake import build_lake
from tests.helpers import answer_json, free_port
from tests.integration.prefect_server import (
    ingest_worker,
    prefect_server,  # noqa: F401  (fixture re-export)
    worker_env,
)
from tests.integration.served_app import serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

INGEST_WAIT_S = 120.0


class Site:
    def __init__(self, settings: Settings, url: str, root: Path) -> None:
        self.settings, self.url, self.root = settings, url, root
        tokens = TokenStore(settings.tokens_path)
        self.writer = {"Authorization": f"Bearer {tokens.add('writer', {Scope.WRITE})}"}
        self.reader = {"Authorization": f"Bearer {tokens.add('viewer', {Scope.READ})}"}
        self.deid = Deidentifier.from_settings(settings.resolve_deid_key(), settings.deid)

    def client(self, headers: dict[str, str]) -> DICOMwebClient:
        return DICOMwebClient(f"{self.url}/dicom-web", headers=headers)

    def cataloged(self, lake_study: str, instances: int) -> list[dict]:
        """The study's catalog row once it holds ``instances`` instances (or the last seen)."""
        deadline, found = time.monotonic() + INGEST_WAIT_S, []
        while time.monotonic() < deadline:
            try:
                found = query(self.settings.catalog_root, "SELECT number_of_instances, number_of_series FROM "
                              "studies WHERE study_uid = ?", [lake_study]).to_pylist()
            except Exception:  # noqa: BLE001 - no catalog committed yet
                found = []
            if found and found[0]["number_of_instances"] == instances:
                return found
            time.sleep(0.5)
        log = (self.root / "worker.log").read_text()[-3000:]
        pytest.fail(f"study not cataloged with {instances} instances in time: {found}\n{log}")


@pytest.fixture(scope="module")
def site(tmp_path_factory, prefect_server) -> Iterator[Site]:  # noqa: F811
    root = tmp_path_factory.mktemp("stow")
    env = {"PACSFLOW_STORAGE_ROOT": str(root / "lake" / "dicom"), "PACSFLOW_CATALOG_ROOT": str(root / "lake" / "catalog"),
           "PACSFLOW_STATE_ROOT": str(root / "state"), "PACSFLOW_DEID_KEY": "stow-test-key-0123456789",
           "PACSFLOW_SERVE__MAX_UPLOAD_MB": "1"}
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        settings = load_settings()
        app = build_app(settings)
        with ingest_worker(worker_env(prefect_server, root / "prefect-home", **env), root / "worker.log"), \
                serving(app, port) as url:
            yield Site(settings, url, root)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Path]]:
    made = sampledata.generate(tmp_path_factory.mktemp("originals"), studies=2, series_per_study=(2, 2),
                               instances_per_series=(2, 2), modalities=("MR",), end_date=dt.date.today(), seed=8,
                               rows=16, cols=16)
    return [sorted(s.path.rglob("*.dcm")) for s in made]


def test_dicomweb_client_stores_studies_that_reach_the_catalog(site, studies):
    files = studies[0]
    datasets = [dcmread(f) for f in files]
    answer = site.client(site.writer).store_instances(datasets)
    lake = site.deid.uid
    assert sorted(i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence) == sorted(
        lake(ds.SOPInstanceUID) for ds in datasets)
    assert "FailedSOPSequence" not in answer
    lake_study = lake(datasets[0].StudyInstanceUID)
    assert site.cataloged(lake_study, 4) == [{"number_of_instances": 4, "number_of_series": 2}]
    found = site.client(site.reader).search_for_instances(study_instance_uid=lake_study)
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(lake(ds.SOPInstanceUID) for ds in datasets)
    retrieved = site.client(site.reader).retrieve_instance(lake_study, lake(datasets[0].SeriesInstanceUID),
                                                           lake(datasets[0].SOPInstanceUID))
    assert retrieved.SOPInstanceUID == lake(datasets[0].SOPInstanceUID)
    assert not any(handoff_root(site.settings).iterdir())  # the flow took the hand-off folder


def test_a_part_of_another_study_is_refused_and_the_rest_ingested(site, studies):
    mine, other = dcmread(studies[1][0]), dcmread(studies[0][1])
    answer = site.client(site.writer).store_instances([mine, other], study_instance_uid=mine.StudyInstanceUID)
    [failed] = answer.FailedSOPSequence
    assert failed.FailureReason == 0xA900
    assert failed.ReferencedSOPInstanceUID == site.deid.uid(other.SOPInstanceUID)
    [stored] = answer.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == site.deid.uid(mine.SOPInstanceUID)
    lake_study = site.deid.uid(mine.StudyInstanceUID)
    assert site.cataloged(lake_study, 1)
    # A second request for the study is a later generation: the catalog merges it with the first.
    rest = [dcmread(f) for f in studies[1][1:]]
    site.client(site.writer).store_instances(rest, study_instance_uid=mine.StudyInstanceUID)
    assert site.cataloged(lake_study, 4) == [{"number_of_instances": 4, "number_of_series": 2}]
    with pytest.raises(requests.HTTPError) as refused:
        site.client(site.writer).store_instances([other], study_instance_uid=mine.StudyInstanceUID)
    assert refused.value.response.status_code == 409
    instances = query(site.settings.catalog_root, "SELECT count(*) AS n FROM instances WHERE study_uid = ?",
                      [lake_study]).to_pylist()
    assert instances == [{"n": 4}]


def test_tokens_and_bodies_that_are_refused(site, studies):
    part = studies[0][0].read_bytes()
    ctype = 'multipart/related; type="application/dicom"; boundary=b0'
    good = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b0--\r\n"
    url = f"{site.url}/dicom-web/studies"
    with pytest.raises(requests.HTTPError) as forbidden:
        site.client(site.reader).store_instances([dcmread(studies[0][0])])
    assert forbidden.value.response.status_code == 403
    assert httpx.post(url, content=good, headers={"Content-Type": ctype}).status_code == 401
    post = {"headers": {**site.writer, "Content-Type": ctype}, "timeout": 30}
    assert httpx.post(url, content=good[:-8], **post).status_code == 400
    assert httpx.post(url, content=good, headers={**site.writer, "Content-Type": "application/dicom"}).status_code == 415
    big = b"--b0\r\n\r\n" + b"\0" * (1024 * 1024 + 10) + b"\r\n--b0--\r\n"
    assert httpx.post(url, content=big, **post).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    assert httpx.post(url, content=chunks(), **post).status_code == 413


def test_the_worker_ran_stow_generations(site):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["ingest-study"])))
    assert runs and all(r.parameters["generation"] > STOW_GENERATION_BASE for r in runs)
    assert all(r.state is not None and r.state.is_completed() for r in runs)



@contextmanager
def recording_fhir_server() -> Iterator[tuple[str, list[str]]]:
    """A FHIR base URL whose every search answers with no match, and the Authorization headers it saw:
    HAPI as launched here takes any caller, so it cannot tell whether credentials were sent."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API; searches are POST _search
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization", ""))
            answer_json(self, 200, {"resourceType": "Bundle", "type": "searchset", "total": 0})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/fhir", seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_study_apis_fhir_check_uses_credentials_from_a_secret_block(site, tmp_path):
    """``pacsflow serve`` loads ``fhir.credentials_block`` from the Prefect server (and not the
    de-identification key's block, which serving never needs)."""
    Secret(value="serve-fhir-token-42").save("serve-fhir-creds", overwrite=True)
    lake = build_lake(tmp_path, studies=1)
    [row] = query(lake.catalog, "SELECT study_uid FROM studies").to_pylist()
    with recording_fhir_server() as (fhir_url, seen):
        fhir = lake.settings.fhir.model_copy(update={"base_url": fhir_url, "credentials_block": "serve-fhir-creds"})
        settings = lake.settings.model_copy(update={"fhir": fhir, "deid_key_block": "no-such-block"})
        with serving(build_app(settings), free_port()) as url:
            answer = httpx.get(f"{url}/api/studies/{row['study_uid']}", params={"check": "fhir"},
                               headers={"Authorization": f"Bearer {lake.token}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert [d["field"] for d in answer.json()["fhir"]["check"]["differences"]] == ["missing"]
    assert seen and set(seen) == {"Bearer serve-fhir-token-42"}
