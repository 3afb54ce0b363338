"""The serial peer chain issue 11 compares the nightly flow with: what a site builds from the usual
open-source parts, one study after another.

For each study: a pynetdicom C-MOVE into a pynetdicom Storage SCP (files written as received) →
dicognito on every file (read, anonymize, write) → pydicom header extraction of every top-level
element but pixel data into one Parquet file per study (pyarrow). No Prefect, no catalog, no audit.
Used by ``bench.nightly_vs_dcmtk``; not a tool of its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pynetdicom import AE, evt
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    StoragePresentationContexts,
)
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from pacsflow.tasks.pacs.client import NODELAY_HANDLER

CHAIN_AE = "PEERCHAIN"


def _scp(out: Path, port: int):
    """A pynetdicom Storage SCP writing each object, as received, to ``out/<study>/<sop>.dcm``."""
    ae = AE(ae_title=CHAIN_AE)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_SYNTAXES)

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        folder = out / str(ds.StudyInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{ds.SOPInstanceUID}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000

    # TCP_NODELAY as pacsflow's receiver sets it: without it, delayed ACKs cost ~40 ms per object here,
    # and the chain would measure Nagle's algorithm rather than its parts.
    handlers = [NODELAY_HANDLER, (evt.EVT_C_STORE, on_store)]
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)


def _move(pacs_ae: str, pacs_port: int, study_uid: str) -> None:
    ae = AE(ae_title=CHAIN_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", pacs_port, ae_title=pacs_ae)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    for _status, _ in assoc.send_c_move(query, CHAIN_AE, StudyRootQueryRetrieveInformationModelMove):
        pass
    assoc.release()


def _anonymize(folder: Path, out: Path, anonymizer) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        target = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target)
        written.append(target)
    return written


def _headers(files: list[Path], parquet: Path) -> None:
    rows = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows.append({e.keyword or str(e.tag): str(e.value) for e in ds if e.VR != "SQ" and e.tag.group != 0x7FE0})
    columns = sorted({k for row in rows for k in row})
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in columns])), parquet)


def run_peer_chain(pacs_ae: str, pacs_port: int, study_uids: list[str], work: Path, port: int) -> tuple[int, float]:
    """Every study through the chain, one after another: (instances anonymized, seconds)."""
    from dicognito.anonymizer import Anonymizer

    received, anonymized, tables = work / "received", work / "anonymized", work / "headers"
    tables.mkdir(parents=True)
    anonymizer = Anonymizer(seed="peer-chain")
    server = _scp(received, port)
    done = 0
    try:
        t0 = time.perf_counter()
        for study_uid in study_uids:
            _move(pacs_ae, pacs_port, study_uid)
            files = _anonymize(received / study_uid, anonymized / study_uid, anonymizer)
            _headers(files, tables / f"{len(list(tables.iterdir())):06d}.parquet")
            done += len(files)
        seconds = time.perf_counter() - t0
    finally:
        server.shutdown()
    return done, seconds


def _all_syntaxes() -> list[str]:
    return sorted({ts for context in StoragePresentationContexts for ts in context.transfer_syntax}
                  | {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90",
                     "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"})


ALL_SYNTAXES = _all_syntaxes()
