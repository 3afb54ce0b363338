"""Did the migration take everything? Per study and series: what the PACS holds, what the ledger
says was retrieved, what the catalog holds, and whether stored objects still match their SHA-256.

Plain code. The PACS side comes with original UIDs; the rows this module returns carry only
pseudonymous ones (``pseudonym`` is the de-identifier's UID mapping), so the report may leave the
PHI zone.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import astuple, dataclass, fields
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from pacsflow.tasks.ingest.report import BLUE, GREEN, Chart, Series

OK, SHORT, EXTRA, NOT_CATALOGED, NOT_ON_PACS = "ok", "short", "extra", "not cataloged", "not on the PACS"
T = TypeVar("T")


@dataclass(frozen=True)
class ReconcileRow:
    study: str  # pseudonymous
    series: str  # pseudonymous; "" for the study's own line
    pacs: int | None
    retrieved: int | None  # the ledger's count when the study was cataloged; None below study level
    cataloged: int
    quarantined: int  # objects held back on purpose (pixel policy, audit): not a loss
    status: str


def _status(pacs: int | None, cataloged: int, quarantined: int) -> str:
    if pacs is None:
        return NOT_ON_PACS
    if cataloged == 0 and quarantined == 0:
        return NOT_CATALOGED
    accounted = cataloged + quarantined
    return OK if accounted == pacs else SHORT if accounted < pacs else EXTRA


def reconcile(pacs: Mapping[str, Mapping[str, int]], cataloged: Mapping[str, Mapping[str, int]],
              retrieved: Mapping[str, int], quarantined: Mapping[str, int],
              pseudonym: Callable[[str], str]) -> list[ReconcileRow]:
    """``pacs``: original study -> original series -> instances (a series-level C-FIND);
    ``cataloged``: pseudonymous study -> pseudonymous series -> instance rows; ``retrieved`` and
    ``quarantined``: per pseudonymous study. One row per study, then one per series, sorted."""
    on_pacs = {pseudonym(study): {pseudonym(s): n for s, n in series.items()} for study, series in pacs.items()}
    rows: list[ReconcileRow] = []
    for study in sorted(set(on_pacs) | set(cataloged)):
        theirs, ours = on_pacs.get(study), cataloged.get(study, {})
        held = quarantined.get(study, 0)
        total = sum(theirs.values()) if theirs is not None else None
        verdict = _status(total, sum(ours.values()), held)
        rows.append(ReconcileRow(study, "", total, retrieved.get(study), sum(ours.values()), held, verdict))
        for series in sorted(set(theirs or {}) | set(ours)):
            n, mine = (theirs or {}).get(series), ours.get(series, 0)
            status = _status(n, mine, 0)
            # Quarantine is recorded per study: a series short by held objects is no loss when the
            # study as a whole adds up.
            if status == SHORT and held and verdict == OK:
                status = OK
            rows.append(ReconcileRow(study, series, n, None, mine, 0, status))
    return rows


def differences(rows: Iterable[ReconcileRow]) -> list[ReconcileRow]:
    return [r for r in rows if r.status != OK]


def as_csv(rows: Iterable[ReconcileRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f.name for f in fields(ReconcileRow)])
    writer.writerows(["" if v is None else v for v in astuple(r)] for r in rows)
    return out.getvalue()


def sample(items: Sequence[T], fraction: float, seed: str) -> list[T]:
    """The objects whose checksum is re-read: all of them at 1.0, else a reproducible sample
    (the same seed picks the same objects, so a finding can be re-checked)."""
    if not 0 < fraction <= 1:
        raise ValueError("reconcile: the checksum sample must be a fraction in (0, 1]")
    if fraction == 1:
        return list(items)
    k = max(1, round(len(items) * fraction)) if items else 0
    return random.Random(seed).sample(list(items), k)


# -- stored objects ------------------------------------------------------------------------------
MISMATCH, MISSING = "checksum mismatch", "missing"


@dataclass(frozen=True)
class StoredObject:
    study: str  # pseudonymous
    instance: str  # pseudonymous SOP Instance UID
    path: str  # as the catalog records it: a path or a URL
    sha256: str


@dataclass(frozen=True)
class ChecksumFinding:
    study: str
    instance: str
    status: str  # checksum mismatch | missing


def check_objects(objects: Iterable[StoredObject], digest: Callable[[str], str | None]) -> list[ChecksumFinding]:
    """Objects whose bytes no longer match the catalog's SHA-256; ``digest(path)`` is the hex SHA-256
    of what is stored there now, None when nothing is."""
    findings = []
    for obj in objects:
        now = digest(obj.path)
        if now != obj.sha256:
            findings.append(ChecksumFinding(obj.study, obj.instance, MISSING if now is None else MISMATCH))
    return findings


def checksums_csv(findings: Iterable[ChecksumFinding]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f.name for f in fields(ChecksumFinding)])
    writer.writerows(astuple(f) for f in findings)
    return out.getvalue()


# -- progress ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class YearProgress:
    year: str
    on_pacs: int  # studies the inventory found
    migrated: int  # of those, cataloged with every object accounted for


def progress_by_year(study_years: Mapping[str, str], rows: Iterable[ReconcileRow]) -> list[YearProgress]:
    """``study_years``: pseudonymous study -> its StudyDate year on the PACS (the inventory's)."""
    done = {r.study for r in rows if not r.series and r.status == OK}
    counts: dict[str, list[int]] = {}
    for study, year in study_years.items():
        n = counts.setdefault(year, [0, 0])
        n[0] += 1
        n[1] += study in done
    return [YearProgress(y, n[0], n[1]) for y, n in sorted(counts.items())]


def progress_chart(progress: Sequence[YearProgress]) -> Chart:
    """Studies on the PACS and studies migrated, per StudyDate year: the migration's progress."""
    labels = [p.year for p in progress]
    return Chart("migration-progress", "Migration progress by study year", "studies", labels,
                 [Series("on the PACS", [p.on_pacs for p in progress], BLUE),
                  Series("migrated", [p.migrated for p in progress], GREEN)])
