"""Burned-in annotation: never export pixels that may show identifying text unchanged.

An object is *at risk* when BurnedInAnnotation (0028,0301) is YES, or when it is absent on the
modalities and SOP classes that commonly burn text into the pixels: ultrasound, secondary
capture (all SC SOP classes), X-ray angiography and fluoroscopy, endoscopy/photography (visible
light), CR, and DX/MG/IO when the flag is missing.

Policies:
- ``quarantine`` (default): an object at risk raises ``BurnedInAnnotationError`` (a
  ``DeidentificationError``), which ``process_study`` turns into a quarantine entry.
- ``mask``: an object at risk that matches a configured mask rule (by SOP class, modality,
  manufacturer, model, rows and columns) has the rule's rectangles set to zero in every frame,
  then BurnedInAnnotation becomes NO and the Clean Pixel Data code (113101) is recorded. An
  object at risk that matches no rule is quarantined. Compressed pixel data is decoded first
  (pydicom's handlers; pylibjpeg and its openjpeg/libjpeg/rle plugins for JPEG, JPEG 2000 and
  RLE) and written back uncompressed (Explicit VR Little Endian); if it cannot be decoded the
  object is quarantined.
- ``allow``: trust the flag (YES still quarantines); for sites that have verified their devices.

Mask rules use the coordinates of deid's pixel filter recipes (``ctpcoordinates`` /
``coordinates``: ``xmin,ymin,xmax,ymax`` in pixels), so a rectangle from a deid ``%filter``
section can be copied as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.deid.choices import PixelPolicy


class BurnedInAnnotationError(DeidentificationError):
    """The pixels may show identifying text and cannot be cleaned under the configured policy."""

    reason = "burned-in-annotation"


# Modalities / SOP classes that commonly carry burned-in text.
RISKY_MODALITIES = frozenset({"US", "IVUS", "XA", "RF", "ES", "XC", "GM", "SM", "OT", "CR", "DX", "MG", "IO", "PX"})
_STORAGE = "1.2.840.10008.5.1.4.1.1."
# SOP class families (the UID itself or any UID under it) that commonly carry burned-in text.
RISKY_SOP_FAMILIES = tuple(
    _STORAGE + s
    for s in (
        "7",  # Secondary Capture and its multi-frame variants
        "6",  # US Image (and retired), Enhanced US Volume
        "3.1",  # US Multi-frame
        "3",  # retired US Multi-frame
        "12",  # XA, Enhanced XA, XRF
        "77.1",  # Visible Light: endoscopy, microscopy, photography, video
        "1",  # CR (exact)
        "1.1",  # DX for presentation / processing
        "1.2",  # MG
        "1.3",  # IO
    )
)


def _risky_sop(sop: str) -> bool:
    return any(sop == f or sop.startswith(f + ".") and f != _STORAGE + "1" for f in RISKY_SOP_FAMILIES)


@dataclass(frozen=True)
class MaskRule:
    """Rectangles to blank for objects that match every given criterion (None = any)."""

    regions: tuple[tuple[int, int, int, int], ...]
    sop_class_uid: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    rows: int | None = None
    columns: int | None = None

    def matches(self, ds: Dataset) -> bool:
        def eq(keyword: str, want: Any) -> bool:
            if want is None:
                return True
            got = ds.get(keyword)
            return got is not None and str(got).strip().upper() == str(want).strip().upper()

        return (
            eq("SOPClassUID", self.sop_class_uid)
            and eq("Modality", self.modality)
            and eq("Manufacturer", self.manufacturer)
            and eq("ManufacturerModelName", self.model)
            and eq("Rows", self.rows)
            and eq("Columns", self.columns)
        )


def parse_masks(masks: Iterable[Any]) -> list[MaskRule]:
    """Mask rules from settings: MaskRule objects or dicts with ``regions`` (or deid's
    ``coordinates`` as "x0,y0,x1,y1" strings) and optional match keys."""
    out = []
    for m in masks or ():
        if isinstance(m, MaskRule):
            out.append(m)
            continue
        m = dict(m)
        raw = m.pop("regions", None) or m.pop("coordinates", None) or m.pop("ctpcoordinates", None) or []
        regions: list[tuple[int, int, int, int]] = []
        for r in raw:
            vals = [int(float(v)) for v in (r.split(",") if isinstance(r, str) else r)]
            if len(vals) != 4:
                raise ValueError("a mask region needs four numbers: xmin, ymin, xmax, ymax")
            regions.append((vals[0], vals[1], vals[2], vals[3]))
        out.append(MaskRule(regions=tuple(regions), **m))
    return out


_TAGS = {"BurnedInAnnotation": BaseTag(0x00280301), "Modality": BaseTag(0x00080060), "SOPClassUID": BaseTag(0x00080016)}


def _peek(ds: Dataset, keyword: str) -> str:
    """A short ASCII value read without converting the element in the Dataset (an element left
    raw is written back as its original bytes, the fast path of the writer)."""
    elem = ds._dict.get(_TAGS[keyword])
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ").upper()
    return str(value or "").strip().upper()


def at_risk(ds: Dataset) -> bool:
    flag = _peek(ds, "BurnedInAnnotation")
    if flag == "YES":
        return True
    if flag == "NO":
        return False
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return False
    modality = _peek(ds, "Modality")
    sop = _peek(ds, "SOPClassUID")
    return modality in RISKY_MODALITIES or _risky_sop(sop)


def check_pixels(ds: Dataset, policy: PixelPolicy, masks: Iterable[MaskRule], report: Any = None) -> bool:
    """Apply the pixel policy; True when pixels were masked (record the Clean Pixel Data code)."""
    flag = _peek(ds, "BurnedInAnnotation")
    if policy == PixelPolicy.ALLOW and flag != "YES":
        return False
    if not at_risk(ds):
        return False
    if policy != PixelPolicy.MASK:
        raise BurnedInAnnotationError(
            "burned-in annotation: BurnedInAnnotation is YES" if flag == "YES"
            else "burned-in annotation: flag absent on a modality that burns text in"
        )
    rule = next((m for m in masks if m.matches(ds)), None)
    if rule is None or not rule.regions:
        raise BurnedInAnnotationError("burned-in annotation: no mask rule for this device or SOP class")
    mask_regions(ds, rule.regions)
    if report is not None:
        report.count("pixel-mask")
    return True


def mask_regions(ds: Dataset, regions: Iterable[tuple[int, int, int, int]]) -> None:
    """Zero the rectangles in every frame; compressed data is decoded and stored uncompressed."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: cannot clean, quarantine
        raise BurnedInAnnotationError(f"burned-in annotation: pixel data cannot be decoded ({type(exc).__name__})") from None
    arr = arr.copy()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    for x0, y0, x1, y1 in regions:
        if frames > 1:
            arr[:, y0:y1, x0:x1, ...] = 0
        elif samples > 1:
            arr[y0:y1, x0:x1, :] = 0
        else:
            arr[y0:y1, x0:x1] = 0
    ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    if ts is not None and ts.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR") and samples == 3:
            ds.PhotometricInterpretation = "RGB"  # pydicom's decoders convert YBR to RGB
    if samples > 1:
        ds.PlanarConfiguration = 0  # pixel_array is colour-by-pixel whatever the source layout
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    ds.BurnedInAnnotation = "NO"
