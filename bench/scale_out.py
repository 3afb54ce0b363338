"""Scale-out: studies per second of the ``plan`` + ``ingest-shard`` flows with 1, 2 and 3 Prefect
workers, against two PACS 20 ms away.

    .venv/bin/python -m bench.scale_out [--studies 300] [--repeat 3] [--workers 1 2 3] [--latency-ms 20]
        [--shard-studies 25] [--days 3] [--deid-workers 0]

What runs, all real and on loopback: PostgreSQL (``tests/postgres.py``) holding the Prefect
server's database and pacsflow's state (``state.url``); a ``prefect server``; the ``plan`` and
``ingest-shard`` deployments of prefect.yaml on the process pool; two Orthanc PACS (the
deployment's ``pacs`` and the source ``b``), each loaded with half of the generated studies
(small CT and MR series) and each reached through its own TCP latency proxy of
``bench.fhir_batch_vs_single`` (each answer held back ``--latency-ms``: a PACS on another site,
so the curve shows what more workers buy by hiding round trips on 2 cores). The way back crosses
the same distance: each worker's receiver is registered at the PACS behind a proxy of its own, so
every C-STORE sub-operation of a C-MOVE waits one round trip too, as it would over a WAN. N ``prefect worker``
processes (``--limit 1``, worker numbers 1..N, each with its own receiver AE ``PACSFLOW{worker}``
and port); the catalog as Delta tables. The settings are the test's (tests/integration/test_shards.py).

For each worker count, and once more for 2 and 3 workers with ``max_associations=2``: fresh
state and lake, the workers started, then ``plan`` is called and the clock runs until every shard
is done. It prints studies/s per run, the median, the speed-up over one worker and the
efficiency (speed-up ÷ workers), and the flattening at ``max_associations=2`` (3 workers ÷ 2).
``--deid-workers`` sets ``deid_workers`` (default 0: a shard's de-identification in its flow-run
process; a pool's start costs a small shard more than it saves). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.fhir_batch_vs_single import LatencyProxy
from pacsflow.deployments.local import sampledata
from pacsflow.deployments.local.orthanc import OrthancConfig, OrthancServer, default_modalities
from tests.helpers import free_port
from tests.integration.prefect_server import deploy, pool_worker, running_prefect_server, worker_env
from tests.postgres import start_postgres

ROOT = Path(__file__).resolve().parents[1]
TODAY = dt.date.today()
PLAN_WAIT_S = 1800.0


def _receiver_base(workers: int) -> int:
    """A port p with p+1..p+workers free now (worker n listens on p + n)."""
    while True:
        base = free_port()
        if base + workers + 1 < 65535:
            return base


def load_pacs(work: Path, name: str, studies: int, days: int, seed: int, modalities: dict) -> OrthancServer:
    server = OrthancServer(OrthancConfig(work / f"orthanc-{name}", free_port(), free_port(), modalities=modalities))
    server.start()
    try:
        sampledata.generate(work / "in", studies=studies, days=days, end_date=TODAY - dt.timedelta(days=1),
                            seed=seed, modalities=("CT", "MR"), series_per_study=(2, 2), instances_per_series=(5, 5),
                            rows=64, cols=64)
        sampledata.load([work / "in"], "127.0.0.1", server.dicom_port)
    except BaseException:
        server.stop(graceful=False)  # not yet in the caller's exit stack
        raise
    finally:
        shutil.rmtree(work / "in", ignore_errors=True)
    return server


def one_run(work: Path, api: str, pacs_ports: tuple[int, int], base: int, workers: int, associations: int,
            state_url: str, args: argparse.Namespace) -> tuple[float, int]:
    """Fresh state and lake, ``workers`` workers, one plan: (seconds to the last shard done, studies cataloged)."""
    from pacsflow.flows.plan import plan
    from pacsflow.tasks.ingest.leases import Leases

    run = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    settings = {
        "PACSFLOW_PACS__PORT": str(pacs_ports[0]), "PACSFLOW_SOURCES__B__PORT": str(pacs_ports[1]),
        "PACSFLOW_RECEIVER__AE_TITLE": "PACSFLOW{worker}",
        "PACSFLOW_RECEIVER__PORT": str(base), "PACSFLOW_RECEIVER__ENGINE": "pynetdicom",
        "PACSFLOW_STORAGE_ROOT": str(run / "lake" / "dicom"), "PACSFLOW_CATALOG_ROOT": str(run / "lake" / "catalog"),
        "PACSFLOW_CATALOG__BACKEND": "delta", "PACSFLOW_STATE_ROOT": str(run / "state"),
        "PACSFLOW_STATE__URL": state_url, "PACSFLOW_DEID_KEY": "scale-out-bench-key-0123456789",
        "PACSFLOW_SHARDS__MAX_STUDIES": str(args.shard_studies), "PACSFLOW_MAX_ASSOCIATIONS": str(associations),
        "PACSFLOW_DEID_WORKERS": str(args.deid_workers),
        "PACSFLOW_MIN_FREE_MB": "0", "PACSFLOW_DEID__PIXEL_POLICY": "quarantine",
    }
    os.environ.update(settings)  # the plan runs here, with the workers' settings and no worker number
    os.environ.pop("PACSFLOW_SHARDS__WORKER", None)
    env = worker_env(api, run / "prefect-home", **settings)
    with ExitStack() as stack:
        for n in range(1, workers + 1):
            stack.enter_context(pool_worker({**env, "PACSFLOW_SHARDS__WORKER": str(n)}, run / f"worker{n}.log",
                                            "--limit", "1", "--name", f"bench-{n}-{run.name}"))
        time.sleep(3)  # the workers poll the pool once a second
        leases = Leases.under(run / "state", state_url)
        t0 = time.perf_counter()
        result = plan(since=TODAY - dt.timedelta(days=args.days + 1), until=TODAY)
        deadline = time.monotonic() + PLAN_WAIT_S
        while time.monotonic() < deadline:
            shards = leases.shards()
            if shards and all(p.finished for p in shards):
                break
            time.sleep(0.25)
        else:
            raise RuntimeError(f"shards not done after {PLAN_WAIT_S:.0f}s: {leases.shards()}")
        seconds = time.perf_counter() - t0
    return seconds, int(result["queued"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--associations", type=int, default=4, help="max_associations of the unconstrained runs")
    ap.add_argument("--shard-studies", type=int, default=25, help="shards.max_studies")
    ap.add_argument("--days", type=int, default=3, help="StudyDate days the studies spread over (a shard is a day "
                    "or a part of one)")
    ap.add_argument("--deid-workers", type=int, default=0, help="deid_workers of every shard run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (workers' logs, lakes)")
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    configs = [(n, args.associations) for n in args.workers] + [(n, 2) for n in args.workers if n >= 2]
    top = max(args.workers)
    work = Path(tempfile.mkdtemp(prefix="pacsflow-scale-"))
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; {args.studies} studies on two PACS, "
          f"latency {args.latency_ms:.0f} ms per PACS answer, {args.days} days, shards of at most "
          f"{args.shard_studies} studies, "
          f"deid_workers {args.deid_workers}")
    figures: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    postgres = start_postgres()
    try:
        with ExitStack() as stack:
            base = _receiver_base(top)
            back = {n: LatencyProxy(base + n, args.latency_ms / 1000) for n in range(1, top + 1)}
            for proxy in back.values():
                stack.callback(proxy.close)
            peers = {**default_modalities(),
                     **{f"PACSFLOW{n}": (f"PACSFLOW{n}", "127.0.0.1", p.port) for n, p in back.items()}}
            ports = []
            for name, studies, seed in (("pacs", args.studies - args.studies // 2, 17), ("b", args.studies // 2, 18)):
                pacs = load_pacs(work, name, studies, args.days, seed, peers)
                stack.callback(pacs.stop, graceful=False)
                proxy = LatencyProxy(pacs.dicom_port, args.latency_ms / 1000)
                stack.callback(proxy.close)
                ports.append(proxy.port)
            prefect_db = postgres.new_database().replace("postgresql://", "postgresql+asyncpg://", 1)
            api = stack.enter_context(running_prefect_server(work, PREFECT_API_DATABASE_CONNECTION_URL=prefect_db))
            deploy(worker_env(api, work / "deploy-home"), "plan", "ingest-shard")
            for rep in range(args.repeat):
                for workers, associations in configs:
                    seconds, studies = one_run(work, api, (ports[0], ports[1]), base, workers, associations,
                                               postgres.new_database(), args)
                    figures[(workers, associations)].append(studies / seconds)
                    print(f"  run {rep + 1}: {workers} worker(s), max_associations {associations}: {studies} studies "
                          f"in {seconds:.1f}s = {studies / seconds:.2f}/s; load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        postgres.stop()
        shutil.rmtree(postgres.folder, ignore_errors=True)
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(figures, args.associations)
    return 0


def report(figures: dict[tuple[int, int], list[float]], associations: int) -> None:
    median = {c: statistics.median(v) for c, v in figures.items()}
    one = median.get((1, associations))
    print("\n| workers | max_associations | studies/s, median (range) | speed-up | efficiency |")
    print("|---|---|---|---|---|")
    for (workers, limit), values in sorted(figures.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        m = median[(workers, limit)]
        speed = f"{m / one:.2f}×" if one else "-"
        eff = f"{m / one / workers:.0%}" if one else "-"
        print(f"| {workers} | {limit} | {m:.2f} ({min(values):.2f}–{max(values):.2f}) | {speed} | {eff} |")
    if (3, 2) in median and (2, 2) in median:
        print(f"\nwith max_associations=2: 3 workers ÷ 2 workers = {median[(3, 2)] / median[(2, 2)]:.2f} "
              "(the issue's bound: at most 1.15)")
    if (3, associations) in median and one:
        print(f"speed-up with 3 workers: {median[(3, associations)] / one:.2f} (the issue's target: at least 2.2)")


if __name__ == "__main__":
    sys.exit(main())
