"""What the ocr pixel policy costs: milliseconds of OCR per frame, and how many objects pay it.

1. OCR per frame: one read of a generated frame (a noisy disc in quiet air with two lines of
   burned-in text in a corner), as :func:`pacsflow.tasks.deid.ocr.find_text` does it (8-bit
   grayscale, upscaled, Tesseract sparse text), for 256, 512 and 1024 pixels, mono and colour.
   A frame with text is read at least twice by the policy (find, mask, read again); a frame
   without text once.
2. The share of objects *at risk* (the only ones OCR reads: CT and MR without the flag never
   are) in the sample corpora: pydicom's test files, pydicom-data, deid-data, and a generated
   nightly sample (``deployments/local/sampledata``).

    .venv/bin/python -m bench.ocr_cost [--repeat 3]

Separate from ``bench.deid_vs_peers``, which measures the header path (no OCR runs there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from bench.false_quarantine import candidate_files
from bench.false_quarantine import corpora as sample_corpora
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.deid.ocr import OcrConfig, find_text, to_gray8
from pacsflow.tasks.deid.pixels import at_risk


def frame(size: int, colour: bool) -> np.ndarray:
    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    gray = (rng.normal(8, 3, (size, size)) + body * rng.normal(110, 15, (size, size))).clip(0, 255)
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(10, size // 40))
    draw.text((6, 4), "DOE JOHN 1961-04-02", fill=255, font=font)
    draw.text((6, 8 + size // 40), "ID 48213579", fill=255, font=font)
    gray[np.asarray(layer) > 0] = 255
    img = gray.astype(np.uint8)
    return np.stack([img, img // 2, img], axis=-1) if colour else img


def ms_per_frame(size: int, colour: bool, repeat: int) -> tuple[float, int]:
    arr = frame(size, colour)
    best, lines = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        lines = len(find_text(to_gray8(arr, "RGB" if colour else "MONOCHROME2"), OcrConfig()))
        best = min(best, time.perf_counter() - start)
    return best * 1000, lines


def corpora(unpack_to: Path) -> dict[str, list[Path]]:
    """The sample corpora ``bench.false_quarantine`` reads, as lists of candidate files."""
    return {name: [path for _, path in candidate_files(root, unpack_to / name)]
            for name, root in sample_corpora().items()}


def share_at_risk(paths: list[Path]) -> tuple[int, int, int]:
    """(DICOM objects read, at risk, frames in the objects at risk)."""
    read = risky = frames = 0
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not DICOM, or broken on purpose in the test corpora
            continue
        read += 1
        if at_risk(ds):
            risky += 1
            frames += int(ds.get("NumberOfFrames", 1) or 1)
    return read, risky, frames


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="best of N reads per frame")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out = sys.stdout
    out.write(f"OCR per frame (one read; best of {args.repeat})\n")
    for size in (256, 512, 1024):
        for colour in (False, True):
            ms, lines = ms_per_frame(size, colour, args.repeat)
            out.write(f"  {size:5d} px {'colour' if colour else 'mono  '} {ms:8.0f} ms  ({lines} text line(s) found)\n")
    out.write("objects OCR reads (at risk) in the corpora\n")
    with tempfile.TemporaryDirectory() as tmp:
        sets = corpora(Path(tmp) / "unpacked")
        sampledata.generate(Path(tmp), studies=30, end_date=dt.date(2026, 11, 1), seed=11, rows=64, cols=64)
        sets["generated nightly sample (30 studies)"] = sorted(Path(tmp).rglob("*.dcm"))
        for name, paths in sets.items():
            read, risky, frames = share_at_risk(paths)
            share = 100.0 * risky / read if read else 0.0
            out.write(f"  {name:40s} {risky:5d} of {read:5d} objects ({share:5.1f} %), {frames} frame(s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
