"""What orchestration costs: Prefect's share of a nightly run's CPU, and a small night's fixed overhead.

    .venv/bin/python -m bench.prefect_share [--studies 30] [--repeat 3]

Generates two sets of studies (``deployments/local/sampledata``, the shape ``bench.nightly_vs_dcmtk``
uses): ``--studies`` of them, and a 6-study night. Each set is loaded into a private Orthanc, and each night runs ``--repeat`` times in each mode,
every time in a fresh Python process with fresh lake and state folders, the way
``pacsflow run nightly`` runs it (``temporary_api`` around ``nightly_ingest``):

  server     a real ``prefect server start`` that the bench starts on a free loopback port
             (its own PREFECT_HOME) and stops by its process id at the end; PREFECT_API_URL
             names it, as it does for a deployment's worker. Its CPU during each run is read
             from /proc (the server's process tree) and counted as Prefect's.
  baseline   (with ``--baseline DIR``) as server, but the run imports pacsflow from ``DIR/pacsflow/``
             (another version's ``flows tasks catalog deployments``, e.g. ``git archive main``
             unpacked there) through PYTHONPATH: two versions compared night by night, in turn.
  temporary  no PREFECT_API_URL: the run starts the temporary API of ``flows/temporary_server.py``
             and stops it at its end. The database was migrated beforehand (as on any night but
             the very first). That server is a reaped child; all its CPU is Prefect's.

What is counted, per run:
  run CPU      the run's process (less the sampler's own thread) + its reaped children (the
               de-identification workers, the temporary server) + the running server's CPU.
  Prefect CPU  the server's CPU, plus what a sampler in the run's process charges to Prefect:
               every 5 ms it reads each thread's CPU clock and charges what the thread used since
               the last look to the thread's current stack. A stack is Prefect's when its
               innermost frame of either prefect or pacsflow is prefect's, so what Prefect calls
               (httpx, anyio, pydantic, logging, SQLAlchemy for an in-process server) is Prefect's,
               and what our tasks call (pydicom, pynetdicom) is ours. Imports count too: the
               sampler starts before anything of Prefect or pacsflow is imported. CPU the
               sampler did not see (threads that ended between two looks, the interpreter's
               start) is printed as "unseen".
  task runs    read from the API at the end of the run, by task name, per study processed.
  timings      wall seconds from the process's start (before its interpreter starts) to the
               flow call and to the first study-level C-FIND, and to the process's exit; "after"
               is from the flow's return to the process's exit (artifacts already written;
               temporary server stopped; Prefect's queues of logs and events drained at exit),
               both less the time the bench spends reading the task runs from the API.

The pixel policy is ``quarantine`` (as in ``bench.nightly_vs_dcmtk``), logging at Prefect's
default (INFO: task logs go to the API, as in production). Medians and ranges over the repeats are
printed. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pacsflow.deployments.local.orthanc import OrthancServer

ROOT = Path(__file__).resolve().parents[1]
# Where the run's pacsflow code is: this checkout, or (baseline mode) DIR/pacsflow on PYTHONPATH.
PACKAGE = Path(os.environ["PREFECT_SHARE_PACKAGE"]) if os.environ.get("PREFECT_SHARE_PACKAGE") else ROOT
OURS = tuple(f"{PACKAGE / d}/" for d in ("flows", "tasks", "catalog", "deployments"))
PREFECT = "/site-packages/prefect/"
MODES = ("server", "baseline", "temporary")
BASELINE: list[str] = []  # --baseline DIR: where the "baseline" mode imports pacsflow from
SMALL_NIGHT = 6
SAMPLE_S = 0.005
IDLE_RATE = [0.0]  # the running server's CPU s/s with no run, measured once it has started


# -- in the run's process: the CPU sampler ------------------------------------------------------
def thread_clock(native_id: int) -> int:
    """Linux's CPU clock id of one thread of this process (its tid): MAKE_THREAD_CPUCLOCK(tid, SCHED)."""
    return ((~native_id) << 3) | 6


def _package(path: str) -> str:
    """A frame's library: the top-level package under site-packages, else the stdlib module."""
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    return Path(path).stem


