"""Benchmark: ``pacsflow listen`` against DCMTK, same files, same run.

    .venv/bin/python -m bench.listener_vs_dcmtk [--studies 40] [--instances-per-series 50 50] [--repeat 3]
        [--engines dcmtk pynetdicom] [--forward-instances 4000] [--memory 2000 20000]

Three measurements, each repeated ``--repeat`` times (median and range printed):

1. **Receive rate.** One set of generated studies (``deployments/local/sampledata``) is sent by
   one DCMTK ``storescu`` association to
   (a) DCMTK ``storescp`` alone, writing to a folder: from ``storescu``'s start to the newest
       file's mtime in that folder;
   (b) ``pacsflow listen`` in a subprocess, once per receive engine, with no routing rules and a
       stability window of an hour (nothing is routed meanwhile): from ``storescu``'s start to the
       last object *received and tracked*, i.e. ``MAX(arrived_at)`` of the listener's tracker
       (``listener_dir/tracker.sqlite``), which is written once the object is staged (renamed
       into the inbox) and its row committed. With the ``dcmtk`` engine the objects of an
       association are staged when it ends, so this includes taking them in.
2. **Forward rate.** One study of ``--forward-instances`` objects is sent to the listener (rules:
   every object to one destination, a DCMTK ``storescp``; stability window ``--window`` s). From
   the *routing start* (the first row queued in the outbox: ``MIN(next_at)``, the time it was
   enqueued) to the *last object delivered* (``MAX(updated_at)`` of the ``delivered`` rows, set
   when the destination answered the C-STORE). Routing (header read, hard link, outbox row per
   object) overlaps delivery and is counted. Against: ``storescu`` sending the same files to a
   fresh ``storescp``, from its start to the newest file's mtime there.
3. **Memory.** Per ``--memory`` size, one series of that many 16×16 images is received and
   forwarded (as in 2). ``VmRSS`` is sampled every 0.2 s from ``/proc``: the listener's process,
   and its ``storescp`` children (``dcmtk`` engine) apart. Peaks are reported for the receive
   phase (until the last object is tracked) and the routing phase (routing start to last
   delivered), then the growth from the smallest size to the largest.

Not a test: nothing here asserts a speed. The listener runs as ``pacsflow listen`` with its
settings in the environment (``PACSFLOW_LISTENER__*``); no Prefect server is involved (no rule ingests).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from pacsflow.deployments.local import sampledata

from bench.nightly_vs_dcmtk import wait_port
from bench.rss_curve import SAMPLE_S, descendants, role, rss_mb
from tests.helpers import free_port

SENDER_AE = "BENCHSCU"
LISTENER_AE = "PACSFLOW"
SINK_AE = "SINK"
POLL_S = 0.2
PACSFLOW = str(Path(sys.executable).with_name("pacsflow"))


# -- the processes ---------------------------------------------------------------------------
@contextlib.contextmanager
def storescp(out: Path, port: int) -> Iterator[Path]:
    """A DCMTK ``storescp`` writing every object it receives into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", SINK_AE, "-od", str(out), "+xa", str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield out
    finally:
        proc.terminate()
        proc.wait()


def write_rules(path: Path, sink_port: int) -> Path:
    """Every object to one destination, as received."""
    path.write_text(f"""destinations:
  sink:
    ae_title: {SINK_AE}
    host: 127.0.0.1
    port: {sink_port}
rules:
  - name: everything-to-sink
    forward: [sink]
""")
    return path


