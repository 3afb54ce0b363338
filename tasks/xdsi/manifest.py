"""The XDS-I.b manifest: one DICOM Key Object Selection (KOS) document per cataloged study.

:func:`load_inputs` reads what a manifest needs from the catalog (de-identified values only);
:func:`build_manifest` turns one study into the Part 10 bytes of its KOS (PS3.3 A.35.4: Patient,
General Study, Key Object Document Series, General Equipment, Key Object Document, SR Document
Content, SOP Common; TID 2010 with the title (113030, DCM, "Manifest")). The Current Requested
Procedure Evidence Sequence lists exactly the catalog's instances of the study, each series with our
Retrieve Location UID (``xdsi.source_oid``) and its WADO-RS Retrieve URL.

**Deterministic.** The KOS's SOP Instance and Series Instance UIDs are ``2.25.`` UIDs derived from
the study UID and :func:`content_hash` (a hash of everything the KOS says), and its dates come from
the study, not the clock: the same catalog rows and settings give byte-identical Part 10 bytes, and
a changed study (a series added) gives a new KOS with new UIDs, which the publisher sends as a
replacement.

Built with pydicom by hand rather than highdicom's ``KeyObjectSelectionDocument``: highdicom is not
a dependency, its SOP base class always stamps ``InstanceCreationDate/Time`` from the clock
(the UIDs it takes from the caller, so those would have been fine), and it copies patient name,
birth date and sex from evidence datasets we would have to invent from catalog rows.

Pure: no Prefect, no sockets. Nothing identified: every value is a catalog value, a setting or a
constant of this module.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import io
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import duckdb
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacsflow.tasks.core.errors import PermanentError
from pacsflow.tasks.settings import XdsiSettings

KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"
#: Part of every content hash: bump it when the KOS's layout changes, so every study gets a new
#: manifest (with new UIDs) that replaces the one published before.
LAYOUT_VERSION = "pacsflow-kos-1"
#: Fixed rather than pydicom's implementation UID, which changes with pydicom's version (and
#: with it the bytes of every manifest). 2.25 form of uuid5(NAMESPACE_URL, "urn:pacsflow:xdsi:manifest").
IMPLEMENTATION_CLASS_UID = "2.25.277806021521587476759525806239729048681"
IMPLEMENTATION_VERSION_NAME = "PACSFLOW_KOS1"
MANUFACTURER = "pacsflow"
KOS_SERIES_NUMBER = 999
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")


class ManifestError(PermanentError):
    """A study cannot be described by a manifest (no pseudonym, date, instances or SOP class), or the
    settings a manifest names are unset. Carries UIDs and setting names only."""

    reason = "xdsi-manifest"


class ValueType(str, enum.Enum):
    """How TID 2010 references an object (PS3.3 C.17.3.2.1): an image, a waveform, any other composite."""

    IMAGE = "IMAGE"
    WAVEFORM = "WAVEFORM"
    COMPOSITE = "COMPOSITE"


def value_type(sop_class_uid: str | None, has_pixels: bool) -> ValueType:
    """IMAGE when the instance has an image pixel matrix (the catalog's ``rows``: this also covers
    image classes whose names lack "Image", like Segmentation or RT Dose, and private ones),
    WAVEFORM for the waveform storage classes, else COMPOSITE (SR, KOS, presentation states, PDFs)."""
    if has_pixels:
        return ValueType.IMAGE
    if sop_class_uid and "Waveform" in UID(sop_class_uid).name:
        return ValueType.WAVEFORM
    return ValueType.COMPOSITE


class InstanceRef(NamedTuple):
    series_uid: str
    sop_class_uid: str | None  # None: the catalog lacks it, and the study cannot have a manifest
    sop_instance_uid: str
    modality: str | None
    value_type: ValueType


def _order(ref: InstanceRef) -> tuple[str, str]:
    return ref.series_uid, ref.sop_instance_uid


@dataclass(frozen=True)
class StudyManifestInput:
    """The catalog's de-identified values one manifest is made of."""

    study_uid: str
    patient_pseudo_id: str | None
    accession_number: str | None
    study_date: dt.date | None
    study_time: str | None
    instances: tuple[InstanceRef, ...]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({i.modality for i in self.instances if i.modality}))


@dataclass(frozen=True)
class Manifest:
    """One study's KOS: its Part 10 bytes and what the submission metadata says about it."""

    study_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    content_hash: str
    part10: bytes
    patient_pseudo_id: str
    accession: str | None
    modalities: tuple[str, ...]
    service_start: str  # YYYYMMDD[HHMMSS], the study's date and time
    instance_count: int


