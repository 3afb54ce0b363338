"""Benchmark: FHIR sync with transaction Bundles against one PUT per resource, same HAPI, same run.

    .venv/bin/python -m bench.fhir_batch_vs_single [--studies 200] [--batch-size N] [--latency-ms 0,10,25]

Starts a private in-memory HAPI FHIR server (deployments/fhir_server.py) on a free loopback port,
generates the studies with the sample-data generator and catalogs them through the real pieces
(de-identification, lake, Parquet catalog). Every measured set is those catalog rows with the
UIDs and pseudonyms made distinct per set (a suffix), so each method creates its own resources of the
same shapes. After a warm-up of the JVM (``--warmup-rounds`` full sets per method, so that the JIT
has compiled the hot paths of both), for each network latency asked for, ``--repeat`` times:
  1. one by one: per study ``PUT Patient?identifier=…`` then ``PUT ImagingStudy?identifier=…``
     (conditional updates, one keep-alive connection, sequential);
  2. batched: ``send_studies`` on the batches ``plan_batches`` makes of the catalog (the sync's own
     planning: at most ``--batch-size`` studies, a patient's studies together), one ``transaction``
     Bundle each.
Both send the same mapped resources in the same order (mapping is not timed). The ratio uses the best
time of each method at that latency. A latency above 0 puts a small TCP
proxy in front of the server that holds each answer back by that many milliseconds once per
request (a round trip to a server elsewhere on the network). Finally, for information, the whole
``sync_catalog`` (the flows' sync loop without Prefect: catalog read, mapping, ledger, Bundles,
reconciliation) on the catalog itself.
Prints studies/s for each and the ratio batched / one by one. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pacsflow.catalog.views import connect
from pacsflow.deployments import fhir_server
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.fhir.mapping import MappingOptions, StudyResources, build_study
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.fhir.sync import load_study_rows, plan_batches, send_studies, sync_catalog
from pacsflow.tasks.settings import FhirSettings, load_settings
from tests.helpers import catalog_studies, free_port

PSEUDONYM_SYSTEM = "urn:pacsflow:bench:pseudonym"


class LatencyProxy:
    """TCP proxy that delays the first bytes of each answer by ``latency_s`` (one round trip per
    request/response exchange on a keep-alive connection)."""

    def __init__(self, upstream_port: int, latency_s: float) -> None:
        self.upstream_port = upstream_port
        self.latency_s = latency_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = {"asked": False}
            threading.Thread(target=self._pump, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], request: bool) -> None:
        try:
            while data := src.recv(65536):
                if request:
                    state["asked"] = True
                elif state["asked"]:
                    state["asked"] = False
                    time.sleep(self.latency_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def catalog_rows(catalog: Path, state: Path, batch_size: int):
    """The catalog's study rows in the order the sync plans them, and the sizes of its batches."""
    con = connect(catalog)
    try:
        batches = plan_batches(con, FhirSyncLedger(state / "bench-plan.sqlite"), batch_size=batch_size)
        uids = [u for b in batches for u in b]
        rows = load_study_rows(con, uids)
    finally:
        con.close()
    return [rows[u] for u in uids], [len(b) for b in batches]


def variant(rows, k: int, options: MappingOptions) -> list[StudyResources]:
    """The catalog rows with every UID and pseudonym suffixed by ``k``, mapped to FHIR."""
    out = []
    for st, series, instances in rows:
        st, series, instances = copy.deepcopy(st), copy.deepcopy(series), copy.deepcopy(instances)
        st["study_uid"] += f".{k}"
        st["patient_pseudo_id"] += f"-{k}"
        for r in series:
            r["series_uid"] += f".{k}"
        for r in instances:
            r["series_uid"] += f".{k}"
            r["sop_instance_uid"] += f".{k}"
        out.append(build_study(st, series, instances, options))
    return out


def one_by_one(client: FhirClient, studies: list[StudyResources]) -> float:
    """Per study: the Patient, then the ImagingStudy referencing the Patient's id from the answer's
    Location (outside a transaction HAPI gives a conditionally created resource its own id)."""
    t0 = time.perf_counter()
    for s in studies:
        resp = client.put(s.patient_identity.conditional_url, s.patient_json)
        location = resp.headers.get("Location") or resp.headers.get("Content-Location") or ""
        patient_id = location.split("/Patient/")[1].split("/")[0]
        doc = dict(s.study_json, subject={"reference": f"Patient/{patient_id}"})
        resp = client.put(s.study_identity.conditional_url, doc)
        if resp.status_code not in (200, 201):
            raise RuntimeError(f"PUT answered {resp.status_code}")
    return time.perf_counter() - t0


