"""Fixtures for the integration tier: real Orthanc 1.10.1 and DCMTK processes on free ports.

``orthanc_factory(receiver_port=..., dcmtk_port=..., limit_find_results=..., extra=...)`` starts an
isolated Orthanc (own tmp work dir, own ports) and returns the running ``OrthancServer``; every
server is stopped at session end (or earlier by the test). ``orthanc`` is a fresh server per test.

AEs registered at each server (``server.cfg.modalities``: name -> (AE, host, port)):
``PACSFLOW`` (our Storage SCP, at ``receiver_port``; the lead's pynetdicom receiver binds there),
``SEEDER`` (storescu), ``DCMTK`` (findscu/movescu/getscu; storescp at ``dcmtk_port`` as C-MOVE
destination).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pacsflow.deployments import fhir_server
from pacsflow.deployments.local.orthanc import (
    ORTHANC_BINARY,
    OrthancConfig,
    OrthancError,
    OrthancServer,
    default_modalities,
)
from tests.helpers import dcmtk_env, free_port, start_hapi

RECEIVER_AE = "PACSFLOW"
DCMTK_AE = "DCMTK"
SEEDER_AE = "SEEDER"

OrthancFactory = Callable[..., OrthancServer]


def _require_binaries(*names: str) -> None:
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"{ORTHANC_BINARY} not installed")
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"DCMTK tools missing: {missing}")


@pytest.fixture(scope="session")
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancFactory]:
    _require_binaries()
    servers: list[OrthancServer] = []

    def make(
        *,
        receiver_port: int | None = None,
        dcmtk_port: int | None = None,
        limit_find_results: int = 0,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra: dict[str, Any] | None = None,
        start: bool = True,
    ) -> OrthancServer:
        last: OrthancError | None = None
        for _attempt in range(3):  # a free port can be taken by someone else before Orthanc binds
            mods = default_modalities()
            mods[RECEIVER_AE] = (RECEIVER_AE, "127.0.0.1", receiver_port or free_port())
            mods[DCMTK_AE] = (DCMTK_AE, "127.0.0.1", dcmtk_port or free_port())
            mods.update(modalities or {})
            cfg = OrthancConfig(
                work_dir=tmp_path_factory.mktemp("orthanc"),
                dicom_port=free_port(),
                http_port=free_port(),
                modalities=mods,
                limit_find_results=limit_find_results,
                extra=dict(extra or {}),
            )
            server = OrthancServer(cfg)
            servers.append(server)
            if not start:
                return server
            try:
                return server.start(timeout_s=30)
            except OrthancError as exc:
                last = exc
        raise last  # type: ignore[misc]

    yield make
    for server in servers:
        server.stop(graceful=False)


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> Iterator[OrthancServer]:
    """A fresh, empty, isolated Orthanc for one test."""
    server = orthanc_factory()
    yield server
    server.stop(graceful=False)


@dataclass
class StoreSCP:
    """A DCMTK storescp process (the C-MOVE destination ``DCMTK``)."""

    ae_title: str
    port: int
    out_dir: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.files():
            p.unlink()


@pytest.fixture
def dcmtk_storescp(orthanc: OrthancServer, tmp_path: Path) -> Iterator[StoreSCP]:
    """storescp listening where ``orthanc`` expects the ``DCMTK`` AE."""
    _require_binaries("storescp")
    ae, host, port = orthanc.cfg.modalities[DCMTK_AE]
    out = tmp_path / "storescp"
    out.mkdir()
    log = open(tmp_path / "storescp.log", "wb")
    proc = subprocess.Popen(
        ["storescp", "-aet", ae, "-od", str(out), "+xa", str(port)],
        env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"storescp exited with {proc.returncode} (port {port})")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield StoreSCP(ae, port, out, proc)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="session")
def hapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fhir_server.FhirServerHandle]:
    """One in-memory HAPI FHIR server (R4) for the session; tests isolate themselves by identifiers."""
    if not fhir_server.java_available():
        pytest.skip("Java 17+ is not installed, so the HAPI FHIR server cannot run")
    fhir_server.build(quiet=True)
    run_dir = tmp_path_factory.mktemp("hapi-sync")
    handle = start_hapi(run_dir, data_dir=None)
    try:
        yield handle
    finally:
        handle.stop()
