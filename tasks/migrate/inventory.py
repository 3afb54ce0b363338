"""What a legacy PACS holds, counted before it is emptied: totals per year and modality, the
volume they make and how long moving it takes.

Plain code. An inventory pass C-FINDs studies per day and their series; each study becomes an
:class:`InventoryStudy` (original UIDs: PHI zone, kept in the state database only). Totals,
estimates and the list of studies changed since a study was migrated are computed here.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping

from pacsflow.tasks.core.clock import parse_dicom_date

UNKNOWN = "(none)"
# Stored bytes per instance when nothing was measured yet: uncompressed 512×512×16-bit slices for
# CT and MR, single large images for projection radiography and mammography.
DEFAULT_BYTES_PER_INSTANCE = {"CT": 530_000, "MR": 300_000, "PT": 70_000, "NM": 300_000, "CR": 9_000_000,
                              "DX": 9_000_000, "MG": 25_000_000, "US": 1_000_000, "XA": 4_000_000}
FALLBACK_BYTES_PER_INSTANCE = 1_000_000


@dataclass(frozen=True)
class SeriesCount:
    modality: str
    instances: int
    series_uid: str = ""  # original: PHI zone only


@dataclass(frozen=True)
class InventoryStudy:
    study_uid: str  # original: PHI zone only
    study_date: str
    series: tuple[SeriesCount, ...]

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


@dataclass(frozen=True)
class Total:
    year: str  # "2019", or "(none)" for studies without a usable date
    modality: str
    studies: int
    series: int
    instances: int


def totals(studies: Iterable[InventoryStudy]) -> list[Total]:
    """Studies, series and instances per (year, modality). A study of two modalities counts once
    under each; its series and instances count under their own modality only."""
    study_sets: dict[tuple[str, str], set[str]] = defaultdict(set)
    series_n: dict[tuple[str, str], int] = defaultdict(int)
    instances_n: dict[tuple[str, str], int] = defaultdict(int)
    for study in studies:
        day = parse_dicom_date(study.study_date)
        year = str(day.year) if day else UNKNOWN
        for s in study.series or (SeriesCount(UNKNOWN, 0),):
            key = (year, s.modality or UNKNOWN)
            study_sets[key].add(study.study_uid)
            series_n[key] += 1 if study.series else 0
            instances_n[key] += s.instances
    return [Total(y, m, len(study_sets[(y, m)]), series_n[(y, m)], instances_n[(y, m)])
            for y, m in sorted(study_sets)]


@dataclass(frozen=True)
class Estimate:
    instances: int
    bytes: int
    hours: float  # of transfer at the rate given
    days: float  # calendar days, with the hours of window a day given

    def describe(self) -> str:
        return (f"{self.instances:,} instances, about {self.bytes / 1e12:.2f} TB: {self.hours:,.0f} hours "
                f"of transfer, about {self.days:,.0f} days")


def estimate(rows: Iterable[Total], *, instances_per_s: float, window_hours_a_day: float,
             bytes_per_instance: Mapping[str, float] | None = None) -> Estimate:
    """The volume of ``rows`` and how long it takes at ``instances_per_s`` (what runs measured)
    inside a window of ``window_hours_a_day`` (24 for always). ``bytes_per_instance`` per
    modality (measured in the catalog) overrides the defaults."""
    if instances_per_s <= 0 or not 0 < window_hours_a_day <= 24:
        raise ValueError("estimate: the rate must be positive and the window 0-24 hours a day")
    sizes = {**DEFAULT_BYTES_PER_INSTANCE, **(bytes_per_instance or {})}
    instances = volume = 0.0
    for row in rows:
        instances += row.instances
        volume += row.instances * sizes.get(row.modality, FALLBACK_BYTES_PER_INSTANCE)
    hours = instances / instances_per_s / 3600
    return Estimate(int(instances), int(volume), hours, hours / window_hours_a_day)


def changed_since_migrated(studies: Iterable[InventoryStudy], migrated: Mapping[str, int]) -> list[InventoryStudy]:
    """Studies of a later pass whose instance count differs from what was migrated (``migrated``:
    original UID -> instances cataloged): objects added to or removed from them on the PACS after
    the migration took them. Studies never migrated are not listed (they are still to do)."""
    return [s for s in studies if s.study_uid in migrated and s.instances != migrated[s.study_uid]]


def by_day(studies: Iterable[InventoryStudy]) -> dict[dt.date | None, tuple[int, int]]:
    """Studies and instances per StudyDate day (the shards of a migration)."""
    out: dict[dt.date | None, list[int]] = defaultdict(lambda: [0, 0])
    for study in studies:
        counts = out[parse_dicom_date(study.study_date)]
        counts[0] += 1
        counts[1] += study.instances
    return {day: (n[0], n[1]) for day, n in out.items()}


def added_since(previous: Iterable[str], studies: Iterable[InventoryStudy]) -> list[InventoryStudy]:
    """Studies of this pass that an earlier pass (its original UIDs ``previous``) did not see:
    stored on the PACS after that pass, or with a date moved into its range."""
    seen = set(previous)
    return [s for s in studies if s.study_uid not in seen]


def series_counts(studies: Iterable[InventoryStudy]) -> dict[str, dict[str, int]]:
    """Original study -> original series -> instances: the PACS side of a reconciliation."""
    return {s.study_uid: {c.series_uid: c.instances for c in s.series} for s in studies}
