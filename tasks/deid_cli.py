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

import csv
import hashlib
import hmac
import io
import json
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


from tasks import deid_iod
from tasks.deid import RECIPE_VERSION, DeidReport, Deidentifier, Option, load_profile
from tasks.errors import BadDicom, DeidentificationError
from tasks.process import deidentify_dataset, encode, read_instance

MANIFEST_NAME = "deid-manifest.json"
MANIFEST_VERSION = 1


@dataclass
class QuarantinedObject:
    id: str
    reason: str


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


def build_manifest(
    deid: Deidentifier, report: DeidReport, quarantined: Iterable[QuarantinedObject], written: int,
    files: int | None = None,
) -> dict[str, Any]:
    """The per-run de-identification manifest (also the Prefect artifact's content). No PHI."""
    quarantined = list(quarantined)
    return {
        "manifest_version": MANIFEST_VERSION,
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "table_edition": load_profile().edition,
        "recipe_version": RECIPE_VERSION,
        "iod_types_source": deid_iod.table_source(),
        "options": [o.value for o in deid.options],
        "method_codes": [c for c, _ in deid.method_codes()],
        "pixel_policy": deid.pixel_policy.value if deid.pixel_policy is not None else "not checked",
        "residual_phi_audit": deid.audit,
        "files": files if files is not None else written + len(quarantined),
        "written": written,
        "quarantined_count": len(quarantined),
        "actions": dict(sorted(report.actions.items())),
        "quarantined": [asdict(q) for q in sorted(quarantined, key=lambda q: q.id)],
    }


def manifest_markdown(manifest: dict[str, Any]) -> str:
    """The manifest as Markdown for ``prefect.artifacts.create_markdown_artifact``."""
    lines = [
        "# De-identification manifest",
        "",
        f"- profile: {manifest['profile']}, Table E.1-1 edition {manifest['table_edition']}",
        f"- recipe: {manifest['recipe_version']}",
        f"- options: {', '.join(manifest['options']) or 'none'}",
        f"- method codes: {', '.join(manifest['method_codes'])}",
        f"- pixel policy: {manifest['pixel_policy']}; residual-PHI audit: {manifest['residual_phi_audit']}",
        f"- objects: {manifest['files']} seen, {manifest['written']} written, {manifest['quarantined_count']} quarantined",
        "",
        "| action | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in manifest["actions"].items()]
    if manifest["quarantined"]:
        lines += ["", "| quarantined object | reason |", "|---|---|"]
        lines += [f"| {q['id']} | {q['reason']} |" for q in manifest["quarantined"]]
    return "\n".join(lines) + "\n"


def object_id(key: bytes, rel: str) -> str:
    """An opaque, keyed name for an object in manifests (never its path or UIDs)."""
    return "q-" + hmac.new(key, b"object\x00" + rel.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:20]


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_private_file(path: Path, text: str) -> None:
    """Write a PHI file with owner-only permissions (0600), through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


CROSSWALK_HEADER = ["kind", "pseudonym", "original"]


def update_crosswalk(path: Path | str, rows: Iterable[tuple[str, str, str]]) -> int:
    """Merge (kind, pseudonym, original) rows into the crosswalk CSV (PHI: owner-only 0600,
    outside the lake, never logged); returns the number of rows in it."""
    path = Path(path)
    known: set[tuple[str, str, str]] = set()
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            known = {tuple(r) for r in reader if len(r) == 3}  # type: ignore[misc]
    known.update(tuple(r) for r in rows)  # type: ignore[misc]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CROSSWALK_HEADER)
    w.writerows(sorted(known))
    write_private_file(path, buf.getvalue())
    return len(known)


def run_deidentify(
    in_dir: Path | str,
    out_dir: Path | str,
    options: Iterable[Option | str],
    key: bytes,
    progress: Callable[[int, int], None] | None = None,
    *,
    pixel_policy: str = "quarantine",
    pixel_masks: Iterable[Any] = (),
    audit: bool = True,
    quarantine_dir: Path | str | None = None,
    crosswalk_path: Path | str | None = None,
) -> DeidRunSummary:
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise ValueError("IN_DIR is not a folder")
    if _inside(out_dir, in_dir) or _inside(in_dir, out_dir):
        raise ValueError("IN_DIR and OUT_DIR must not contain each other")
    for extra, name in ((quarantine_dir, "quarantine folder"), (crosswalk_path, "crosswalk")):
        if extra is not None and _inside(Path(extra), out_dir):
            raise ValueError(f"the {name} holds PHI and must be outside OUT_DIR")
    started = time.perf_counter()
    deid = Deidentifier(key, options, pixel_policy=pixel_policy, pixel_masks=pixel_masks, audit=audit)
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
            try:
                ds = read_instance(path)
            except OSError as exc:  # a user's folder: an unreadable file is quarantined like a bad one
                raise BadDicom(f"unreadable file ({type(exc).__name__})") from None
            pid = str(ds.get("PatientID", "") or "")
            study = str(ds.StudyInstanceUID)
            data = encode(deidentify_dataset(ds, deid, one), audit=audit)
        except (BadDicom, DeidentificationError) as exc:
            qid = object_id(key, rel)
            summary.quarantined.append(QuarantinedObject(qid, str(exc)))
            if quarantine_dir is not None:
                qdir = Path(quarantine_dir)
                qdir.mkdir(parents=True, exist_ok=True, mode=0o700)
                shutil.copyfile(path, qdir / f"{qid}.dcm")
                os.chmod(qdir / f"{qid}.dcm", stat.S_IRUSR | stat.S_IWUSR)
                index[qid] = rel
        else:
            report.merge(one)
            dest = out_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            _write_atomic(dest, data)
            summary.written += 1
            summary.bytes_written += len(data)
            if crosswalk_path is not None:
                crosswalk.add(("patient", deid.patient_ref(pid), pid))
                crosswalk.add(("study", deid.study_ref(study), study))
        if progress is not None:
            progress(n, len(files))
    summary.actions = dict(sorted(report.actions.items()))
    manifest = build_manifest(deid, report, summary.quarantined, summary.written, summary.files)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    summary.manifest_path = str(out_dir / MANIFEST_NAME)
    if quarantine_dir is not None and index:
        write_private_file(Path(quarantine_dir) / "index.json", json.dumps(index, indent=1, sort_keys=True) + "\n")
    if crosswalk_path is not None:
        update_crosswalk(crosswalk_path, crosswalk)
        summary.crosswalk_path = str(crosswalk_path)
    summary.seconds = time.perf_counter() - started
    return summary


def purge_older_than(root: Path | str, days: int, now: float | None = None) -> int:
    """Retention of a PHI zone (staging, quarantine): delete entries of ``root`` whose newest
    file is older than ``days``; returns how many top-level entries were removed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    limit = (now if now is not None else time.time()) - days * 86400
    removed = 0
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            mtimes = [p.stat().st_mtime for p in entry.rglob("*") if p.is_file()] or [entry.stat().st_mtime]
            if max(mtimes) < limit:
                shutil.rmtree(entry)
                removed += 1
        elif entry.stat().st_mtime < limit:
            entry.unlink()
            removed += 1
    return removed
