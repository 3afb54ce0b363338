"""Realistic synthetic DICOM studies for the local stack and the tests (plain pydicom).

Deterministic given ``seed`` (and ``end_date``): UIDs come from ``generate_uid(entropy_srcs=...)``,
every choice and every pixel from RNGs seeded per study. Headers carry plausible fake PHI on
purpose (names incl. non-ASCII ones, IDs, dates, physicians, institution, a private block holding
the patient's name, burned-in-annotation flags) so de-identification has something to remove.
Nothing here logs names or IDs.

Layout: ``out_dir/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"

SOP_CLASSES = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE, "MG": MG_FOR_PRESENTATION, "US": US_IMAGE_STORAGE}
PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "ACME 1.0"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"
IMPLEMENTATION_VERSION = "PACSFLOW_SYNTH"


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    patient_id: str
    study_date: date
    modality: str
    n_series: int
    n_instances: int
    path: Path  # out_dir/<study_uid>
    series_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeriesSummary:
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    series_date: date
    n_instances: int
    path: Path  # out_dir/<study_uid>/<series_uid>
    sop_uids: tuple[str, ...] = ()


# -- vocabulary ----------------------------------------------------------------------------------

# (family, given, sex). Names are invented; some collide with common names by design.
_LATIN1_NAMES = [
    ("Müller", "Jürgen", "M"), ("Dubois", "Hélène", "F"), ("Nuñez", "José", "M"),
    ("Østergaard", "Søren", "M"), ("Åberg", "Ingrid", "F"), ("Lefèvre", "Zoë", "F"),
]
_UTF8_NAMES = [  # not encodable in Latin-1: needs ISO_IR 192
    ("Łukasiewicz", "Zofia", "F"), ("Dvořák", "Tomáš", "M"), ("Παπαδόπουλος", "Νίκος", "M"),
    ("Kovačević", "Ana", "F"),
]
_ASCII_NAMES = [
    ("Smith", "John", "M"), ("Johnson", "Mary", "F"), ("Williams", "Robert", "M"),
    ("Brown", "Patricia", "F"), ("Garcia", "Maria", "F"), ("Miller", "James", "M"),
    ("Davis", "Linda", "F"), ("Wilson", "Michael", "M"), ("Taylor", "Susan", "F"),
    ("Anderson", "David", "M"), ("Thomas", "Karen", "F"), ("Moore", "Richard", "M"),
    ("Jackson", "Nancy", "F"), ("White", "Daniel", "M"), ("Harris", "Lisa", "F"),
]
_INSTITUTIONS = [
    ("St. Elsewhere General Hospital", "1 Hospital Way, Springfield, IL 62701, USA", "RADIOLOGY"),
    ("Klinikum Nordstadt", "Hauptstraße 12, 20095 Hamburg, Germany", "Radiologie"),
    ("Hôpital Saint-Exempt", "12 rue de la Paix, 75002 Paris, France", "Imagerie"),
]
_REFERRING = ["Kildare^James^^Dr.", "Quinn^Michaela^^Dr.", "Welby^Marcus^^Dr.", "Zhivago^Yuri^^Dr.", ""]
_PERFORMING = ["House^Gregory", "Grey^Meredith", "Ross^Doug", "Carter^John"]
_OPERATORS = ["Tech^Alex", "Tech^Sam", "Rivera^Jo", "Nguyen^Lee"]

# modality -> equipment (manufacturer, model, software, station prefix, field strength for MR)
_Equipment = tuple[str, str, str, str, str | None]
_EQUIPMENT: dict[str, list[_Equipment]] = {
    "CT": [("SIEMENS", "SOMATOM Definition AS+", "syngo CT VA48A", "CTAWP", None),
           ("GE MEDICAL SYSTEMS", "Revolution CT", "revo_ct_22BC.1", "CT", None)],
    "MR": [("SIEMENS", "MAGNETOM Skyra", "syngo MR E11", "MRC", "3"),
           ("Philips Medical Systems", "Ingenia", "5.4.1", "MR", "1.5")],
    "MG": [("HOLOGIC, Inc.", "Selenia Dimensions", "1.10.3.7", "MG", None),
           ("GE HEALTHCARE", "Senographe Pristina", "ADS_57.10", "MAMMO", None)],
    "US": [("Philips Medical Systems", "EPIQ 7G", "7.0.5.424", "US", None),
           ("GE Healthcare", "LOGIQ E10", "R3.1.1", "LOGIQ", None)],
}

# modality -> protocols: (body part, study description, procedure code, [(series description, protocol)])
_Protocol = tuple[str, str, str, list[tuple[str, str]]]
_PROTOCOLS: dict[str, list[_Protocol]] = {
    "CT": [
        ("CHEST", "CT Chest with contrast", "CTCHC",
         [("Topogram 0.6 T20f", "Thorax^Routine"), ("Thorax 3.0 B31f", "Thorax^Routine"),
          ("Lung 1.0 B70f", "Thorax^Routine"), ("Mediastinum 5.0 B30f", "Thorax^Routine")]),
        ("ABDOMEN", "CT Abdomen Pelvis with contrast", "CTAPC",
         [("Topogram 0.6 T20f", "Abdomen^Routine"), ("Abdomen 5.0 B30f", "Abdomen^Routine"),
          ("Abdomen 1.0 B31f", "Abdomen^Routine"), ("Cor 3.0 B30f", "Abdomen^Routine")]),
        ("HEAD", "CT Head without contrast", "CTHNC",
         [("Topogram 0.6 T20f", "Head^Routine"), ("Head 5.0 H31s", "Head^Routine"),
          ("Head 0.75 H60s bone", "Head^Routine"), ("Sag 3.0 H31s", "Head^Routine")]),
    ],
    "MR": [
        ("HEAD", "MR Brain without contrast", "MRBRN",
         [("localizer", "localizer"), ("t2_tse_tra", "t2_tse_tra"), ("t2_flair_tra", "t2_flair_tra"),
          ("ep2d_diff_tra", "dwi_tra"), ("t1_mprage_sag", "t1_mprage_sag")]),
        ("KNEE", "MR Knee right", "MRKNR",
         [("localizer", "localizer"), ("pd_tse_fs_cor", "pd_tse_fs_cor"), ("pd_tse_fs_sag", "pd_tse_fs_sag"),
          ("t1_tse_cor", "t1_tse_cor")]),
        ("LSPINE", "MR Lumbar spine", "MRLSP",
         [("localizer", "localizer"), ("t2_tse_sag", "t2_tse_sag"), ("t1_tse_sag", "t1_tse_sag"),
          ("t2_tse_tra", "t2_tse_tra")]),
    ],
    "MG": [
        ("BREAST", "MG Screening Bilateral", "MGSCR", [("R CC", "Screening"), ("L CC", "Screening"),
                                                     ("R MLO", "Screening"), ("L MLO", "Screening")]),
    ],
    "US": [
        ("ABDOMEN", "US Abdomen complete", "USABD",
         [("Liver", "Abdomen"), ("Kidneys", "Abdomen"), ("Gallbladder", "Abdomen"), ("Spleen", "Abdomen")]),
        ("THYROID", "US Thyroid", "USTHY",
         [("Thyroid right lobe", "Thyroid"), ("Thyroid left lobe", "Thyroid"), ("Isthmus", "Thyroid")]),
    ],
}
_MG_VIEWS = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
_MG_VIEW_CODES = {"CC": ("R-10242", "cranio-caudal"), "MLO": ("R-10226", "medio-lateral oblique")}
_MG_ORIENTATION = {("R", "CC"): ["P", "L"], ("L", "CC"): ["A", "R"], ("R", "MLO"): ["P", "F"], ("L", "MLO"): ["A", "F"]}


# -- small helpers -------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["pacsflow-sampledata", *map(str, parts)]))


def _ds(x: float) -> str:
    """A DS string (<= 16 chars)."""
    return format(round(float(x), 4), "g")


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _tm(t: datetime) -> str:
    return t.strftime("%H%M%S")


def _charset(name: str) -> str:
    try:
        name.encode("latin-1")
        return "ISO_IR 100"
    except UnicodeEncodeError:
        return "ISO_IR 192"


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


@dataclass(frozen=True)
class _Patient:
    name: str
    patient_id: str
    birth_date: date
    sex: str
    weight: str
    size: str


def _make_patients(n: int, seed: int) -> list[_Patient]:
    rng = random.Random(f"pacsflow-sampledata:{seed}:patients")
    pool = _ASCII_NAMES + _LATIN1_NAMES + _UTF8_NAMES
    out: list[_Patient] = []
    used: set[str] = set()
    for p in range(n):
        # Guarantee both non-ASCII flavours: patient 0 Latin-1 (ISO_IR 100), patient 1 ISO_IR 192.
        family, given, sex = rng.choice(_LATIN1_NAMES if p == 0 else _UTF8_NAMES if p == 1 else pool)
        if rng.random() < 0.3:
            given2 = rng.choice(pool)[1]
            name = f"{family}^{given}^{given2}"
        else:
            name = f"{family}^{given}"
        while name in used:
            name = f"{name}^{rng.choice('ABCDEFGHJKLMNPRSTW')}" if name.count("^") < 2 else name + "I"
        used.add(name)
        birth = date(1935, 1, 1) + timedelta(days=rng.randrange(0, 365 * 70))
        out.append(_Patient(
            name=name,
            patient_id=f"PSYN{seed % 1000:03d}{p:05d}",
            birth_date=birth,
            sex=sex,
            weight=_ds(rng.uniform(50, 110)),
            size=_ds(rng.uniform(1.5, 1.95)),
        ))
    return out


def _age(birth: date, on: date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{max(years, 0):03d}Y"


# -- building datasets ---------------------------------------------------------------------------


def _study_dataset(patient: _Patient, study_uid: str, accession: str, study_id: str, start: datetime,
                   description: str, procedure_code: str, institution: tuple[str, str, str],
                   referring: str) -> Dataset:
    """Patient- and study-level attributes (shared by every instance of the study)."""
    ds = Dataset()
    ds.SpecificCharacterSet = _charset(patient.name)
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "ACME-HIS"
    ds.PatientBirthDate = _da(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.PatientAge = _age(patient.birth_date, start.date())
    ds.PatientWeight = patient.weight
    ds.PatientSize = patient.size
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _da(start.date())
    ds.StudyTime = _tm(start)
    ds.AccessionNumber = accession
    ds.StudyID = study_id
    ds.StudyDescription = description
    ds.ReferringPhysicianName = referring
    ds.InstitutionName = institution[0]
    ds.InstitutionAddress = institution[1]
    ds.InstitutionalDepartmentName = institution[2]
    ds.ProcedureCodeSequence = DicomSequence([_code_item(procedure_code, "99ACME", description)])
    return ds


def _private_block(ds: Dataset, patient_name: str, study_id: str, equipment_serial: str) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "ACME Workflow 4.2")
    block.add_new(0x02, "PN", patient_name)  # PHI in a private tag: de-id must drop the block
    block.add_new(0x03, "SH", study_id)
    block.add_new(0x04, "DS", "1.25")
    block.add_new(0x05, "LO", equipment_serial)


@dataclass
class _SeriesPlan:
    modality: str
    series_uid: str
    series_number: int
    description: str
    protocol_name: str
    body_part: str
    start: datetime  # series date/time
    n_instances: int
    equipment: _Equipment
    station_name: str
    device_serial: str
    performing: str
    operator: str
    frame_of_reference_uid: str
    request: tuple[str, str, str, str]  # requested procedure id, sps id, description, protocol code
    accession: str
    mpps_uid: str
    mg_view: tuple[str, str] | None
    burned_in: bool
    sop_uid_parts: tuple[object, ...]  # entropy for SOP instance UIDs


def _series_template(study: Dataset, plan: _SeriesPlan, rows: int, cols: int, rng: random.Random) -> Dataset:
    """Series-level attributes; instance-level ones are added per instance on a shallow copy."""
    ds = Dataset(dict(study._dict))  # shares study-level elements (never mutated afterwards)
    m = plan.modality
    manufacturer, model, software, *_ = plan.equipment
    ds.SOPClassUID = SOP_CLASSES[m]
    ds.Modality = m
    ds.SeriesInstanceUID = plan.series_uid
    ds.SeriesNumber = plan.series_number
    ds.SeriesDate = _da(plan.start.date())
    ds.SeriesTime = _tm(plan.start)
    ds.SeriesDescription = plan.description
    ds.ProtocolName = plan.protocol_name
    ds.BodyPartExamined = plan.body_part
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.SoftwareVersions = software
    ds.StationName = plan.station_name
    ds.DeviceSerialNumber = plan.device_serial
    ds.PerformingPhysicianName = plan.performing
    ds.OperatorsName = plan.operator
    rp_id, sps_id, rp_desc, proto_code = plan.request
    ras = Dataset()
    ras.AccessionNumber = plan.accession
    ras.RequestedProcedureID = rp_id
    ras.RequestedProcedureDescription = rp_desc
    ras.ScheduledProcedureStepID = sps_id
    ras.ScheduledProcedureStepDescription = rp_desc
    ras.ScheduledProtocolCodeSequence = DicomSequence([_code_item(proto_code, "99ACME", plan.protocol_name)])
    ds.RequestAttributesSequence = DicomSequence([ras])  # nested two deep
    ref_pps = Dataset()
    ref_pps.ReferencedSOPClassUID = MPPS_SOP_CLASS
    ref_pps.ReferencedSOPInstanceUID = plan.mpps_uid
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([ref_pps])
    ds.PerformedProcedureStepStartDate = ds.SeriesDate
    ds.PerformedProcedureStepStartTime = ds.SeriesTime
    ds.PerformedProcedureStepID = sps_id
    ds.PerformedProcedureStepDescription = rp_desc

    # Image pixel module
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    if m == "US":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    elif m == "MG":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 14, 13
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"

    _modality_attributes(ds, plan, cols, rng)
    return ds


# Values every generated series of a modality carries: fixed acquisition facts and display defaults.
_CROSS_SECTIONAL: dict[str, object] = {
    "PositionReferenceIndicator": "", "PatientPosition": "HFS",
    "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"], "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
}
_FIXED_ATTRIBUTES: dict[str, dict[str, object]] = {
    "CT": {**_CROSS_SECTIONAL, "DataCollectionDiameter": "500", "GantryDetectorTilt": "0", "RotationDirection": "CW",
           "RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU", "WindowCenter": "40",
           "WindowWidth": "400"},
    "MR": {**_CROSS_SECTIONAL, "SequenceVariant": ["SK", "SP"], "ScanOptions": "", "ImagedNucleus": "1H",
           "WindowCenter": "600", "WindowWidth": "1200"},
    "MG": {"ImageType": ["ORIGINAL", "PRIMARY"], "PresentationIntentType": "FOR PRESENTATION", "DetectorType": "DIRECT",
           "ImagerPixelSpacing": ["0.07", "0.07"], "PixelSpacing": ["0.065", "0.065"],
           "PixelIntensityRelationship": "LOG", "PixelIntensityRelationshipSign": -1, "BreastImplantPresent": "NO",
           "QualityControlImage": "NO", "BurnedInAnnotation": "NO", "WindowCenter": "2047", "WindowWidth": "4095",
           "VOILUTFunction": "SIGMOID"},
    "US": {},
}


def _modality_attributes(ds: Dataset, plan: _SeriesPlan, cols: int, rng: random.Random) -> None:
    """The modality's own attributes: the fixed ones above, then those drawn per series."""
    m = plan.modality
    for keyword, value in _FIXED_ATTRIBUTES[m].items():
        setattr(ds, keyword, value)
    if m in ("CT", "MR"):
        ds.FrameOfReferenceUID = plan.frame_of_reference_uid
        spacing = _ds(rng.choice([0.5, 0.625, 0.7, 0.8, 0.9765625]))
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = _ds(rng.choice([1.0, 3.0, 5.0]) if m == "CT" else rng.choice([3.0, 4.0, 5.0]))
    if m == "CT":
        ds.KVP = rng.choice(["100", "120", "140"])
        ds.XRayTubeCurrent = rng.randrange(80, 400)
        ds.ExposureTime = rng.randrange(500, 1000)
        ds.ConvolutionKernel = plan.description.split()[-1][:16]
        ds.ReconstructionDiameter = _ds(float(ds.PixelSpacing[0]) * cols)
        ds.TableHeight = _ds(rng.uniform(120, 180))
    elif m == "MR":
        ds.ScanningSequence = ["SE"] if "se" in plan.description else ["GR"]
        ds.MRAcquisitionType = "3D" if "mprage" in plan.description else "2D"
        ds.SequenceName = "*" + plan.protocol_name[:10]
        ds.RepetitionTime = _ds(rng.uniform(400, 9000))
        ds.EchoTime = _ds(rng.uniform(2, 120))
        ds.EchoTrainLength = rng.choice([1, 7, 15, 23])
        ds.FlipAngle = _ds(rng.choice([90, 150, 8]))
        ds.MagneticFieldStrength = plan.equipment[4] or "1.5"
        ds.ImagingFrequency = _ds(42.577 * float(ds.MagneticFieldStrength))
    elif m == "MG":
        _mammography_view(ds, plan.mg_view or ("R", "CC"))
        ds.KVP = _ds(rng.choice([28, 29, 30, 31]))
        ds.ExposureTime = rng.randrange(800, 1600)
        ds.BodyPartThickness = _ds(rng.uniform(35, 70))
        ds.CompressionForce = _ds(rng.uniform(60, 140))
    elif m == "US":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL" if plan.body_part == "ABDOMEN" else "SMALL PARTS", "0001"]
        ds.BurnedInAnnotation = "YES" if plan.burned_in else "NO"
        ds.TransducerData = rng.choice(["C5-1", "L12-5", "eL18-4"])


