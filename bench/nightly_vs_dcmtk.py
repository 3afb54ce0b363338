"""Benchmark: the nightly flow against DCMTK movescu → storescp, on the same Orthanc, same run.

    .venv/bin/python -m bench.nightly_vs_dcmtk [--studies 100] [--instances-per-series 30 37]

    .venv/bin/python -m bench.nightly_vs_dcmtk --engines dcmtk pynetdicom   # one nightly run per receive engine

Generates the studies (default 100 studies, ~10,000 instances), loads them into a private
Orthanc on free loopback ports, then measures:
  1. DCMTK: one ``movescu`` per study into one ``storescp`` (the peer's plain retrieve);
  2. the serial peer chain (``bench.peer_chain``): pynetdicom C-MOVE into a pynetdicom Storage
     SCP, dicognito, pydicom header extraction to Parquet, one study after another;
  3. pacsflow: one full ``nightly_ingest`` run under Prefect per receive engine (discover, C-MOVE
     into our Storage SCP, de-identify, audit, write the lake, extract, commit the catalog), each
     into a lake and state of its own.
and prints instances/s for each and pacsflow's ratios to DCMTK and to the chain. Not a test:
nothing here asserts a speed.
The pixel policy is ``quarantine`` unless PACSFLOW_DEID__PIXEL_POLICY says otherwise (the
generated ultrasound is flagged YES with no text; OCR's cost is measured by ``bench.ocr_cost``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pacsflow.deployments.local import sampledata
from pacsflow.deployments.local.orthanc import (
    OrthancConfig,
    OrthancServer,
    default_modalities,
)

from bench.peer_chain import CHAIN_AE, run_peer_chain
from tests.helpers import free_port


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def bench_dcmtk(server: OrthancServer, studies, work: Path, port: int) -> tuple[int, float]:
    out = work / "storescp"
    out.mkdir()
    env = dict(os.environ, TCP_NODELAY="1")
    scp = subprocess.Popen(["storescp", "-aet", "DCMTK", "-od", str(out), "+xa", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        t0 = time.perf_counter()
        for s in studies:
            subprocess.run(
                ["movescu", "-S", "-aet", "DCMTK", "-aec", server.aet, "-aem", "DCMTK",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={s.study_uid}",
                 "127.0.0.1", str(server.dicom_port)],
                env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        seconds = time.perf_counter() - t0
    finally:
        scp.terminate()
        scp.wait()
    return sum(1 for _ in out.iterdir()), seconds


def bench_pacsflow(server: OrthancServer, work: Path, receiver_port: int, engine: str) -> tuple[int, float, dict]:
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        PACSFLOW_RECEIVER__ENGINE=engine,
        PACSFLOW_PACS__PORT=str(server.dicom_port),
        PACSFLOW_PACS__HTTP_URL=server.rest_url,
        PACSFLOW_RECEIVER__PORT=str(receiver_port),
        PACSFLOW_STORAGE_ROOT=str(work / "lake" / "dicom"),
        PACSFLOW_CATALOG_ROOT=str(work / "lake" / "catalog"),
        PACSFLOW_STATE_ROOT=str(work / "state"),
        PACSFLOW_DEID_KEY="benchmark-key-0123456789",
        # The generated ultrasound says BurnedInAnnotation YES without drawn text: under the default
        # ocr policy each would be read by Tesseract and then quarantined all the same. The pipeline's
        # own rate is measured with quarantine; OCR's cost per frame is bench.ocr_cost's.
        PACSFLOW_DEID__PIXEL_POLICY=os.environ.get("PACSFLOW_DEID__PIXEL_POLICY", "quarantine"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="ERROR",
    )
    from pacsflow.flows.nightly import nightly_ingest, run_result
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        result = run_result(nightly_ingest(return_state=True))  # a night with failed studies has one too
        seconds = time.perf_counter() - t0
    from pacsflow.tasks.ingest.ledger import Ledger

    for entry in Ledger(work / "state" / "ledger.sqlite").entries().values():
        if entry.status == "failed":
            print(f"  failed study {entry.pseudo_uid}: {entry.reason}")
    # Objects quarantined (burned-in ultrasound) went through the whole pipeline too.
    return int(result["instances"]) + int(result["quarantined_objects"]), seconds, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--series-per-study", type=int, nargs=2, default=(3, 3))
    ap.add_argument("--instances-per-series", type=int, nargs=2, default=(30, 37))
    ap.add_argument("--engines", nargs="+", default=["auto"], choices=["auto", "dcmtk", "pynetdicom"],
                    help="receiver.engine of each nightly run (default: auto, DCMTK when installed)")
    ap.add_argument("--no-chain", action="store_true", help="skip the serial peer chain")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pacsflow-bench-"))
    dcmtk_port, receiver_port, chain_port = free_port(), free_port(), free_port()
    mods = default_modalities()
    mods["PACSFLOW"] = ("PACSFLOW", "127.0.0.1", receiver_port)
    mods["DCMTK"] = ("DCMTK", "127.0.0.1", dcmtk_port)
    mods[CHAIN_AE] = (CHAIN_AE, "127.0.0.1", chain_port)
    server = OrthancServer(OrthancConfig(work_dir=work / "orthanc", dicom_port=free_port(), http_port=free_port(),
                                         modalities=mods))
    server.start()
    try:
        t0 = time.perf_counter()
        studies = sampledata.generate(work / "in", studies=args.studies, days=7, end_date=dt.date.today(), seed=2026,
                                      series_per_study=tuple(args.series_per_study),
                                      instances_per_series=tuple(args.instances_per_series))
        total = sum(s.n_instances for s in studies)
        sampledata.load([work / "in"], "127.0.0.1", server.dicom_port)
        print(f"generated and loaded {len(studies)} studies / {total} instances in {time.perf_counter() - t0:.1f}s")
        shutil.rmtree(work / "in")

        n_dcmtk, s_dcmtk = bench_dcmtk(server, studies, work, dcmtk_port)
        dcmtk_rate = n_dcmtk / s_dcmtk
        print(f"DCMTK movescu -> storescp : {n_dcmtk} instances in {s_dcmtk:.1f}s = {dcmtk_rate:.0f} instances/s")
        chain_rate = None
        if not args.no_chain:
            n_chain, s_chain = run_peer_chain(server.aet, server.dicom_port, [s.study_uid for s in studies],
                                              work / "chain", chain_port)
            chain_rate = n_chain / s_chain
            print(f"serial peer chain         : {n_chain} instances in {s_chain:.1f}s = {chain_rate:.0f} instances/s "
                  f"(pynetdicom C-MOVE -> dicognito -> pydicom headers to Parquet, study by study)")
        ok = n_dcmtk == total
        for engine in args.engines:
            n_ours, s_ours, result = bench_pacsflow(server, work / f"nightly-{engine}", receiver_port, engine)
            rate = n_ours / s_ours
            print(f"pacsflow nightly_ingest   : {n_ours} instances in {s_ours:.1f}s = {rate:.0f} instances/s "
                  f"(receiver.engine {engine}; {result['instances']} cataloged, "
                  f"{result['quarantined_objects']} quarantined, {result['failed']} studies failed)")
            print(f"  ratio to DCMTK          : {rate / dcmtk_rate:.2f}")
            if chain_rate:
                print(f"  ratio to the peer chain : {rate / chain_rate:.2f}")
            ok = ok and n_ours == total
        if not ok:
            print(f"WARNING: expected {total} instances on every side")
            return 1
    finally:
        server.stop(graceful=False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
