"""One object: read a staged original, de-identify it, encode it as Part 10, audit the bytes.

The single read-and-de-identify path, used by the nightly flow (:mod:`pacsflow.tasks.lake.study`)
and by ``pacsflow deidentify`` (:mod:`.folder`). Plain functions: no Prefect, no sockets.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacsflow.tasks.core.errors import BadDicom, DeidentificationError
from pacsflow.tasks.deid import part10
from pacsflow.tasks.deid.audit import audit_or_raise
from pacsflow.tasks.deid.validation import problems
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier, Originals


def read_instance(path: Path) -> pydicom.Dataset:
    """Parse one staged object (with its pixels: they are written out again)."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise BadDicom(f"unreadable DICOM ({type(exc).__name__}); check the object at its source (the PACS)") from None
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        raise BadDicom("missing SOP/Study/Series Instance UID; check the object at its source (the PACS)")
    problem = problems(ds)
    if problem:
        raise BadDicom(problem)
    return ds


def deidentify_dataset(ds: pydicom.Dataset, deid: Deidentifier, report: DeidReport) -> Originals | None:
    """Apply the pixel policy and the profile in place; returns the original identifying values
    for ``encode`` to audit (None when ``deid`` does not audit). Any failure is a typed,
    PHI-free error."""
    try:
        return deid.apply(ds, report)
    except DeidentificationError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, LookupError, NotImplementedError,
            BytesLengthException) as exc:
        # Unknown character sets and malformed values surface here: never export half-cleaned.
        raise DeidentificationError(f"de-identification failed ({type(exc).__name__}); the original is in "
                                    "quarantine_dir: check its character set and values") from None


def deidentify_file(path: Path, deid: Deidentifier, report: DeidReport) -> tuple[pydicom.Dataset, Originals | None]:
    """Parse once, apply the pixel policy and the profile: the de-identified Dataset and the
    original identifying values (in memory only) for ``encode``."""
    ds = read_instance(path)
    return ds, deidentify_dataset(ds, deid, report)


def encode(ds: pydicom.Dataset, originals: Originals | None) -> bytes:
    """Encode as Part 10, then audit the bytes for the ``originals`` (from ``deidentify_*`` or
    ``Deidentifier.apply``; None skips the audit). A hit is located in ``ds`` and judged by the
    audit's rules (:mod:`.audit`); a leak raises ``ResidualPHIError``, a DeidentificationError."""
    try:
        data = _part10(ds)
    except (ValueError, TypeError, AttributeError, LookupError, OverflowError, NotImplementedError,
            BytesLengthException) as exc:
        raise DeidentificationError(f"cannot encode de-identified object ({type(exc).__name__}); the original is "
                                    "in quarantine_dir: check its values") from None
    audit_or_raise(data, originals, ds)
    return data


PIXEL_DATA = BaseTag(0x7FE00010)


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
        meta is None
        or ts is None
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
    if isinstance(pixels, DataElement):
        pixels.is_undefined_length = ts.is_compressed  # as dcmwrite does
    fp = DicomBytesIO()
    preamble = getattr(ds, "preamble", None)
    fp.write(preamble if preamble and len(preamble) == 128 else b"\x00" * 128)
    fp.write(b"DICM")
    fp.write(_meta_bytes(meta) or _meta_by_pydicom(meta))
    fp.is_implicit_VR = ts.is_implicit_VR
    fp.is_little_endian = ts.is_little_endian
    part10.write_dataset(fp, ds)
    return fp.getvalue()
