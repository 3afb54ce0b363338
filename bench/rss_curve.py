"""Memory against volume: the resident memory of one nightly run at 2,000 to 200,000 instances.

    .venv/bin/python -m bench.rss_curve [--instances 2000 20000 200000] [--per-series 50]

For each size: generate studies of small instances (``deployments/local/sampledata``, 2 series
per study, ``--per-series`` instances per series, 16×16 pixels, the usual CT/MR/MG/US mix),
load them into a private Orthanc with DCMTK ``storescu``, then run one ``nightly_ingest`` under
Prefect (``bench.nightly_vs_dcmtk``'s run: C-MOVE into our Storage SCP, de-identify in the worker
processes, lake, catalog) in a fresh spawned process. A sampler thread reads ``VmRSS`` from
``/proc`` every 0.2 s for:

  flow     the run's process (Prefect client, Storage SCP, bookkeeping, catalog commits);
  workers  its de-identification worker processes, summed at each sample;
  server   the Prefect test server the run starts (reported apart: a deployment runs its own).

It prints the peak and median of each per size, then the growth of the peaks from the smallest
size to the largest (the issue's goal: under 10 %). Generation and loading happen in this
process, never in the measured ones. Not a test: nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pacsflow.deployments.local import sampledata
from pacsflow.deployments.local.orthanc import (
    OrthancConfig,
    OrthancServer,
    default_modalities,
)

from tests.helpers import free_port

SAMPLE_S = 0.2
SERIES_PER_STUDY = 2
ROLES = ("flow", "workers", "storescp", "server")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        out.append((child, command_line(child)))
        todo.extend(parents.get(child, []))
    return out


def role(cmdline: str) -> str:
    """What a process under the run is: a de-identification worker (multiprocessing spawn), the
    Prefect test server (uvicorn), the native receiver's storescp processes, or other helpers
    (counted with the workers)."""
    if "uvicorn" in cmdline or "prefect" in cmdline and "server" in cmdline:
        return "server"
    if cmdline.startswith("storescp"):
        return "storescp"
    return "workers"


@dataclass
class Samples:
    mb: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})

    def take(self, pid: int) -> None:
        sums = dict.fromkeys(ROLES, 0.0)
        sums["flow"] = rss_mb(pid)
        own = command_line(pid)
        for child, cmd in descendants(pid):
            # A child between fork and exec (the native receiver's storescp, any subprocess) still
            # runs the flow's command line and shows the flow's shared pages as its own: counting
            # it doubled the workers' sum in the one sample that caught it.
            if cmd != own:
                sums[role(cmd)] += rss_mb(child)
        for r in ROLES:
            self.mb[r].append(sums[r])

    def peak(self, r: str) -> float:
        return max(self.mb[r], default=0.0)

    def peak_at(self, r: str) -> float:
        """When the peak was reached, in seconds from the run process's start."""
        values = self.mb[r]
        return values.index(max(values)) * SAMPLE_S if values else 0.0

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["seconds," + ",".join(ROLES)]
        lines += [f"{i * SAMPLE_S:.1f}," + ",".join(f"{self.mb[r][i]:.1f}" for r in ROLES)
                  for i in range(len(self.mb["flow"]))]
        path.write_text("\n".join(lines) + "\n", encoding="ascii")

    def median(self, r: str) -> float:
        seen = [v for v in self.mb[r] if v > 0]
        return statistics.median(seen) if seen else 0.0


def sample_until_done(process: multiprocessing.process.BaseProcess) -> Samples:
    samples = Samples()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            samples.take(process.pid or 0)
            stop.wait(SAMPLE_S)

    thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
    thread.start()
    process.join()
    stop.set()
    thread.join()
    return samples


def run_nightly(work: str, dicom_port: int, rest_url: str, receiver_port: int, out, log: str | None) -> None:
    """In the measured process: one nightly run (settings as ``bench.nightly_vs_dcmtk``'s), its
    counts sent back on ``out``. Wholly quarantined studies (ultrasound) fail the run's state: the
    result is read from it all the same. With ``log``, the run logs at INFO into that file, after
    a first line with the process's start as a Unix time, so a peak can be matched to a log line."""
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        started = time.time() - (time.monotonic() - process_start_monotonic())
        print(f"process start {started:.3f} ({dt.datetime.fromtimestamp(started):%H:%M:%S.%f})", flush=True)
    os.environ.update(
        PACSFLOW_PACS__PORT=str(dicom_port), PACSFLOW_PACS__HTTP_URL=rest_url,
        PACSFLOW_RECEIVER__PORT=str(receiver_port), PACSFLOW_STORAGE_ROOT=f"{work}/lake/dicom",
        PACSFLOW_CATALOG_ROOT=f"{work}/lake/catalog", PACSFLOW_STATE_ROOT=f"{work}/state",
        PACSFLOW_DEID_KEY="benchmark-key-0123456789", PACSFLOW_DEID__PIXEL_POLICY="quarantine",
        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO" if log else "ERROR",
    )
    from pacsflow.flows.nightly import nightly_ingest, run_result
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        result = run_result(nightly_ingest(return_state=True))
        seconds = time.perf_counter() - t0
    out.put((int(result["instances"]) + int(result["quarantined_objects"]), seconds, int(result["failed"])))