def batched(client: FhirClient, studies: list[StudyResources], sizes: list[int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    transactions = 0
    i = 0
    for size in sizes:
        out = send_studies(client, studies[i : i + size])
        i += size
        if out.failed:
            raise RuntimeError(f"{len(out.failed)} studies failed: {out.failed[0][1]}")
        transactions += out.transactions
    return time.perf_counter() - t0, transactions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="studies per Bundle (default: the fhir.batch_size setting's default)")
    ap.add_argument("--warmup-rounds", type=int, default=3, help="full sets per method sent before measuring")
    ap.add_argument("--repeat", type=int, default=2, help="measurements per method and latency")
    ap.add_argument("--latency-ms", default="0,10,25", help="comma-separated added round-trip times")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    if args.batch_size is None:
        args.batch_size = FhirSettings().batch_size
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if not fhir_server.java_available():
        print("Java 17+ is not installed: cannot start the HAPI FHIR server", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pacsflow-fhir-bench-"))
    handle = None
    try:
        t0 = time.perf_counter()
        handle = fhir_server.start(free_port(), work / "hapi", data_dir=None)
        print(f"HAPI FHIR {fhir_server.HAPI_FHIR_VERSION} (in memory, -Xmx1g) ready at {handle.base_url} "
              f"in {time.perf_counter() - t0:.1f}s")

        t0 = time.perf_counter()
        n = args.studies
        raw = sampledata.generate(work / "raw", studies=n, patients=max(1, n // 3), days=60,
                                  end_date=dt.date(2026, 11, 27), seed=3, rows=16, cols=16,
                                  modalities=("CT", "MR", "MG"))  # US may be quarantined (burned-in text)
        catalog = catalog_studies(raw, work / "lake", b"bench-key-0123456789", lake="dicom")
        rows, sizes = catalog_rows(catalog, work / "state", args.batch_size)
        instances = sum(len(r[2]) for r in rows)
        print(f"{n} studies ({instances} instances, {n // 3} patients) generated, de-identified and cataloged "
              f"in {time.perf_counter() - t0:.1f}s")

        options = MappingOptions(pseudonym_system=PSEUDONYM_SYSTEM)
        t0 = time.perf_counter()
        keys = iter(range(1, 10**6))
        warm = [(variant(rows, next(keys), options), variant(rows, next(keys), options))
                for _ in range(args.warmup_rounds)]
        cells = [[(variant(rows, next(keys), options), variant(rows, next(keys), options))
                  for _ in range(args.repeat)] for _ in latencies]
        mapped = 2 * n * (len(warm) + len(latencies) * args.repeat)
        print(f"mapped {mapped} studies to FHIR in {time.perf_counter() - t0:.1f}s "
              f"({(time.perf_counter() - t0) / mapped * 1000:.1f} ms per study; not timed below)")

        t0 = time.perf_counter()
        with FhirClient(handle.base_url, timeout_s=300) as client:  # JIT warm-up, both paths
            for single_set, batched_set in warm:
                one_by_one(client, single_set)
                batched(client, batched_set, sizes)
        print(f"JVM warm-up: {args.warmup_rounds} x {n} studies per method in {time.perf_counter() - t0:.1f}s")

        results = []
        for latency, repeats in zip(latencies, cells):
            proxy = LatencyProxy(handle.port, latency / 1000) if latency > 0 else None
            base = f"http://127.0.0.1:{proxy.port}/fhir" if proxy else handle.base_url
            singles, batches = [], []
            try:
                with FhirClient(base, timeout_s=300) as client:
                    for single_set, batched_set in repeats:
                        singles.append(one_by_one(client, single_set))
                        seconds, transactions = batched(client, batched_set, sizes)
                        batches.append(seconds)
            finally:
                if proxy:
                    proxy.close()
            results.append((latency, singles, batches, transactions))

        settings = load_settings(catalog_root=catalog, state_root=work / "state",
                                 fhir={"base_url": handle.base_url, "batch_size": args.batch_size,
                                       "pseudonym_system": PSEUDONYM_SYSTEM, "timeout_s": 300})
        report = sync_catalog(settings)
        if report.failed or report.sent != n:
            print(f"WARNING: sync_catalog sent {report.sent}, failed {len(report.failed)}", file=sys.stderr)

        print()
        print(f"{'added RTT':>10} | {'one PUT per resource':>24} | {'transaction Bundles':>24} | ratio (best)")
        for latency, singles, batches, transactions in results:
            r_single, r_batched = n / min(singles), n / min(batches)
            print(f"{latency:>8.0f}ms | {r_single:>8.1f} studies/s (best) "
                  f"| {r_batched:>8.1f} studies/s (best) | {r_batched / r_single:>5.2f}x")
            print(f"{'':>10} | {'  '.join(f'{x:.2f}s' for x in singles):>24} "
                  f"| {'  '.join(f'{x:.2f}s' for x in batches):>24} |")
        print(f"({n} studies per measurement: {2 * n} PUTs, or {results[0][3]} Bundles of <= {args.batch_size} "
              f"studies planned by plan_batches)")
        print(f"sync_catalog end to end, no added RTT: {report.sent} studies in {report.seconds:.2f}s = "
              f"{report.sent / max(report.seconds, 1e-9):.1f} studies/s (catalog read, mapping, ledger, "
              f"{report.transactions} Bundles, reconciliation)")
        return 0
    finally:
        if handle is not None:
            handle.stop()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
