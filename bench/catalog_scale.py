"""The catalog at scale: the README's analyst queries on millions of generated instance rows.

Rows start from real extracted ones, as in ``bench.catalog_size``: a few sample studies (CT, MR,
MG) are generated, de-identified and extracted. Their rows are then taken as templates, column by
column with Arrow (no Python object per row), for a catalog with realistic counts:
- six modalities by share of studies (CR 28 %, DX 22 %, CT 20 %, MR 12 %, US 10 %, MG 8 %); CR, DX
  and US reuse the MG rows with their own SOP class;
- series per study and instances per series by modality: CT 3–8 series of about 150 slices
  (20–600), MR 5–12 series of about 100 (15–400), US 1–2 series of 5–60, CR/DX 1–3 series of 1–2
  images, MG 4–6 single images;
- studies spread over six years (2020–2025), one patient per six studies, each patient's dates
  shifted back by 1–365 days as de-identification does; fresh random ``2.25.`` UIDs everywhere.

The catalog is written by ``CatalogStore.commit`` in batches of whole studies, in the order of
their real dates (one batch stands for several nights), then compacted, so the layout measured
is the product's. Each README query (read from the README's ``sql`` blocks), a one-study and a
one-patient lookup then run through ``pacsflow.catalog.views.query`` (what ``pacsflow catalog
query`` runs): cold (the catalog's files dropped from the page cache with posix_fadvise) and
warm, several runs each, median and range. Layout variants (row-group size, sort order,
partitioning) are the same rows committed again into a fresh catalog with the writer's
parameters changed, and timed the same way.

    .venv/bin/python -m bench.catalog_scale --instances 10000000
    .venv/bin/python -m bench.catalog_scale --instances 1000000 --dicom-json template \\
        --variants rg16k,rg256k,rg1m,year,none
    .venv/bin/python -m bench.catalog_scale --instances 10000000 --dir /tmp/cs10m --reuse

``--reuse`` times a catalog an earlier run left in ``--dir`` (same ``--instances`` and ``--seed``)
after compacting it with today's writer, instead of generating and committing it again.

``--dicom-json null`` (default) leaves the column empty; ``template`` puts a real de-identified
object's JSON (about 4.7 kB) in every row with that row's SOP Instance UID in it: the size is
realistic, the compression a lower bound (see the README, "Size of dicom_json").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.catalog_size import TABLES, template_studies
from pacsflow.catalog import store as store_mod
from pacsflow.catalog.schema import SCHEMAS
from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import query

README = Path(__file__).resolve().parents[1] / "README.md"

# modality: (share of studies, series per study, median instances per series, instance range,
#            template modality, SOP class, body parts)
MODALITIES: dict[str, tuple[float, tuple[int, int], float, tuple[int, int], str, str, tuple[str, ...]]] = {
    "CR": (0.28, (1, 3), 1.3, (1, 2), "MG", "1.2.840.10008.5.1.4.1.1.1", ("CHEST", "HAND", "KNEE", "SPINE")),
    "DX": (0.22, (1, 3), 1.3, (1, 2), "MG", "1.2.840.10008.5.1.4.1.1.1.1", ("CHEST", "FOOT", "PELVIS")),
    "CT": (0.20, (3, 8), 150.0, (20, 600), "CT", "1.2.840.10008.5.1.4.1.1.2", ("CHEST", "ABDOMEN", "HEAD")),
    "MR": (0.12, (5, 12), 100.0, (15, 400), "MR", "1.2.840.10008.5.1.4.1.1.4", ("BRAIN", "KNEE", "SPINE")),
    "US": (0.10, (1, 2), 20.0, (5, 60), "MG", "1.2.840.10008.5.1.4.1.1.6.1", ("ABDOMEN", "NECK")),
    "MG": (0.08, (4, 6), 1.0, (1, 1), "MG", "1.2.840.10008.5.1.4.1.1.1.2", ("BREAST",)),
}
FIRST_DAY = dt.date(2020, 1, 1)
YEARS = 6
STUDIES_PER_PATIENT = 6
VARIANTS: dict[str, dict[str, Any]] = {  # name: writer parameters that differ from the product's
    "rg16k": {"row_group_rows": 16 * 1024},
    "rg64k": {"row_group_rows": 64 * 1024},
    "nobloom": {"bloom": False},
    "rg256k": {"row_group_rows": 256 * 1024},
    "rg1m": {"row_group_rows": 1024 * 1024},
    "sort-date": {"instances_sort": ("study_date", "study_uid", "series_uid", "sop_instance_uid")},
    "year": {"partition_format": "%Y"},
    "none": {"partition_format": "all"},  # a literal: every dated study in one partition
}


# -- generation ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """Study- and series-level arrays for the whole catalog, studies in the order of their real dates."""

    study_modality: np.ndarray  # index into MODALITIES
    study_patient: np.ndarray
    study_date: np.ndarray  # shifted, numpy datetime64[D]
    study_series: np.ndarray  # series count per study
    series_study: np.ndarray  # study index per series
    series_instances: np.ndarray  # instance count per series


def _uids(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` random ``2.25.`` UIDs (38 random digits), built by Arrow."""
    hi = pc.cast(pa.array(rng.integers(10**18, 10**19 - 1, n, dtype=np.uint64)), pa.string())
    lo = pc.utf8_lpad(pc.cast(pa.array(rng.integers(0, 10**19 - 1, n, dtype=np.uint64)), pa.string()), 19, "0")
    return pc.binary_join_element_wise("2.25.", hi, lo, "")


