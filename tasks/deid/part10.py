"""A dataset encoded as pydicom's ``write_dataset`` encodes it, with its element loop made cheap.

De-identification leaves most elements as they were read (raw, in their original encoding), and
pydicom spends most of its writing time on per-element bookkeeping for exactly those: a buffer,
a context manager and a dozen attribute lookups per element. Here a raw element of a dataset
written in its own encoding is copied with one ``struct.pack`` for its header; everything else
(converted values, encapsulated pixel data, values over 64 KiB in a 16-bit length, a dataset
whose encoding or character set changed) goes through pydicom's own writer. The output is
byte for byte pydicom's (``tests/unit/test_deid_part10.py`` compares them on every sample file).
"""

from __future__ import annotations

import struct

from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.filewriter import write_dataset as pydicom_write_dataset
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_UNDEFINED = 0xFFFFFFFF
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)


def write_dataset(fp: DicomBytesIO, ds: Dataset, parent_encoding: str | list[str] = "iso8859") -> None:
    """Write ``ds`` to ``fp`` (little endian, ``fp.is_implicit_VR`` set) as pydicom would."""
    implicit = fp.is_implicit_VR
    if (
        not fp.is_little_endian
        or ds.original_encoding != (implicit, True)
        or ds.original_character_set != ds._character_set
    ):
        pydicom_write_dataset(fp, ds, parent_encoding)  # pydicom converts what it must re-encode
        return
    encoding = ds.get("SpecificCharacterSet", parent_encoding)
    d = ds._dict
    for tag in sorted(d):
        t = int(tag)
        if not t & 0xFFFF and t >> 16 > 6:
            continue  # retired group length, never written
        elem = d[tag]
        if elem.__class__ is RawDataElement:
            if elem.value is None:
                elem = ds[tag]  # as pydicom's get_item: a raw element without a value is converted
            elif _write_raw(fp, t, elem, implicit):
                continue
        if elem.VR == "SQ" and elem.__class__ is not RawDataElement:
            _write_sequence(fp, t, elem, convert_encodings(encoding or ["iso8859"]), implicit)
        else:
            write_data_element(fp, elem, encoding)


def _write_raw(fp: DicomBytesIO, t: int, elem: RawDataElement, implicit: bool) -> bool:
    """Copy a raw element as read; False when pydicom's writer must handle it."""
    if elem.length == _UNDEFINED:
        return False  # encapsulated pixel data or an unparsed sequence: delimiters to write
    value = elem.value
    if value is None:
        return False
    n = len(value)
    if implicit:
        fp.write(struct.pack("<HHI", t >> 16, t & 0xFFFF, n))
    else:
        vr = elem.VR
        if not vr or len(vr) != 2:
            return False
        if vr in _LONG_VRS:
            fp.write(struct.pack("<HH2sHI", t >> 16, t & 0xFFFF, vr.encode("ascii"), 0, n))
        elif n <= 0xFFFF:
            fp.write(struct.pack("<HH2sH", t >> 16, t & 0xFFFF, vr.encode("ascii"), n))
        else:
            return False  # pydicom rewrites it as UN, with a warning
    fp.write(value)
    return True


def _write_sequence(fp: DicomBytesIO, t: int, elem: object, encoding: list[str], implicit: bool) -> None:
    """A sequence whose items are Datasets, each written by :func:`write_dataset`."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    for item in elem.value or ():  # type: ignore[attr-defined]
        start = body.tell()
        body.write(_ITEM)
        write_dataset(body, item, encoding)
        if getattr(item, "is_undefined_length_sequence_item", False):
            body.write(_ITEM_DELIMITER)
        else:
            end = body.tell()
            body.seek(start + 4)
            body.write(struct.pack("<I", end - start - 8))
            body.seek(end)
    undefined = elem.is_undefined_length  # type: ignore[attr-defined]
    length = _UNDEFINED if undefined else body.tell()
    if implicit:
        fp.write(struct.pack("<HHI", t >> 16, t & 0xFFFF, length))
    else:
        fp.write(struct.pack("<HH2sHI", t >> 16, t & 0xFFFF, b"SQ", 0, length))
    fp.write(body.getvalue())
    if undefined:
        fp.write(_SEQUENCE_DELIMITER)
