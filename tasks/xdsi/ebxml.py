"""The metadata of one RAD-68 submission: an XDS.b ``ProvideAndRegisterDocumentSetRequest`` (ITI TF-3
4.2 / RAD TF-3 4.68) for one study's KOS manifest, built with lxml. Pure: no clock, no network.

One SubmissionSet, one DocumentEntry (the KOS), the HasMember association between them and, for a
changed study, an RPLC association to the entry it replaces. Every entryUUID and the submission
set's uniqueId are derived from the KOS SOP Instance UID, so building again sends the same ids.
The patient is the pseudonym under ``xdsi.pseudonym_oid``; no sourcePatientInfo is sent.

No maintained Python library sends XDS.b with MTOM (checked 2026-12 on PyPI: oru2xds is a GPL
HL7-to-CDA application pinned to 2021 libraries, pymtom-xop an alpha zeep plugin), hence this module.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from lxml import etree

from pacsflow.tasks.core.errors import XdsConfigurationError
from pacsflow.tasks.settings import XdsCode, XdsiSettings
from pacsflow.tasks.xdsi import mtom

XDSB = "urn:ihe:iti:xds-b:2007"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
_NSMAP = {"xdsb": XDSB, "lcm": LCM, "rim": RIM}

STABLE_DOCUMENT_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
MIME_DICOM = "application/dicom"
KOS_FORMAT = XdsCode(code="1.2.840.10008.5.1.4.1.1.88.59", scheme="1.2.840.10008.2.6.1",
                     display="Key Object Selection Document")
MODALITY_SCHEME = "1.2.840.10008.2.16.4"  # DICOM's DCM coding scheme (PS3.16 CID 29 codes)
ACCESSION_ID_TYPE = "urn:ihe:iti:xds:2013:accession"
STUDY_UID_ID_TYPE = "urn:ihe:iti:xds:2016:studyInstanceUID"
REFERENCE_ID_LIST = "urn:ihe:iti:xds:2013:referenceIdList"
TITLE = "Imaging study manifest"

# Classification schemes and external identifiers (ITI TF-3 4.2.5)
_DE = {"author": "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d",
       "classCode": "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a",
       "confidentialityCode": "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f",
       "eventCodeList": "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4",
       "formatCode": "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d",
       "healthcareFacilityTypeCode": "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1",
       "practiceSettingCode": "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead",
       "typeCode": "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983",
       "patientId": "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427",
       "uniqueId": "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"}
#: The DocumentEntry's classification and identifier schemes by attribute name (the query parser reads them).
DOCUMENT_ENTRY_SCHEMES = _DE
_SS = {"author": "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d",
       "contentTypeCode": "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500",
       "patientId": "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446",
       "sourceId": "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832",
       "uniqueId": "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"}
_OBJECT_TYPE = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:"

# Fixed for good: every entryUUID already published was derived under it.
_NAMESPACE = uuid.UUID("4f62307f-a6f0-4215-8280-3d9b4789bf86")
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UUID_URN = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DICOM_DT = re.compile(r"(\d{8})(\d{2,6})?(\.\d+)?")

# Series modalities that are objects about images, not acquisitions: not events of the study.
_NOT_ACQUISITIONS = frozenset({"KO", "PR", "SR", "DOC", "REG", "SEG", "FID", "RWV", "PLAN"})
# Code meanings of DCM (PS3.16 Annex D) for the usual acquisition modalities; others show their code.
_MODALITY_NAMES = {
    "CR": "Computed Radiography", "CT": "Computed Tomography", "DX": "Digital Radiography",
    "ES": "Endoscopy", "IO": "Intra-oral Radiography", "MG": "Mammography", "MR": "Magnetic Resonance",
    "NM": "Nuclear Medicine", "OP": "Ophthalmic Photography", "OT": "Other",
    "PT": "Positron emission tomography", "PX": "Panoramic X-Ray", "RF": "Radio Fluoroscopy",
    "SM": "Slide Microscopy", "US": "Ultrasound", "XA": "X-Ray Angiography",
    "XC": "External-camera Photography",
}


class ManifestLike(Protocol):
    """What the builder reads of a KOS manifest (:mod:`pacsflow.tasks.xdsi.manifest` makes them)."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def study_uid(self) -> str: ...
    @property
    def accession(self) -> str | None: ...
    @property
    def modalities(self) -> Sequence[str]: ...
    @property
    def patient_pseudo_id(self) -> str: ...
    @property
    def service_start(self) -> str | None: ...  # study date and time, YYYYMMDD[hhmmss]
    @property
    def part10(self) -> bytes: ...