def plan(instances: int, seed: int) -> Plan:
    rng = np.random.default_rng(seed)
    names = list(MODALITIES)
    shares = np.array([MODALITIES[m][0] for m in names])
    mean = sum(MODALITIES[m][0] * sum(MODALITIES[m][1]) / 2 * MODALITIES[m][2] for m in names)
    n = int(instances / mean * 1.3) + 10
    modality = rng.choice(len(names), n, p=shares / shares.sum())
    lo = np.array([MODALITIES[m][1][0] for m in names])[modality]
    hi = np.array([MODALITIES[m][1][1] for m in names])[modality]
    n_series = rng.integers(lo, hi + 1)
    series_study = np.repeat(np.arange(n), n_series)
    sm = modality[series_study]
    median = np.array([MODALITIES[m][2] for m in names])[sm]
    i_lo = np.array([MODALITIES[m][3][0] for m in names])[sm]
    i_hi = np.array([MODALITIES[m][3][1] for m in names])[sm]
    per_series = np.clip(np.rint(median * rng.lognormal(0, 0.5, sm.size)), i_lo, i_hi).astype(np.int64)
    # Keep whole studies, in random order, until the instance count is reached (less than one study over).
    order = rng.permutation(n)
    per_study = np.bincount(series_study, weights=per_series, minlength=n).astype(np.int64)
    kept = order[: int(np.searchsorted(np.cumsum(per_study[order]), instances)) + 1]
    real = np.datetime64(FIRST_DAY) + rng.integers(0, 365 * YEARS, n).astype("timedelta64[D]")
    kept = kept[np.argsort(real[kept], kind="stable")]
    patients = max(1, kept.size // STUDIES_PER_PATIENT)
    patient = rng.integers(0, patients, n)
    shift = rng.integers(1, 366, patients).astype("timedelta64[D]")
    starts = np.concatenate([[0], np.cumsum(n_series)])
    series_idx = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in kept])
    return Plan(modality[kept], patient[kept], real[kept] - shift[patient[kept]], n_series[kept],
                np.repeat(np.arange(kept.size), n_series[kept]), per_series[series_idx])


def templates(out: Path, seed: int) -> dict[str, dict[str, pa.Table]]:
    """Per template modality (CT, MR, MG): the extracted rows of real de-identified sample studies."""
    studies, _ = template_studies(out, studies=6, seed=seed)
    by_modality: dict[str, dict[str, list[pa.Table]]] = {}
    for study in studies:
        modality = study["series"]["modality"][0].as_py()
        for name in TABLES:
            by_modality.setdefault(modality, {t: [] for t in TABLES})[name].append(study[name])
    return {m: {t: pa.concat_tables(parts[t]) for t in TABLES} for m, parts in by_modality.items()}


def _set(table: pa.Table, column: str, values: Any) -> pa.Table:
    pos = table.schema.get_field_index(column)
    fld = table.schema.field(pos)
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, fld.type)
    return table.set_column(pos, fld, array.cast(fld.type))


def _one_item_lists(values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int32)), values)


def _from_templates(sources: dict[str, pa.Table], kinds: np.ndarray, ordinal: np.ndarray) -> pa.Table:
    """For each row, a row of the template table of its modality (``sources`` is keyed by template
    modality), cycling through the template's rows by ``ordinal``."""
    pieces, positions = [], []
    for k, m in enumerate(MODALITIES):
        rows = np.flatnonzero(kinds == k)
        if rows.size:
            source = sources[MODALITIES[m][4]]
            pieces.append(source.take(pa.array(ordinal[rows] % source.num_rows)))
            positions.append(rows)
    merged = pa.concat_tables(pieces).combine_chunks()
    return merged.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))