def _mammography_view(ds: Dataset, view: tuple[str, str]) -> None:
    lat, position = view
    code, meaning = _MG_VIEW_CODES[position]
    ds.Laterality = lat
    ds.ImageLaterality = lat
    ds.ViewPosition = position
    ds.ViewCodeSequence = DicomSequence([_code_item(code, "SRT", meaning)])
    ds.AnatomicRegionSequence = DicomSequence([_code_item("T-04000", "SRT", "Breast")])
    ds.PatientOrientation = _MG_ORIENTATION[(lat, position)]


def _pixels(m: str, rows: int, cols: int, base: np.ndarray, nprng: np.random.Generator) -> bytes:
    if m == "US":
        noise = nprng.integers(0, 40, size=(rows, cols), dtype=np.uint8)
        return (base.astype(np.uint8) + noise).tobytes()
    noise = nprng.integers(0, 200, size=(rows, cols), dtype=np.uint16)
    return (base + noise).astype("<u2").tobytes()


def _base_image(m: str, rows: int, cols: int, nprng: np.random.Generator) -> np.ndarray:
    """A disc phantom per series (values within BitsStored after noise is added)."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = rows / 2 + nprng.uniform(-3, 3), cols / 2 + nprng.uniform(-3, 3)
    r = min(rows, cols) * nprng.uniform(0.3, 0.45)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    if m == "US":
        return np.where(disc, 120, 20).astype(np.uint8)
    hi = {"CT": 1100, "MR": 900, "MG": 9000}[m]
    return np.where(disc, hi, 50).astype(np.uint16)


def _encode_elements(ds: Dataset, encodings: list[str]) -> dict[int, bytes]:
    """Each top-level element of ``ds`` encoded on its own (Explicit VR Little Endian)."""
    out: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem, encodings)
        out[int(elem.tag)] = fp.getvalue()
    return out


_LONG_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UN", "UR", "UT"}


def _el(tag: int, vr: str, value: bytes | str) -> bytes:
    """One Explicit VR Little Endian element (used for the few per-instance elements)."""
    raw = value.encode("ascii") if isinstance(value, str) else value
    if len(raw) % 2:
        raw += b"\0" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(raw)) + raw
    return head + struct.pack("<H", len(raw)) + raw


def _sq(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence with defined lengths; each item is the concatenation of its encoded elements."""
    body = b"".join(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(i)) + i for i in items)
    return _el(tag, "SQ", body)


