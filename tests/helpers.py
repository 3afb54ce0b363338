"""Small helpers shared by the test tiers (no fixtures here; see the conftest files)."""

from __future__ import annotations

import json
import os
import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``.

    The OS picks it (bind to port 0); a port is never handed out twice in one test process, so
    several servers started side by side get distinct ports. Another process may still grab it
    before our server binds: fixtures retry start-up with fresh ports.
    """
    with _lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("could not find a free port")


def answer_json(handler, status: int, doc: dict) -> None:
    """An ``http.server`` handler's answer: ``doc`` as FHIR JSON with its length."""
    body = json.dumps(doc).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/fhir+json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: TCP_NODELAY=1 avoids the ~50 ms Nagle delay per message."""
    return dict(os.environ, TCP_NODELAY="1")


def build_catalog(root, key: bytes = b"test-catalog-key-0123456789", **generate_kw):
    """A catalog made by the real pieces, without a PACS: generate studies (``generate_kw`` goes
    to ``sampledata.generate``) and catalog them with ``catalog_studies``.

    Returns the generated study summaries; the catalog is ``root / "catalog"`` and the lake
    ``root / "lake"``.
    """
    from pathlib import Path

    from pacsflow.deployments.local import sampledata

    root = Path(root)
    studies = sampledata.generate(root / "in", **generate_kw)
    catalog_studies(studies, root, key)
    return studies


def catalog_studies(studies, root, key: bytes, lake: str = "lake"):
    """Stage each generated study's files, de-identify/store/extract them (``process_study``)
    and commit one batch to ``root / "catalog"``, which is returned."""
    import shutil
    from pathlib import Path

    from pacsflow.catalog.store import CatalogStore
    from pacsflow.tasks.deid.deidentifier import Deidentifier
    from pacsflow.tasks.lake.study import process_study, read_rows
    from pacsflow.tasks.lake.storage import LakeStorage

    root = Path(root)
    deid = Deidentifier(key)
    rows = []
    for s in studies:
        staged = root / "staging" / s.study_uid
        staged.mkdir(parents=True)
        for f in s.path.rglob("*.dcm"):
            shutil.copy(f, staged / f.name)
        out = process_study(staged, deid.study_ref(s.study_uid), deid, LakeStorage(root / lake),
                            root / "quarantine", root / "rows" / s.study_uid)
        if out.rows_dir:
            rows.append(out.rows_dir)
    CatalogStore(root / "catalog").commit(read_rows(rows))
    shutil.rmtree(root / "staging")
    return root / "catalog"


def start_hapi(run_dir, data_dir=None, attempts: int = 2):
    """Start the HAPI FHIR server on a free port, retrying with a new port when another process
    took it before Jetty could bind."""
    from pacsflow.deployments import fhir_server

    last = None
    for _attempt in range(attempts):
        try:
            return fhir_server.start(free_port(), run_dir, data_dir=data_dir, timeout_s=300)
        except fhir_server.FhirServerError as exc:
            last = exc
    raise last


def pydicom_sample_files(max_bytes: int = 2_000_000) -> list:
    """Every file of pydicom's own test data (test_files and charset_files) under ``max_bytes``:
    the corpus our writers and encoders are pinned against pydicom on."""
    from pathlib import Path

    from pydicom.data import get_testdata_file

    root = Path(get_testdata_file("CT_small.dcm")).parent.parent
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc", ".json", ".txt")
                  and p.stat().st_size < max_bytes)
