"""Our de-identifier vs deid (default recipe) vs dicognito, on the same generated files, in one run.

Every tool gets the same in-memory file bytes and does the same work per file: parse, de-identify,
encode to Part 10 bytes. Ours runs as in production: the PS3.15 profile with the default options
(``DEFAULT_OPTIONS``: modified dates, patient characteristics, clean descriptors), the pixel
policy (quarantine: objects at risk of burned-in text are examined and held back) and the
residual-PHI audit of the encoded bytes; objects it quarantines still count as processed files.
It is also timed with the pixel check off (every file de-identified and encoded). Prints files/s
and ratios, and apart, what the ``ocr`` policy (the default) adds: milliseconds of OCR per frame
of an object at risk (``bench.ocr_cost`` has the sizes and corpora).

    .venv/bin/python -m bench.deid_vs_peers [--studies 30] [--size 256] [--repeat 3] [--files 300]

Needs: deid (in the project's dependencies) and dicognito (pip install dicognito).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable


import pydicom

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.deid.choices import PixelPolicy
from pacsflow.tasks.deid.deidentifier import DEFAULT_OPTIONS, DeidReport, Deidentifier
from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.deid.instance import encode


def _write(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def ours_fn(pixel_policy: PixelPolicy | None = PixelPolicy.QUARANTINE) -> Callable[[bytes], bytes | None]:
    deid = Deidentifier(b"bench-key-0123456789abcdef", DEFAULT_OPTIONS, pixel_policy=pixel_policy, audit=True)
    report = DeidReport()

    def run(data: bytes) -> bytes | None:
        ds = pydicom.dcmread(io.BytesIO(data))
        try:
            return encode(ds, deid.apply(ds, report))
        except DeidentificationError:
            return None  # quarantined: examined, not exported

    return run


def dicognito_fn() -> Callable[[bytes], bytes | None]:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="bench")

    def run(data: bytes) -> bytes | None:
        ds = pydicom.dcmread(io.BytesIO(data))
        anonymizer.anonymize(ds)
        return _write(ds)

    return run


def deid_fn() -> Callable[[bytes], bytes | None]:
    from deid.config import DeidRecipe
    from deid.dicom import get_identifiers, replace_identifiers

    recipe = DeidRecipe()  # deid's default recipe

    def run(data: bytes) -> bytes | None:
        ds = pydicom.dcmread(io.BytesIO(data))
        ids = get_identifiers([ds])
        [out] = replace_identifiers(dicom_files=[ds], deid=recipe, ids=ids, save=False)
        return _write(out)

    return run


def measure(tools: dict[str, Callable[[bytes], bytes | None]], files: list[bytes], repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` files/s per tool, with the tools interleaved in every round so that a
    busy machine slows them all alike."""
    best = {name: float("inf") for name in tools}
    for _ in range(repeat):
        for name, fn in tools.items():
            # deid keeps every dataset it has seen: frozen, the objects earlier passes left behind
            # are not traversed again by the garbage collector during the next tool's pass
            gc.collect()
            gc.freeze()
            t0 = time.perf_counter()
            for data in files:
                fn(data)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(files) / seconds for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=30)
    ap.add_argument("--size", type=int, default=256, help="rows = columns of the generated images")
    ap.add_argument("--repeat", type=int, default=3, help="best of N passes per tool")
    ap.add_argument("--files", type=int, default=300, help="time every tool on the first N files (0 = all)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # deid logs every file
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        sampledata.generate(Path(tmp), studies=args.studies, end_date=dt.date(2026, 11, 1), seed=11,
                            rows=args.size, cols=args.size)
        files = [p.read_bytes() for p in sorted(Path(tmp).rglob("*.dcm"))]
    size_kb = sum(map(len, files)) / len(files) / 1024
    # "every file exported": the pixel check off, so burned-in objects are de-identified and encoded too
    tools: dict[str, Callable[[bytes], bytes | None]] = {"pacsflow": ours_fn(), "pacsflow, every file exported": ours_fn(None)}
    for name, make in (("dicognito", dicognito_fn), ("deid (default recipe)", deid_fn)):
        try:
            tools[name] = make()
        except ImportError:
            pass
    files = files[: args.files] if args.files else files
    results = measure(tools, files, args.repeat)
    lines = [f"{len(files)} files, {size_kb:.0f} KB each on average (parse + de-identify + encode, in memory), "
             f"best of {args.repeat} interleaved rounds"]
    lines += [f"{name:32s} {rate:8.1f} files/s" for name, rate in results.items()]
    for mine in ("pacsflow", "pacsflow, every file exported"):
        lines += [f"{mine} / {name}: {results[mine] / rate:.2f}x"
                  for name, rate in results.items() if not name.startswith("pacsflow")]
    lines.append(_ocr_line(files, args.size))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _ocr_line(files: list[bytes], size: int) -> str:
    """OCR apart: the ``ocr`` pixel policy reads the frames of objects at risk only (above they
    are held back by ``quarantine``, so the rates are those of the header path)."""
    from bench.ocr_cost import ms_per_frame
    from pacsflow.tasks.deid.ocr import available
    from pacsflow.tasks.deid.pixels import at_risk

    risky = sum(at_risk(pydicom.dcmread(io.BytesIO(f), stop_before_pixels=False)) for f in files)
    if not available():
        return f"OCR: tesseract missing; {risky} of {len(files)} files are at risk and would be read"
    ms, _ = ms_per_frame(size, False, 1)
    return (f"OCR (pixel policy ocr, objects at risk only: {risky} of {len(files)} files here): "
            f"{ms:.0f} ms per {size}x{size} frame read, a frame with text read at least twice")


if __name__ == "__main__":
    raise SystemExit(main())