def _ref_item(sop_class: str, sop_uid: str, extra: bytes = b"") -> bytes:
    return _el(0x00081150, "UI", sop_class) + _el(0x00081155, "UI", sop_uid) + extra


def _file_meta_bytes(sop_class: str, sop_uid: str) -> bytes:
    body = (
        _el(0x00020001, "OB", b"\x00\x01")
        + _el(0x00020002, "UI", sop_class)
        + _el(0x00020003, "UI", sop_uid)
        + _el(0x00020010, "UI", ExplicitVRLittleEndian)
        + _el(0x00020012, "UI", IMPLEMENTATION_CLASS_UID)
        + _el(0x00020013, "SH", IMPLEMENTATION_VERSION)
    )
    return _el(0x00020000, "UL", struct.pack("<I", len(body))) + body


def _write_series(study: Dataset, plan: _SeriesPlan, study_dir: Path, rows: int, cols: int,
                  rng: random.Random, nprng: np.random.Generator,
                  reference: tuple[str, str] | None) -> list[str]:
    """Write one series; returns its SOP Instance UIDs.

    ``reference`` is another instance of the study that every instance points at through
    ReferencedImageSequence (like slices referencing a localizer).

    Speed: the series-level elements are encoded once by pydicom; per instance only ~14 simple
    elements (UIDs, dates, positions, references, pixels) are encoded by hand, and all are joined
    in tag order into a Part 10 file (~0.3 ms each). The tests read every file back with pydicom
    and dcmdump.
    """
    template = _series_template(study, plan, rows, cols, rng)
    template.AcquisitionNumber = 1
    _private_block(template, str(study.PatientName), str(study.StudyID), plan.device_serial)
    encodings = convert_encodings(template.get("SpecificCharacterSet", "ISO_IR 6"))
    shared = _encode_elements(template, encodings)

    sop_class = SOP_CLASSES[plan.modality]
    series_dir = study_dir / plan.series_uid
    series_dir.mkdir(parents=True, exist_ok=True)
    base = _base_image(plan.modality, rows, cols, nprng)
    thickness = float(template.SliceThickness) if "SliceThickness" in template else 0.0
    spacing = float(template.PixelSpacing[0]) if "PixelSpacing" in template else 1.0
    pixel_vr = "OB" if plan.modality == "US" else "OW"
    ref_seq = _sq(0x00081140, [_ref_item(*reference)]) if reference is not None else b""
    purpose = _sq(0x0040A170, [_el(0x00080100, "SH", "121322") + _el(0x00080102, "SH", "DCM")
                               + _el(0x00080104, "LO", "Source image for image processing operation")])
    z0 = rng.uniform(-50, 50)
    sop_uids: list[str] = []
    prev: str | None = None
    for k in range(plan.n_instances):
        sop_uid = _uid(*plan.sop_uid_parts, k)
        t = plan.start + timedelta(seconds=2 * k + 1, microseconds=rng.randrange(0, 999_999))
        da, tm = _da(t.date()), t.strftime("%H%M%S.%f")
        own = {
            0x00080012: _el(0x00080012, "DA", da),  # InstanceCreationDate
            0x00080013: _el(0x00080013, "TM", t.strftime("%H%M%S")),
            0x00080018: _el(0x00080018, "UI", sop_uid),  # SOPInstanceUID
            0x00080022: _el(0x00080022, "DA", da),  # AcquisitionDate
            0x00080023: _el(0x00080023, "DA", da),  # ContentDate
            0x0008002A: _el(0x0008002A, "DT", t.strftime("%Y%m%d%H%M%S.%f")),  # AcquisitionDateTime
            0x00080032: _el(0x00080032, "TM", tm),  # AcquisitionTime
            0x00080033: _el(0x00080033, "TM", tm),  # ContentTime
            0x00200013: _el(0x00200013, "IS", str(k + 1)),  # InstanceNumber
        }
        if plan.modality in ("CT", "MR"):
            z = z0 - k * thickness
            ipp = "\\".join((_ds(-(cols / 2) * spacing), _ds(-(rows / 2) * spacing), _ds(z)))
            own[0x00200032] = _el(0x00200032, "DS", ipp)  # ImagePositionPatient
            own[0x00201041] = _el(0x00201041, "DS", _ds(z))  # SliceLocation
        if reference is not None and reference[1] != sop_uid:
            own[0x00081140] = ref_seq  # ReferencedImageSequence
        if plan.modality == "MR" and prev is not None:
            own[0x00082112] = _sq(0x00082112, [_ref_item(sop_class, prev, purpose)])  # SourceImageSequence
        own[0x7FE00010] = _el(0x7FE00010, pixel_vr, _pixels(plan.modality, rows, cols, base, nprng))

        elements = {**shared, **own}
        path = series_dir / f"{sop_uid}.dcm"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"\0" * 128 + b"DICM" + _file_meta_bytes(sop_class, sop_uid)
                    + b"".join(elements[tag] for tag in sorted(elements)))
        os.replace(tmp, path)
        sop_uids.append(sop_uid)
        prev = sop_uid
    return sop_uids


