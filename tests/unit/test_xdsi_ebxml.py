"""The RAD-68 submission metadata (pacsflow.tasks.xdsi.ebxml): CX escaping, ids derived from the KOS
UID, and one ProvideAndRegisterDocumentSetRequest against a golden file (compared after C14N),
then its slots, classifications, identifiers and associations one by one."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from lxml import etree

from pacsflow.tasks.core.errors import XdsConfigurationError
from pacsflow.tasks.settings import XdsCode, XdsiSettings
from pacsflow.tasks.xdsi import ebxml
from pacsflow.tasks.xdsi.mtom import XOP
from tests.xdsi_samples import PSEUDONYM_OID, SOURCE_OID, Manifest, kos_manifest

GOLDEN = Path(__file__).parent / "data" / "xdsi" / "provide_and_register_rplc.xml"
NS = {"rim": ebxml.RIM, "xdsb": ebxml.XDSB, "lcm": ebxml.LCM, "xop": XOP}
ACCESSION_OID = "2.25.42"
SUBMITTED = datetime(2026, 12, 1, 14, 30, 5, tzinfo=timezone.utc)
CREATED = datetime(2026, 12, 1, 15, 29, 0, tzinfo=timezone(timedelta(hours=1)))  # 14:29:00 UTC
OLD_ENTRY = "urn:uuid:0b7a2c64-4f0e-4d7e-9a53-2f3c1d6a9e10"


def _settings(**changes: object) -> XdsiSettings:
    return XdsiSettings(source_oid=SOURCE_OID, pseudonym_oid=PSEUDONYM_OID, **changes)  # type: ignore[arg-type]


def _golden_submission() -> ebxml.Submission:
    return ebxml.build_request(Manifest(), _settings(), submitted=SUBMITTED, created=CREATED, replaces=OLD_ENTRY,
                               accession_authority=ACCESSION_OID, author_institution="pacsflow research")


def _c14n(xml: bytes) -> str:
    return etree.canonicalize(etree.fromstring(xml), strip_text=True)


def _one(root: etree._Element, path: str) -> etree._Element:
    [found] = root.xpath(path, namespaces=NS)
    return found


def _values(entry: etree._Element, slot: str) -> list[str]:
    return entry.xpath(f"rim:Slot[@name='{slot}']/rim:ValueList/rim:Value/text()", namespaces=NS)


def _codes(entry: etree._Element, scheme: str) -> list[tuple[str, str, str]]:
    return [(c.get("nodeRepresentation"), _values(c, "codingScheme")[0],
             c.xpath("rim:Name/rim:LocalizedString/@value", namespaces=NS)[0])
            for c in entry.xpath(f"rim:Classification[@classificationScheme='{scheme}']", namespaces=NS)]


def _external(obj: etree._Element, scheme: str) -> str:
    return _one(obj, f"rim:ExternalIdentifier[@identificationScheme='{scheme}']").get("value")


# -- CX and friends -----------------------------------------------------------------------------

def test_cx_patient_id_plain():
    assert ebxml.cx_patient_id("PSEUDO7", "1.2.3") == "PSEUDO7^^^&1.2.3&ISO"


def test_cx_patient_id_escapes_an_ampersand_inside_the_pseudonym_only():
    assert ebxml.cx_patient_id("A&B", "1.2.3") == "A\\T\\B^^^&1.2.3&ISO"


@pytest.mark.parametrize("raw, escaped", [("a^b", "a\\S\\b"), ("a|b", "a\\F\\b"), ("a~b", "a\\R\\b"),
                                          ("a\\b", "a\\E\\b"), ("\\T\\", "\\E\\T\\E\\")])
def test_cx_patient_id_escapes_every_hl7_delimiter(raw, escaped):
    assert ebxml.cx_patient_id(raw, "1.2.3") == f"{escaped}^^^&1.2.3&ISO"


@pytest.mark.parametrize("oid", ["", "1.2.x", "1.2&3", "01.2", "1." + "2" * 70])
def test_cx_patient_id_refuses_an_authority_that_is_not_an_oid(oid):
    with pytest.raises(XdsConfigurationError, match="xdsi.pseudonym_oid"):
        ebxml.cx_patient_id("P", oid)


def test_cx_patient_id_needs_a_pseudonym():
    with pytest.raises(ValueError):
        ebxml.cx_patient_id("", "1.2.3")


def test_reference_ids():
    assert ebxml.reference_id("1.2.3", ebxml.STUDY_UID_ID_TYPE) == "1.2.3^^^^urn:ihe:iti:xds:2016:studyInstanceUID"
    assert ebxml.reference_id("A^1", ebxml.ACCESSION_ID_TYPE, "2.25.42") == \
        "A\\S\\1^^^&2.25.42&ISO^urn:ihe:iti:xds:2013:accession"


@pytest.mark.parametrize("given, expected", [
    ("20240102", "20240102"), ("20240102093015", "20240102093015"), ("20240102093015.123", "20240102093015"),
    ("202401020930", "202401020930"), ("20240102093", "2024010209"), (" 20240102 ", "20240102"),
    (None, None), ("", None), ("2024-01-02", None), ("2024", None)])
def test_service_start_time(given, expected):
    assert ebxml.service_start_time(given) == expected


def test_times_are_utc_and_naive_ones_are_refused():
    assert ebxml.dtm(CREATED) == "20261201142900"
    with pytest.raises(ValueError, match="UTC"):
        ebxml.dtm(datetime(2026, 12, 1))


def test_event_codes_are_the_acquisition_modalities():
    codes = ebxml.event_codes(["SR", "mr", "CT", "KO", "CT", " ", "ZZ"])
    assert [(c.code, c.scheme, c.display) for c in codes] == [
        ("CT", ebxml.MODALITY_SCHEME, "Computed Tomography"), ("MR", ebxml.MODALITY_SCHEME, "Magnetic Resonance"),
        ("ZZ", ebxml.MODALITY_SCHEME, "ZZ")]


def test_entry_uuid_is_a_uuid_urn_derived_from_the_kos_uid():
    first = ebxml.entry_uuid("2.25.1")
    assert first == ebxml.entry_uuid("2.25.1") != ebxml.entry_uuid("2.25.2")
    assert first.startswith("urn:uuid:") and len(first) == 45


# -- the request --------------------------------------------------------------------------------

def test_request_matches_the_golden_file():
    built = etree.tostring(_golden_submission().request)
    assert _c14n(built) == _c14n(GOLDEN.read_bytes())


def test_building_twice_gives_the_same_bytes_and_ids():
    first, second = _golden_submission(), _golden_submission()
    assert etree.tostring(first.request) == etree.tostring(second.request)
    assert first == replace(second, request=first.request)


def test_document_entry_fields():
    manifest = Manifest()
    submission = _golden_submission()
    entry = _one(submission.request, "lcm:SubmitObjectsRequest/rim:RegistryObjectList/rim:ExtrinsicObject")
    patient = f"PSEUDO\\T\\7^^^&{PSEUDONYM_OID}&ISO"
    assert entry.get("id") == submission.entry_uuid == ebxml.entry_uuid(manifest.sop_instance_uid)
    assert entry.get("objectType") == "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
    assert entry.get("mimeType") == "application/dicom"
    assert entry.get("status") is None  # the registry sets it
    assert _external(entry, ebxml._DE["uniqueId"]) == manifest.sop_instance_uid == submission.document_unique_id
    assert _external(entry, ebxml._DE["patientId"]) == patient
    assert _values(entry, "sourcePatientId") == [patient]
    assert _values(entry, "sourcePatientInfo") == []
    assert _values(entry, "creationTime") == ["20261201142900"]
    assert _values(entry, "serviceStartTime") == ["20240102093015"]
    assert _values(entry, "languageCode") == ["en-US"]
    assert _values(entry, "hash") == [hashlib.sha1(manifest.part10).hexdigest()]
    assert _values(entry, "size") == [str(len(manifest.part10))]
    assert _values(entry, ebxml.REFERENCE_ID_LIST) == [
        f"{manifest.study_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
        f"ACC-7^^^&{ACCESSION_OID}&ISO^urn:ihe:iti:xds:2013:accession"]
    assert _codes(entry, ebxml._DE["formatCode"]) == [
        ("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1", "Key Object Selection Document")]
    assert [c[:2] for c in _codes(entry, ebxml._DE["eventCodeList"])] == [
        ("CT", "1.2.840.10008.2.16.4"), ("MR", "1.2.840.10008.2.16.4")]
    for classification in entry.xpath("rim:Classification", namespaces=NS):
        assert classification.get("classifiedObject") == submission.entry_uuid


def test_document_entry_codes_come_from_the_settings():
    custom = XdsCode(code="X1", scheme="1.2.99", display="Custom")
    xdsi = _settings(class_code=custom, type_code=replace_code(custom, "T"),
                     practice_setting_code=replace_code(custom, "P"),
                     healthcare_facility_type_code=replace_code(custom, "H"),
                     confidentiality_code=replace_code(custom, "C"), language_code="de-CH")
    request = ebxml.build_request(Manifest(), xdsi, submitted=SUBMITTED).request
    entry = _one(request, "//rim:ExtrinsicObject")
    assert _codes(entry, ebxml._DE["classCode"]) == [("X1", "1.2.99", "Custom")]
    assert _codes(entry, ebxml._DE["typeCode"]) == [("T", "1.2.99", "Custom")]
    assert _codes(entry, ebxml._DE["practiceSettingCode"]) == [("P", "1.2.99", "Custom")]
    assert _codes(entry, ebxml._DE["healthcareFacilityTypeCode"]) == [("H", "1.2.99", "Custom")]
    assert _codes(entry, ebxml._DE["confidentialityCode"]) == [("C", "1.2.99", "Custom")]
    assert _values(entry, "languageCode") == ["de-CH"]
    assert _values(entry, "creationTime") == _values(_one(request, "//rim:RegistryPackage"), "submissionTime")


def replace_code(code: XdsCode, new: str) -> XdsCode:
    return code.model_copy(update={"code": new})


def test_default_codes_are_the_issue_s():
    entry = _one(ebxml.build_request(Manifest(), _settings(), submitted=SUBMITTED).request, "//rim:ExtrinsicObject")
    assert _codes(entry, ebxml._DE["classCode"])[0][:2] == ("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1")
    assert _codes(entry, ebxml._DE["typeCode"])[0][:2] == ("18748-4", "2.16.840.1.113883.6.1")


def test_submission_set_fields():
    submission = _golden_submission()
    package = _one(submission.request, "//rim:RegistryPackage")
    assert package.get("id") == submission.submission_set_uuid
    assert _values(package, "submissionTime") == ["20261201143005"]
    assert _external(package, ebxml._SS["sourceId"]) == SOURCE_OID
    assert _external(package, ebxml._SS["patientId"]) == f"PSEUDO\\T\\7^^^&{PSEUDONYM_OID}&ISO"
    unique_id = _external(package, ebxml._SS["uniqueId"])
    assert unique_id == submission.submission_set_unique_id
    assert unique_id.startswith("2.25.") and unique_id[5:].isdigit() and len(unique_id) <= 64
    assert _codes(package, ebxml._SS["contentTypeCode"]) == [("18748-4", "2.16.840.1.113883.6.1",
                                                             "Diagnostic imaging study")]
    author = _one(package, f"rim:Classification[@classificationScheme='{ebxml._SS['author']}']")
    assert _values(author, "authorInstitution") == [f"pacsflow research^^^^^^^^^{SOURCE_OID}"]
    node = _one(submission.request, "//rim:RegistryObjectList/rim:Classification")
    assert (node.get("classificationNode"), node.get("classifiedObject")) == (ebxml.SUBMISSION_SET_NODE,
                                                                            submission.submission_set_uuid)


def test_has_member_and_rplc_associations():
    submission = _golden_submission()
    member = _one(submission.request, f"//rim:Association[@associationType='{ebxml.HAS_MEMBER}']")
    assert (member.get("sourceObject"), member.get("targetObject")) == (submission.submission_set_uuid,
                                                                        submission.entry_uuid)
    assert _values(member, "SubmissionSetStatus") == ["Original"]
    rplc = _one(submission.request, f"//rim:Association[@associationType='{ebxml.RPLC}']")
    assert (rplc.get("sourceObject"), rplc.get("targetObject")) == (submission.entry_uuid, OLD_ENTRY)


def test_a_first_submission_has_no_rplc_and_no_author_unless_asked():
    request = ebxml.build_request(Manifest(), _settings(), submitted=SUBMITTED).request
    assert request.xpath(f"//rim:Association[@associationType='{ebxml.RPLC}']", namespaces=NS) == []
    assert request.xpath(f"//rim:Classification[@classificationScheme='{ebxml._SS['author']}']",
                         namespaces=NS) == []


def test_every_id_is_unique_and_a_uuid_urn():
    ids = _golden_submission().request.xpath("//rim:*/@id", namespaces=NS)
    assert len(ids) == len(set(ids)) and all(ebxml._UUID_URN.fullmatch(i) for i in ids)


def test_document_holds_an_xop_include_of_the_content_id():
    submission = _golden_submission()
    document = _one(submission.request, "xdsb:Document")
    assert document.get("id") == submission.entry_uuid
    assert _one(document, "xop:Include").get("href") == f"cid:{submission.content_id}"
    assert document.text is None


def test_optional_fields_can_be_left_out():
    manifest = Manifest(accession=None, service_start=None)
    request = ebxml.build_request(manifest, _settings(), submitted=SUBMITTED, with_hash_size=False,
                                  with_format_code=False).request
    entry = _one(request, "//rim:ExtrinsicObject")
    assert _values(entry, "hash") == _values(entry, "size") == _values(entry, "serviceStartTime") == []
    assert _codes(entry, ebxml._DE["formatCode"]) == []
    assert _values(entry, ebxml.REFERENCE_ID_LIST) == [f"{manifest.study_uid}^^^^{ebxml.STUDY_UID_ID_TYPE}"]


def test_accession_without_a_known_authority():
    entry = _one(ebxml.build_request(Manifest(), _settings(), submitted=SUBMITTED).request, "//rim:ExtrinsicObject")
    assert _values(entry, ebxml.REFERENCE_ID_LIST)[1] == "ACC-7^^^^urn:ihe:iti:xds:2013:accession"


def test_publishing_needs_the_oids():
    with pytest.raises(XdsConfigurationError, match="xdsi.source_oid and xdsi.pseudonym_oid"):
        ebxml.build_request(Manifest(), XdsiSettings(), submitted=SUBMITTED)


def test_replaces_must_be_an_entry_uuid():
    with pytest.raises(ValueError, match="entryUUID"):
        ebxml.build_request(Manifest(), _settings(), submitted=SUBMITTED, replaces="2.25.1")


def test_a_manifest_from_the_builder():
    xdsi = _settings(retrieve_url="https://pacsflow.test/dicom-web")
    manifest: ebxml.ManifestLike = kos_manifest(xdsi, "PSEUDO-9", series=("CT", "SR", "MR"))
    entry = _one(ebxml.build_request(manifest, xdsi, submitted=SUBMITTED).request, "//rim:ExtrinsicObject")
    assert _external(entry, ebxml._DE["uniqueId"]) == manifest.sop_instance_uid
    assert _values(entry, "hash") == [hashlib.sha1(manifest.part10).hexdigest()]
    assert _values(entry, "serviceStartTime") == ["20240102093015"]
    assert [c[0] for c in _codes(entry, ebxml._DE["eventCodeList"])] == ["CT", "MR"]
    assert _values(entry, ebxml.REFERENCE_ID_LIST) == [
        f"{manifest.study_uid}^^^^{ebxml.STUDY_UID_ID_TYPE}", f"ACC-1^^^^{ebxml.ACCESSION_ID_TYPE}"]
