"""Where the nightly path's CPU goes: milliseconds of CPU per instance for each of its stages.

    .venv/bin/python -m bench.stage_profile [--studies 30] [--instances-per-series 30 37]
    .venv/bin/python -m bench.stage_profile --studies 100     # the README's ~10,000-instance set
    .venv/bin/python -m bench.stage_profile --nightly         # and the share outside the stages

Generates studies (``deployments/local/sampledata``, the shape ``bench.nightly_vs_dcmtk`` uses),
then runs every object through the nightly path's own functions, in one process, one stage after
the other, timing each call with ``time.process_time`` (this process's CPU, all its threads):

  receive    our Storage SCP (``StorageReceiver`` + ``StagingWriter``, in this process on a free
             loopback port) receiving every study from DCMTK ``storescu``, one association per
             study, as C-MOVE sub-operations arrive; storescu's own CPU is another process's.
  parse      ``read_instance`` of the staged file (pydicom ``dcmread``, UID and value checks).
  deidentify ``deidentify_dataset`` (``Deidentifier.apply``) with the default settings and the
             ``quarantine`` pixel policy: OCR never runs here (``bench.ocr_cost`` measures it).
  encode     ``encode(ds, None)``: the Part 10 bytes, audit off.
  audit      ``audit_or_raise`` on those bytes, against the originals ``apply`` returned.
  hash       ``hashlib.sha256`` of the bytes (the catalog's sha256 column).
  write      ``LakeStorage.put`` into a local folder (atomic write: a temp file in the folder, then a rename).
  extract    ``StudyExtractor.add`` (catalog row, DICOM JSON), then per study ``tables()`` and the
             row files written as ``process_study`` writes them.
  commit     ``read_rows`` + ``CatalogStore.commit`` of all studies (one batch: commit_batch is 200).

This is ``tasks/lake/study.py``'s ``process_study`` taken apart; objects that de-identification
quarantines (the generated ultrasound says BurnedInAnnotation YES) stop after deidentify, as there.
Every stage is divided by all instances received, so the column sums to the CPU per instance of
the whole path on one core.

With ``--nightly`` the same studies are then loaded into a private Orthanc and one real
``nightly_ingest`` runs under Prefect (``bench.nightly_vs_dcmtk``'s run, test-harness server):
its CPU (this process and its reaped children: the worker processes, the Prefect server) less
the stages' CPU per instance times the instances is what the run spends outside the stages —
Prefect (imports, server, task runs, state), the retrieve's client side, planning, bookkeeping.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from pacsflow.catalog.store import CatalogStore
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.core.errors import BadDicom, DeidentificationError
from pacsflow.tasks.core.files import write_atomic
from pacsflow.tasks.deid.audit import audit_or_raise
from pacsflow.tasks.deid.choices import PixelPolicy
from pacsflow.tasks.deid.deidentifier import Deidentifier, DeidReport
from pacsflow.tasks.deid.instance import deidentify_dataset, encode, read_instance
from pacsflow.tasks.lake.rows import StudyExtractor
from pacsflow.tasks.lake.storage import LakeStorage
from pacsflow.tasks.lake.study import TABLES, read_rows
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver
from pacsflow.tasks.settings import DeidSettings

from tests.helpers import dcmtk_env, free_port

STAGES = ("receive", "parse", "deidentify", "encode", "audit", "hash", "write", "extract", "commit")
KEY = b"stage-profile-key-0123456789"
SENDER_AE, RECEIVER_AE = "BENCH", "PACSFLOW"


class Clock:
    """CPU seconds of this process, summed per stage."""

    def __init__(self) -> None:
        self.cpu: Counter[str] = Counter()

    def run(self, stage: str, fn, *args, **kwargs):
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.cpu[stage] += time.process_time() - t0


def receive(studies, staging: Path, deid: Deidentifier, clock: Clock) -> StagingWriter:
    """storescu → our receiver, one association per study; the CPU of this process meanwhile."""
    writer = StagingWriter(staging, deid.study_ref)
    writer.expect([s.study_uid for s in studies])
    port = free_port()
    with StorageReceiver(RECEIVER_AE, "127.0.0.1", port, writer, [SENDER_AE]):
        for s in studies:
            files = sorted(str(p) for p in Path(s.path).rglob("*.dcm"))
            clock.run("receive", subprocess.run,
                      ["storescu", "-aet", SENDER_AE, "-aec", RECEIVER_AE, "127.0.0.1", str(port), *files],
                      env=dcmtk_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if writer.rejected:
        raise RuntimeError(f"the receiver refused {writer.rejected} objects: {dict(writer.refused)}")
    return writer


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()  # what process_study records in the sha256 column


def process(staged: Path, rows_dir: Path, deid: Deidentifier, storage: LakeStorage, clock: Clock) -> tuple[int, int]:
    """``process_study`` stage by stage; returns (written, quarantined)."""
    report = DeidReport()
    extractor = StudyExtractor()
    written = quarantined = 0
    for path in sorted(p for p in staged.iterdir() if p.suffix == ".dcm" and not p.name.startswith(".")):
        try:
            ds = clock.run("parse", read_instance, path)
            originals = clock.run("deidentify", deidentify_dataset, ds, deid, report)
            data = clock.run("encode", encode, ds, None)
            clock.run("audit", audit_or_raise, data, originals, ds)
        except (BadDicom, DeidentificationError):
            quarantined += 1
            continue
        sha = clock.run("hash", sha256_hex, data)
        rel = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        url = clock.run("write", storage.put, rel, data)
        clock.run("extract", extractor.add, ds, file_path=url, file_size=len(data), sha256=sha)
        written += 1
    if written:
        tables = clock.run("extract", extractor.tables)
        for name in TABLES:
            clock.run("extract", write_atomic, rows_dir / f"{name}.parquet", partial(pq.write_table, tables[name]),
                      private=True)
    return written, quarantined


def children_and_self_cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def nightly_cpu(inputs: Path, work: Path, instances: int) -> tuple[int, float]:
    """(instances, CPU seconds) of one real nightly run over the ``instances`` under ``inputs``.

    A study whose every object is quarantined (generated ultrasound) fails the run at its end, as
    it should: all its objects went through the whole run all the same, so the CPU still counts."""
    from pacsflow.deployments.local.orthanc import (
        OrthancConfig,
        OrthancServer,
        default_modalities,
    )
    from pacsflow.flows.nightly import StudiesFailed

    from bench.nightly_vs_dcmtk import bench_pacsflow

    receiver_port = free_port()
    mods = default_modalities()
    mods["PACSFLOW"] = ("PACSFLOW", "127.0.0.1", receiver_port)
    server = OrthancServer(OrthancConfig(work_dir=work / "orthanc", dicom_port=free_port(), http_port=free_port(),
                                         modalities=mods))
    server.start()
    try:
        sampledata.load([inputs], "127.0.0.1", server.dicom_port)
        before = children_and_self_cpu()
        try:
            bench_pacsflow(server, work / "nightly", receiver_port)
        except StudiesFailed as exc:
            sys.stdout.write(f"nightly run: {exc}\n")
        return instances, children_and_self_cpu() - before
    finally:
        server.stop(graceful=False)


def table(clock: Clock, instances: int, nightly: tuple[int, float] | None) -> str:
    total = sum(clock.cpu[s] for s in STAGES)
    lines = ["| stage | CPU ms/instance | share |", "|---|---|---|"]
    for stage in STAGES:
        cpu = clock.cpu[stage]
        lines.append(f"| {stage} | {1000 * cpu / instances:.2f} | {100 * cpu / total:.0f} % |")
    lines.append(f"| **all stages** | **{1000 * total / instances:.2f}** | 100 % |")
    if nightly is None:
        lines.append("| Prefect and the rest, outside the stages | not measured (--nightly) | — |")
    else:
        n, cpu = nightly
        outside = cpu - n * total / instances
        lines.append(f"| outside the stages in a real nightly run (Prefect, retrieve client, bookkeeping) "
                     f"| {1000 * outside / n:.2f} | {100 * outside / cpu:.0f} % of that run's {cpu:.1f} s CPU |")
    rate = instances / total
    return "\n".join(lines) + f"\n\nsum of the stages: {rate:.0f} instances/s per core\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=30, help="100 for the README's ~10,000-instance set")
    ap.add_argument("--series-per-study", type=int, nargs=2, default=(3, 3))
    ap.add_argument("--instances-per-series", type=int, nargs=2, default=(30, 37))
    ap.add_argument("--nightly", action="store_true", help="also run nightly_ingest on the same studies (Orthanc)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if shutil.which("storescu") is None:
        sys.stderr.write("DCMTK storescu is needed to measure the receive stage\n")
        return 2
    work = Path(tempfile.mkdtemp(prefix="pacsflow-stages-"))
    try:
        studies = sampledata.generate(work / "in", studies=args.studies, days=7, end_date=dt.date.today(), seed=2026,
                                      series_per_study=tuple(args.series_per_study),
                                      instances_per_series=tuple(args.instances_per_series))
        instances = sum(s.n_instances for s in studies)
        deid = Deidentifier.from_settings(KEY, DeidSettings(pixel_policy=PixelPolicy.QUARANTINE))
        clock = Clock()
        writer = receive(studies, work / "staging", deid, clock)
        storage = LakeStorage(work / "lake" / "dicom")
        rows_dirs, written, quarantined = [], 0, 0
        for s in studies:
            rows_dir = work / "rows" / deid.study_ref(s.study_uid)
            w, q = process(writer.study_dir(s.study_uid), rows_dir, deid, storage, clock)
            written, quarantined = written + w, quarantined + q
            if w:
                rows_dirs.append(str(rows_dir))
        catalog = CatalogStore(work / "lake" / "catalog")
        clock.run("commit", lambda: catalog.commit(read_rows(rows_dirs)))
        sys.stdout.write(f"{len(studies)} studies, {instances} instances received; {written} written to the lake, "
                         f"{quarantined} quarantined (pixel policy quarantine); CPU of this process, one core\n\n")
        nightly = nightly_cpu(work / "in", work, instances) if args.nightly else None
        sys.stdout.write(table(clock, instances, nightly))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
