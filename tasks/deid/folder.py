"""``pacsflow deidentify IN_DIR OUT_DIR``: the de-identifier on a folder, for privacy officers
and researchers to check it on their own files; plus the run manifest, the optional crosswalk
and the retention purge of the PHI zones.

Plain functions (no Prefect, no print): the CLI command and the flow call them.

- Every file under IN_DIR (recursively, in sorted order) is parsed once, checked by the pixel
  policy, de-identified, encoded and audited for residual identifiers.
- Outputs go to ``OUT_DIR/<study>/<series>/<instance>.dcm`` (pseudonymous UIDs), each written
  through a temp file and a rename. The same key gives byte-identical outputs on every run.
- What must not leave is not written to OUT_DIR. It is listed in the manifest by an opaque id
  (a keyed hash of its relative path) with the reason; when ``quarantine_dir`` is given (it must
  be outside OUT_DIR), the original is copied there (owner-only) with an index of ids to paths.
- ``OUT_DIR/deid-manifest.json``: table edition, recipe version, options, pixel policy, counts by
  action, quarantined objects with reasons. No PHI, no timestamps (identical on rerun).
- The crosswalk (pseudonym <-> original patient ID and study UID) is written only when asked,
  outside OUT_DIR, with 0600 permissions.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydicom.dataset import Dataset

from pacsflow.tasks.core.errors import BadDicom, DeidentificationError
from pacsflow.tasks.core.files import is_inside, write_atomic, write_private_file
from pacsflow.tasks.deid.choices import Option, PixelPolicy
from pacsflow.tasks.deid.crosswalk import Crosswalk, CsvCrosswalk
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier
from pacsflow.tasks.deid.instance import deidentify_dataset, encode, read_instance
from pacsflow.tasks.deid.manifest import MANIFEST_NAME, QuarantinedObject, build_manifest, object_id
from pacsflow.tasks.deid.recipe import SiteRecipe
from pacsflow.tasks.deid.ocr import OcrConfig

@dataclass
class DeidRunSummary:
    files: int = 0
    written: int = 0
    quarantined: list[QuarantinedObject] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0
    manifest_path: str | None = None
    crosswalk_path: str | None = None

    def lines(self) -> list[str]:
        """A short human summary (no PHI) for the CLI to print."""
        out = [
            f"files: {self.files}  written: {self.written}  quarantined: {len(self.quarantined)}",
            "actions: " + ", ".join(f"{k}={v}" for k, v in sorted(self.actions.items())),
        ]
        reasons: dict[str, int] = {}
        for q in self.quarantined:
            reasons[q.reason] = reasons.get(q.reason, 0) + 1
        out += [f"  quarantined ({n}): {r}" for r, n in sorted(reasons.items())]
        if self.manifest_path:
            out.append(f"manifest: {self.manifest_path}")
        return out


def run_deidentify(
    in_dir: Path | str,
    out_dir: Path | str,
    options: Iterable[Option | str],
    key: bytes,
    progress: Callable[[int, int], None] | None = None,
    *,
    pixel_policy: PixelPolicy | str = PixelPolicy.OCR,
    pixel_masks: Iterable[Any] = (),
    pixel_ocr: OcrConfig | None = None,
    audit: bool = True,
    quarantine_dir: Path | str | None = None,
    crosswalk_path: Path | str | Crosswalk | None = None,
    recipe: SiteRecipe | None = None,
) -> DeidRunSummary:
    """De-identify every file under ``in_dir`` into ``out_dir``; ``crosswalk_path`` (a CSV path, or a
    :class:`Crosswalk` such as the one in PostgreSQL) receives the pseudonym <-> original rows."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    cw = CsvCrosswalk(crosswalk_path) if isinstance(crosswalk_path, (str, Path)) else crosswalk_path
    _check_folders(in_dir, out_dir, quarantine_dir, cw.path if isinstance(cw, CsvCrosswalk) else None)
    started = time.perf_counter()
    deid = Deidentifier(key, options, pixel_policy=pixel_policy, pixel_masks=pixel_masks, audit=audit,
                        pixel_ocr=pixel_ocr, recipe=recipe)
    report = DeidReport()
    summary = DeidRunSummary()
    files = sorted(p for p in in_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    summary.files = len(files)
    crosswalk: set[tuple[str, str, str]] = set()
    index: dict[str, str] = {}
    for n, path in enumerate(files, 1):
        rel = path.relative_to(in_dir).as_posix()
        one = DeidReport()
        try:
            ds, data, pid, study = _deidentify_one(path, deid, one)
        except (BadDicom, DeidentificationError) as exc:
            qid = object_id(key, rel)
            summary.quarantined.append(QuarantinedObject(qid, str(exc)))
            if quarantine_dir is not None:
                _keep_original(path, Path(quarantine_dir), qid)
                index[qid] = rel
        else:
            report.merge(one)
            dest = out_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            write_atomic(dest, data)
            summary.written += 1
            summary.bytes_written += len(data)
            if cw is not None:
                crosswalk.update({("patient", deid.patient_ref(pid), pid), ("study", deid.study_ref(study), study)})
        if progress is not None:
            progress(n, len(files))
    summary.actions = dict(sorted(report.actions.items()))
    manifest = build_manifest(deid, report, summary.quarantined, summary.written, summary.files)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    summary.manifest_path = str(out_dir / MANIFEST_NAME)
    if quarantine_dir is not None and index:
        write_private_file(Path(quarantine_dir) / "index.json", json.dumps(index, indent=1, sort_keys=True) + "\n")
    if cw is not None:
        cw.add(crosswalk)
        summary.crosswalk_path = cw.where
    summary.seconds = time.perf_counter() - started
    return summary


def _check_folders(in_dir: Path, out_dir: Path, quarantine_dir: Path | str | None,
                   crosswalk_path: Path | str | None) -> None:
    if not in_dir.is_dir():
        raise ValueError("IN_DIR is not a folder")
    if is_inside(out_dir, in_dir) or is_inside(in_dir, out_dir):
        raise ValueError("IN_DIR and OUT_DIR must not contain each other")
    for extra, name in ((quarantine_dir, "quarantine folder"), (crosswalk_path, "crosswalk")):
        if extra is not None and is_inside(Path(extra), out_dir):
            raise ValueError(f"the {name} holds PHI and must be outside OUT_DIR")


def _deidentify_one(path: Path, deid: Deidentifier, report: DeidReport) -> tuple[Dataset, bytes, str, str]:
    """The de-identified Dataset, its audited Part 10 bytes, and the original patient ID and
    study UID (for the crosswalk)."""
    try:
        ds = read_instance(path)
    except OSError as exc:  # a user's folder: an unreadable file is quarantined like a bad one
        raise BadDicom(f"unreadable file ({type(exc).__name__})") from None
    pid = str(ds.get("PatientID", "") or "")
    study = str(ds.StudyInstanceUID)
    data = encode(ds, deidentify_dataset(ds, deid, report))
    return ds, data, pid, study


def _keep_original(path: Path, quarantine_dir: Path, qid: str) -> None:
    quarantine_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest = quarantine_dir / f"{qid}.dcm"
    shutil.copyfile(path, dest)
    os.chmod(dest, stat.S_IRUSR | stat.S_IWUSR)