def process_start_monotonic() -> float:
    """This process's start on the monotonic clock (``/proc/self/stat`` field 22, in clock ticks
    since boot), so log times line up with the sampler's seconds."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(size: int, per_series: int, work: Path, log: Path | None = None) -> tuple[Samples, tuple[int, float, int]]:
    receiver_port = free_port()
    peers = {**default_modalities(), "PACSFLOW": ("PACSFLOW", "127.0.0.1", receiver_port)}
    server = OrthancServer(OrthancConfig(work / "orthanc", free_port(), free_port(), modalities=peers))
    server.start()
    try:
        t0 = time.perf_counter()
        studies = max(1, size // (SERIES_PER_STUDY * per_series))
        made = sampledata.generate(work / "in", studies=studies, days=7, end_date=dt.date.today(), seed=2026,
                                   series_per_study=(SERIES_PER_STUDY, SERIES_PER_STUDY),
                                   instances_per_series=(per_series, per_series), rows=16, cols=16)
        sampledata.load([work / "in"], "127.0.0.1", server.dicom_port)
        shutil.rmtree(work / "in")
        total = sum(s.n_instances for s in made)
        print(f"  {size}: generated and loaded {len(made)} studies / {total} instances into Orthanc "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        process = ctx.Process(target=run_nightly, name="nightly",
                              args=(str(work), server.dicom_port, server.rest_url, receiver_port, queue,
                                    str(log) if log else None))
        process.start()
        samples = sample_until_done(process)
        if process.exitcode != 0:
            raise RuntimeError(f"the nightly run exited with {process.exitcode}")
        return samples, queue.get(timeout=10)
    finally:
        server.stop(graceful=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, nargs="+", default=[2000, 20000, 200000],
                    help="run sizes, in instances (rounded down to whole studies)")
    ap.add_argument("--per-series", type=int, default=50, help="instances per series (2 series per study)")
    ap.add_argument("--commit-batch", type=int, help="studies per catalog commit (the setting's default: 200)")
    ap.add_argument("--keep", action="store_true", help="keep the work folders")
    ap.add_argument("--trace", type=Path, help="write each size's samples to TRACE/rss-SIZE.csv (seconds, MiB by role) "
                    "and the run's INFO log to TRACE/flow-SIZE.log")
    args = ap.parse_args(argv)
    if args.commit_batch:
        os.environ["PACSFLOW_COMMIT_BATCH"] = str(args.commit_batch)

    print("source: private Orthanc loaded with generated 16x16 instances (sampledata), C-MOVE into our Storage SCP; "
          f"RSS sampled every {SAMPLE_S}s from /proc")
    rows = []
    for size in sorted(args.instances):
        work = Path(tempfile.mkdtemp(prefix=f"pacsflow-rss-{size}-"))
        try:
            if args.trace:
                args.trace.mkdir(parents=True, exist_ok=True)
            log = args.trace / f"flow-{size}.log" if args.trace else None
            samples, (n, seconds, failed) = measure(size, args.per_series, work, log)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        rows.append((n, samples))
        if args.trace:
            samples.write_csv(args.trace / f"rss-{size}.csv")
        print(f"  {size}: {n} instances through the run in {seconds:.0f}s ({n / seconds:.0f}/s), {failed} studies "
              f"failed; flow peak {samples.peak('flow'):.0f} MiB "
              f"at {samples.peak_at('flow'):.0f}s of {len(samples.mb['flow']) * SAMPLE_S:.0f}s, workers peak "
              f"{samples.peak('workers'):.0f} MiB at {samples.peak_at('workers'):.0f}s", flush=True)

    print()
    print("| instances | flow peak | flow median | workers peak (sum) | workers median | storescp peak (sum) "
          "| Prefect server peak |")
    print("|---|---|---|---|---|---|---|")
    for n, s in rows:
        print(f"| {n:,} | {s.peak('flow'):.0f} MiB | {s.median('flow'):.0f} MiB | {s.peak('workers'):.0f} MiB "
              f"| {s.median('workers'):.0f} MiB | {s.peak('storescp'):.0f} MiB | {s.peak('server'):.0f} MiB |")
    if len(rows) > 1:
        (n0, first), (n1, last) = rows[0], rows[-1]
        for r in ROLES:
            growth = 100 * (last.peak(r) / first.peak(r) - 1) if first.peak(r) else 0.0
            print(f"peak {r} RSS growth from {n0:,} to {n1:,} instances: {growth:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
