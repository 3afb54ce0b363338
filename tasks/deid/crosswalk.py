"""The crosswalk: pseudonym <-> original (patient IDs, study UIDs). PHI: owner-only, outside the
lake, never logged; written only when ``deid.crosswalk_path`` is set."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from pacsflow.tasks.core.files import write_private_file


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
