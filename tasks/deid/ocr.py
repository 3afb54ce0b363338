"""Burned-in text found by OCR: Tesseract over every frame, as 8-bit grayscale images.

Only :mod:`.pixels` calls this, and only for objects at risk of burned-in text: OCR costs
about a second per 1024-pixel frame (``bench/ocr_cost.py``), so CT and MR without the
BurnedInAnnotation flag never get here.

What counts as text: a word Tesseract reads with a confidence of at least
``OcrConfig.min_confidence`` and at least two letters or digits (single glyphs and punctuation
are what photographs and anatomy produce). What gets masked: the whole *line* such a word
belongs to (Tesseract often reads the first words of a line badly, a patient's name before a
well-read ID), padded, in the frame it was found in. Tesseract is driven through pytesseract;
the ``tesseract`` program (Debian ``tesseract-ocr`` and ``tesseract-ocr-eng``) must be on PATH.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax (exclusive), in pixels of the frame

#: Tesseract reads overlay-sized glyphs (10-15 pixels) with low confidence: frames are
#: upscaled by a whole factor (at most 4) while the longer side stays within this. At 2x the
#: confidence of real overlay text rose from 40-60 to 80-96 on deid-data's ultrasounds.
_TARGET_SIDE = 2048
_MAX_SCALE = 4
# psm 11 = sparse text: overlays are scattered words and short lines, not paragraphs.
_TESSERACT_CONFIG = "--psm 11"


class OcrUnavailable(RuntimeError):
    """The tesseract program is missing or failed: no object at risk can be checked."""


@dataclass(frozen=True)
class OcrConfig:
    """How burned-in text is looked for (settings ``deid.ocr_*``)."""

    min_confidence: int = 70
    max_frames: int = 100
    passes: int = 3
    padding: int = 3
    device_regions: bool = True

    @classmethod
    def from_settings(cls, deid: Any) -> "OcrConfig":
        """From the ``deid`` section of the settings (its ``ocr_*`` fields)."""
        return cls(
            min_confidence=deid.ocr_min_confidence,
            max_frames=deid.ocr_max_frames,
            passes=deid.ocr_passes,
            device_regions=deid.ocr_device_regions,
        )


def to_gray8(frame: np.ndarray, photometric: str) -> np.ndarray:
    """A frame as 8-bit grayscale for OCR: colour by luminance, other depths by a percentile
    window (0.5-99.5 %, so that a few hot pixels do not flatten the text against its ground),
    MONOCHROME1 inverted so that the window means the same for every object."""
    arr = np.asarray(frame)
    windowed = arr.dtype != np.uint8
    if arr.ndim == 3:  # colour by pixel (pydicom converts YBR to RGB when decoding)
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    arr = arr.astype(np.float32, copy=False)
    if windowed and arr.size:
        lo, hi = np.percentile(arr, (0.5, 99.5))
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr - lo
    out = np.clip(arr, 0, 255).astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


def find_text(gray: np.ndarray, config: OcrConfig) -> list[Box]:
    """Padded boxes of the text lines Tesseract reads in one 8-bit frame (empty: no text)."""
    data = _tesseract(gray)
    rows, cols = gray.shape
    scale = data.pop("__scale__")
    lines: dict[tuple[int, int, int], list[int]] = {}
    confident: set[tuple[int, int, int]] = set()
    for i, text in enumerate(data["text"]):
        if int(data["level"][i]) != 5:
            continue
        key = (int(data["block_num"][i]), int(data["par_num"][i]), int(data["line_num"][i]))
        lines.setdefault(key, []).append(i)
        if float(data["conf"][i]) >= config.min_confidence and sum(ch.isalnum() for ch in text) >= 2:
            confident.add(key)
    boxes = []
    for key in sorted(confident):
        idx = lines[key]
        x0 = min(int(data["left"][i]) for i in idx)
        y0 = min(int(data["top"][i]) for i in idx)
        x1 = max(int(data["left"][i]) + int(data["width"][i]) for i in idx)
        y1 = max(int(data["top"][i]) + int(data["height"][i]) for i in idx)
        pad = config.padding + (y1 - y0) // (4 * scale)
        boxes.append((
            max(0, x0 // scale - pad), max(0, y0 // scale - pad),
            min(cols, -(-x1 // scale) + pad), min(rows, -(-y1 // scale) + pad),
        ))
    return boxes


def _tesseract(gray: np.ndarray) -> dict[str, Any]:
    import pytesseract
    from PIL import Image

    image = Image.fromarray(gray)
    scale = max(1, min(_MAX_SCALE, _TARGET_SIDE // max(gray.shape)))
    if scale > 1:
        image = image.resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.Resampling.BICUBIC)
    try:
        data: dict[str, Any] = pytesseract.image_to_data(
            image, config=_TESSERACT_CONFIG, output_type=pytesseract.Output.DICT
        )
    except (pytesseract.TesseractNotFoundError, pytesseract.TesseractError, OSError) as exc:
        raise OcrUnavailable(f"tesseract cannot run ({type(exc).__name__})") from None
    data["__scale__"] = scale
    return data


@dataclass
class OcrOutcome:
    """Counts only (never the text read): what :func:`mask_text` found and left."""

    lines_found: int = 0
    frames_with_text: int = 0
    lines_left: int = 0
    changed: bool = False


def mask_text(frames: np.ndarray, photometric: str, fixed: list[Box], config: OcrConfig) -> OcrOutcome:
    """Zero, in place, the ``fixed`` regions in every frame of ``frames`` (shape ``(n, rows,
    columns[, samples])``) and the text lines read in each frame, reading again after each
    masking pass (Tesseract segments a page anew once lines are gone, and finds words it missed
    next to them), for at most ``config.passes`` passes. ``lines_left`` counts what OCR still
    reads after the last pass."""
    outcome = OcrOutcome(changed=bool(fixed))
    for n in range(frames.shape[0]):
        for x0, y0, x1, y1 in fixed:
            frames[n, y0:y1, x0:x1, ...] = 0
        for done in range(config.passes + 1):
            boxes = find_text(to_gray8(frames[n], photometric), config)
            if not boxes:
                break
            if done == config.passes:
                outcome.lines_left += len(boxes)
                break
            outcome.frames_with_text += done == 0
            outcome.lines_found += len(boxes)
            outcome.changed = True
            for x0, y0, x1, y1 in boxes:
                frames[n, y0:y1, x0:x1, ...] = 0
    return outcome


def available() -> bool:
    """Whether the tesseract program can be run."""
    import pytesseract

    try:
        pytesseract.get_tesseract_version()
    except (pytesseract.TesseractNotFoundError, OSError):
        return False
    return True