# -- catalog -----------------------------------------------------------------------------------------
# Constant SQL, values bound. ``rows`` tells images from other objects (see value_type).
_SQL_STUDIES = ("SELECT study_uid, patient_pseudo_id, accession_number, study_date, study_time FROM studies "
                "WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))")
_SQL_REFERENCES = ("SELECT i.study_uid, i.series_uid, i.sop_class_uid, i.sop_instance_uid, s.modality, "
                   "i.rows IS NOT NULL FROM instances i LEFT JOIN series s "
                   "ON s.study_uid = i.study_uid AND s.series_uid = i.series_uid "
                   "WHERE i.study_uid IN (SELECT unnest(?::VARCHAR[])) "
                   "ORDER BY i.study_uid, i.series_uid, i.sop_instance_uid")


def load_inputs(con: duckdb.DuckDBPyConnection, study_uids: Sequence[str]) -> dict[str, StudyManifestInput]:
    """The manifest inputs of these studies, from a connection made by
    :func:`pacsflow.catalog.views.connect` (absent UIDs are left out)."""
    uids = sorted(set(study_uids))
    refs: dict[str, list[InstanceRef]] = {}
    for study, series, sop_class, sop, modality, has_pixels in con.execute(_SQL_REFERENCES, [uids]).fetchall():
        refs.setdefault(study, []).append(
            InstanceRef(series, sop_class, sop, modality, value_type(sop_class, bool(has_pixels))))
    return {
        study: StudyManifestInput(study, pseudo, accession, date, time, tuple(refs.get(study, ())))
        for study, pseudo, accession, date, time in con.execute(_SQL_STUDIES, [uids]).fetchall()
    }


# -- identity ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Names:
    """The settings a manifest names; all required."""

    source_oid: str
    retrieve_url: str
    pseudonym_oid: str


def _names(xdsi: XdsiSettings) -> _Names:
    for name in ("source_oid", "retrieve_url", "pseudonym_oid"):
        if not getattr(xdsi, name):
            raise ManifestError(f"xdsi.{name} is unset: a manifest needs it (retrieve_url defaults to "
                                "serve.public_base_url + /dicom-web)")
    assert xdsi.source_oid and xdsi.retrieve_url and xdsi.pseudonym_oid
    return _Names(xdsi.source_oid, xdsi.retrieve_url.rstrip("/"), xdsi.pseudonym_oid)