def _hex_digests(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` random SHA-256-like hex strings, built as one buffer."""
    raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text = np.empty((n, 64), dtype=np.uint8)
    text[:, 0::2], text[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * 64)
    return pa.StringArray.from_buffers(n, offsets.buffers()[1], pa.py_buffer(text.tobytes()))


def _json_parts(tpl: dict[str, dict[str, pa.Table]]) -> dict[str, pa.Table]:
    """Each template instance's DICOM JSON cut around its SOP Instance UID, to put a new one in."""
    parts = {}
    for m, tables in tpl.items():
        cut = [(text or "").split(f'"{sop}"', 1) for text, sop in zip(
            tables["instances"]["dicom_json"].to_pylist(), tables["instances"]["sop_instance_uid"].to_pylist())]
        parts[m] = pa.table({"prefix": [c[0] + '"' for c in cut], "suffix": ['"' + c[-1] for c in cut]})
    return parts


@dataclass
class Generator:
    """Builds the three tables of a range of studies of a :class:`Plan`."""

    plan: Plan
    tpl: dict[str, dict[str, pa.Table]]
    json: bool
    seed: int

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed + 1)
        self.study_uids = _uids(rng, self.plan.study_modality.size)
        self.series_uids = _uids(rng, self.plan.series_study.size)
        self.pseudo_ids = pc.binary_join_element_wise(
            "PF", pc.utf8_lpad(pc.cast(pa.array(self.plan.study_patient), pa.string()), 20, "0"), "")
        self.json_parts = _json_parts(self.tpl) if self.json else {}
        self.series_start = np.concatenate([[0], np.cumsum(self.plan.study_series)])

    def batch(self, s0: int, s1: int) -> dict[str, pa.Table]:
        rng = np.random.default_rng([self.seed, s0])
        p = self.plan
        se0, se1 = int(self.series_start[s0]), int(self.series_start[s1])
        series = np.arange(se0, se1)
        counts = p.series_instances[se0:se1]
        inst_series = np.repeat(series, counts)
        ordinal = np.arange(inst_series.size) - np.repeat(np.cumsum(counts) - counts, counts)
        instances = self._instances(rng, inst_series, ordinal)
        sizes = instances["file_size"].to_numpy()
        series_bytes = np.bincount(inst_series - se0, weights=sizes, minlength=series.size)
        series_table = self._series(rng, series, counts, series_bytes)
        study_bytes = np.bincount(p.series_study[series] - s0, weights=series_bytes, minlength=s1 - s0)
        study_counts = np.bincount(p.series_study[series] - s0, weights=counts, minlength=s1 - s0)
        return {"studies": self._studies(rng, np.arange(s0, s1), study_counts, study_bytes),
                "series": series_table, "instances": instances}

    def _instances(self, rng: np.random.Generator, inst_series: np.ndarray, ordinal: np.ndarray) -> pa.Table:
        p, n = self.plan, inst_series.size
        study = p.series_study[inst_series]
        kinds = p.study_modality[study]
        # The template's JSON (kB per row) is left out of the copy: it is replaced below anyway.
        sources = {m: t["instances"].drop_columns(["dicom_json"]) for m, t in self.tpl.items()}
        table = _from_templates(sources, kinds, ordinal)
        sop = _uids(rng, n)
        study_uid, series_uid = self.study_uids.take(pa.array(study)), self.series_uids.take(pa.array(inst_series))
        classes = pa.array([MODALITIES[m][5] for m in MODALITIES]).take(pa.array(kinds))
        path = pc.binary_join_element_wise("file:///var/lake/dicom/", study_uid, "/", series_uid, "/", sop, ".dcm", "")
        for column, values in (("study_uid", study_uid), ("series_uid", series_uid), ("sop_instance_uid", sop),
                               ("sop_class_uid", classes), ("instance_number", pa.array(ordinal + 1)),
                               ("file_path", path), ("file_sha256", _hex_digests(rng, n))):
            table = _set(table, column, values)
        if self.json:
            cut = _from_templates(self.json_parts, kinds, ordinal)
            text = pc.binary_join_element_wise(cut["prefix"], sop, cut["suffix"], "")
        else:
            text = pa.nulls(n, pa.large_string())
        fld = SCHEMAS["instances"].field("dicom_json")
        return table.add_column(SCHEMAS["instances"].get_field_index("dicom_json"), fld, text)

    def _series(self, rng: np.random.Generator, series: np.ndarray, counts: np.ndarray,
                size: np.ndarray) -> pa.Table:
        p = self.plan
        study = p.series_study[series]
        kinds = p.study_modality[study]
        number = series - self.series_start[study]
        table = _from_templates({m: t["series"] for m, t in self.tpl.items()}, kinds, number)
        parts = [MODALITIES[m][6][int(rng.integers(len(MODALITIES[m][6])))] for m in (list(MODALITIES)[k] for k in kinds)]
        for column, values in (("study_uid", self.study_uids.take(pa.array(study))),
                               ("series_uid", self.series_uids.take(pa.array(series))),
                               ("series_number", pa.array(number + 1)),
                               ("modality", pa.array(list(MODALITIES)).take(pa.array(kinds))),
                               ("body_part_examined", pa.array(parts)),
                               ("number_of_instances", pa.array(counts)), ("total_file_size", pa.array(size.astype(np.int64)))):
            table = _set(table, column, values)
        return table

    def _studies(self, rng: np.random.Generator, studies: np.ndarray, counts: np.ndarray,
                 size: np.ndarray) -> pa.Table:
        p = self.plan
        kinds = p.study_modality[studies]
        table = _from_templates({m: t["studies"] for m, t in self.tpl.items()}, kinds, studies)
        modality = pa.array(list(MODALITIES)).take(pa.array(kinds))
        age = (p.study_patient[studies] * 7919) % 90 + (p.study_date[studies].astype("datetime64[Y]").astype(int) - 50)
        age_text = pc.binary_join_element_wise(pc.utf8_lpad(pc.cast(pa.array(age), pa.string()), 3, "0"), "Y", "")
        sex = pa.array(np.where(p.study_patient[studies] % 2 == 0, "F", "M"))
        for column, values in (("study_uid", self.study_uids.take(pa.array(studies))),
                               ("patient_pseudo_id", self.pseudo_ids.take(pa.array(studies))),
                               ("study_date", pa.array(p.study_date[studies])), ("modalities", _one_item_lists(modality)),
                               ("number_of_series", pa.array(p.study_series[studies])),
                               ("number_of_instances", pa.array(counts.astype(np.int64))),
                               ("total_file_size", pa.array(size.astype(np.int64))),
                               ("patient_sex", sex), ("patient_age", age_text),
                               ("patient_age_years", pa.array(age.astype(np.float64)))):
            table = _set(table, column, values)
        return table


# -- writing ------------------------------------------------------------------------------------
@contextlib.contextmanager
def writer_layout(row_group_rows: int | None = None, partition_format: str | None = None,
                  instances_sort: tuple[str, ...] | None = None, bloom: bool = True) -> Iterator[None]:
    """The store's layout parameters changed for the duration (the product's values otherwise)."""
    saved = (store_mod.ROW_GROUP_ROWS, store_mod.PARTITION_FORMAT, store_mod.SORT_KEYS, store_mod.BLOOM_FILTER_COLUMNS)
    store_mod.ROW_GROUP_ROWS = row_group_rows or saved[0]
    store_mod.PARTITION_FORMAT = partition_format or saved[1]
    if instances_sort:
        store_mod.SORT_KEYS = {**saved[2], "instances": instances_sort}
    if not bloom:
        store_mod.BLOOM_FILTER_COLUMNS = {t: () for t in TABLES}
    try:
        yield
    finally:
        (store_mod.ROW_GROUP_ROWS, store_mod.PARTITION_FORMAT, store_mod.SORT_KEYS,
         store_mod.BLOOM_FILTER_COLUMNS) = saved


def _batches(counts: np.ndarray, per_batch: int) -> list[tuple[int, int]]:
    """Consecutive ranges of studies of about ``per_batch`` instances each."""
    ends = np.searchsorted(np.cumsum(counts), np.arange(per_batch, int(counts.sum()) + per_batch, per_batch))
    bounds = sorted({0, *(min(int(e) + 1, counts.size) for e in ends)})
    return list(zip(bounds[:-1], bounds[1:]))


def build_catalog(root: Path, gen: Generator, per_batch: int) -> dict[str, float]:
    """Commit every study of the plan in batches (real-date order), as nightly runs would."""
    p = gen.plan
    counts = np.bincount(p.series_study, weights=p.series_instances).astype(np.int64)
    store = CatalogStore(root)
    generating = committing = 0.0
    batches = _batches(counts, per_batch)
    for s0, s1 in batches:
        start = time.perf_counter()
        tables = gen.batch(s0, s1)
        generating += time.perf_counter() - start
        start = time.perf_counter()
        store.commit(tables)
        committing += time.perf_counter() - start
    return {"commits": len(batches), "generate_s": generating, "commit_s": committing}


def relayout(base: Path, root: Path, params: dict[str, Any], per_commit: int) -> float:
    """Commit the base catalog's rows again into ``root`` with other writer parameters, a few
    partitions at a time (whole studies: all rows of a study share its partition)."""
    snap = CatalogStore(base).snapshot()
    assert snap.directory is not None
    entries = {t: {e.partition: e for e in snap.entries[t] if e.rows} for t in TABLES}
    groups: list[list[str | None]] = [[]]
    rows = 0
    for part, entry in sorted(entries["instances"].items(), key=lambda kv: str(kv[0])):
        if rows >= per_commit:
            groups.append([])
            rows = 0
        groups[-1].append(part)
        rows += entry.rows
    store, seconds = CatalogStore(root), 0.0
    with writer_layout(**params):
        for group in groups:
            tables = {t: pa.concat_tables([pq_read(snap.directory / entries[t][p].path) for p in group if p in entries[t]])
                      for t in TABLES}
            start = time.perf_counter()
            store.commit(tables)
            seconds += time.perf_counter() - start
        store.vacuum(grace_s=0)
    return seconds


def pq_read(path: Path) -> pa.Table:
    return pq.ParquetFile(path).read()


def night_commit(root: Path, gen: Generator, params: dict[str, Any], studies: int) -> float:
    """Seconds to commit one night's worth of studies again (the newest ``studies``) under ``params``."""
    n = gen.plan.study_modality.size
    tables = gen.batch(n - studies, n)
    with writer_layout(**params):
        start = time.perf_counter()
        CatalogStore(root).commit(tables)
        return time.perf_counter() - start


# -- reading ------------------------------------------------------------------------------------
def readme_queries() -> list[tuple[str, str]]:
    """(name, SQL) of every ``sql`` block of the README, named by its first comment."""
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    out = []
    for sql in blocks:
        first = sql.strip().splitlines()[0]
        out.append((first.lstrip("- ")[:60] if first.startswith("--") else first[:60], sql))
    return out


def evict(root: Path) -> None:
    """Drop the catalog's files from the page cache (clean pages only: the store fsyncs)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass
class Timing:
    name: str
    cold: list[float]
    warm: list[float]
    rows: int


def time_query(root: Path, name: str, sql: str, params: list[Any] | None, runs: int) -> Timing:
    def once() -> tuple[float, int]:
        start = time.perf_counter()
        table = query(root, sql, params)
        return time.perf_counter() - start, table.num_rows

    cold = []
    for _ in range(runs):
        evict(root)
        cold.append(once()[0])
    warm, rows = [], 0
    for _ in range(runs):
        seconds, rows = once()
        warm.append(seconds)
    return Timing(name, cold, warm, rows)


def workload(gen: Generator) -> list[tuple[str, str, list[Any] | None]]:
    """The README's queries, then one study (a CT study: the most rows) and one patient."""
    p = gen.plan
    ct = int(np.flatnonzero(p.study_modality == list(MODALITIES).index("CT"))[len(p.study_modality) // 20])
    study_uid = gen.study_uids[ct].as_py()
    patient = gen.pseudo_ids[ct].as_py()
    return [(name, sql, None) for name, sql in readme_queries()] + [
        ("one study: all its instances", "SELECT * FROM instances WHERE study_uid = ?", [study_uid]),
        ("one patient: all files", "SELECT i.study_uid, i.series_uid, i.sop_instance_uid, i.file_path "
         "FROM studies s JOIN instances i USING (study_uid) WHERE s.patient_pseudo_id = ?", [patient]),
    ]


def time_workload(root: Path, gen: Generator, runs: int) -> list[Timing]:
    return [time_query(root, name, sql, params, runs) for name, sql, params in workload(gen)]


def layout_stats(root: Path) -> dict[str, Any]:
    files = CatalogStore(root).files("instances")
    groups = [pq.ParquetFile(f).metadata.num_row_groups for f in files]
    return {"files": len(files), "row_groups": sum(groups),
            "bytes": sum(Path(f).stat().st_size for f in files)}


# -- report -------------------------------------------------------------------------------------
def _ms(values: list[float]) -> str:
    med = statistics.median(values) * 1e3
    return f"{med:,.0f} ({min(values) * 1e3:,.0f}–{max(values) * 1e3:,.0f})"


def print_timings(title: str, timings: list[Timing]) -> None:
    print(f"\n{title}\n\n| query | cold ms, median (range) | warm ms, median (range) | rows |\n|---|---|---|---|")
    for t in timings:
        print(f"| {t.name} | {_ms(t.cold)} | {_ms(t.warm)} | {t.rows:,} |")


def print_layouts(rows: list[tuple[str, dict[str, Any], float, list[Timing]]]) -> None:
    names = [f"Q{i + 1}" for i in range(len(rows[0][3]))]
    print("\n" + "\n".join(f"Q{i + 1}: {t.name}" for i, t in enumerate(rows[0][3])))
    head = "| layout | files | row groups | MB | night commit s | " + " | ".join(names) + " |"
    print("\nwarm median ms per query (cold in brackets)\n\n" + head + "\n" + "|---" * (5 + len(names)) + "|")
    for label, stats, night, timings in rows:
        cells = [f"{statistics.median(t.warm) * 1e3:,.0f} ({statistics.median(t.cold) * 1e3:,.0f})" for t in timings]
        print(f"| {label} | {stats['files']} | {stats['row_groups']} | {stats['bytes'] / 1e6:,.0f} | {night:.2f} | "
              + " | ".join(cells) + " |")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=250_000, help="instances per commit while building")
    parser.add_argument("--dicom-json", choices=("null", "template"), default="null")
    parser.add_argument("--runs", type=int, default=3, help="cold and warm runs per query")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--night", type=int, default=100, help="studies in the timed one-night commit")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--reuse", action="store_true",
                        help="time the catalog already in --dir/catalog (compacted again) instead of building one")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run(work, args)


def run(work: Path, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    tpl = templates(work / "templates", args.seed)
    p = plan(args.instances, args.seed)
    gen = Generator(p, tpl, args.dicom_json == "template", args.seed)
    print(f"{int(p.series_instances.sum()):,} instances, {p.series_study.size:,} series, {p.study_modality.size:,} studies, "
          f"{np.unique(p.study_patient).size:,} patients; dicom_json {args.dicom_json}; "
          f"study months {str(p.study_date.min())[:7]} to {str(p.study_date.max())[:7]}")
    base = work / "catalog"
    label = f"month, {store_mod.ROW_GROUP_ROWS // 1024}k rows"
    layouts = []
    if args.reuse and (base / store_mod.CURRENT_LINK).exists():
        print(f"reusing the catalog in {base} (same --instances and --seed: the same studies)")
    else:
        built = build_catalog(base, gen, args.batch)
        print(f"built by {built['commits']} commits: generating {built['generate_s']:.0f} s, "
              f"committing {built['commit_s']:.0f} s; peak RSS {_rss_gb():.1f} GB")
        layouts.append((f"{label}, after commits", layout_stats(base), night_commit(base, gen, {}, args.night),
                        time_workload(base, gen, args.runs)))
    start = time.perf_counter()
    CatalogStore(base).compact()  # with --reuse: rewrites every file with today's writer
    CatalogStore(base).vacuum(grace_s=0)
    print(f"compact: {time.perf_counter() - start:.0f} s")
    final = time_workload(base, gen, args.runs)
    print_timings(f"the product's layout (study month, {label}, sorted by study), after compact:", final)
    nights = [night_commit(base, gen, {}, args.night) for _ in range(args.runs)]
    print(f"night commit ({args.night} studies again): {_ms(nights)} ms")
    layouts.append((f"{label}, compacted (the product)", layout_stats(base), statistics.median(nights), final))
    for name in filter(None, args.variants.split(",")):
        root = work / f"variant-{name}"
        seconds = relayout(base, root, VARIANTS[name], per_commit=max(args.batch, 1_000_000))
        night = night_commit(root, gen, VARIANTS[name], args.night)
        layouts.append((f"{name}: {VARIANTS[name]}", layout_stats(root), night, time_workload(root, gen, args.runs)))
        print(f"variant {name}: written in {seconds:.0f} s; peak RSS {_rss_gb():.1f} GB")
        shutil.rmtree(root)
    print_layouts(layouts)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; peak RSS {_rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
