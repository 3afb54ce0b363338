"""``pacsflow serve`` with ``serve.tls_cert``: the real command speaks HTTPS only, with the configured
certificate, and still wants a token; a plain-HTTP client gets no answer. In one process and with
``serve.workers`` processes (each reads the settings and the tokens again)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pacsflow.tasks.web.tokens import Scope, TokenStore
from tests.faults.pki import make_pki
from tests.helpers import free_port


@pytest.fixture(params=[1, 2], ids=["one process", "two worker processes"])
def https_serve(tmp_path: Path, request) -> Iterator[tuple[str, Path, str]]:
    pki = make_pki(tmp_path / "pki", names=("server",))
    port = free_port()
    env = dict(os.environ, PACSFLOW_STATE_ROOT=str(tmp_path / "state"),
               PACSFLOW_CATALOG_ROOT=str(tmp_path / "lake" / "catalog"),
               PACSFLOW_STORAGE_ROOT=str(tmp_path / "lake" / "dicom"),
               PACSFLOW_SERVE__PORT=str(port), PACSFLOW_SERVE__TLS_CERT=str(pki / "server.pem"),
               PACSFLOW_SERVE__TLS_KEY=str(pki / "server.key"), PACSFLOW_SERVE__WORKERS=str(request.param))
    env.pop("PACSFLOW_CONFIG", None)
    env.pop("PREFECT_API_URL", None)
    token = TokenStore(tmp_path / "state" / "serve" / "tokens.json").add("tester", {Scope.READ})
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pacsflow.flows.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                httpx.get(f"{base}/health", verify=_trusting(pki / "ca.pem"), timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.3)
        yield base, pki / "ca.pem", token
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        log.close()


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_serve_speaks_https_with_its_certificate_and_still_wants_a_token(https_serve):
    base, ca_file, token = https_serve
    ca = _trusting(ca_file)

    assert httpx.get(f"{base}/health", verify=ca).json() == {"status": "ok"}
    assert httpx.get(f"{base}/api/studies", verify=ca).status_code == 401
    with pytest.raises(httpx.ConnectError):  # a client that does not trust our CA
        httpx.get(f"{base}/health")
    with pytest.raises(httpx.TransportError):  # plain HTTP on the HTTPS port gets no answer
        httpx.get(base.replace("https:", "http:") + "/health", timeout=5)
    answer = httpx.get(f"{base}/api/studies", verify=ca, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code != 401