def _plan_series(modality: str, protocol: _Protocol, equipment: _Equipment, rng: random.Random, seed: int,
                 study_key: tuple[object, ...], series_uid: str, series_number: int, series_index: int,
                 start: datetime, n_instances: int, accession: str, study_id: str, for_uid: str,
                 institution_code: str) -> _SeriesPlan:
    body_part, description, proc_code, series_list = protocol
    sdesc, pname = series_list[series_index % len(series_list)]
    mg_view = _MG_VIEWS[series_index % len(_MG_VIEWS)] if modality == "MG" else None
    return _SeriesPlan(
        modality=modality,
        series_uid=series_uid,
        series_number=series_number,
        description=sdesc,
        protocol_name=pname,
        body_part=body_part,
        start=start,
        n_instances=n_instances,
        equipment=equipment,
        station_name=f"{equipment[3]}{institution_code}{rng.randrange(1, 4):02d}"[:16],
        device_serial=str(10000 + (_stable_hash(equipment[1]) % 90000)),
        performing=rng.choice(_PERFORMING),
        operator=rng.choice(_OPERATORS),
        frame_of_reference_uid=for_uid,
        request=(f"RP{study_id}", f"SPS{study_id}", description, proc_code),
        accession=accession,
        mpps_uid=_uid(seed, *study_key, "mpps", series_number),
        mg_view=mg_view,
        burned_in=(modality == "US" and (series_index == 0 or rng.random() < 0.3)),
        sop_uid_parts=(seed, *study_key, "sop", series_number),
    )


