"""Our HAPI FHIR JPA server (R4, H2), for real: built with Maven, started on a free port.

One server for the module (files under a tmp dir), stopped by the fixture's finalizer. Every
request goes to 127.0.0.1. The first run on a fresh machine also builds the server (Maven
downloads from Maven Central, then a training start), hence the long timeout.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from pacsflow.deployments import fhir_server
from tests.helpers import start_hapi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

FHIR_JSON = "application/fhir+json"
DICOM_UID = "urn:dicom:uid"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fhir_server.FhirServerHandle]:
    if not fhir_server.java_available():
        pytest.skip("Java 17+ is not installed")
    fhir_server.build(quiet=True)
    run_dir = tmp_path_factory.mktemp("fhir-run")
    handle = start_hapi(run_dir, data_dir=run_dir / "data")
    try:
        yield handle
    finally:
        pid = handle.pid
        assert handle.stop() is True
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
        assert not (run_dir / fhir_server.PID_NAME).exists()
        assert not fhir_server.is_ready(handle.base_url, timeout_s=2)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def fhir(server: fhir_server.FhirServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120,
                      headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}) as client:
        yield client


def _uid() -> str:
    """A fresh DICOM UID under the UUID-derived root 2.25."""
    return f"2.25.{uuid.uuid4().int}"


def imaging_study(study_uid: str, patient_ref: str, n_series: int = 1) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "subject": {"reference": patient_ref},
        "numberOfSeries": n_series,
        "series": [
            {"uid": f"{study_uid}.{i + 1}",
             "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}}
            for i in range(n_series)
        ],
    }


def errors(outcome: dict[str, Any]) -> list[str]:
    return [str(i.get("diagnostics")) for i in outcome.get("issue", []) if i.get("severity") in ("error", "fatal")]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


# 127.0.0.1 in /proc/net/tcp, or as the IPv4-mapped ::ffff:127.0.0.1 of Java's dual-stack socket
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def test_listens_on_loopback_only(server: fhir_server.FhirServerHandle) -> None:
    addresses = _listening_addresses(server.port)
    assert addresses and addresses <= LOOPBACK, addresses  # never 0.0.0.0 or ::


def test_metadata_is_an_r4_capability_statement(fhir: httpx.Client) -> None:
    resp = fhir.get("/metadata")
    assert resp.status_code == 200
    cs = resp.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    for kind in ("ImagingStudy", "Patient"):
        assert resources[kind]["conditionalCreate"] is True
        assert resources[kind]["conditionalUpdate"] is True
        interactions = {i["code"] for i in resources[kind]["interaction"]}
        assert {"create", "read", "update", "search-type", "history-instance"} <= interactions
    assert {"transaction", "history-system"} <= {i["code"] for i in cs["rest"][0]["interaction"]}
    assert cs["software"]["version"] == fhir_server.HAPI_FHIR_VERSION
    assert fhir_server.is_ready(str(fhir.base_url).rstrip("/"))


def test_put_with_client_id_creates(fhir: httpx.Client) -> None:
    pid = f"pf-{uuid.uuid4().hex[:12]}"
    resp = fhir.put(f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "active": True})
    assert resp.status_code == 201, resp.text
    assert resp.json()["id"] == pid
    got = fhir.get(f"/Patient/{pid}")
    assert got.status_code == 200
    assert got.json()["meta"]["versionId"] == "1"
    # a purely numeric client id is accepted too (client id strategy ANY)
    num = str(uuid.uuid4().int % 10**12 + 10**12)
    assert fhir.put(f"/Patient/{num}", json={"resourceType": "Patient", "id": num}).status_code == 201


def test_conditional_update_by_identifier_twice_gives_one_resource(fhir: httpx.Client) -> None:
    pid = f"pf-{uuid.uuid4().hex[:12]}"
    assert fhir.put(f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid}).status_code == 201
    study_uid = _uid()
    url = f"/ImagingStudy?identifier={DICOM_UID}|urn:oid:{study_uid}"

    first = fhir.put(url, json=imaging_study(study_uid, f"Patient/{pid}", n_series=1))
    assert first.status_code == 201, first.text
    second = fhir.put(url, json=imaging_study(study_uid, f"Patient/{pid}", n_series=2))
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["meta"]["versionId"] == "2"

    found = fhir.get("/ImagingStudy", params={"identifier": f"{DICOM_UID}|urn:oid:{study_uid}"}).json()
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["numberOfSeries"] == 2

    # conditional create with the same identifier finds it and creates nothing
    again = fhir.post("/ImagingStudy", json=imaging_study(study_uid, f"Patient/{pid}"),
                      headers={"If-None-Exist": f"identifier={DICOM_UID}|urn:oid:{study_uid}"})
    assert again.status_code == 200
    count = fhir.get("/ImagingStudy", params={"identifier": f"{DICOM_UID}|urn:oid:{study_uid}",
                                              "_summary": "count"}).json()
    assert count["total"] == 1


def test_transaction_bundle_with_two_entries(fhir: httpx.Client) -> None:
    mrn = uuid.uuid4().hex[:12]
    study_uid = _uid()
    patient_full_url = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_full_url,
             "resource": {"resourceType": "Patient",
                          "identifier": [{"system": "urn:pacsflow:test:pseudo-id", "value": mrn}]},
             "request": {"method": "PUT", "url": f"Patient?identifier=urn:pacsflow:test:pseudo-id|{mrn}"}},
            {"resource": imaging_study(study_uid, patient_full_url),
             "request": {"method": "PUT", "url": f"ImagingStudy?identifier={DICOM_UID}|urn:oid:{study_uid}"}},
        ],
    }
    resp = fhir.post("", json=bundle)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["type"] == "transaction-response"
    assert [e["response"]["status"] for e in out["entry"]] == ["201 Created", "201 Created"]
    patient_id = out["entry"][0]["response"]["location"].split("/")[1]
    study = fhir.get("/ImagingStudy", params={"identifier": f"{DICOM_UID}|urn:oid:{study_uid}"}).json()
    assert study["total"] == 1
    assert study["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"

    # the same transaction again changes nothing
    again = fhir.post("", json=bundle).json()
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK", "200 OK"]


def test_batch_bundle(fhir: httpx.Client) -> None:
    pid = f"pf-{uuid.uuid4().hex[:12]}"
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": pid}, "request": {"method": "PUT", "url": f"Patient/{pid}"}},
            {"request": {"method": "GET", "url": "Patient/does-not-exist-xyz"}},
        ],
    }
    resp = fhir.post("", json=bundle)
    assert resp.status_code == 200, resp.text
    statuses = [e["response"]["status"] for e in resp.json()["entry"]]
    assert statuses[0] == "201 Created"
    assert statuses[1].startswith("404")  # one failed entry does not fail the batch


def test_history_shows_versions(fhir: httpx.Client) -> None:
    pid = f"pf-{uuid.uuid4().hex[:12]}"
    for gender in ("female", "male", "other"):
        resp = fhir.put(f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": gender})
        assert resp.status_code in (200, 201), resp.text
    history = fhir.get(f"/Patient/{pid}/_history").json()
    assert history["type"] == "history"
    assert history["total"] == 3
    assert sorted(e["resource"]["meta"]["versionId"] for e in history["entry"]) == ["1", "2", "3"]
    v1 = fhir.get(f"/Patient/{pid}/_history/1").json()
    assert v1["gender"] == "female"


def test_validate_minimal_patient_has_no_errors(fhir: httpx.Client) -> None:
    resp = fhir.post("/Patient/$validate", json={"resourceType": "Patient", "active": True,
                                                  "name": [{"family": "Test"}]})
    assert resp.status_code == 200, resp.text
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert errors(outcome) == []


def test_validate_imaging_study(fhir: httpx.Client) -> None:
    pid = f"pf-{uuid.uuid4().hex[:12]}"
    assert fhir.put(f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid}).status_code == 201
    ok = fhir.post("/ImagingStudy/$validate", json=imaging_study(_uid(), f"Patient/{pid}"))
    assert ok.status_code == 200, ok.text
    assert ok.json()["resourceType"] == "OperationOutcome"
    assert errors(ok.json()) == []

    bad = imaging_study(_uid(), f"Patient/{pid}")
    del bad["status"]  # required, 1..1
    resp = fhir.post("/ImagingStudy/$validate", json=bad)
    assert resp.status_code in (200, 412)  # HAPI 8.8 answers 200; the outcome carries the errors
    assert resp.json()["resourceType"] == "OperationOutcome"
    assert any("ImagingStudy.status" in e for e in errors(resp.json()))