@dataclass
class Listener:
    """``pacsflow listen`` in a subprocess, its state under ``work``."""

    work: Path
    engine: str
    window_s: float
    rules: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def listener_dir(self) -> Path:
        return self.work / "state" / "listener"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, TCP_NODELAY="1", PACSFLOW_STATE_ROOT=str(self.work / "state"),
                   PACSFLOW_DEID_KEY="benchmark-key-0123456789", PACSFLOW_LISTENER__AE_TITLE=LISTENER_AE,
                   PACSFLOW_LISTENER__PORT=str(self.port), PACSFLOW_LISTENER__ENGINE=self.engine,
                   PACSFLOW_LISTENER__ALLOWED_AES=json.dumps([SENDER_AE]),
                   PACSFLOW_LISTENER__STABLE_AFTER_S=str(self.window_s),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="ERROR")
        if self.rules is not None:
            env["PACSFLOW_LISTENER__RULES_FILE"] = str(self.rules)
        return env

    def __enter__(self) -> "Listener":
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "listener.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([PACSFLOW, "listen"], env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_port(self.port, timeout=120)
        except RuntimeError:
            self.__exit__()
            raise RuntimeError(f"the listener did not start; see {self.work / 'listener.log'}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # the CLI stops the service on KeyboardInterrupt
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tracked(self) -> tuple[int, float]:
        """(objects tracked, when the last one was): the tracker's rows."""
        return _query(self.listener_dir / "tracker.sqlite", "SELECT COUNT(*), MAX(arrived_at) FROM objects")

    def delivered(self) -> tuple[int, float]:
        """(rows delivered, when the last one was)."""
        return _query(self.listener_dir / "outbox.sqlite",
                      "SELECT COUNT(*), MAX(updated_at) FROM deliveries WHERE state = 'delivered'")

    def routing(self) -> tuple[float, float]:
        """(first row queued, last row queued): enqueue times, as no delivery failed."""
        return _query(self.listener_dir / "outbox.sqlite", "SELECT MIN(next_at), MAX(next_at) FROM deliveries")


def _query(db: Path, sql: str) -> tuple:
    if not db.exists():
        return (0, 0.0)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        n, t = con.execute(sql).fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet
        return (0, 0.0)
    finally:
        con.close()
    return (n or 0, t or 0.0)


def wait_count(read: Callable[[], tuple[int, float]], n: int, what: str, timeout_s: float = 1800) -> float:
    """Poll ``read`` until it counts ``n``; the time it reports then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count, at = read()
        if count >= n:
            return at
        time.sleep(POLL_S)
    raise RuntimeError(f"{what}: {read()[0]} of {n} after {timeout_s:.0f}s")


def send(folder: Path, port: int, called_ae: str) -> float:
    """One ``storescu`` association with every file under ``folder``; its start (epoch seconds)."""
    t0 = time.time()
    sampledata.load([folder], "127.0.0.1", port, called_ae=called_ae, calling_ae=SENDER_AE)
    return t0


def newest_mtime(folder: Path, n: int) -> float:
    times = [e.stat().st_mtime for e in os.scandir(folder) if e.is_file()]
    if len(times) != n:
        raise RuntimeError(f"storescp wrote {len(times)} of {n} files")
    return max(times)


# -- the measurements ------------------------------------------------------------------------
def dcmtk_rate(files: Path, n: int, work: Path) -> float:
    """storescu → storescp: instances/s, storescu's start to the newest file written."""
    port = free_port()
    with storescp(work / "out", port) as out:
        t0 = send(files, port, SINK_AE)
        end = newest_mtime(out, n)
    shutil.rmtree(work, ignore_errors=True)
    return n / (end - t0)


def receive_rate(files: Path, n: int, work: Path, engine: str) -> float:
    """storescu → the listener, nothing routed: instances/s to the last object tracked."""
    with Listener(work, engine, window_s=3600) as listener:
        t0 = send(files, listener.port, LISTENER_AE)
        end = wait_count(listener.tracked, n, "tracked")
    shutil.rmtree(work, ignore_errors=True)
    return n / (end - t0)


def forward_rate(files: Path, n: int, work: Path, engine: str, window_s: float) -> tuple[float, float]:
    """The listener forwards a stable study to a storescp: (instances/s from the routing start
    to the last delivered, routing alone in instances/s)."""
    sink_port = free_port()
    work.mkdir(parents=True)
    rules = write_rules(work / "rules.yaml", sink_port)
    with storescp(work / "sink", sink_port), Listener(work, engine, window_s, rules) as listener:
        send(files, listener.port, LISTENER_AE)
        end = wait_count(listener.delivered, n, "delivered")
        first, last = listener.routing()
    shutil.rmtree(work, ignore_errors=True)
    return n / (end - first), n / max(last - first, 1e-9)


@dataclass
class Trace:
    """RSS samples of the listener (MiB): (epoch seconds, its process, its storescp children)."""

    samples: list[tuple[float, float, float]] = field(default_factory=list)

    def peak(self, start: float, end: float) -> tuple[float, float]:
        inside = [(p, s) for t, p, s in self.samples if start <= t <= end]
        return max((p for p, _ in inside), default=0.0), max((s for _, s in inside), default=0.0)


@contextlib.contextmanager
def sampling(pid: int) -> Iterator[Trace]:
    trace = Trace()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            scp = sum(rss_mb(c) for c, cmd in descendants(pid) if role(cmd) == "storescp")
            trace.samples.append((time.time(), rss_mb(pid), scp))
            stop.wait(SAMPLE_S)

    thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield trace
    finally:
        stop.set()
        thread.join()


def memory_run(files: Path, n: int, work: Path, engine: str, window_s: float) -> dict[str, float]:
    """One series received and forwarded, RSS sampled: peaks per phase (MiB)."""
    sink_port = free_port()
    work.mkdir(parents=True)
    rules = write_rules(work / "rules.yaml", sink_port)
    with storescp(work / "sink", sink_port), Listener(work, engine, window_s, rules) as listener:
        assert listener.proc is not None
        with sampling(listener.proc.pid) as trace:
            t0 = send(files, listener.port, LISTENER_AE)
            received = wait_count(listener.tracked, n, "tracked")
            end = wait_count(listener.delivered, n, "delivered")
            first, _ = listener.routing()
            time.sleep(2 * SAMPLE_S)
    shutil.rmtree(work, ignore_errors=True)
    recv, recv_scp = trace.peak(t0, received)
    route, route_scp = trace.peak(first, end)
    idle = trace.samples[0][1] if trace.samples else 0.0
    return {"start": idle, "receive": recv, "storescp": recv_scp, "route": route, "route_storescp": route_scp,
            "seconds": end - t0}


# -- printing --------------------------------------------------------------------------------
def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """``median (min–max)`` of the runs."""
    med = fmt.format(statistics.median(values))
    if len(values) < 2:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def generate(folder: Path, studies: int, series: tuple[int, int], per_series: tuple[int, int], rows: int,
             modalities: tuple[str, ...] = ("CT", "MR", "MG", "US"), seed: int = 2026) -> int:
    """Instances written under ``folder`` (``sampledata``)."""
    made = sampledata.generate(folder, studies=studies, days=7, end_date=dt.date.today(), seed=seed,
                               series_per_study=series, instances_per_series=per_series, rows=rows, cols=rows,
                               modalities=modalities)
    return sum(s.n_instances for s in made)


def bench_receive(args: argparse.Namespace, root: Path) -> None:
    files = root / "receive-set"
    n = generate(files, args.studies, tuple(args.series_per_study), tuple(args.instances_per_series), args.rows)
    print(f"\n1. receive rate: {args.studies} studies, {n} instances of {args.rows}x{args.rows}, one storescu association")
    rates: dict[str, list[float]] = {"storescp": []}
    for rep in range(args.repeat):  # interleaved, so that the load of the moment hits every side
        rates["storescp"].append(dcmtk_rate(files, n, root / f"scp-{rep}"))
        for engine in args.engines:
            rates.setdefault(engine, []).append(receive_rate(files, n, root / f"recv-{engine}-{rep}", engine))
        print(f"  run {rep + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)
    base = rates["storescp"]
    print("\n| receiver | instances/s | listener / storescp |\n|---|---|---|")
    print(f"| DCMTK `storescp` alone (to a folder) | {spread(base)} | — |")
    for engine in args.engines:
        ratio = [r / b for r, b in zip(rates[engine], base)]
        print(f"| `pacsflow listen`, engine {engine} (received and tracked) | {spread(rates[engine])} "
              f"| {spread(ratio, '{:.2f}')}× |")
    shutil.rmtree(files, ignore_errors=True)


def bench_forward(args: argparse.Namespace, root: Path) -> None:
    files = root / "forward-set"
    per_series = args.forward_instances // 4
    n = generate(files, 1, (4, 4), (per_series, per_series), args.rows, ("CT",), seed=7)
    engine = args.engines[0]
    print(f"\n2. forward rate: one study of {n} instances of {args.rows}x{args.rows} to a storescp "
          f"(listener engine {engine}, window {args.window:g}s)")
    ours: list[float] = []
    routing: list[float] = []
    theirs: list[float] = []
    for rep in range(args.repeat):
        theirs.append(dcmtk_rate(files, n, root / f"fwd-scu-{rep}"))
        rate, route = forward_rate(files, n, root / f"fwd-{rep}", engine, args.window)
        ours.append(rate)
        routing.append(route)
        print(f"  run {rep + 1}: storescu {theirs[-1]:.0f}/s, listener {rate:.0f}/s (routing alone {route:.0f}/s)",
              flush=True)
    ratio = [o / t for o, t in zip(ours, theirs)]
    print("\n| sender | instances/s | listener / storescu |\n|---|---|---|")
    print(f"| DCMTK `storescu` → `storescp` | {spread(theirs)} | — |")
    print(f"| `pacsflow listen` routing start → last delivered | {spread(ours)} | {spread(ratio, '{:.2f}')}× |")
    print(f"| (of which routing: header, link, outbox row) | {spread(routing)} | |")
    shutil.rmtree(files, ignore_errors=True)


def bench_memory(args: argparse.Namespace, root: Path) -> None:
    print(f"\n3. memory: one series of 16x16 images received and forwarded to a storescp (window {args.window:g}s)")
    rows = []
    for size in sorted(args.memory):
        files = root / f"series-{size}"
        n = generate(files, 1, (1, 1), (size, size), 16, ("CT",), seed=11)
        for engine in args.engines:
            runs = [memory_run(files, n, root / f"mem-{engine}-{size}-{rep}", engine, args.window)
                    for rep in range(args.memory_repeat)]
            rows.append((n, engine, runs))
            print(f"  {n} images, engine {engine}: " + "; ".join(
                f"receive peak {r['receive']:.0f} MiB, routing peak {r['route']:.0f} MiB in {r['seconds']:.0f}s"
                for r in runs), flush=True)
        shutil.rmtree(files, ignore_errors=True)
    keys = ("start", "receive", "route", "storescp", "route_storescp")
    print("\n| images | engine | listener at start | peak, receiving | peak, routing and forwarding "
          "| its storescp children, receiving | …, routing |\n|---|---|---|---|---|---|---|")
    for n, engine, runs in rows:
        cells = " | ".join(f"{spread([r[k] for r in runs])} MiB" for k in keys)
        print(f"| {n:,} | {engine} | {cells} |")
    for engine in args.engines:
        mine = [(n, runs) for n, e, runs in rows if e == engine]
        if len(mine) > 1:
            (n0, a), (n1, b) = mine[0], mine[-1]
            for k in ("receive", "route"):
                lo, hi = statistics.median(r[k] for r in a), statistics.median(r[k] for r in b)
                print(f"engine {engine}: peak {k} RSS from {n0:,} to {n1:,} images: {hi - lo:+.0f} MiB "
                      f"({100 * (hi / lo - 1):+.1f} %)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=40, help="receive set: studies")
    ap.add_argument("--series-per-study", type=int, nargs=2, default=(2, 2))
    ap.add_argument("--instances-per-series", type=int, nargs=2, default=(50, 50))
    ap.add_argument("--rows", type=int, default=64, help="image rows and columns (receive and forward sets)")
    ap.add_argument("--engines", nargs="+", default=["dcmtk", "pynetdicom"], choices=["dcmtk", "pynetdicom"],
                    help="listener.engine of the listener runs (forwarding uses the first)")
    ap.add_argument("--forward-instances", type=int, default=4000, help="forward set: one study, 4 series")
    ap.add_argument("--window", type=float, default=3.0, help="listener.stable_after_s when routing")
    ap.add_argument("--memory", type=int, nargs="*", default=[2000, 20000], help="series sizes (none: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the receive and forward measurements")
    ap.add_argument("--memory-repeat", type=int, default=1, help="runs of each memory size")
    ap.add_argument("--only", nargs="+", choices=["receive", "forward", "memory"],
                    default=["receive", "forward", "memory"])
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="pacsflow-listen-bench-"))
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    try:
        steps = {"receive": bench_receive, "forward": bench_forward, "memory": bench_memory}
        for name in args.only:
            steps[name](args, root)
    finally:
        print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