@dataclass(frozen=True)
class Submission:
    """A built request and the ids it carries (what the ledger records)."""

    request: etree._Element  # xdsb:ProvideAndRegisterDocumentSetRequest
    entry_uuid: str  # the DocumentEntry's (and xdsb:Document's) id
    document_unique_id: str  # = the KOS SOP Instance UID
    submission_set_uuid: str
    submission_set_unique_id: str
    content_id: str  # the MIME part the xop:Include names


# -- HL7 v2 data types as XDS uses them ---------------------------------------------------------

_HL7_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def hl7_escape(text: str) -> str:
    """``text`` as one HL7 v2 (sub)component: its delimiters escaped, the escape character first."""
    for raw, escaped in _HL7_ESCAPES:
        text = text.replace(raw, escaped)
    return text


def _require_oid(value: str, what: str) -> str:
    if len(value) > 64 or not _OID.fullmatch(value):
        raise XdsConfigurationError(f"{what} must be an OID (digits and dots, at most 64 characters)")
    return value


def cx_patient_id(pseudonym: str, oid: str) -> str:
    """The CX patient ID ``pseudonym^^^&oid&ISO``: a delimiter inside the pseudonym is escaped
    (``&`` -> ``\\T\\``); the ``&`` around the authority's OID are the CX.4 separators."""
    if not pseudonym:
        raise ValueError("a patient ID needs a pseudonym")
    return f"{hl7_escape(pseudonym)}^^^&{_require_oid(oid, 'xdsi.pseudonym_oid')}&ISO"


def reference_id(value: str, id_type: str, authority: str | None = None) -> str:
    """A CXi reference ID (``referenceIdList``): CX.1 value, CX.4 assigning authority when the value
    is unique only within it (an accession number), CX.5 the IHE identifier type."""
    assigner = f"&{_require_oid(authority, 'the accession number authority')}&ISO" if authority else ""
    return f"{hl7_escape(value)}^^^{assigner}^{id_type}"


def xon_organization(name: str, oid: str) -> str:
    """An XON with the organization's name (XON.1) and OID (XON.10)."""
    return f"{hl7_escape(name)}^^^^^^^^^{_require_oid(oid, 'xdsi.source_oid')}"


def dtm(moment: datetime) -> str:
    """An XDS time: UTC, YYYYMMDDhhmmss. A naive datetime is refused (its zone is unknown)."""
    if moment.tzinfo is None:
        raise ValueError("XDS times are UTC: give an aware datetime")
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S")


