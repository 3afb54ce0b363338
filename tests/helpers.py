"""Small helpers shared by the test tiers (no fixtures here; see the conftest files)."""

from __future__ import annotations

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


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: TCP_NODELAY=1 avoids the ~50 ms Nagle delay per message."""
    return dict(os.environ, TCP_NODELAY="1")


def build_catalog(root, key: bytes = b"test-catalog-key-0123456789", **generate_kw):
    """A catalog made by the real pieces, without a PACS: generate studies, stage each one's
    files, de-identify/store/extract them (``process_study``) and commit one batch.

    Returns the generated study summaries; the catalog is ``root / "catalog"`` and the lake
    ``root / "lake"``. ``generate_kw`` goes to ``sampledata.generate``.
    """
    import shutil
    from pathlib import Path

    from catalog.store import CatalogStore
    from deployments.local import sampledata
    from tasks.deid import Deidentifier
    from tasks.process import process_study, read_rows
    from tasks.storage import LakeStorage

    root = Path(root)
    studies = sampledata.generate(root / "in", **generate_kw)
    deid = Deidentifier(key)
    rows = []
    for s in studies:
        staged = root / "staging" / s.study_uid
        staged.mkdir(parents=True)
        for f in s.path.rglob("*.dcm"):
            shutil.copy(f, staged / f.name)
        out = process_study(staged, deid.study_ref(s.study_uid), deid, LakeStorage(root / "lake"),
                            root / "quarantine", root / "rows" / s.study_uid)
        if out.rows_dir:
            rows.append(out.rows_dir)
    CatalogStore(root / "catalog").commit(read_rows(rows))
    return studies