def _stable_hash(s: str) -> int:
    """Stable (process-independent) small hash."""
    h = 0
    for ch in s.encode():
        h = (h * 131 + ch) % 1_000_003
    return h


# -- public API ----------------------------------------------------------------------------------


def _check_generate_args(studies: int, days: int, modalities: Sequence[str], series_per_study: tuple[int, int],
                         instances_per_series: tuple[int, int], n_patients: int) -> None:
    if studies < 0 or days < 1:
        raise ValueError("studies must be >= 0 and days >= 1")
    unknown = [m for m in modalities if m not in SOP_CLASSES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {sorted(SOP_CLASSES)}")
    (lo_s, hi_s), (lo_i, hi_i) = series_per_study, instances_per_series
    if not (1 <= lo_s <= hi_s and 1 <= lo_i <= hi_i):
        raise ValueError("series_per_study / instances_per_series must be ranges (lo, hi) with 1 <= lo <= hi")
    if n_patients < 1:
        raise ValueError("patients must be >= 1")


def generate(
    out_dir: Path,
    studies: int = 12,
    series_per_study: tuple[int, int] = (2, 4),
    instances_per_series: tuple[int, int] = (3, 12),
    patients: int | None = None,
    days: int = 10,
    end_date: date | None = None,
    seed: int = 0,
    modalities: Sequence[str] = ("CT", "MR", "MG", "US"),
    rows: int = 64,
    cols: int = 64,
) -> list[StudySummary]:
    """Write ``studies`` synthetic studies under ``out_dir``; deterministic for a given seed and end_date.

    Studies are spread evenly over the ``days`` days ending ``end_date`` (default today), shared
    among ``patients`` patients (default ``studies // 3``, at least 1) and among ``modalities``.
    Ranges are inclusive.
    """
    n_patients = patients if patients is not None else max(1, studies // 3)
    _check_generate_args(studies, days, modalities, series_per_study, instances_per_series, n_patients)
    lo_s, hi_s = series_per_study
    lo_i, hi_i = instances_per_series
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    end_date = end_date or date.today()
    people = _make_patients(n_patients, seed)

    top = random.Random(f"pacsflow-sampledata:{seed}:assign")
    patient_of = [i % n_patients for i in range(studies)]
    day_of = [i % days for i in range(studies)]
    modality_of = [modalities[i % len(modalities)] for i in range(studies)]
    top.shuffle(patient_of)
    top.shuffle(day_of)
    top.shuffle(modality_of)

    t0 = time.perf_counter()
    summaries: list[StudySummary] = []
    for i in range(studies):
        rng = random.Random(f"pacsflow-sampledata:{seed}:study:{i}")
        nprng = np.random.default_rng([seed & 0xFFFFFFFF, i])
        patient = people[patient_of[i]]
        modality = modality_of[i]
        study_date = end_date - timedelta(days=day_of[i])
        start = datetime.combine(study_date, datetime.min.time()) + timedelta(
            seconds=rng.randrange(7 * 3600, 19 * 3600))
        study_uid = _uid(seed, "study", i)
        accession = f"A{seed % 100:02d}{int(_uid(seed, 'acc', i).rsplit('.', 1)[-1][:7]):07d}"[:16]
        study_id = str(rng.randrange(1000, 99999))
        inst_idx = rng.randrange(len(_INSTITUTIONS))
        institution = _INSTITUTIONS[inst_idx]
        protocol = rng.choice(_PROTOCOLS[modality])
        equipment = rng.choice(_EQUIPMENT[modality])
        study = _study_dataset(patient, study_uid, accession, study_id, start, protocol[1], protocol[2],
                               institution, rng.choice(_REFERRING))
        study_dir = out_dir / study_uid
        for_uid = _uid(seed, "for", i)
        n_series = rng.randint(lo_s, hi_s)
        reference: tuple[str, str] | None = None
        series_uids: list[str] = []
        total = 0
        for j in range(n_series):
            series_uid = _uid(seed, "series", i, j)
            plan = _plan_series(modality, protocol, equipment, rng, seed, ("s", i), series_uid, j + 1, j,
                                start + timedelta(minutes=3 * j), rng.randint(lo_i, hi_i), accession,
                                study_id, for_uid, str(inst_idx))
            if reference is None:
                # Every other instance of the study references its first one (slices -> localizer).
                reference = (SOP_CLASSES[modality], _uid(*plan.sop_uid_parts, 0))
            sops = _write_series(study, plan, study_dir, rows, cols, rng, nprng, reference)
            series_uids.append(series_uid)
            total += len(sops)
        summaries.append(StudySummary(study_uid, patient.patient_id, study_date, modality, n_series, total,
                                      study_dir, tuple(series_uids)))
    n_inst = sum(s.n_instances for s in summaries)
    log.info("generated %d studies, %d instances, %d patients in %.1f s under %s",
             len(summaries), n_inst, n_patients, time.perf_counter() - t0, out_dir)
    return summaries


_STUDY_LEVEL = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "ProcedureCodeSequence",
)


def add_series(
    study: Path | StudySummary,
    out_dir: Path,
    *,
    instances: int = 4,
    modality: str | None = None,
    series_date: date | None = None,
    seed: int = 0,
    rows: int = 64,
    cols: int = 64,
) -> SeriesSummary:
    """Add a new series to an existing study (same StudyInstanceUID, same patient).

    ``study`` is a study directory written by :func:`generate` (``<root>/<study_uid>``) or its
    summary. The series is written to ``out_dir/<study_uid>/<series_uid>/`` (``out_dir`` may be
    the original root or another one, e.g. a "new arrivals" folder). Its SeriesNumber is one more
    than the highest in the study; its date defaults to the study date (pass ``series_date`` for
    "a new series arriving today"). Every new instance references an existing instance of the study.
    """
    study_dir = Path(study.path if isinstance(study, StudySummary) else study)
    series_dirs = sorted(p for p in study_dir.iterdir() if p.is_dir())
    firsts = [files[0] for d in series_dirs if (files := sorted(d.glob("*.dcm")))]
    if not firsts:
        raise ValueError(f"no DICOM files under study directory {study_dir.name}")
    headers = [dcmread(f, stop_before_pixels=True) for f in firsts]
    src = headers[0]
    study_ds = Dataset()
    for kw in _STUDY_LEVEL:
        if kw in src:
            study_ds[kw] = src[kw]
    study_uid = str(src.StudyInstanceUID)
    modality = modality or str(src.Modality)
    if modality not in SOP_CLASSES:
        raise ValueError(f"unsupported modality {modality!r}")
    series_number = max(int(h.get("SeriesNumber", 0) or 0) for h in headers) + 1
    key = ("added", study_uid, series_number)
    rng = random.Random(f"pacsflow-sampledata:{seed}:{study_uid}:{series_number}")
    nprng = np.random.default_rng([seed & 0xFFFFFFFF, _stable_hash(study_uid), series_number])

    body_part = str(src.get("BodyPartExamined", ""))
    protocols = _PROTOCOLS[modality]
    protocol = next((p for p in protocols if p[0] == body_part), protocols[0])
    equipment = next((e for e in _EQUIPMENT[modality] if e[0] == src.get("Manufacturer")), _EQUIPMENT[modality][0])
    day = series_date or datetime.strptime(str(src.StudyDate), "%Y%m%d").date()
    start = datetime.combine(day, datetime.min.time()) + timedelta(seconds=rng.randrange(7 * 3600, 19 * 3600))
    series_uid = _uid(seed, *key, "series")
    for_uid = str(src.get("FrameOfReferenceUID", "")) or _uid(seed, *key, "for")
    plan = _plan_series(modality, protocol, equipment, rng, seed, key, series_uid, series_number,
                        series_number - 1, start, instances, str(src.get("AccessionNumber", "")),
                        str(src.get("StudyID", "")), for_uid, "0")
    reference = (str(src.SOPClassUID), str(src.SOPInstanceUID))
    sops = _write_series(study_ds, plan, Path(out_dir) / study_uid, rows, cols, rng, nprng, reference)
    log.info("added series %s (%d instances) to study %s", series_uid, len(sops), study_uid)
    return SeriesSummary(study_uid, series_uid, str(src.PatientID), modality, day, len(sops),
                         Path(out_dir) / study_uid / series_uid, tuple(sops))


class LoadError(RuntimeError):
    """storescu failed to send some files."""


def load(
    paths: Path | str | Iterable[Path | str],
    host: str = "127.0.0.1",
    port: int = 4242,
    called_ae: str = "ORTHANC",
    calling_ae: str = "SEEDER",
    timeout_s: float | None = None,
) -> int:
    """Push DICOM files (``*.dcm`` files and directories, scanned recursively) with DCMTK storescu.

    One storescu run (one association) per batch of arguments. Raises :class:`LoadError` if
    storescu exits non-zero or reports a failed store. Returns the number of files sent.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs: list[Path] = []
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"not found: {p}")
    n_dir_files = sum(1 for d in dirs for _ in d.rglob("*.dcm"))
    total = n_dir_files + len(files)
    if total == 0:
        return 0
    env = dict(os.environ, TCP_NODELAY="1")
    base = ["storescu", "-aet", calling_ae, "-aec", called_ae, "--required", "+sd", "+r", "+sp", "*.dcm"]
    if timeout_s is not None:
        base += ["-to", str(int(timeout_s)), "-ta", str(int(timeout_s))]
    batches: list[list[str]] = []
    if dirs:
        batches.append([str(d) for d in dirs])
    for i in range(0, len(files), 500):
        batches.append([str(f) for f in files[i:i + 500]])
    t0 = time.perf_counter()
    for batch in batches:
        cmd = [*base, host, str(port), *batch]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
        failed = [ln for ln in proc.stderr.splitlines() if ln.startswith(("E:", "F:"))]
        if proc.returncode != 0 or failed:
            tail = "\n".join((failed or proc.stderr.splitlines())[-10:])
            raise LoadError(f"storescu to {called_ae}@{host}:{port} exited {proc.returncode}:\n{tail}")
    dt = time.perf_counter() - t0
    log.info("sent %d files to %s@%s:%d in %.1f s (%.0f files/s)", total, called_ae, host, port, dt,
             total / dt if dt else 0.0)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.local.sampledata",
                                     description="Generate synthetic DICOM studies or push them to a PACS.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write synthetic studies")
    g.add_argument("out", type=Path)
    g.add_argument("--studies", type=int, default=12)
    g.add_argument("--series", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    g.add_argument("--instances", type=int, nargs=2, default=(3, 12), metavar=("MIN", "MAX"))
    g.add_argument("--patients", type=int, default=None)
    g.add_argument("--days", type=int, default=10)
    g.add_argument("--end-date", type=date.fromisoformat, default=None, help="YYYY-MM-DD (default today)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--modalities", default="CT,MR,MG,US")
    g.add_argument("--rows", type=int, default=64)
    g.add_argument("--cols", type=int, default=64)
    ld = sub.add_parser("load", help="push files with storescu")
    ld.add_argument("paths", type=Path, nargs="+")
    ld.add_argument("--host", default="127.0.0.1")
    ld.add_argument("--port", type=int, default=4242)
    ld.add_argument("--aec", default="ORTHANC", help="called AE title")
    ld.add_argument("--aet", default="SEEDER", help="calling AE title")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        generate(args.out, studies=args.studies, series_per_study=tuple(args.series),
                 instances_per_series=tuple(args.instances), patients=args.patients, days=args.days,
                 end_date=args.end_date, seed=args.seed,
                 modalities=tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip()),
                 rows=args.rows, cols=args.cols)
        return 0
    try:
        load(args.paths, host=args.host, port=args.port, called_ae=args.aec, calling_ae=args.aet)
    except (LoadError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
