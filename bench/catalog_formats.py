"""Commit cost of the catalog's table-format candidates on pacsflow's commit pattern.

The pattern (issue 17, part 2): a commit replaces whole studies' rows in the three catalog tables
(delete by ``study_uid`` + append, one atomic commit per table), 200 studies a batch, and three
OS processes commit into the same tables at once. Candidates:

* ``snapshot``: today's :class:`pacsflow.catalog.store.CatalogStore` (local disk only: flock, links);
* ``delta``: Delta Lake through ``deltalake`` (delta-rs): ``write_deltalake(mode="overwrite",
  predicate="study_uid IN (...)")`` (a replaceWhere: one commit removes and adds the files), as
  the product does it: :class:`pacsflow.catalog.table_format.DeltaCatalogStore` (sorted, zstd,
  Bloom filters, conflicts re-applied);
* ``iceberg``: Apache Iceberg through ``pyiceberg`` with its SQL catalog on SQLite:
  ``Table.overwrite(rows, overwrite_filter=In("study_uid", ...))`` (one catalog commit).

Each on local disk and on S3 (a moto server the bench starts on loopback, or ``--s3-endpoint``).
Rows come from :mod:`bench.catalog_scale`'s generator (real extracted rows as templates), its
instance counts scaled to about 100 per study (``--instances-per-study``).

Printed per format and storage:
* sequential: ``--new`` commits of new studies, then ``--replace`` re-commits of earlier batches;
  wall and CPU time per commit, p50 and p95 (nearest rank), and the ratio of the p50s to the
  snapshot store's on local disk;
* concurrent: three processes commit ``--rounds`` batches each (their own studies, a batch all
  three share, and a re-commit of their first): wall time, conflicts retried, and whether the final
  tables hold exactly the expected rows with no duplicate key.

    .venv/bin/python -m bench.catalog_formats
    .venv/bin/python -m bench.catalog_formats --formats delta --storages local --new 3 --replace 3
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from bench.catalog_scale import Generator, plan, templates
from pacsflow.catalog.schema import PRIMARY_KEYS
from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.table_format import DeltaCatalogStore

TABLES = ("instances", "series", "studies")  # children first: a study row appears after its rows
ATTEMPTS = 20
BUCKET = "pacsflow-bench"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


# -- the candidates --------------------------------------------------------------------------------
class Writer(Protocol):
    def setup(self) -> None: ...
    def commit(self, tables: dict[str, pa.Table]) -> int: ...  # returns the conflicts retried
    def read(self, table: str, columns: list[str]) -> pa.Table: ...


def _with_month(table: pa.Table) -> pa.Table:
    return table.append_column("study_month", pc.strftime(table["study_date"], format="%Y-%m"))


def _retrying(attempt: Any, retryable: tuple[type[BaseException], ...]) -> int:
    """Run ``attempt()`` until it commits; the conflicts it met (bounded, jittered back-off)."""
    for n in range(ATTEMPTS):
        try:
            attempt()
            return n
        except retryable:
            time.sleep(random.uniform(0, 0.05 * 2 ** min(n, 5)))
    raise RuntimeError(f"no commit after {ATTEMPTS} attempts")


@dataclass
class SnapshotStore:
    root: str

    def setup(self) -> None:
        CatalogStore(self.root).ensure_initialized()

    def commit(self, tables: dict[str, pa.Table]) -> int:
        CatalogStore(self.root).commit(tables)
        return 0

    def read(self, table: str, columns: list[str]) -> pa.Table:
        import pyarrow.parquet as pq

        paths = CatalogStore(self.root).snapshot().paths(table)
        return pa.concat_tables([pq.ParquetFile(p).read(columns=columns) for p in paths])


@dataclass
class Delta:
    root: str
    options: dict[str, str]

    def setup(self) -> None:
        DeltaCatalogStore(self.root, storage_options=self.options).ensure_initialized()

    def commit(self, tables: dict[str, pa.Table]) -> int:
        store = DeltaCatalogStore(self.root, storage_options=self.options)
        store.commit(tables)
        return store.retries

    def read(self, table: str, columns: list[str]) -> pa.Table:
        from deltalake import DeltaTable

        return DeltaTable(f"{self.root}/{table}", storage_options=self.options or None).to_pyarrow_table(columns=columns)


@dataclass
class Iceberg:
    db: str
    warehouse: str
    options: dict[str, str]

    def _catalog(self) -> Any:
        from pyiceberg.catalog.sql import SqlCatalog

        return SqlCatalog("bench", uri=f"sqlite:///{self.db}", warehouse=self.warehouse, **self.options)

    def setup(self) -> None:
        from pacsflow.catalog.schema import SCHEMAS

        cat = self._catalog()
        cat.create_namespace_if_not_exists("catalog")
        for t in TABLES:
            table = cat.create_table(f"catalog.{t}", schema=_with_month(SCHEMAS[t].empty_table()).schema)
            with table.update_spec() as spec:
                spec.add_identity("study_month")

    def commit(self, tables: dict[str, pa.Table]) -> int:
        from pyiceberg.exceptions import CommitFailedException, ValidationException
        from pyiceberg.expressions import In
        from sqlalchemy.exc import OperationalError

        cat = self._catalog()
        uids = In("study_uid", tables["studies"]["study_uid"].to_pylist())
        retries = 0
        for t in TABLES:
            data = _with_month(tables[t])
            retries += _retrying(lambda: cat.load_table(f"catalog.{t}").overwrite(data, overwrite_filter=uids),
                                 (CommitFailedException, ValidationException, OperationalError))
        return retries

    def read(self, table: str, columns: list[str]) -> pa.Table:
        return self._catalog().load_table(f"catalog.{table}").scan(selected_fields=tuple(columns)).to_arrow()


def make_writer(fmt: str, storage: str, work: Path, s3: str | None) -> Writer:
    work.mkdir(parents=True, exist_ok=True)  # the Iceberg catalog's SQLite file stays local
    if storage == "s3":
        assert s3 is not None
        base = f"s3://{BUCKET}/{work.name}/{fmt}"
        if fmt == "delta":
            return Delta(base, {**S3_KEYS, "AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true",
                                "aws_conditional_put": "etag"})
        if fmt == "iceberg":
            return Iceberg(str(work / f"{fmt}-s3.db"), base, {
                "s3.endpoint": s3, "s3.access-key-id": "bench", "s3.secret-access-key": "bench",
                "s3.region": "us-east-1"})
        raise SystemExit(f"{fmt} has no S3 storage")
    root = work / f"{fmt}-local"
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "delta":
        return Delta(str(root), {})
    if fmt == "iceberg":
        return Iceberg(str(root / "catalog.db"), f"file://{root}", {})
    return SnapshotStore(str(root))


# -- rows ---------------------------------------------------------------------------------------------
def write_batches(work: Path, batches: int, studies: int, per_study: float, seed: int) -> list[Path]:
    """``batches`` batches of ``studies`` generated studies as Arrow IPC files (one per table)."""
    tpl = templates(work / "templates", seed)
    p = plan(batches * studies * 500, seed)  # more studies than needed: the batches take the first ones
    scale = per_study * p.study_modality.size / p.series_instances.sum()
    p.series_instances = np.maximum(1, np.rint(p.series_instances * scale)).astype(np.int64)
    gen = Generator(p, tpl, False, seed)
    paths = []
    for b in range(batches):
        s0 = b * studies
        tables = gen.batch(s0, s0 + studies)
        path = work / "batches" / f"b{b:03d}"
        path.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            with ipc.new_file(path / f"{name}.arrow", table.schema) as out:
                out.write_table(table)
        paths.append(path)
    return paths


def load_batch(path: Path) -> dict[str, pa.Table]:
    return {t: ipc.open_file(path / f"{t}.arrow").read_all() for t in TABLES}


# -- measuring ----------------------------------------------------------------------------------------
@dataclass
class Timed:
    wall: list[float]
    cpu: list[float]
    retries: int = 0


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]


def sequential(writer: Writer, batches: list[Path], new: int, replace: int) -> tuple[Timed, Timed]:
    fresh, again = Timed([], []), Timed([], [])
    for i in list(range(new)) + list(range(replace)):
        tables = load_batch(batches[i])
        wall, cpu = time.perf_counter(), time.process_time()
        retries = writer.commit(tables)
        into = fresh if len(fresh.wall) < new else again
        into.wall.append(time.perf_counter() - wall)
        into.cpu.append(time.process_time() - cpu)
        into.retries += retries
    return fresh, again


def _worker(writer: Writer, batches: list[str], out: Any) -> None:
    retries, cpu = 0, time.process_time()
    for path in batches:
        retries += writer.commit(load_batch(Path(path)))
    out.put((os.getpid(), retries, time.process_time() - cpu))


def concurrent(writer: Writer, batches: list[Path], rounds: int, processes: int = 3) -> dict[str, Any]:
    """``processes`` OS processes commit at once: own batches, one shared batch, a re-commit of their first."""
    shared = batches[0]
    plans = []
    for k in range(processes):
        own = batches[1 + k * (rounds - 2): 1 + (k + 1) * (rounds - 2)]
        plans.append([str(p) for p in own[:1] + [shared] + own[1:] + own[:1]][:rounds])
    ctx = mp.get_context("spawn")  # delta-rs and pyiceberg start threads: no fork
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(writer, plan_, out)) for plan_ in plans]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    results = [out.get(timeout=5) for proc in procs if proc.exitcode == 0]
    wall = time.perf_counter() - start
    expected = {Path(p) for plan_ in plans for p in plan_}
    return {"wall": wall, "retries": sum(r[1] for r in results), "cpu": sum(r[2] for r in results),
            "commits": sum(len(p) for p in plans), "finished": sum(p.exitcode == 0 for p in procs),
            "rows_ok": rows_ok(writer, [Path(p) for p in sorted(expected)])}


def rows_ok(writer: Writer, batches: list[Path]) -> str:
    """``ok`` when every table holds exactly the rows of ``batches`` with no duplicate key."""
    problems = []
    for t in TABLES:
        keys = list(PRIMARY_KEYS[t])
        want = pa.concat_tables([ipc.open_file(b / f"{t}.arrow").read_all().select(keys) for b in batches])
        have = writer.read(t, keys)
        distinct = have.group_by(keys).aggregate([]).num_rows
        if have.num_rows != want.num_rows or distinct != have.num_rows:
            problems.append(f"{t}: {have.num_rows} rows, {distinct} distinct, {want.num_rows} expected")
    return "; ".join(problems) or "ok"


# -- S3 -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port (stopped by its PID), with the bench's bucket."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=url, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- report -------------------------------------------------------------------------------------------
def _ms(values: list[float], q: float) -> str:
    return f"{_p(values, q) * 1000:7.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="snapshot,delta,iceberg")
    parser.add_argument("--storages", default="local,s3")
    parser.add_argument("--studies", type=int, default=200, help="studies per batch")
    parser.add_argument("--instances-per-study", type=float, default=100.0)
    parser.add_argument("--new", type=int, default=5, help="timed commits of new studies")
    parser.add_argument("--replace", type=int, default=5, help="timed re-commits of earlier batches")
    parser.add_argument("--rounds", type=int, default=4, help="commits per concurrent writer")
    parser.add_argument("--s3-endpoint", default=None, help="an S3 server to use instead of a moto one")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="catalog-formats-")))
        run(work, args, stack)


def run(work: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    storages = args.storages.split(",")
    s3 = args.s3_endpoint or (stack.enter_context(moto_server()) if "s3" in storages else None)
    count = max(args.new, args.replace) + 1 + 3 * (args.rounds - 2)
    start = time.perf_counter()
    batches = write_batches(work, count, args.studies, args.instances_per_study, args.seed)
    rows = load_batch(batches[0])
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; deltalake, pyiceberg: {_versions()}")
    print(f"{count} batches of {args.studies} studies (batch 0: {rows['instances'].num_rows:,} instance, "
          f"{rows['series'].num_rows:,} series rows), generated in {time.perf_counter() - start:.0f} s")
    print(f"\n{'format':9} {'storage':6} | {'new p50':>8} {'p95':>7} {'cpu p50':>8} | {'replace p50':>11} {'p95':>7} "
          f"{'cpu p50':>8} | {'ratio wall':>10} {'cpu':>4} | 3 writers x {args.rounds}: {'wall s':>6} {'conflicts':>9} finished rows")
    base: tuple[float, float] | None = None
    for storage in storages:
        for fmt in args.formats.split(","):
            if fmt == "snapshot" and storage != "local":
                continue
            seq = make_writer(fmt, storage, work / "seq", s3)
            seq.setup()
            fresh, again = sequential(seq, batches, args.new, args.replace)
            conc = make_writer(fmt, storage, work / "conc", s3)
            conc.setup()
            c = concurrent(conc, batches, args.rounds)
            median = (statistics.median(fresh.wall + again.wall), statistics.median(fresh.cpu + again.cpu))
            base = median if fmt == "snapshot" and storage == "local" else base
            ratio = f"{median[0] / base[0]:10.2f} {median[1] / base[1]:4.2f}" if base else f"{'-':>10} {'-':>4}"
            print(f"{fmt:9} {storage:6} | {_ms(fresh.wall, .5)} {_ms(fresh.wall, .95)} {_ms(fresh.cpu, .5)} | "
                  f"{_ms(again.wall, .5):>11} {_ms(again.wall, .95)} {_ms(again.cpu, .5)} | {ratio} | "
                  f"{c['wall']:6.1f} {c['retries']:>9} {c['finished']}/3 {c['rows_ok']}", flush=True)
    print("\nms per commit of all three tables; ratio: p50 of all timed commits (wall, CPU) / the snapshot store's "
          "on local disk; conflicts: table commits re-applied after losing a race, under 3 concurrent writers")


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(version(p) for p in ("deltalake", "pyiceberg"))


if __name__ == "__main__":
    main()