def owner(frame: FrameType) -> tuple[str, str, str]:
    """(prefect | pacsflow | other, the owner's module area (Prefect's imports apart), the innermost
    frame's library)."""
    leaf = _package(frame.f_code.co_filename)
    importing = False
    f: FrameType | None = frame
    while f is not None:
        path = f.f_code.co_filename
        importing = importing or path.startswith("<frozen importlib")
        if PREFECT in path:
            area = path.split(PREFECT, 1)[1].split("/", 1)[0].removesuffix(".py")
            return "prefect", "(imports)" if importing else area, leaf
        if path.startswith(OURS):
            return "pacsflow", path[len(str(PACKAGE)) + 1:].removesuffix(".py"), leaf
        f = f.f_back
    return "other", "", leaf


class CpuSampler(threading.Thread):
    """Charges each thread's CPU, look by look, to the owner of its current stack (:func:`owner`)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.cpu: Counter[tuple[str, str, str]] = Counter()
        self.stopped = threading.Event()
        self._last: dict[int, float] = {}

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            self.look()

    def look(self) -> None:
        frames = sys._current_frames()
        for t in threading.enumerate():
            frame = frames.get(t.ident or -1)
            if t is self or t.native_id is None or frame is None:
                continue
            try:
                now = time.clock_gettime(thread_clock(t.native_id))
            except OSError:  # the thread ended meanwhile
                continue
            used = now - self._last.get(t.native_id, 0.0)
            self._last[t.native_id] = now
            if used > 0:
                self.cpu[owner(frame)] += used

    def stop(self) -> float:
        """Stop; this thread's own CPU seconds."""
        own = time.clock_gettime(thread_clock(self.native_id)) if self.native_id else 0.0
        self.stopped.set()
        self.join()
        return own


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def task_runs(flow_run_id: object) -> dict[str, int]:
    """Task runs of the flow run by task name, once the server has recorded them all (task run
    states reach it as events: wait until the count holds still)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    counts: Counter[str] = Counter()
    of_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        for _ in range(20):
            now: Counter[str] = Counter()
            while sum(now.values()) % 200 == 0:  # the API gives at most 200 a page
                page = client.read_task_runs(flow_run_filter=of_run, limit=200, offset=sum(now.values()))
                now.update(r.task_key.rsplit("-", 1)[0] for r in page)
                if not page:
                    break
            if now == counts and now:
                break
            counts = now
            time.sleep(0.5)
    return dict(counts)


def one_night(out: Path, started: float) -> None:
    """The run's process: one ``pacsflow run nightly`` (temporary_api + nightly_ingest), measured."""
    sampler = CpuSampler()
    sampler.start()
    marks = {"process": started}
    from pacsflow.flows.nightly import nightly_ingest, run_result
    from pacsflow.flows.temporary_server import temporary_api
    from pacsflow.tasks.pacs.client import PacsClient

    find = PacsClient.find_studies

    def first_find(self: PacsClient, *args: object, **kwargs: object) -> object:
        marks.setdefault("first_cfind", time.time())
        return find(self, *args, **kwargs)  # type: ignore[arg-type]

    PacsClient.find_studies = first_find  # type: ignore[method-assign]
    marks["imported"] = time.time()
    with temporary_api():
        marks["flow_call"] = time.time()
        state = nightly_ingest(return_state=True)
        marks["flow_return"] = time.time()
        result = run_result(state)
        counting = time.time()
        tasks = task_runs(state.state_details.flow_run_id)
        marks["counting_s"] = time.time() - counting  # the bench's own wait: not the run's
        workers = _cpu(resource.RUSAGE_CHILDREN)
    sampler_cpu = sampler.stop()
    marks["end"] = time.time()
    children = _cpu(resource.RUSAGE_CHILDREN)
    out.write_text(json.dumps({
        "marks": marks, "self_cpu": _cpu(resource.RUSAGE_SELF) - sampler_cpu, "workers_cpu": workers,
        "temporary_server_cpu": children - workers, "sampled": [[*k, v] for k, v in sampler.cpu.items()],
        "tasks": tasks, "studies": result["queued"], "instances": result["instances"],
        "quarantined": result["quarantined_objects"], "failed": result["failed"],
    }))


