"""Benchmark: `pacsflow hl7 listen` against the local HAPI FHIR server: ACK latency and drain rate.

    .venv/bin/python -m bench.hl7_ack [--rate 50] [--seconds 60] [--burst-seconds 20] [--connections 4]

Starts a private in-memory HAPI FHIR server (deployments/fhir_server.py) on a free loopback port and
`pacsflow hl7 listen` as a subprocess (identified mode, its own state folder), as an operator would.
A sender built on python-hl7's MLLP client (``hl7.client.MLLPClient``; one message, then its ACK,
per connection) sends ADT messages of fictitious patients: two A01 (a new patient, full PID) for
each A08 (a sparse update of an earlier patient), every control id new.

1. warm-up: ``--warmup`` messages, not measured (the JVM's JIT, SQLite's page cache);
2. paced: ``--rate`` messages/s for ``--seconds`` on one connection, each sent at its slot;
3. unthrottled: ``--connections`` connections sending back to back for ``--burst-seconds``.

For each run: ACK latency p50/p99/max, from the send to the ACK received (and, for the paced run,
from the message's slot, which also counts the wait of a message behind a slow ACK); messages/s
acknowledged; and the drain: the inbox polled until no message is pending, messages applied to FHIR
per second from the run's first message to the empty inbox. CPU seconds of the listener process
(user + system, from /proc) per run, and the HAPI JVM's. Every ACK must be AA and every message applied, or the run
says so. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hl7.client import MLLPClient

from pacsflow.deployments import fhir_server
from pacsflow.tasks.hl7.inbox import Inbox, InboxState
from tests.helpers import free_port

SYSTEM = "urn:oid:1.2.826.0.1.99.4242"
BIN = Path(sys.executable).parent


def message(n: int, control: str) -> bytes:
    """Message ``n``: two A01 (patient ``n``) for each A08 (an earlier patient's new phone)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    if n % 3 == 2:
        pid = f"PID|1||{n - 1}^^^HOSP^MR||||||||||^PRN^PH^^^^^^^^^+41 31 {n:07d}"
        event = "A08"
    else:
        pid = (f"PID|1||{n}^^^HOSP^MR||Bench^Patient^{n}||19{n % 90 + 10:02d}0101|{'FM'[n % 2]}|||"
               f"Street {n}^^Bern^^3011^CH^H||^PRN^PH^^^^^^^^^+41 31 {n:07d}|||M")
        event = "A01"
    return (f"MSH|^~\\&|BENCH|HOSP|PACSFLOW|RAD|{stamp}||ADT^{event}^ADT_A01|{control}|P|2.5.1\r"
            f"EVN|{event}|{stamp}\r{pid}\r").encode("ascii")


@dataclass
class Run:
    name: str
    latencies: list[float] = field(default_factory=list)   # send → ACK, seconds
    from_slot: list[float] = field(default_factory=list)   # slot → ACK (paced run)
    refused: int = 0
    started: float = 0.0
    sent_s: float = 0.0
    drained_s: float = 0.0
    cpu_s: float = 0.0
    hapi_cpu_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, started: float, ack: bytes, slot: float | None = None) -> None:
        done = time.perf_counter()
        with self.lock:
            self.latencies.append(done - started)
            if slot is not None:
                self.from_slot.append(done - slot)
            if b"MSA|AA" not in ack:
                self.refused += 1


