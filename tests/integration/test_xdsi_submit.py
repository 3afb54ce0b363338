"""RAD-68 from pacsflow's own code (ebxml + client) into the real IPF XDS.b peer, read back by the
peer's independent IPF consumer (ITI-18 FindDocuments, ITI-43).

One peer for the module. Each test sends a KOS made by pacsflow's manifest builder; what the registry
kept is read from the consumer's summary, never from our code.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pacsflow.tasks.core.errors import XdsRegistryError
from pacsflow.tasks.settings import XdsiSettings
from pacsflow.tasks.xdsi import ebxml
from pacsflow.tasks.xdsi.client import SubmissionResult, XdsRepositoryClient
from pacsflow.tasks.xdsi.ebxml import ManifestLike
from tests.integration.test_xds_peer import peer  # noqa: F401  (fixture re-export: one peer for this module)
from tests.xds_peer import XdsPeer
from tests.xdsi_samples import SOURCE_OID, kos_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

ACCESSION_OID = "2.25.42"
ACCESSION = "ACC-1"
RETRIEVE_URL = "http://127.0.0.1:9/dicom-web"
OTHER_AUTHORITY = "2.25.77777777777777777777777777777777"
SUBMITTED = datetime(2026, 12, 1, 15, 30, tzinfo=timezone.utc)


def _settings(peer: XdsPeer, pseudonym_oid: str | None = None) -> XdsiSettings:
    return XdsiSettings(repository_url=peer.url("xds-iti41"), source_oid=SOURCE_OID,
                        pseudonym_oid=pseudonym_oid or peer.authority, retrieve_url=RETRIEVE_URL, max_retries=1,
                        retry_backoff_s=0.1)


def _publish(peer: XdsPeer, manifest: ManifestLike, *, pseudonym_oid: str | None = None,
             **options: Any) -> tuple[ebxml.Submission, SubmissionResult | XdsRegistryError, int]:
    """Builds and sends; returns the submission, the result or the registry's refusal, and the
    number of requests the client made."""
    xdsi = _settings(peer, pseudonym_oid)
    submission = ebxml.build_request(manifest, xdsi, submitted=SUBMITTED, **options)
    with XdsRepositoryClient.from_settings(xdsi) as client:
        try:
            outcome: SubmissionResult | XdsRegistryError = client.provide_and_register(submission.request,
                                                                                        manifest.part10)
        except XdsRegistryError as exc:
            outcome = exc
        return submission, outcome, client.requests


def _consume(peer: XdsPeer, out: Path, patient: str, *extra: str) -> dict[str, Any]:
    status, summary = peer.client("consume", out, "--registry-url", peer.url("xds-iti18"),
                                  "--repository-url", peer.url("xds-iti43"), "--patient-id", patient, *extra)
    assert status == 0, summary
    return summary


def test_a_published_manifest_is_found_and_retrieved_unchanged(peer: XdsPeer, tmp_path: Path) -> None:
    pseudonym = "PSEUDO&SEND-1"  # an & inside the ID: escaped as \T\ in the CX we send
    manifest = kos_manifest(_settings(peer), pseudonym, accession=ACCESSION)
    submission, result, _requests = _publish(peer, manifest, accession_authority=ACCESSION_OID,
                                             author_institution="pacsflow research")
    assert isinstance(result, SubmissionResult), result
    assert (result.status, result.attempts, result.warnings) == ("Success", 1, ())

    patient = ebxml.cx_patient_id(pseudonym, peer.authority)
    found = _consume(peer, tmp_path / "consumed", patient)
    [entry] = found["documentEntries"]
    assert entry["uniqueId"] == manifest.sop_instance_uid
    assert entry["entryUuid"] == submission.entry_uuid  # the registry kept our deterministic UUID
    assert entry["availabilityStatus"] == "Approved"
    assert entry["patientId"] == entry["sourcePatientId"] == patient
    assert entry["mimeType"] == "application/dicom"
    assert (entry["formatCode"]["code"], entry["formatCode"]["scheme"]) == (
        "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1")
    assert [(c["code"], c["scheme"]) for c in entry["eventCodeList"]] == [("CT", "1.2.840.10008.2.16.4")]  # not SR
    assert {(r["id"], r["idType"], r["assigningAuthority"]) for r in entry["referenceIdList"]} == {
        (manifest.study_uid, ebxml.STUDY_UID_ID_TYPE, None), (ACCESSION, ebxml.ACCESSION_ID_TYPE, ACCESSION_OID)}
    assert (entry["classCode"]["code"], entry["typeCode"]["code"]) == ("IMAGES", "18748-4")
    assert entry["serviceStartTime"] == "20240102093015"
    assert entry["repositoryUniqueId"] == peer.repository_id
    assert (entry["size"], entry["hash"]) == (len(manifest.part10), hashlib.sha1(manifest.part10).hexdigest())

    [retrieved] = found["retrieve"]["documents"]
    assert found["retrieve"]["status"] == "Success"
    assert Path(retrieved["file"]).read_bytes() == manifest.part10


def test_a_patient_of_another_authority_is_refused_once(peer: XdsPeer) -> None:
    manifest = kos_manifest(_settings(peer, OTHER_AUTHORITY), "PSEUDO-SEND-X")
    _submission, error, requests = _publish(peer, manifest, pseudonym_oid=OTHER_AUTHORITY)
    assert isinstance(error, XdsRegistryError), error
    assert error.code == "XDSUnknownPatientId"
    assert requests == 1  # a registry error is not retried
    assert "PSEUDO-SEND-X" not in str(error) and OTHER_AUTHORITY not in str(error)
    assert "xdsi.pseudonym_oid" in str(error)


def test_a_manifest_without_format_code_is_rejected_by_the_validator(peer: XdsPeer) -> None:
    manifest = kos_manifest(_settings(peer), "PSEUDO-SEND-F")
    _submission, error, _requests = _publish(peer, manifest, with_format_code=False)
    assert isinstance(error, XdsRegistryError), error
    assert error.code == "XDSRepositoryMetadataError", error  # the repository validates before it registers
    assert ebxml._DE["formatCode"].removeprefix("urn:uuid:") in error.context, error.context


def test_a_replacement_deprecates_the_first_entry(peer: XdsPeer, tmp_path: Path) -> None:
    pseudonym = "PSEUDO-SEND-R"
    first = kos_manifest(_settings(peer), pseudonym)
    first_submission, first_result, _requests = _publish(peer, first)
    # a series added to the study: a new manifest, sent as the replacement of the first
    second = kos_manifest(_settings(peer), pseudonym, study_uid=first.study_uid, series=("CT", "SR", "MR"))
    assert second.sop_instance_uid != first.sop_instance_uid
    second_submission, result, _requests = _publish(peer, second, replaces=first_submission.entry_uuid)
    assert isinstance(first_result, SubmissionResult) and isinstance(result, SubmissionResult), result

    # the same manifest again: refused as a duplicate, not registered twice
    _submission, error, requests = _publish(peer, second, replaces=first_submission.entry_uuid)
    assert isinstance(error, XdsRegistryError), error
    assert (requests, error.code) == (1, "XDSRegistryDuplicateUniqueIdInMessage"), error

    found = _consume(peer, tmp_path / "consumed", ebxml.cx_patient_id(pseudonym, peer.authority))
    statuses = {e["entryUuid"]: (e["uniqueId"], e["availabilityStatus"]) for e in found["documentEntries"]}
    assert statuses == {first_submission.entry_uuid: (first.sop_instance_uid, "Deprecated"),
                        second_submission.entry_uuid: (second.sop_instance_uid, "Approved")}