def content_hash(inp: StudyManifestInput, xdsi: XdsiSettings) -> str:
    """SHA-256 (hex) of everything the study's KOS and its metadata say: a new value means a new manifest."""
    names = _names(xdsi)
    doc = {
        "layout": LAYOUT_VERSION,
        "study": [inp.study_uid, inp.patient_pseudo_id, inp.accession_number,
                  inp.study_date.isoformat() if inp.study_date else None, inp.study_time],
        "instances": [list(i) for i in sorted(inp.instances, key=_order)],
        "names": [names.source_oid, names.retrieve_url, names.pseudonym_oid],
    }
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def derived_uid(*parts: str) -> str:
    """A ``2.25.`` UID (PS3.5 B.2) from a name-based UUID (version 8) of ``parts``: the same parts,
    the same UID."""
    raw = bytearray(hashlib.sha256("\x1f".join(parts).encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return f"2.25.{uuid.UUID(bytes=bytes(raw)).int}"


# -- dates -------------------------------------------------------------------------------------------
def _dicom_time(text: str | None) -> str | None:
    """The catalog's TM text as HHMMSS[.F] (old ``HH:MM:SS`` accepted, missing minutes and seconds
    as 00), or None when absent or malformed."""
    if not text:
        return None
    m = _TIME.fullmatch(text.strip().replace(":", ""))
    if m is None or int(m[1]) > 23 or int(m[2] or 0) > 59 or int(m[3] or 0) > 60:
        return None
    return f"{m[1]}{m[2] or '00'}{m[3] or '00'}{m[4] or ''}"


def _study_datetime(inp: StudyManifestInput) -> tuple[str, str | None]:
    if inp.study_date is None:
        raise ManifestError(f"study {inp.study_uid} has no StudyDate in the catalog: its manifest needs a date")
    return inp.study_date.strftime("%Y%m%d"), _dicom_time(inp.study_time)


# -- the KOS -----------------------------------------------------------------------------------------
def _sop_ref(sop_class_uid: str | None, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _evidence(inp: StudyManifestInput, names: _Names) -> Dataset:
    """Current Requested Procedure Evidence: the study, its series (where to retrieve them) and instances."""
    by_series: dict[str, list[InstanceRef]] = {}
    for ref in sorted(inp.instances, key=_order):
        by_series.setdefault(ref.series_uid, []).append(ref)
    series_items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.RetrieveLocationUID = names.source_oid
        item.RetrieveURL = f"{names.retrieve_url}/studies/{inp.study_uid}/series/{series_uid}"
        item.ReferencedSOPSequence = [_sop_ref(r.sop_class_uid, r.sop_instance_uid) for r in refs]
        series_items.append(item)
    study = Dataset()
    study.StudyInstanceUID = inp.study_uid
    study.ReferencedSeriesSequence = series_items
    return study


def _content_items(inp: StudyManifestInput) -> list[Dataset]:
    """TID 2010's key objects: every instance, CONTAINS, without a concept name."""
    items = []
    for ref in sorted(inp.instances, key=_order):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = ref.value_type.value
        item.ReferencedSOPSequence = [_sop_ref(ref.sop_class_uid, ref.sop_instance_uid)]
        items.append(item)
    return items


def _request(inp: StudyManifestInput) -> Dataset:
    """The Referenced Request (the accession), so a consumer can match the manifest to its order;
    the other type 2 attributes stay empty (the catalog has no order data)."""
    item = Dataset()
    item.StudyInstanceUID = inp.study_uid
    item.AccessionNumber = inp.accession_number
    item.IssuerOfAccessionNumberSequence = []
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = ""
    item.RequestedProcedureID = ""
    item.RequestedProcedureDescription = ""
    item.RequestedProcedureCodeSequence = []
    return item


def _dataset(inp: StudyManifestInput, names: _Names, sop_uid: str, series_uid: str) -> Dataset:
    date, time = _study_datetime(inp)
    ds = Dataset()
    texts = (inp.patient_pseudo_id or "", inp.accession_number or "")
    if not all(t.isascii() for t in texts):  # the default repertoire otherwise: readers check it best
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time or "000000"
    ds.SOPClassUID = KOS_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = date
    ds.ContentDate = date
    ds.StudyTime = time or ""
    ds.ContentTime = time or "000000"  # type 1: midnight of the study's day when the catalog has no time
    ds.AccessionNumber = inp.accession_number or ""
    ds.Modality = "KO"
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = ""
    ds.PatientName = ""  # type 2: the manifest names no one
    ds.PatientID = inp.patient_pseudo_id
    ds.IssuerOfPatientID = names.pseudonym_oid
    issuer = Dataset()
    issuer.UniversalEntityID = names.pseudonym_oid
    issuer.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [issuer]
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = inp.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = KOS_SERIES_NUMBER
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    title = Dataset()  # TID 2010's document title, CID 7010
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "113030", "DCM", "Manifest"
    ds.ConceptNameCodeSequence = [title]
    ds.ContinuityOfContent = "SEPARATE"
    if inp.accession_number:
        ds.ReferencedRequestSequence = [_request(inp)]
    ds.CurrentRequestedProcedureEvidenceSequence = [_evidence(inp, names)]
    ds.ReferencedPerformedProcedureStepSequence = []
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = [template]
    ds.ContentSequence = _content_items(inp)
    return ds


def _part10(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _service_start(inp: StudyManifestInput) -> str:
    date, time = _study_datetime(inp)
    return date + (time[:6] if time else "")


def build_manifest(inp: StudyManifestInput, xdsi: XdsiSettings) -> Manifest:
    """The study's KOS (Part 10, explicit VR little endian) and its metadata; ManifestError when the
    study cannot have one (no pseudonym, date or instances) or a setting it names is unset."""
    names = _names(xdsi)
    if not inp.patient_pseudo_id:
        raise ManifestError(f"study {inp.study_uid} has no patient pseudonym in the catalog")
    if not inp.instances:
        raise ManifestError(f"study {inp.study_uid} has no instances in the catalog")
    unclassed = [r.sop_instance_uid for r in inp.instances if not r.sop_class_uid]
    if unclassed:
        raise ManifestError(f"study {inp.study_uid}: instance {unclassed[0]} (of {len(unclassed)}) has no "
                            "SOP Class UID in the catalog")
    digest = content_hash(inp, xdsi)
    sop_uid = derived_uid("kos-instance", inp.study_uid, digest)
    series_uid = derived_uid("kos-series", inp.study_uid, digest)
    part10 = _part10(_dataset(inp, names, sop_uid, series_uid))
    return Manifest(study_uid=inp.study_uid, sop_instance_uid=sop_uid, series_instance_uid=series_uid,
                    content_hash=digest, part10=part10, patient_pseudo_id=inp.patient_pseudo_id,
                    accession=inp.accession_number or None, modalities=inp.modalities,
                    service_start=_service_start(inp), instance_count=len(inp.instances))
