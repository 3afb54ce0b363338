"""From a FHIR ImagingStudy to its pixels: with ``serve.public_base_url`` set, the FHIR sync to the real
HAPI server publishes one Endpoint (``dicom-wado-rs``) that every ImagingStudy and series references;
a plain HTTP client follows ImagingStudy → Endpoint.address and retrieves an instance by WADO-RS from
``pacsflow serve`` (its app under uvicorn), byte for byte as the lake holds it."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import httpx
import pytest
from pacsflow.catalog.views import query
from pacsflow.flows.serve import build_app
from pacsflow.tasks.fhir.mapping import ENDPOINT_CONNECTION_SYSTEM
from pacsflow.tasks.fhir.sync import sync_catalog
from pacsflow.tasks.settings import Settings

from tests.dicomweb_lake import WebLake, bearer, build_lake, parse_multipart
from tests.helpers import free_port
from tests.integration.conftest import hapi  # noqa: F401  (session fixture)
from tests.integration.served_app import serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FHIR_JSON = {"Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[WebLake, str]]:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    lake = build_lake(tmp_path_factory.mktemp("endpoint"), studies=2, public_base_url=public)
    with serving(build_app(lake.settings), port):
        yield lake, public


def with_fhir(settings: Settings, base_url: str) -> Settings:
    fhir = settings.fhir.model_copy(update={"base_url": base_url, "pseudonym_system": f"urn:t:{uuid.uuid4().hex}",
                                            "timeout_s": 120, "max_retries": 2, "retry_backoff_s": 0.05})
    return settings.model_copy(update={"fhir": fhir})


def test_a_fhir_client_goes_from_an_imaging_study_to_its_instances(hapi, served):  # noqa: F811
    lake, public = served
    assert lake.settings.fhir.wado_rs_base_url == f"{public}/dicom-web"  # from serve.public_base_url alone
    settings = with_fhir(lake.settings, hapi.base_url)
    studies = query(lake.catalog, "SELECT study_uid FROM studies").to_pylist()
    assert sync_catalog(settings).sent == len(studies) == 2
    assert sync_catalog(settings, force=True).sent == 2  # sent again: still one Endpoint

    fhir = httpx.Client(base_url=hapi.base_url, headers=FHIR_JSON, timeout=60)
    endpoints = fhir.get("Endpoint", params={"identifier": f"urn:ietf:rfc:3986|{public}/dicom-web"}).json()
    assert endpoints["total"] == 1
    [entry] = endpoints["entry"]
    assert entry["resource"]["connectionType"] == {"system": ENDPOINT_CONNECTION_SYSTEM, "code": "dicom-wado-rs"}
    assert entry["resource"]["status"] == "active" and entry["resource"]["meta"]["versionId"] == "1"

    study_uid = studies[0]["study_uid"]
    bundle = fhir.get("ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"}).json()
    [found] = bundle["entry"]
    imaging_study = found["resource"]
    [reference] = imaging_study["endpoint"]
    assert all(se["endpoint"] == [reference] for se in imaging_study["series"])
    endpoint = fhir.get(reference["reference"]).json()
    assert endpoint["id"] == entry["resource"]["id"]
    wado = endpoint["address"]

    series = imaging_study["series"][0]
    instance = series["instance"][0]
    url = f"{wado}/studies/{study_uid}/series/{series['uid']}/instances/{instance['uid']}"
    answer = httpx.get(url, headers={**bearer(lake.token), "Accept": 'multipart/related; type="application/dicom"'})
    assert answer.status_code == 200
    [(_, data)] = parse_multipart(answer.headers["content-type"], answer.content)
    [row] = query(lake.catalog, "SELECT file_sha256 FROM instances WHERE sop_instance_uid = ?",
                  [instance["uid"]]).to_pylist()
    assert hashlib.sha256(data).hexdigest() == row["file_sha256"]


def test_the_study_api_checks_the_live_fhir_server(hapi, tmp_path):  # noqa: F811
    """``/api/studies/{uid}?check=fhir`` reads the study's ImagingStudy from the real server (its id
    and version as HAPI holds them) and reconciles it with the catalog: none before the sync, no
    difference after it, and the server's count once someone changed it there."""
    lake = build_lake(tmp_path, studies=1, seed=uuid.uuid4().int % 10**9)  # UIDs no other test sent
    settings = with_fhir(lake.settings, hapi.base_url)
    [row] = query(lake.catalog, "SELECT study_uid FROM studies").to_pylist()
    study_uid = row["study_uid"]
    fhir = httpx.Client(base_url=hapi.base_url, headers=FHIR_JSON, timeout=60)
    with serving(build_app(settings), free_port()) as base:
        api = httpx.Client(base_url=base, headers=bearer(lake.token), timeout=120)

        def check() -> dict:
            answer = api.get(f"/api/studies/{study_uid}", params={"check": "fhir"})
            assert answer.status_code == 200, answer.text
            return answer.json()["fhir"]

        before = check()
        assert before["check"]["imaging_studies"] == []
        assert [d["field"] for d in before["check"]["differences"]] == ["missing"]

        assert sync_catalog(settings).sent == 1
        after = check()
        assert after["status"] == "synced"
        [held] = fhir.get("ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"}).json()["entry"]
        resource = held["resource"]
        [seen] = after["check"]["imaging_studies"]
        assert (seen["id"], seen["version"]) == (resource["id"], resource["meta"]["versionId"])
        assert seen["number_of_instances"] == resource["numberOfInstances"]
        assert after["check"]["differences"] == []

        count = resource["numberOfInstances"]
        assert fhir.put(f"ImagingStudy/{resource['id']}", json={**resource, "numberOfInstances": count + 5}
                        ).status_code == 200
        drifted = check()["check"]
        assert drifted["imaging_studies"][0]["version"] != resource["meta"]["versionId"]
        assert drifted["differences"] == [{"field": "numberOfInstances", "catalog": count, "server": count + 5,
                                           "text": f"numberOfInstances: catalog {count}, server {count + 5}"}]
