"""Every de-identified attribute of an instance as DICOM JSON (PS3.18 F.2), for the catalog.

The typed catalog columns hold what analysts query most; this text holds everything else the
de-identified object carries, so that any attribute is reachable from DuckDB
(``json_extract_string(dicom_json, '$."00180087".Value[0]')``). It is built from the
de-identified Dataset only, after it has been written to the lake: never from an original.

Left out, because they are large and no query needs them: pixel data (group 7FE0), every element
with a binary VR (OB OW OF OD OL OV UN: LUTs, icons, overlays, waveforms) at any depth, and the
file meta. An element pydicom cannot convert (a malformed IS) is left out too. Keys are the 8-hex-digit tags in tag order, as PS3.18 writes them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from pacsflow.tasks.core.values import items_of

_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD", "DS"})


def _vr(ds: Dataset, tag: BaseTag) -> str:
    """The element's VR without converting it (implicit-VR raw elements: the dictionary's)."""
    vr = ds._dict[tag].VR
    if vr is None or (vr == "UN" and not tag.is_private):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    return str(vr).split(" or ")[0]


def dicom_json_dict(ds: Dataset) -> dict[str, Any]:
    """The Dataset as a DICOM JSON object, without pixel data or binary elements. Only the
    elements written out are converted; one pydicom cannot convert (a malformed IS) is left out."""
    out: dict[str, Any] = {}
    d = ds._dict
    for tag in sorted(d):
        vr = _vr(ds, tag)
        if tag.group == 0x7FE0 or vr in _BINARY_VRS:
            continue
        elem = d[tag]
        try:
            value = _raw_json(vr, elem.value) if elem.__class__ is RawDataElement and vr in _RAW_TEXT_VRS else None
            if value is None:
                value = _element_json(ds[tag])
        except (ValueError, TypeError, KeyError, OverflowError):
            continue
        out[f"{int(tag):08X}"] = value
    return out


# Text VRs whose raw ASCII bytes give the JSON values directly, split and stripped as pydicom
# decodes each (converting every element through pydicom cost most of a catalog row's time).
_WHOLE_STRIPPED = frozenset({"AS", "CS", "UI"})  # trailing spaces and NULs off the whole value, then split
_EACH_RSTRIPPED = {"LO": "\x00 ", "SH": "\x00 ", "DA": None, "DT": None, "TM": None}  # split, then each
_RAW_TEXT_VRS = _WHOLE_STRIPPED | frozenset(_EACH_RSTRIPPED) | {"AE"}


def _raw_json(vr: str, raw: bytes | None) -> dict[str, Any] | None:
    """The JSON of a raw, ASCII text element; None: let pydicom convert it."""
    if raw is None or not raw.isascii() or b"\x1b" in raw:
        return None
    text = raw.decode("ascii")
    if vr in _WHOLE_STRIPPED:
        values = text.rstrip(" \x00").split("\\")
    elif vr == "AE":
        values = [v.strip() for v in text.split("\\")]
    else:
        values = [v.rstrip(_EACH_RSTRIPPED[vr]) for v in text.split("\\")]
    if values == [""]:
        return {"vr": vr}
    return {"vr": vr, "Value": [v or None for v in values]}


def _element_json(elem: DataElement) -> dict[str, Any]:
    """One element as PS3.18 F.2 writes it. Written here rather than with pydicom's
    ``to_json_dict``, which costs several times more per element: the catalog builds one per
    instance, on the ingest's critical path."""
    vr = str(elem.VR)
    if vr == "SQ":
        items = [dicom_json_dict(item) for item in elem.value or ()]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if elem.value is None or elem.value == "" or elem.VM == 0:
        return {"vr": vr}
    values = [_json_value(vr, v) for v in items_of(elem.value)]
    return {"vr": vr, "Value": values}


def _json_value(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if vr == "PN":
        return {"Alphabetic": str(value)}
    if vr == "IS":
        return int(value)
    if vr in _FLOAT_VRS:
        number = float(value)
        return number if math.isfinite(number) else None  # JSON has no NaN or infinity
    if vr in _NUMBER_VRS:
        return int(value)
    if vr == "AT":
        return f"{int(value):08X}"
    return str(value)


def dicom_json(ds: Dataset) -> str:
    """:func:`dicom_json_dict` as compact JSON text (UTF-8 characters kept as they are)."""
    return json.dumps(dicom_json_dict(ds), ensure_ascii=False, separators=(",", ":"))