class Sender:
    """Numbered messages over one MLLP connection, each waiting for its ACK."""

    counter = iter(range(1, 10**9))
    counter_lock = threading.Lock()

    def __init__(self, port: int, prefix: str) -> None:
        self.client = MLLPClient("127.0.0.1", port)
        self.client.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.prefix = prefix

    def send(self, run: Run, slot: float | None = None) -> None:
        with Sender.counter_lock:
            n = next(Sender.counter)
        raw = message(n, f"{self.prefix}{n}")
        t0 = time.perf_counter()
        ack = self.client.send_message(raw)
        run.record(t0, ack if isinstance(ack, bytes) else str(ack).encode(), slot)

    def close(self) -> None:
        self.client.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_drained(inbox: Inbox, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while inbox.counts()[InboxState.PENDING]:
        if time.monotonic() > deadline:
            raise RuntimeError("the inbox did not drain")
        time.sleep(0.05)


def measure(run: Run, inbox: Inbox, pid: int, body, hapi_pid: int = 0) -> Run:
    cpu0, hapi0 = cpu_seconds(pid), cpu_seconds(hapi_pid) if hapi_pid else 0.0
    run.started = time.perf_counter()
    body()
    run.sent_s = time.perf_counter() - run.started
    wait_drained(inbox)
    run.drained_s = time.perf_counter() - run.started
    run.cpu_s = cpu_seconds(pid) - cpu0
    run.hapi_cpu_s = cpu_seconds(hapi_pid) - hapi0 if hapi_pid else 0.0
    return run


def sequential(port: int, count: int, run: Run) -> None:
    sender = Sender(port, "W")
    try:
        for _ in range(count):
            sender.send(run)
    finally:
        sender.close()


def paced(port: int, rate: float, seconds: float, run: Run) -> None:
    sender = Sender(port, "P")
    try:
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            slot = t0 + i / rate
            pause = slot - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sender.send(run, slot)
    finally:
        sender.close()


def unthrottled(port: int, seconds: float, connections: int, run: Run) -> None:
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        sender = Sender(port, f"U{k}-")
        try:
            while time.perf_counter() < stop:
                sender.send(run)
        finally:
            sender.close()

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


def report(run: Run) -> None:
    n = len(run.latencies)
    ms = [x * 1000 for x in run.latencies]
    print(f"{run.name}: {n} messages in {run.sent_s:.1f} s = {n / run.sent_s:.1f} msg/s acknowledged"
          f"{'' if not run.refused else f' ({run.refused} NOT AA)'}")
    print(f"  ACK latency (send -> ACK): p50 {pct(ms, 50):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms")
    if run.from_slot:
        slot = [x * 1000 for x in run.from_slot]
        print(f"  ACK latency (slot -> ACK): p50 {pct(slot, 50):.1f} ms, p99 {pct(slot, 99):.1f} ms")
    print(f"  drain: inbox empty {run.drained_s - run.sent_s:.1f} s after the last ACK; "
          f"{n / run.drained_s:.1f} msg/s applied to FHIR (first message to empty inbox)")
    print(f"  listener CPU: {run.cpu_s:.1f} s = {run.cpu_s / n * 1000:.2f} ms per message "
          f"(accept + ACK + drain, FHIR client side); HAPI CPU {run.hapi_cpu_s:.1f} s = "
          f"{run.hapi_cpu_s / n * 1000:.2f} ms per message")


def start_listener(work: Path, fhir_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PACSFLOW_STATE_ROOT": str(work / "state"), "PACSFLOW_HL7__PORT": str(port),
           "PACSFLOW_HL7__IDENTIFIER_SYSTEMS": f'{{"HOSP": "{SYSTEM}"}}', "PACSFLOW_FHIR__BASE_URL": fhir_url,
           "PACSFLOW_FHIR__TIMEOUT_S": "120", "PACSFLOW_LOG_LEVEL": "WARNING"}
    env.pop("PACSFLOW_CONFIG", None)
    proc = subprocess.Popen([str(BIN / "pacsflow"), "hl7", "listen"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / "listener.log", "wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"pacsflow hl7 listen exited: see {work / 'listener.log'}") from None
            time.sleep(0.2)
    raise RuntimeError("pacsflow hl7 listen did not listen")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0, help="messages/s of the paced run")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the paced run")
    ap.add_argument("--burst-seconds", type=float, default=20.0, help="length of the unthrottled run")
    ap.add_argument("--connections", type=int, default=4, help="connections of the unthrottled run")
    ap.add_argument("--warmup", type=int, default=300, help="messages sent before measuring")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if not fhir_server.java_available():
        print("Java 17+ is not installed: cannot start the HAPI FHIR server", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pacsflow-hl7-bench-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: print(f"work folder kept: {work}") if args.keep
                         else shutil.rmtree(work, ignore_errors=True))
        handle = fhir_server.start(free_port(), work / "hapi", data_dir=None)
        cleanup.callback(handle.stop)
        port = free_port()
        proc = start_listener(work, handle.base_url, port)
        cleanup.callback(lambda: proc.poll() is None and (proc.send_signal(signal.SIGTERM), proc.wait(60)))
        run_all(args, Inbox(work / "state" / "hl7" / "inbox.sqlite"), (proc.pid, handle.pid), port, handle.base_url)
    return 0


def run_all(args: argparse.Namespace, inbox: Inbox, pids: tuple[int, int], port: int, fhir_url: str) -> None:
    pid, hapi_pid = pids
    print(f"HAPI FHIR {fhir_server.HAPI_FHIR_VERSION} (in memory) at {fhir_url}; pacsflow hl7 listen on {port}; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    warm = Run("warm-up")
    measure(warm, inbox, pid, lambda: sequential(port, args.warmup, warm))
    paced_run = Run(f"paced {args.rate:g} msg/s for {args.seconds:g} s, 1 connection")
    measure(paced_run, inbox, pid, lambda: paced(port, args.rate, args.seconds, paced_run), hapi_pid)
    burst = Run(f"unthrottled, {args.connections} connections, {args.burst_seconds:g} s")
    measure(burst, inbox, pid, lambda: unthrottled(port, args.burst_seconds, args.connections, burst), hapi_pid)
    print()
    for run in (paced_run, burst):
        report(run)
    counts = inbox.counts()
    print(f"inbox at the end: {counts[InboxState.APPLIED]} applied, {counts[InboxState.FAILED]} failed, "
          f"{counts[InboxState.PENDING]} pending; load average (1/5/15 min) "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))

if __name__ == "__main__":
    sys.exit(main())
