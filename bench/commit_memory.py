"""A catalog commit's memory, without the rest of the nightly run.

    .venv/bin/python -m bench.commit_memory [--commits 30] [--studies 20] [--per-study 100]

Commits ``--commits`` batches of ``--studies`` new studies (2 series, ``--per-study`` instances
each, one study month) into a fresh catalog, as the nightly flow does with ``commit_batch``. The
instance rows carry a ``dicom_json`` of about 5 KB, like the de-identifier's. A sampler thread
reads ``VmRSS`` every 5 ms; for each commit it prints the resident memory before, the lift
during it and the memory after, the rows of the file it wrote (a merge of small files shows as
more rows than the batch), and Arrow's allocations. Not a test: nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
import threading
import time

import pyarrow as pa

from pacsflow.catalog.schema import SCHEMAS
from pacsflow.catalog.store import CatalogStore

from bench.rss_curve import rss_mb

STUDY_DATE = dt.date(2026, 11, 28)


def _column(field: pa.Field, n: int, given: dict[str, list]) -> pa.Array:
    """The given values, else nulls, else one plain value of the field's type repeated."""
    if field.name in given:
        return pa.array(given[field.name], field.type)
    if field.nullable:
        return pa.nulls(n, field.type)
    if pa.types.is_list(field.type):
        return pa.array([[]] * n, field.type)
    for value in (1, "x", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), False):
        try:
            return pa.array([value] * n, field.type)
        except (pa.ArrowTypeError, pa.ArrowInvalid, TypeError):
            continue
    raise TypeError(f"no value for {field}")


def _table(name: str, given: dict[str, list]) -> pa.Table:
    n = len(next(iter(given.values())))
    return pa.Table.from_arrays([_column(f, n, given) for f in SCHEMAS[name]], schema=SCHEMAS[name])


def batch(rnd: random.Random, studies: int, per_study: int) -> dict[str, pa.Table]:
    """A commit of new studies, every study a chunk of its own (as the flow's batch reads them)."""
    parts: dict[str, list[pa.Table]] = {"studies": [], "series": [], "instances": []}
    for _ in range(studies):
        study = f"2.25.{rnd.getrandbits(100)}"
        series = [f"2.25.{rnd.getrandbits(100)}" for _ in range(2)]
        sops = [(s, f"2.25.{rnd.getrandbits(100)}") for s in series for _ in range(per_study // 2)]
        attrs = [json.dumps({f"{k:08X}": {"vr": "LO", "Value": [f"{rnd.getrandbits(160):040x}"]} for k in range(60)})
                 for _ in sops]
        parts["studies"].append(_table("studies", {"study_uid": [study], "study_date": [STUDY_DATE]}))
        parts["series"].append(_table("series", {"study_uid": [study] * 2, "series_uid": series}))
        parts["instances"].append(_table("instances", {
            "study_uid": [study] * len(sops), "series_uid": [s for s, _ in sops],
            "sop_instance_uid": [sop for _, sop in sops], "dicom_json": attrs,
            "file_path": [f"lake/{sop}.dcm" for _, sop in sops]}))
    return {t: pa.concat_tables(p) for t, p in parts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=30)
    ap.add_argument("--studies", type=int, default=20, help="studies per commit (the flow's commit_batch)")
    ap.add_argument("--per-study", type=int, default=100, help="instances per study")
    args = ap.parse_args(argv)
    rnd = random.Random(2026)
    batches = [batch(rnd, args.studies, args.per_study) for _ in range(args.commits)]
    row_bytes = batches[0]["instances"].nbytes // max(1, batches[0]["instances"].num_rows)
    store = CatalogStore(tempfile.mkdtemp(prefix="pacsflow-commit-memory-"))
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb_self())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    base = rss_mb_self()
    print(f"{args.commits} commits of {args.studies} studies x {args.per_study} instances "
          f"({row_bytes} bytes an instance row in Arrow); process at {base:.0f} MiB with the batches built")
    lifts = []
    for i, tables in enumerate(batches):
        before = peak[0] = rss_mb_self()
        result = store.commit(tables)
        time.sleep(0.02)
        lifts.append(peak[0] - before)
        biggest = max(e.rows for e in store.snapshot().entries["instances"] if f"part-{result.version:012d}-" in e.path)
        print(f"commit {i + 1:3d}: {before:4.0f} MiB before, +{peak[0] - before:3.0f} during, "
              f"{rss_mb_self():4.0f} after; new instances file {biggest:6,} rows; "
              f"Arrow peak so far {pa.default_memory_pool().max_memory() / 2**20:.0f} MiB")
    stop.set()
    print(f"largest lift during a commit: {max(lifts):.0f} MiB; resident after the last: "
          f"{rss_mb_self() - base:+.0f} MiB against the start")
    return 0


def rss_mb_self() -> float:
    return rss_mb(os.getpid())


if __name__ == "__main__":
    sys.exit(main())
