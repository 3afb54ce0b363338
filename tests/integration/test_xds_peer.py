"""The IPF XDS.b peer (deployments/xds-peer), for real and without pacsflow's code.

One peer for the module, started by ``start.sh`` on a free port and stopped by its PID file.
Its own IPF producers play Document Source (``submit``: ITI-41 with MTOM) and Imaging Document
Consumer (``consume``: ITI-18, ITI-43, RAD-69); the registry's answers are read from the summary
they write. The first run on a fresh machine builds the jar (Maven), hence the long timeout.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.xds_peer import XdsPeer, start_peer, unavailable_reason

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
FORMAT_SCHEME = "1.2.840.10008.2.6.1"
MODALITY_SCHEME = "1.2.840.10008.2.16.4"
STUDY_UID_TYPE = "urn:ihe:iti:xds:2016:studyInstanceUID"
ACCESSION_TYPE = "urn:ihe:iti:xds:2013:accession"
OTHER_AUTHORITY = "2.25.77777777777777777777777777777777"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsPeer]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    handle = start_peer(tmp_path_factory.mktemp("xds-peer-run"))
    try:
        yield handle
    finally:
        handle.stop()
        assert not _running(handle.pid)
        assert not (handle.run_dir / "xds-peer.pid").exists()


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kos(path: Path, study_uid: str, pseudonym: str) -> bytes:
    """A tiny Key Object Selection file: the peer stores bytes, so a header is enough."""
    ds = Dataset()
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.PatientID = pseudonym
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KOS_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _submit(peer: XdsPeer, tmp: Path, name: str, patient: str, *extra: str) -> tuple[int, dict[str, Any], bytes]:
    study_uid = generate_uid()
    kos = tmp / f"{name}.dcm"
    data = _kos(kos, study_uid, patient.split("^")[0])
    status, summary = peer.client(
        "submit", tmp / f"{name}-out", "--url", peer.url("xds-iti41"), "--patient-id", patient,
        "--file", str(kos), "--unique-id", generate_uid(), "--event-code", f"CT^{MODALITY_SCHEME}",
        "--event-code", f"SR^{MODALITY_SCHEME}", "--reference-id", f"{study_uid}^^^^{STUDY_UID_TYPE}",
        "--reference-id", f"ACC-{name}^^^&2.25.42&ISO^{ACCESSION_TYPE}", "--service-start-time", "20240102",
        *extra)
    return status, summary, data


def _consume(peer: XdsPeer, out: Path, patient: str, *extra: str) -> dict[str, Any]:
    status, summary = peer.client("consume", out, "--registry-url", peer.url("xds-iti18"),
                                  "--repository-url", peer.url("xds-iti43"), "--patient-id", patient, *extra)
    assert status == 0, summary
    return summary


def test_listens_on_loopback_only(peer: XdsPeer) -> None:
    # /proc/net/tcp{,6}: local address in hex, state 0A = LISTEN; Java's dual-stack socket shows
    # 127.0.0.1 as ::ffff:127.0.0.1
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port, 16) == peer.port:
                listening.add(address)
    assert listening and listening <= loopback, listening


def test_every_wsdl_answers(peer: XdsPeer) -> None:
    for service in ("xds-iti41", "xds-iti18", "xds-iti43", "xdsi-rad69"):
        resp = httpx.get(f"{peer.url(service)}?wsdl", timeout=30)
        assert resp.status_code == 200, service
        assert b"definitions" in resp.content[:2000], service
    assert (peer.run_dir / "xds-peer.url").read_text().strip() == peer.base_url


def test_submit_find_retrieve_round_trip(peer: XdsPeer, tmp_path: Path) -> None:
    patient = peer.patient("PSEUDO-RT")
    status, submitted, data = _submit(peer, tmp_path, "rt", patient)
    assert status == 0 and submitted["status"] == "Success", submitted

    found = _consume(peer, tmp_path / "consumed", patient)
    assert found["query"]["status"] == "Success"
    [entry] = found["documentEntries"]
    assert entry["uniqueId"] == submitted["uniqueId"]
    assert entry["entryUuid"] == submitted["entryUuid"]
    assert entry["availabilityStatus"] == "Approved"
    assert entry["patientId"] == patient
    assert entry["mimeType"] == "application/dicom"
    assert (entry["formatCode"]["code"], entry["formatCode"]["scheme"]) == (KOS_SOP_CLASS, FORMAT_SCHEME)
    assert {(c["code"], c["scheme"]) for c in entry["eventCodeList"]} == {("CT", MODALITY_SCHEME), ("SR", MODALITY_SCHEME)}
    assert {r["idType"] for r in entry["referenceIdList"]} == {STUDY_UID_TYPE, ACCESSION_TYPE}
    # the registry computed size, hash and repository itself
    assert entry["size"] == len(data)
    assert entry["hash"] == hashlib.sha1(data).hexdigest()
    assert entry["repositoryUniqueId"] == peer.repository_id
    assert entry["serviceStartTime"] == "20240102"

    [retrieved] = found["retrieve"]["documents"]
    assert found["retrieve"]["status"] == "Success"
    assert Path(retrieved["file"]).read_bytes() == data


def test_patient_of_another_authority_is_rejected(peer: XdsPeer, tmp_path: Path) -> None:
    patient = peer.patient("PSEUDO-X", authority=OTHER_AUTHORITY)
    status, summary, _data = _submit(peer, tmp_path, "other", patient)
    assert status == 2
    assert summary["status"] == "Failure"
    assert [e["errorCode"] for e in summary["errors"]] == ["XDSUnknownPatientId"]
    assert _consume(peer, tmp_path / "consumed", patient, "--status", "Approved")["documentEntries"] == []


def test_replacement_deprecates_the_old_entry(peer: XdsPeer, tmp_path: Path) -> None:
    patient = peer.patient("PSEUDO-RPLC")
    _s, first, _d = _submit(peer, tmp_path, "v1", patient)
    status, second, _d = _submit(peer, tmp_path, "v2", patient, "--replaces", first["entryUuid"])
    assert status == 0, second
    entries = {e["uniqueId"]: e["availabilityStatus"] for e in _consume(peer, tmp_path / "all", patient)["documentEntries"]}
    assert entries == {first["uniqueId"]: "Deprecated", second["uniqueId"]: "Approved"}
    # a deprecated entry cannot be replaced again
    status, third, _d = _submit(peer, tmp_path, "v3", patient, "--replaces", first["entryUuid"])
    assert status == 2 and [e["errorCode"] for e in third["errors"]] == ["XDSRegistryDeprecatedDocumentError"]


def test_rad69_consumer_gets_the_source_bytes(peer: XdsPeer, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    instances = {generate_uid(): _kos(tmp_path / f"i{i}.dcm", study, "PSEUDO-R") for i in range(2)}
    for uid, data in instances.items():
        (peer.rad69_dir / f"{uid}.dcm").write_bytes(data)
    missing = generate_uid()
    images = [arg for uid in [*instances, missing] for arg in ("--image", f"{study}/{series}/{uid}")]
    started = time.monotonic()
    status, summary = peer.client("consume", tmp_path / "rad69", "--rad69-url", peer.url("xdsi-rad69"),
                                  "--rad69-repository-id", peer.repository_id, *images)
    assert time.monotonic() - started < 300
    assert status == 2  # one instance is unknown: PartialSuccess
    assert summary["rad69"]["status"] == "PartialSuccess"
    assert [e["errorCode"] for e in summary["rad69"]["errors"]] == ["XDSMissingDocument"]
    got = {d["uniqueId"]: Path(d["file"]).read_bytes() for d in summary["rad69"]["documents"]}
    assert got == instances
