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
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_HUGE = 1 << 62  # bulk-data threshold: never reached, binary elements are skipped before


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
    for tag in sorted(ds._dict):
        if tag.group == 0x7FE0 or _vr(ds, tag) in _BINARY_VRS:
            continue
        try:
            elem = ds[tag]
            if elem.VR == "SQ":
                items = [dicom_json_dict(item) for item in elem.value or ()]
                value = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            else:
                value = elem.to_json_dict(None, _HUGE)
        except (ValueError, TypeError, KeyError, OverflowError):
            continue
        out[f"{int(tag):08X}"] = value
    return out


def dicom_json(ds: Dataset) -> str:
    """:func:`dicom_json_dict` as compact JSON text (UTF-8 characters kept as they are)."""
    return json.dumps(dicom_json_dict(ds), ensure_ascii=False, separators=(",", ":"))
