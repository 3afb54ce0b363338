"""Burned-in annotation: never export pixels that may show identifying text unchanged.

An object is *at risk* when BurnedInAnnotation (0028,0301) is YES, or when it is absent on the
modalities and SOP classes that commonly burn text into the pixels: ultrasound, secondary
capture (all SC SOP classes), X-ray angiography and fluoroscopy, endoscopy/photography (visible
light), CR, and DX/MG/IO when the flag is missing.

Only objects at risk are looked at; CT, MR and the rest without the flag never are (OCR costs
about a second a frame, ``bench/ocr_cost.py``). Policies:

- ``ocr`` (default): every frame is decoded and read by Tesseract (:mod:`.ocr`: 8-bit grayscale,
  upscaled, sparse-text mode). The lines holding a word read with at least
  ``deid.ocr_min_confidence`` are set to zero (padded) in the frame they are in, together with,
  in every frame, the regions of deid's ``%filter`` recipe whose criteria match the header
  (known devices' text areas, ``deid.ocr_device_regions``) and the configured mask rules that
  match. The frames with text are read again after each masking, up to ``deid.ocr_passes``
  passes; text still read after the last one quarantines the object, with counts in the reason
  (never the text read). So do: more frames than ``deid.ocr_max_frames``; BurnedInAnnotation
  YES with no text located and no region to blank (the device says there is text that OCR
  cannot find); pixel data that cannot be decoded; tesseract missing. Otherwise
  BurnedInAnnotation becomes NO and the Clean Pixel Data code (113101) is recorded, also for an
  object where no text was found: its pixels pass unchanged, and NO then states that they were
  checked (the manifest counts ``pixel-ocr-clean`` apart from ``pixel-ocr-masked``). What OCR
  does not read as text (handwriting, rotated or very faint text) is not found: sites with such
  sources choose ``quarantine``. Photographs of people (modality XC, VL Photographic and Video
  Photographic images) are quarantined under every policy but ``allow``, whatever their flag and
  whatever OCR reads: a face is identifying and Clean Recognizable Visual Features is not offered.
- ``quarantine``: an object at risk raises ``BurnedInAnnotationError`` (a
  ``DeidentificationError``), which ``process_study`` turns into a quarantine entry.
- ``mask``: an object at risk that matches a configured mask rule (by SOP class, modality,
  manufacturer, model, rows and columns) has the rule's rectangles set to zero in every frame,
  then BurnedInAnnotation becomes NO and the Clean Pixel Data code (113101) is recorded. An
  object at risk that matches no rule is quarantined.
- ``allow``: trust the flag (YES still quarantines); for sites that have verified their devices.

Masked pixels (``ocr`` and ``mask``) are decoded first (pydicom's handlers; pylibjpeg and its
openjpeg/libjpeg/rle plugins for JPEG, JPEG 2000 and RLE) and written back uncompressed
(Explicit VR Little Endian: re-compressing lossily would alter the cleaned image again;
YBR colour becomes RGB, as decoded); pixels that cannot be decoded quarantine the object.

Mask rules use the coordinates of deid's pixel filter recipes (``ctpcoordinates`` /
``coordinates``: ``xmin,ymin,xmax,ymax`` in pixels), so a rectangle from a deid ``%filter``
section can be copied as it is.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Iterable, Iterator

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.deid.choices import PixelPolicy
from pacsflow.tasks.deid.ocr import Box, OcrConfig, OcrUnavailable, mask_text


class BurnedInAnnotationError(DeidentificationError):
    """The pixels may show identifying text and cannot be cleaned under the configured policy."""

    reason = "burned-in-annotation"


class RecognizableFeaturesError(BurnedInAnnotationError):
    """A photograph that may show a face: no pixel policy but ``allow`` can clean it."""

    reason = "recognizable-features"


# External-camera photographs of the patient (VL Photographic Image, Video Photographic Image).
_PHOTOGRAPH_SOPS = frozenset({"1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.5.1.4.1.1.77.1.4.1"})


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


_SPECIFIC_CHARACTER_SET = 0x00080005
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


def check_pixels(
    ds: Dataset, policy: PixelPolicy, masks: Iterable[MaskRule], report: Any = None, ocr: OcrConfig | None = None,
    site_filters: Any = None,
) -> bool:
    """Apply the pixel policy; True when the pixels were cleaned or checked clean (record the
    Clean Pixel Data code). ``site_filters`` is a site recipe's ``deid.config.DeidRecipe`` whose
    ``%filter`` regions are blanked as well (under ``ocr``, and under ``mask`` with the rules)."""
    flag = _peek(ds, "BurnedInAnnotation")
    if policy == PixelPolicy.ALLOW and flag != "YES":
        return False
    if _peek(ds, "Modality") == "XC" or _peek(ds, "SOPClassUID") in _PHOTOGRAPH_SOPS:
        raise RecognizableFeaturesError("recognizable features: a photograph may show a face, which no pixel "
                                        "policy but allow lets through (deid.pixel_policy)")
    if not at_risk(ds):
        return False
    if policy == PixelPolicy.OCR:
        return _ocr_clean(ds, masks, ocr or OcrConfig(), flag == "YES", report, site_filters)
    if policy != PixelPolicy.MASK:
        raise BurnedInAnnotationError(
            "burned-in annotation: BurnedInAnnotation is YES" if flag == "YES"
            else "burned-in annotation: flag absent on a modality that burns text in"
        )
    rule = next((m for m in masks if m.matches(ds)), None)
    regions = list(rule.regions) if rule is not None else []
    if site_filters is not None:
        regions += device_regions(ds, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), site_filters,
                                  with_default=False)
    if not regions:
        raise BurnedInAnnotationError("burned-in annotation: no mask rule for this device or SOP class")
    mask_regions(ds, regions)
    if report is not None:
        report.count("pixel-mask")
    return True


def _ocr_clean(
    ds: Dataset, masks: Iterable[MaskRule], config: OcrConfig, flagged: bool, report: Any, site_filters: Any
) -> bool:
    """The ``ocr`` policy for one object at risk (see the module docstring)."""
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes > config.max_frames:
        raise BurnedInAnnotationError(
            f"burned-in annotation: {nframes} frames, more than OCR checks (deid.ocr_max_frames {config.max_frames})"
        )
    arr = _decode(ds)
    frames = arr if nframes > 1 else arr[np.newaxis]
    rows, cols = frames.shape[1], frames.shape[2]
    fixed = [r for m in masks if m.matches(ds) for r in m.regions]
    if config.device_regions or site_filters is not None:
        fixed += device_regions(ds, rows, cols, site_filters, with_default=config.device_regions)
    try:
        outcome = mask_text(frames, str(ds.get("PhotometricInterpretation", "")).upper(), fixed, config)
    except OcrUnavailable:
        raise BurnedInAnnotationError("burned-in annotation: OCR cannot run (tesseract missing or failing)") from None
    if outcome.lines_left:
        raise BurnedInAnnotationError(
            f"burned-in annotation: OCR still reads {outcome.lines_left} text line(s) after masking "
            f"{outcome.lines_found} in {outcome.frames_with_text} frame(s)"
        )
    if flagged and not outcome.changed:
        raise BurnedInAnnotationError("burned-in annotation: BurnedInAnnotation is YES but OCR located no text")
    if outcome.changed:
        _store(ds, arr)
    ds.BurnedInAnnotation = "NO"
    if report is not None:
        report.count("pixel-ocr-masked" if outcome.changed else "pixel-ocr-clean")
    return True


def device_regions(
    ds: Dataset, rows: int, columns: int, site_recipe: Any = None, *, with_default: bool = True
) -> list[Box]:
    """Rectangles to blank from the ``%filter`` sections whose criteria match the header of
    ``ds``: deid's default dicom recipe (``with_default``) and a site's recipe (a
    ``deid.config.DeidRecipe``), by deid's own parser and filter evaluation. Only the regions to
    clean are taken: ``keepcoordinates`` never un-blank what OCR found; ``all`` is the whole
    frame."""
    recipes = ([_device_recipe()] if with_default else []) + ([site_recipe] if site_recipe is not None else [])
    out: list[Box] = []
    for recipe in recipes:
        out += _regions_of(ds, rows, columns, recipe)
    return out


def _regions_of(ds: Dataset, rows: int, columns: int, recipe: Any) -> list[Box]:
    from deid.dicom.pixels.detect import has_burned_pixels

    with _quiet_deid():
        # a copy per object: deid writes "from:" coordinates back into the recipe it evaluates
        result = has_burned_pixels(_filter_header(ds, recipe), force=True, deid=copy.deepcopy(recipe))
    out: list[Box] = []
    for hit in result.get("results", ()):
        for keep, coords in hit.get("coordinates", ()):
            for c in coords if isinstance(coords, list) else [coords]:
                if int(keep) == 0 and str(c).strip().lower() == "all":
                    out.append((0, 0, columns, rows))
                elif int(keep) == 0:
                    x0, y0, x1, y1 = (int(float(v)) for v in str(c).split(","))
                    out.append((max(0, x0), max(0, y0), min(columns, x1), min(rows, y1)))
    return [b for b in out if b[0] < b[2] and b[1] < b[3]]


@cache
def _device_recipe() -> Any:
    from deid.config import DeidRecipe

    with _quiet_deid():
        return DeidRecipe()  # no file: deid's default "dicom" recipe


def _filter_header(ds: Dataset, recipe: Any) -> FileDataset:
    """A copy of just the attributes the recipe's filters name, so that deid reading them does
    not convert raw elements of ``ds`` (which the writer copies as their original bytes)."""
    wanted = {_SPECIFIC_CHARACTER_SET}
    for items in (recipe.get_filters() or {}).values():
        for item in items:
            for group in item.get("filters", ()):
                wanted.update(t for t in (tag_for_keyword(f) for f in group.get("field", ())) if t is not None)
    header = Dataset()
    for tag in wanted:
        elem = ds._dict.get(BaseTag(tag))
        if elem is not None:
            header._dict[BaseTag(tag)] = elem
    meta = getattr(ds, "file_meta", None)
    return FileDataset("", header, file_meta=meta if meta is not None else FileMetaDataset(), preamble=b"\0" * 128)


@contextmanager
def _quiet_deid() -> Iterator[None]:
    """deid's logger prints recipe parsing to the console: silenced while pacsflow calls it."""
    from deid.logger import bot

    level = bot.level
    bot.level = 0
    try:
        yield
    finally:
        bot.level = level


def _decode(ds: Dataset) -> np.ndarray:
    try:
        return np.array(ds.pixel_array, copy=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: cannot clean, quarantine
        raise BurnedInAnnotationError(
            f"burned-in annotation: pixel data cannot be decoded ({type(exc).__name__})"
        ) from None


def mask_regions(ds: Dataset, regions: Iterable[tuple[int, int, int, int]]) -> None:
    """Zero the rectangles in every frame; compressed data is decoded and stored uncompressed."""
    arr = _decode(ds)
    frames = arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[np.newaxis]
    for x0, y0, x1, y1 in regions:
        frames[:, y0:y1, x0:x1, ...] = 0
    _store(ds, arr)


def _store(ds: Dataset, arr: np.ndarray) -> None:
    """Write decoded, changed pixels back: uncompressed Explicit VR Little Endian (re-compressing
    lossily would alter the cleaned image again; losslessly is left to the PACS)."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
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