# -- the bench's process ------------------------------------------------------------------------
def nightly_env(orthanc: OrthancServer, work: Path, receiver_port: int) -> dict[str, str]:
    """A nightly run's settings against ``orthanc``, lake and state under ``work`` (as in
    ``bench.nightly_vs_dcmtk``, but with Prefect's default log level: logs go to the API)."""
    return {
        "PACSFLOW_PACS__PORT": str(orthanc.dicom_port), "PACSFLOW_PACS__HTTP_URL": orthanc.rest_url,
        "PACSFLOW_RECEIVER__PORT": str(receiver_port), "PACSFLOW_STORAGE_ROOT": str(work / "lake" / "dicom"),
        "PACSFLOW_CATALOG_ROOT": str(work / "lake" / "catalog"), "PACSFLOW_STATE_ROOT": str(work / "state"),
        "PACSFLOW_DEID_KEY": "benchmark-key-0123456789", "PACSFLOW_DEID__PIXEL_POLICY": "quarantine",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


@contextmanager
def loaded_orthanc(inputs: Path, work: Path) -> Iterator[tuple[OrthancServer, int]]:
    """A private Orthanc holding the studies under ``inputs``, which knows our receiver as PACSFLOW
    at a free port: (server, receiver port)."""
    from pacsflow.deployments.local import sampledata
    from pacsflow.deployments.local.orthanc import (
        OrthancConfig,
        OrthancServer,
        default_modalities,
    )

    from tests.helpers import free_port

    receiver_port = free_port()
    mods = {**default_modalities(), "PACSFLOW": ("PACSFLOW", "127.0.0.1", receiver_port)}
    orthanc = OrthancServer(OrthancConfig(work_dir=work / "orthanc", dicom_port=free_port(), http_port=free_port(),
                                          modalities=mods))
    orthanc.start()
    try:
        sampledata.load([inputs], "127.0.0.1", orthanc.dicom_port)
        yield orthanc, receiver_port
    finally:
        orthanc.stop(graceful=False)


def tree_cpu(root: int) -> float:
    """CPU seconds of process ``root`` and its descendants (with their reaped children), from /proc."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        cpu[pid] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    mine, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in mine]
        mine.update(kids)
        frontier.extend(kids)
    return sum(cpu.get(p, 0.0) for p in mine)


def start_server(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on a free loopback port, in its own process group; (process, API URL)."""
    from bench.nightly_vs_dcmtk import wait_port
    from tests.helpers import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    wait_port(port, timeout=180)
    _wait_healthy(url)
    return process, url


def _wait_healthy(url: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stop_server(process: subprocess.Popen) -> None:
    """The server and what it started (its own process group), politely, then not."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def idle_rate(pid: int, seconds: float = 20.0) -> float:
    """CPU seconds per second the running server spends with no run (its services' loops)."""
    before = tree_cpu(pid)
    time.sleep(seconds)
    return (tree_cpu(pid) - before) / seconds


def run_night(env: dict[str, str], work: Path, server_pid: int | None) -> dict:
    """One night in a fresh process; its measurements, with the running server's CPU meanwhile."""
    work.mkdir(parents=True, exist_ok=True)
    out, log = work / "night.json", work / "night.log"
    server_before = tree_cpu(server_pid) if server_pid else 0.0
    started = time.time()
    code = subprocess.run([sys.executable, "-m", "bench.prefect_share", "--one-night", str(out),
                           "--started", repr(started)], check=False, env=env, cwd=ROOT, stdout=log.open("wb"),
                          stderr=subprocess.STDOUT).returncode
    ended = time.time()
    if code or not out.is_file():
        raise RuntimeError(f"the nightly run's process failed ({code}); see {log}")
    night = json.loads(out.read_text())
    night["marks"]["exit"] = ended
    night["server_cpu"] = tree_cpu(server_pid) - server_before if server_pid else 0.0
    night["idle_server_cpu"] = IDLE_RATE[0] * (time.time() - started) if server_pid else 0.0
    return night


def figures(night: dict) -> dict[str, float]:
    """What one night's measurements add up to (seconds, shares in %, counts)."""
    m = night["marks"]
    sampled = {"prefect": 0.0, "pacsflow": 0.0, "other": 0.0}
    for who, _area, _leaf, cpu in night["sampled"]:
        sampled[who] += cpu
    prefect = sampled["prefect"] + night["temporary_server_cpu"] + night["server_cpu"]
    run_cpu = night["self_cpu"] + night["workers_cpu"] + night["temporary_server_cpu"] + night["server_cpu"]
    studies = max(night["studies"], 1)
    return {
        "wall": m["exit"] - m["process"] - m["counting_s"], "to_flow_call": m["flow_call"] - m["process"],
        "to_first_cfind": m["first_cfind"] - m["process"], "call_to_first_cfind": m["first_cfind"] - m["flow_call"],
        "after": m["exit"] - m["flow_return"] - m["counting_s"], "run_cpu": run_cpu, "prefect_cpu": prefect,
        "prefect_client_cpu": sampled["prefect"], "server_cpu": night["temporary_server_cpu"] + night["server_cpu"],
        "share": 100 * prefect / run_cpu, "idle_server_cpu": night["idle_server_cpu"],
        "share_less_idle": 100 * (prefect - night["idle_server_cpu"]) / (run_cpu - night["idle_server_cpu"]),
        "unseen": night["self_cpu"] - sum(sampled.values()),
        "task_runs_per_study": sum(night["tasks"].values()) / studies,
    }


def _median(values: list[float], fmt: str) -> str:
    text = format(statistics.median(values), fmt)
    return text if len(values) < 2 else f"{text} ({format(min(values), fmt)}–{format(max(values), fmt)})"


ROWS = (
    ("wall s", "wall", ".1f"), ("run CPU s", "run_cpu", ".1f"), ("Prefect CPU s", "prefect_cpu", ".2f"),
    ("  in the run's process", "prefect_client_cpu", ".2f"), ("  the server's", "server_cpu", ".2f"),
    ("  of which the idle server's", "idle_server_cpu", ".2f"),
    ("Prefect share %", "share", ".1f"), ("Prefect share % less the idle server", "share_less_idle", ".1f"), ("unseen by the sampler s", "unseen", ".2f"),
    ("task runs per study", "task_runs_per_study", ".2f"), ("start → flow call s", "to_flow_call", ".2f"),
    ("start → first C-FIND s", "to_first_cfind", ".2f"), ("flow call → first C-FIND s", "call_to_first_cfind", ".2f"),
    ("flow return → process end s", "after", ".2f"),
)


def table(title: str, nights: dict[str, list[dict]]) -> str:
    modes = [m for m in MODES if nights.get(m)]
    first = nights[modes[0]][0]
    head = (f"{title}: {first['studies']} studies, {first['instances'] + first['quarantined']} instances "
            f"({first['quarantined']} quarantined), median (range) of {len(nights[modes[0]])} runs")
    lines = [head, "",
             "| | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(_median([figures(n)[key] for n in nights[m]], fmt)
                                                  for m in modes) + " |")
    return "\n".join(lines) + "\n"


def breakdown(nights: list[dict], top: int = 12) -> str:
    """Where the run's process spends Prefect's CPU, by Prefect's module (imports apart), per run."""
    cpu: Counter[str] = Counter()
    libs: dict[str, Counter[str]] = {}
    for night in nights:
        for who, area, leaf, seconds in night["sampled"]:
            if who == "prefect":
                cpu[area] += seconds / len(nights)
                libs.setdefault(area, Counter())[leaf] += seconds
    lines = ["| prefect module | CPU s per run | innermost libraries |", "|---|---|---|"]
    lines += [f"| {area} | {s:.2f} | {', '.join(lib for lib, _ in libs[area].most_common(3))} |"
              for area, s in cpu.most_common(top)]
    return "\n".join(lines) + "\n"


def task_counts(nights: list[dict]) -> str:
    night = nights[0]
    return ", ".join(f"{name} {n}" for name, n in sorted(night["tasks"].items())) + f" ({night['studies']} studies)"


def nights_of(inputs: Path, work: Path, repeat: int, homes: dict[str, Path], server: tuple[int, str],
              modes: tuple[str, ...] = MODES) -> dict:
    """Each mode's ``repeat`` nights over the studies under ``inputs``, interleaved."""
    nights: dict[str, list[dict]] = {m: [] for m in modes}
    with loaded_orthanc(inputs, work) as (orthanc, receiver_port):
        for i in range(repeat):
            for mode in modes:
                run_dir = work / f"{mode}-{i}"
                env = {**os.environ, **nightly_env(orthanc, run_dir, receiver_port), "PREFECT_HOME": str(homes[mode])}
                env.pop("PREFECT_API_URL", None)
                if mode != "temporary":
                    env["PREFECT_API_URL"] = server[1]
                if mode == "baseline":
                    env["PYTHONPATH"] = BASELINE[0]
                    env["PREFECT_SHARE_PACKAGE"] = str(Path(BASELINE[0]) / "pacsflow")
                night = run_night(env, run_dir.parent / f"{mode}-{i}.out", server[0] if mode != "temporary" else None)
                nights[mode].append(night)
                f = figures(night)
                print(f"  {mode} #{i + 1}: {f['wall']:.1f} s, CPU {f['run_cpu']:.1f} s, Prefect {f['share']:.1f} %, "
                      f"first C-FIND at {f['to_first_cfind']:.2f} s", flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
    return nights


def generate(out: Path, studies: int, seed: int) -> Path:
    import datetime as dt

    from pacsflow.deployments.local import sampledata

    sampledata.generate(out, studies=studies, days=7, end_date=dt.date.today(), seed=seed,
                        series_per_study=(3, 3), instances_per_series=(30, 37))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=30, help="the larger night (the small one has 6 studies)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each night in each mode")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--modes", default="server,temporary", help="which modes, comma-separated (server, temporary, "
                                                                   "baseline)")
    ap.add_argument("--baseline", type=Path, help="the baseline mode's package root (holds pacsflow/flows etc.)")
    ap.add_argument("--one-night", type=Path, help=argparse.SUPPRESS)  # the run's process (internal)
    ap.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one_night:
        one_night(args.one_night, args.started)
        return 0
    work = Path(tempfile.mkdtemp(prefix="pacsflow-prefect-share-"))
    homes = {m: work / f"prefect-home-{m}" for m in MODES}
    server = None
    try:
        small, big = generate(work / "in-small", SMALL_NIGHT, 11), generate(work / "in-big", args.studies, 2026)
        server, url = start_server(homes["server"], work / "prefect-server.log")
        IDLE_RATE[0] = idle_rate(server.pid)
        print(f"prefect server (pid {server.pid}) on {url}; idle, it uses {IDLE_RATE[0]:.3f} CPU s/s", flush=True)
        modes = tuple(m for m in MODES if m in args.modes.split(",") and (m != "baseline" or args.baseline))
        BASELINE[:] = [str(args.baseline.resolve())] if args.baseline else []
        if "temporary" in modes:
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], check=True,
                           env={**os.environ, "PREFECT_HOME": str(homes["temporary"])}, stdout=subprocess.DEVNULL)
        print(f"{SMALL_NIGHT}-study nights:", flush=True)
        few = nights_of(small, work / "small", args.repeat, homes, (server.pid, url), modes)
        print(f"{args.studies}-study nights:", flush=True)
        many = nights_of(big, work / "big", args.repeat, homes, (server.pid, url), modes)
        print()
        print(table(f"{SMALL_NIGHT}-study night", few))
        print(table(f"{args.studies}-study night", many))
        print(f"task runs ({args.studies}-study night): {task_counts(many[modes[0]])}\n")
        print("Prefect's CPU in the run's process, by where (the larger night, first mode):\n")
        print(breakdown(many[modes[0]]))
    finally:
        if server is not None:
            stop_server(server)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
