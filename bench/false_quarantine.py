"""How often the residual-PHI audit quarantines the public sample files, and why.

Runs our de-identifier as production does (``DEFAULT_OPTIONS``, audit on) over every DICOM file
of pydicom's test files, pydicom-data and deid-data (zip archives included), with no pixel
policy so that the audit's own decisions are counted; what a pixel policy (``--pixel-policy``,
``quarantine`` by default because ``ocr`` takes minutes) quarantines, masks and checks clean is
counted apart. The sample files carry fake PHI, but the output names only
files, keywords and attribute paths, never a value.

    .venv/bin/python -m bench.false_quarantine [--verbose] [--pixel-policy ocr]

For each corpus: files read, files the de-identifier rejects for other reasons (unreadable,
invalid, cannot be de-identified), audit quarantines with their located reasons, and the rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pacsflow.tasks.core.errors import BadDicom, DeidentificationError
from pacsflow.tasks.deid.audit import audit_hits
from pacsflow.tasks.deid.choices import DEFAULT_OPTIONS, PixelPolicy
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier
from pacsflow.tasks.deid.instance import deidentify_dataset, encode, read_instance
from pacsflow.tasks.deid.pixels import BurnedInAnnotationError

KEY = b"false-quarantine-bench-key-0123"


@dataclass
class CorpusResult:
    name: str
    read: int = 0
    rejected: int = 0  # unreadable, invalid or not de-identifiable: not the audit's doing
    burned_in: int = 0  # what the pixel policy quarantines, counted apart
    pixel_reasons: dict[str, int] = field(default_factory=dict)  # its reasons, without counts and sizes
    pixel_actions: dict[str, int] = field(default_factory=dict)  # pixel-ocr-masked, pixel-ocr-clean, ...
    audit: list[tuple[str, str]] = field(default_factory=list)  # (file, located reasons)
    retained: list[tuple[str, str]] = field(default_factory=list)  # hits the rules found not to be leaks

    def lines(self, verbose: bool) -> list[str]:
        rate = len(self.audit) / self.read if self.read else 0.0
        out = [f"{self.name}: {self.read} files read, {self.rejected} rejected before the audit, "
               f"{len(self.audit)} quarantined by the audit ({rate:.1%}); "
               f"the pixel policy quarantines {self.burned_in} (counted apart); "
               f"{len(self.retained)} with hits the rules clear (not leaks)"]
        if self.pixel_actions or self.pixel_reasons:
            out.append("    pixel policy: " + (", ".join(f"{k} {v}" for k, v in sorted(self.pixel_actions.items()))
                                                 or "nothing cleaned")
                       + "; quarantined: " + (", ".join(f"{k} {v}" for k, v in sorted(self.pixel_reasons.items()))
                                               or "none"))
        if verbose:
            out += [f"    quarantined {file}: {reason}" for file, reason in self.audit]
            out += [f"    not a leak  {file}: {reason}" for file, reason in self.retained]
        return out


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def corpora() -> dict[str, Path]:
    """The sample corpora installed in this environment, by name."""
    found = {}
    for name, module, sub in (("pydicom", "pydicom.data", ""), ("pydicom-data", "data_store", "data"),
                              ("deid-data", "deid_data", "data")):
        root = _package_dir(module)
        if root is not None and (root / sub).is_dir():
            found[name] = root / sub
    return found


def candidate_files(root: Path, unpack_to: Path) -> Iterator[tuple[str, Path]]:
    """Every file under ``root`` that may be DICOM (by content, not name), zip members unpacked."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix in (".py", ".pyc", ".md", ".json", ".txt", ".gz", ".bz2", ".xz"):
            continue
        rel = str(path.relative_to(root))
        if zipfile.is_zipfile(path):
            target = unpack_to / rel
            with zipfile.ZipFile(path) as zf:
                zf.extractall(target)
            yield from ((f"{rel}:{p.relative_to(target)}", p) for p in sorted(target.rglob("*")) if p.is_file())
        else:
            yield rel, path


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm"


def run_file(result: CorpusResult, rel: str, path: Path, audited: Deidentifier, pixels: Deidentifier) -> None:
    try:
        ds = read_instance(path)
    except BadDicom:
        result.rejected += 1
        return
    result.read += 1
    try:
        originals = deidentify_dataset(ds, audited, DeidReport())
        hits = audit_hits(encode(ds, None), originals, ds)  # what encode(ds, originals) judges
    except DeidentificationError:
        result.rejected += 1
    else:
        leaks, kept = [h.reason for h in hits if h.leak], [h.reason for h in hits if not h.leak]
        if leaks:
            result.audit.append((rel, "; ".join(leaks)))
        elif kept:
            result.retained.append((rel, "; ".join(kept)))
    report = DeidReport()
    try:
        deidentify_dataset(read_instance(path), pixels, report)
    except BurnedInAnnotationError as exc:
        result.burned_in += 1
        kind = re.sub(r"\d+", "N", str(exc).split(" (")[0])
        result.pixel_reasons[kind] = result.pixel_reasons.get(kind, 0) + 1
    except DeidentificationError:
        pass
    for action, n in report.actions.items():
        if action.startswith("pixel-"):
            result.pixel_actions[action] = result.pixel_actions.get(action, 0) + n


def measure(name: str, root: Path, policy: PixelPolicy = PixelPolicy.QUARANTINE) -> CorpusResult:
    audited = Deidentifier(KEY, DEFAULT_OPTIONS, pixel_policy=None, audit=True)
    pixels = Deidentifier(KEY, DEFAULT_OPTIONS, pixel_policy=policy, audit=False)
    result = CorpusResult(name)
    with tempfile.TemporaryDirectory() as tmp:
        for rel, path in candidate_files(root, Path(tmp)):
            if _is_dicom(path):
                run_file(result, rel, path, audited, pixels)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="list every audit quarantine with its reasons")
    ap.add_argument("--pixel-policy", default=PixelPolicy.QUARANTINE.value, choices=[p.value for p in PixelPolicy],
                    help="the pixel policy counted apart (ocr reads every frame at risk: minutes)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    total = CorpusResult("all")
    lines = []
    for name, root in corpora().items():
        result = measure(name, root, PixelPolicy(args.pixel_policy))
        lines += result.lines(args.verbose)
        total.read += result.read
        total.rejected += result.rejected
        total.burned_in += result.burned_in
        total.audit += result.audit
        total.retained += result.retained
    lines += total.lines(False)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
