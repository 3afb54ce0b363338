"""What a received object must be before we de-identify and catalog it.

Cheap checks on the parsed object, before any value is converted: the pixel data is as long as its
image attributes say, the image attributes that must be there are, and number, date and time values
parse. A failing object is quarantined with the first problem found (names of attributes, never
values); the rest of its study goes on.
"""

from __future__ import annotations

import re
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.tag import BaseTag

from pacsflow.tasks.core.values import int_or_none, items_of

PIXEL_DATA = BaseTag(0x7FE00010)

# Type 1 attributes of the Image Pixel module (PS3.3 C.7.6.3): an object with pixels lacks none of them.
IMAGE_PIXEL_TYPE_1 = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                      "BitsStored", "HighBit", "PixelRepresentation")

# PS3.5 6.2 value formats, one value each (multiple values are split on the backslash first). Dates
# and times also in the ACR-NEMA forms (1997.04.24, 10:30:00) that PS3.5 keeps readable.
_FORMATS = {
    "DS": re.compile(rb"^ *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)? *$"),
    "IS": re.compile(rb"^ *[+-]?\d+ *$"),
    "DA": re.compile(rb"^(\d{4}(\.?)(0[1-9]|1[0-2])\2(0[1-9]|[12]\d|3[01]))? *$"),
    "TM": re.compile(rb"^(([01]\d|2[0-3])(:?)([0-5]\d(\3[0-5]\d(\.\d{1,6})?)?)?)? *$"),
}
# Samples stored per pixel where the chroma is subsampled (PS3.3 C.7.6.3.1.2): two, not three.
_STORED_SAMPLES = {"YBR_FULL_422": 2}


def problems(ds: Dataset) -> str | None:
    """The first reason not to export ``ds``, or None when it passes every check."""
    return _pixel_problem(ds) or _value_problem(ds)


def _pixel_problem(ds: Dataset) -> str | None:
    if PIXEL_DATA not in ds._dict:
        return None
    missing = [k for k in IMAGE_PIXEL_TYPE_1 if k not in ds]
    if missing:
        return "pixel data without " + ", ".join(missing)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or syntax.is_compressed:
        return None  # encapsulated frames have no fixed length to check
    try:
        frames = int_or_none(ds.get("NumberOfFrames", 1)) or 1
        samples = _STORED_SAMPLES.get(str(ds.PhotometricInterpretation), int(ds.SamplesPerPixel))
        bits = int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.BitsAllocated)
    except (TypeError, ValueError, BytesLengthException):
        return "image attributes (Rows, Columns, SamplesPerPixel, BitsAllocated) that are not numbers"
    expected = (bits + 7) // 8
    actual = len(ds._dict[PIXEL_DATA].value or b"")
    if actual < expected:
        return f"pixel data shorter than Rows x Columns x SamplesPerPixel x frames x BitsAllocated ({actual} of {expected} bytes)"
    return None


def _value_problem(ds: Dataset) -> str | None:
    for tag, elem in ds._dict.items():
        vr = elem.VR
        pattern = _FORMATS.get(vr or "")
        if pattern is None:
            continue
        raw = _raw_bytes(elem)
        if raw is None:
            continue
        for value in raw.rstrip(b"\x00 ").split(b"\\"):
            if value and not pattern.match(value):
                return f"unparseable {vr} value in ({tag.group:04X},{tag.element:04X}) {keyword_for_tag(tag)}".rstrip()
    return None


def _raw_bytes(elem: Any) -> bytes | None:
    """The element's value as encoded: raw elements are checked without converting them."""
    value = elem.value
    if isinstance(value, bytes):
        return value
    if value is None:
        return None
    return "\\".join(str(getattr(v, "original_string", v)) for v in items_of(value)).encode("ascii", "replace")