def service_start_time(dicom_date_time: str | None) -> str | None:
    """The study's date and time (DICOM DA + TM) as an XDS time with the precision it has (fractions
    dropped); None when absent or not a date. DICOM names no zone, so the local time is sent as
    written, as imaging sources commonly do."""
    found = _DICOM_DT.fullmatch((dicom_date_time or "").strip())
    if found is None:
        return None
    time_part = found.group(2) or ""
    return found.group(1) + time_part[: len(time_part) // 2 * 2]


def event_codes(modalities: Sequence[str]) -> list[XdsCode]:
    """eventCodeList: the study's acquisition modalities (DCM codes), sorted, without the
    objects-about-images modalities (KO, PR, SR, SEG, ...)."""
    picked = sorted({m.strip().upper() for m in modalities if m.strip()} - _NOT_ACQUISITIONS)
    return [XdsCode(code=m, scheme=MODALITY_SCHEME, display=_MODALITY_NAMES.get(m, m)) for m in picked]


# -- ids ---------------------------------------------------------------------------------------

def _derived_uuid(kos_uid: str, role: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{kos_uid}/{role}")


def entry_uuid(kos_uid: str) -> str:
    """The DocumentEntry's entryUUID for the KOS ``kos_uid`` (the same on every run)."""
    return f"urn:uuid:{_derived_uuid(kos_uid, 'DocumentEntry')}"


def _urn(kos_uid: str, role: str) -> str:
    return f"urn:uuid:{_derived_uuid(kos_uid, role)}"


# -- ebRIM elements ----------------------------------------------------------------------------

def _rim(parent: etree._Element, tag: str, **attributes: str) -> etree._Element:
    return etree.SubElement(parent, f"{{{RIM}}}{tag}", attributes)


def _slot(parent: etree._Element, name: str, *values: str) -> None:
    value_list = _rim(_rim(parent, "Slot", name=name), "ValueList")
    for value in values:
        _rim(value_list, "Value").text = value


def _name(parent: etree._Element, text: str, lang: str | None = None) -> None:
    localized = _rim(_rim(parent, "Name"), "LocalizedString", value=text)
    if lang:
        localized.set("charset", "UTF-8")
        localized.set("{http://www.w3.org/XML/1998/namespace}lang", lang)


def _classification(parent: etree._Element, ident: str, scheme: str, code: XdsCode) -> None:
    node = _rim(parent, "Classification", id=ident, classificationScheme=scheme,
                classifiedObject=parent.get("id", ""), nodeRepresentation=code.code,
                objectType=_OBJECT_TYPE + "Classification")
    _slot(node, "codingScheme", code.scheme)
    _name(node, code.display)


def _external_id(parent: etree._Element, ident: str, scheme: str, value: str, label: str) -> None:
    node = _rim(parent, "ExternalIdentifier", id=ident, registryObject=parent.get("id", ""),
                identificationScheme=scheme, value=value, objectType=_OBJECT_TYPE + "ExternalIdentifier")
    _name(node, label)


def _association(parent: etree._Element, ident: str, kind: str, source: str, target: str) -> etree._Element:
    return _rim(parent, "Association", id=ident, associationType=kind, sourceObject=source,
                targetObject=target, objectType=_OBJECT_TYPE + "Association")


# -- the request -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Ids:
    kos_uid: str
    entry: str
    submission_set: str

    def of(self, role: str) -> str:
        return _urn(self.kos_uid, role)


def _document_entry(objects: etree._Element, manifest: ManifestLike, xdsi: XdsiSettings, patient: str,
                    ids: _Ids, *, created: datetime, accession_authority: str | None, with_format: bool,
                    with_hash_size: bool) -> None:
    entry = _rim(objects, "ExtrinsicObject", id=ids.entry, mimeType=MIME_DICOM, objectType=STABLE_DOCUMENT_ENTRY)
    _slot(entry, "creationTime", dtm(created))
    if with_hash_size:
        _slot(entry, "hash", hashlib.sha1(manifest.part10).hexdigest())
        _slot(entry, "size", str(len(manifest.part10)))
    _slot(entry, "languageCode", xdsi.language_code)
    start = service_start_time(manifest.service_start)
    if start:
        _slot(entry, "serviceStartTime", start)
    _slot(entry, "sourcePatientId", patient)
    references = [reference_id(manifest.study_uid, STUDY_UID_ID_TYPE)]
    if manifest.accession:
        references.append(reference_id(manifest.accession, ACCESSION_ID_TYPE, accession_authority))
    _slot(entry, REFERENCE_ID_LIST, *references)
    _name(entry, TITLE, xdsi.language_code)
    codes: list[tuple[str, XdsCode]] = [("classCode", xdsi.class_code),
                                        ("confidentialityCode", xdsi.confidentiality_code)]
    codes += [("eventCodeList", code) for code in event_codes(manifest.modalities)]
    if with_format:
        codes.append(("formatCode", KOS_FORMAT))
    codes += [("healthcareFacilityTypeCode", xdsi.healthcare_facility_type_code),
              ("practiceSettingCode", xdsi.practice_setting_code), ("typeCode", xdsi.type_code)]
    for index, (kind, code) in enumerate(codes):
        _classification(entry, ids.of(f"DocumentEntry/{kind}/{index}"), _DE[kind], code)
    _external_id(entry, ids.of("DocumentEntry/patientId"), _DE["patientId"], patient, "XDSDocumentEntry.patientId")
    _external_id(entry, ids.of("DocumentEntry/uniqueId"), _DE["uniqueId"], manifest.sop_instance_uid,
                 "XDSDocumentEntry.uniqueId")


def _submission_set(objects: etree._Element, xdsi: XdsiSettings, source_oid: str, patient: str, ids: _Ids,
                    unique_id: str, *, submitted: datetime, author_institution: str | None) -> None:
    package = _rim(objects, "RegistryPackage", id=ids.submission_set,
                   objectType=_OBJECT_TYPE + "RegistryPackage")
    _slot(package, "submissionTime", dtm(submitted))
    if author_institution:
        author = _rim(package, "Classification", id=ids.of("SubmissionSet/author"), classificationScheme=_SS["author"],
                      classifiedObject=ids.submission_set, nodeRepresentation="",
                      objectType=_OBJECT_TYPE + "Classification")
        _slot(author, "authorInstitution", xon_organization(author_institution, source_oid))
    _classification(package, ids.of("SubmissionSet/contentTypeCode"), _SS["contentTypeCode"], xdsi.content_type_code)
    _external_id(package, ids.of("SubmissionSet/uniqueId"), _SS["uniqueId"], unique_id, "XDSSubmissionSet.uniqueId")
    _external_id(package, ids.of("SubmissionSet/sourceId"), _SS["sourceId"], source_oid, "XDSSubmissionSet.sourceId")
    _external_id(package, ids.of("SubmissionSet/patientId"), _SS["patientId"], patient, "XDSSubmissionSet.patientId")
    _rim(objects, "Classification", id=ids.of("SubmissionSet/node"), classificationNode=SUBMISSION_SET_NODE,
         classifiedObject=ids.submission_set, objectType=_OBJECT_TYPE + "Classification")


def _configured(xdsi: XdsiSettings) -> tuple[str, str]:
    if not xdsi.source_oid or not xdsi.pseudonym_oid:
        raise XdsConfigurationError("set xdsi.source_oid and xdsi.pseudonym_oid before publishing")
    return xdsi.source_oid, xdsi.pseudonym_oid


def build_request(manifest: ManifestLike, xdsi: XdsiSettings, *, submitted: datetime,
                  created: datetime | None = None, replaces: str | None = None,
                  accession_authority: str | None = None, author_institution: str | None = None,
                  with_hash_size: bool = True, with_format_code: bool = True) -> Submission:
    """The ProvideAndRegisterDocumentSetRequest publishing ``manifest``.

    ``submitted`` is the submission time and ``created`` the KOS's creation time (default: the
    same); ``replaces`` the entryUUID of the entry this one replaces (RPLC). ``accession_authority``
    is the OID under which the accession number is unique, when known. ``author_institution`` names
    the submitting organization (its OID is ``xdsi.source_oid``); unset = no author. The registry
    checks hash and size when sent. ``with_format_code=False`` exists for tests only (a registry
    must refuse the entry)."""
    source_oid, pseudonym_oid = _configured(xdsi)
    if replaces is not None and not _UUID_URN.fullmatch(replaces):
        raise ValueError("replaces must be the replaced entry's entryUUID (urn:uuid:...)")
    kos_uid = manifest.sop_instance_uid
    ids = _Ids(kos_uid, entry_uuid(kos_uid), _urn(kos_uid, "SubmissionSet"))
    patient = cx_patient_id(manifest.patient_pseudo_id, pseudonym_oid)
    set_unique_id = f"2.25.{_derived_uuid(kos_uid, 'SubmissionSet/uniqueId').int}"
    content_id = f"{ids.entry.removeprefix('urn:uuid:')}@pacsflow"

    request = etree.Element(f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest", nsmap=_NSMAP)
    submit = etree.SubElement(request, f"{{{LCM}}}SubmitObjectsRequest")
    objects = _rim(submit, "RegistryObjectList")
    _document_entry(objects, manifest, xdsi, patient, ids, created=created or submitted,
                    accession_authority=accession_authority, with_format=with_format_code,
                    with_hash_size=with_hash_size)
    _submission_set(objects, xdsi, source_oid, patient, ids, set_unique_id, submitted=submitted,
                    author_institution=author_institution)
    member = _association(objects, ids.of("HasMember"), HAS_MEMBER, ids.submission_set, ids.entry)
    _slot(member, "SubmissionSetStatus", "Original")
    if replaces is not None:
        _association(objects, ids.of(f"RPLC/{replaces}"), RPLC, ids.entry, replaces)
    document = etree.SubElement(request, f"{{{XDSB}}}Document", id=ids.entry)
    document.append(mtom.include(content_id))
    return Submission(request=request, entry_uuid=ids.entry, document_unique_id=kos_uid,
                      submission_set_uuid=ids.submission_set, submission_set_unique_id=set_unique_id,
                      content_id=content_id)
