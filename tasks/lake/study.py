"""Staged originals → de-identified Part 10 files in the lake + catalog rows, for one study.

Plain functions (no Prefect, no sockets). Each instance is parsed once: the same in-memory
Dataset is de-identified, encoded, stored and then read for the catalog row.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier
from pacsflow.tasks.core.errors import BadDicom, DeidentificationError
from pacsflow.tasks.lake.rows import StudyExtractor
from pacsflow.tasks.lake.storage import LakeStorage

from pacsflow.tasks.core.files import write_atomic
from pacsflow.tasks.deid.instance import deidentify_file, encode
log = logging.getLogger(__name__)

TABLES = ("studies", "series", "instances")


@dataclass
class StudyOutcome:
    pseudo_uid: str
    written: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    actions: dict[str, int] = field(default_factory=dict)
    rows_dir: str | None = None
    bytes_written: int = 0


def _quarantine(src: Path, quarantine_dir: Path, pseudo_uid: str) -> str:
    dest = quarantine_dir / pseudo_uid
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.move(str(src), dest / src.name)
    return src.name


def process_study(
    staged: Path,
    pseudo_uid: str,
    deid: Deidentifier,
    storage: LakeStorage,
    quarantine_dir: Path,
    rows_dir: Path,
) -> StudyOutcome:
    """De-identify, store and extract every staged object of one study.

    Objects that cannot be read or de-identified are moved to quarantine with a reason; the
    rest of the study goes on. Row tables are written to ``rows_dir`` for the catalog commit.
    """
    outcome = StudyOutcome(pseudo_uid)
    report = DeidReport()
    extractor = StudyExtractor()
    for path in sorted(p for p in staged.iterdir() if p.suffix == ".dcm" and not p.name.startswith(".")):
        try:
            ds, originals = deidentify_file(path, deid, report)
            data = encode(ds, originals)
        except (BadDicom, DeidentificationError) as exc:
            outcome.quarantined.append((_quarantine(path, quarantine_dir, pseudo_uid), str(exc)))
            continue
        rel = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        url = storage.put(rel, data)
        extractor.add(ds, file_path=url, file_size=len(data), sha256=hashlib.sha256(data).hexdigest())
        outcome.written += 1
        outcome.bytes_written += len(data)
    outcome.actions = report.actions
    if outcome.written:
        tables = extractor.tables()
        for name in TABLES:
            write_atomic(rows_dir / f"{name}.parquet", partial(pq.write_table, tables[name]), private=True)
        outcome.rows_dir = str(rows_dir)
    return outcome


def read_rows(rows_dirs: list[str]) -> dict[str, pa.Table]:
    """Concatenate the per-study row files written by ``process_study``."""
    out: dict[str, pa.Table] = {}
    for name in TABLES:
        parts = [pq.read_table(Path(d) / f"{name}.parquet") for d in rows_dirs]
        out[name] = pa.concat_tables(parts) if parts else None  # type: ignore[assignment]
    return out
