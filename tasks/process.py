"""Staged originals → de-identified Part 10 files in the lake + catalog rows, for one study.

Plain functions (no Prefect, no sockets). Each instance is parsed once: the same in-memory
Dataset is de-identified, encoded, stored and then read for the catalog row.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tasks.deid import DeidReport, Deidentifier, file_meta_for
from tasks.deid_audit import audit_or_raise
from tasks.errors import BadDicom, DeidentificationError
from tasks.extract import StudyExtractor
from tasks.storage import LakeStorage

log = logging.getLogger(__name__)

TABLES = ("studies", "series", "instances")


@dataclass
class StudyOutcome:
    pseudo_uid: str
    written: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    actions: dict[str, int] = field(default_factory=dict)
    rows_dir: str | None = None
    bytes_written: int = 0


def _quarantine(src: Path, quarantine_dir: Path, pseudo_uid: str) -> str:
    dest = quarantine_dir / pseudo_uid
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.move(str(src), dest / src.name)
    return src.name


def read_instance(path: Path) -> pydicom.Dataset:
    """Parse one staged object (with its pixels: they are written out again)."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise BadDicom(f"unreadable DICOM ({type(exc).__name__})") from None
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        raise BadDicom("missing SOP/Study/Series Instance UID")
    return ds


def deidentify_dataset(ds: pydicom.Dataset, deid: Deidentifier, report: DeidReport) -> pydicom.Dataset:
    """Apply the pixel policy and the profile in place; any failure is a typed, PHI-free error."""
    try:
        deid.apply(ds, report)
        file_meta_for(ds)
    except DeidentificationError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, LookupError, NotImplementedError) as exc:
        # Unknown character sets and malformed values surface here: never export half-cleaned.
        raise DeidentificationError(f"de-identification failed ({type(exc).__name__})") from None
    return ds


def deidentify_file(path: Path, deid: Deidentifier, report: DeidReport) -> pydicom.Dataset:
    """Parse once, apply the pixel policy and the profile; the Dataset keeps (in memory only)
    the original identifying values for the residual-PHI audit in ``encode``."""
    return deidentify_dataset(read_instance(path), deid, report)


def encode(ds: pydicom.Dataset, audit: bool = True) -> bytes:
    """Encode as Part 10; then, if the de-identifier kept the originals, audit the bytes for
    residual identifying values (a hit raises ``ResidualPHIError``, a DeidentificationError)."""
    try:
        data = _part10(ds)
    except (ValueError, TypeError, AttributeError, LookupError, OverflowError, NotImplementedError) as exc:
        raise DeidentificationError(f"cannot encode de-identified object ({type(exc).__name__})") from None
    if audit:
        audit_or_raise(data, getattr(ds, "_deid_originals", None))
    return data


PIXEL_DATA = 0x7FE00010


_META_VRS = {0x00020001: "OB", 0x00020002: "UI", 0x00020003: "UI", 0x00020010: "UI", 0x00020012: "UI",
             0x00020013: "SH"}


def _meta_bytes(meta) -> bytes | None:
    """The file meta group as ``write_file_meta_info`` encodes it (explicit VR little endian,
    group length first), for the elements the de-identifier writes; None for anything else."""
    if any(int(t) not in _META_VRS and int(t) != 0x00020000 for t in meta.keys()):
        return None
    body = bytearray()
    for tag in sorted(int(t) for t in meta.keys()):
        if tag == 0x00020000:
            continue
        value = meta[tag].value
        vr = _META_VRS[tag]
        if vr == "OB":
            raw = bytes(value)
            raw += b"\x00" * (len(raw) & 1)
            body += struct.pack("<HH2sHI", 2, tag & 0xFFFF, b"OB", 0, len(raw)) + raw
            continue
        raw = str(value).encode("ascii")
        if len(raw) & 1:
            raw += b"\x00" if vr == "UI" else b" "
        body += struct.pack("<HH2sH", 2, tag & 0xFFFF, vr.encode(), len(raw)) + raw
    if 0x00020001 not in meta:
        body = bytearray(struct.pack("<HH2sHI", 2, 1, b"OB", 0, 2) + b"\x00\x01") + body
    return struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + bytes(body)


def _meta_by_pydicom(meta) -> bytes:
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _part10(ds: pydicom.Dataset) -> bytes:
    """Part 10 bytes: preamble, DICM, the file meta and the dataset. What ``save_as(...,
    enforce_file_format=True)`` writes, without its deep copy of the file meta (a fifth of the
    time per object); deflated and unusual transfer syntaxes go through ``save_as``."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if (
        ts is None
        or ts == DeflatedExplicitVRLittleEndian
        or not ts.is_transfer_syntax
        or meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID")
        or meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID")
        or not meta.get("MediaStorageSOPClassUID")
    ):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    pixels = ds._dict.get(PIXEL_DATA)
    if pixels is not None and not pixels.is_raw:
        pixels.is_undefined_length = ts.is_compressed  # as dcmwrite does
    fp = DicomBytesIO()
    preamble = getattr(ds, "preamble", None)
    fp.write(preamble if preamble and len(preamble) == 128 else b"\x00" * 128)
    fp.write(b"DICM")
    fp.write(_meta_bytes(meta) or _meta_by_pydicom(meta))
    fp.is_implicit_VR = ts.is_implicit_VR
    fp.is_little_endian = ts.is_little_endian
    write_dataset(fp, ds)
    return fp.getvalue()


def process_study(
    staged: Path,
    pseudo_uid: str,
    deid: Deidentifier,
    storage: LakeStorage,
    quarantine_dir: Path,
    rows_dir: Path,
) -> StudyOutcome:
    """De-identify, store and extract every staged object of one study.

    Objects that cannot be read or de-identified are moved to quarantine with a reason; the
    rest of the study goes on. Row tables are written to ``rows_dir`` for the catalog commit.
    """
    outcome = StudyOutcome(pseudo_uid)
    report = DeidReport()
    extractor = StudyExtractor()
    for path in sorted(p for p in staged.iterdir() if p.suffix == ".dcm" and not p.name.startswith(".")):
        try:
            ds = deidentify_file(path, deid, report)
            data = encode(ds)
        except (BadDicom, DeidentificationError) as exc:
            outcome.quarantined.append((_quarantine(path, quarantine_dir, pseudo_uid), str(exc)))
            continue
        rel = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        url = storage.put(rel, data)
        extractor.add(ds, file_path=url, file_size=len(data), sha256=hashlib.sha256(data).hexdigest())
        outcome.written += 1
        outcome.bytes_written += len(data)
    outcome.actions = report.actions
    if outcome.written:
        tables = extractor.tables()
        rows_dir.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            tmp = rows_dir / f".{name}.parquet.part"
            pq.write_table(tables[name], tmp)
            os.replace(tmp, rows_dir / f"{name}.parquet")
        outcome.rows_dir = str(rows_dir)
    return outcome


def read_rows(rows_dirs: list[str]) -> dict[str, pa.Table]:
    """Concatenate the per-study row files written by ``process_study``."""
    out: dict[str, pa.Table] = {}
    for name in TABLES:
        parts = [pq.read_table(Path(d) / f"{name}.parquet") for d in rows_dirs]
        out[name] = pa.concat_tables(parts) if parts else None  # type: ignore[assignment]
    return out
