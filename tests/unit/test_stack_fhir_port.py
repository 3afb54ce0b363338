"""`pacsflow stack status` reports the local HAPI FHIR server on the port `stack up --fhir-port`
gave it, read from the URL file its start script leaves in the stack's state folder."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from pacsflow.deployments import fhir_server
from pacsflow.deployments.local import cli as stack_cli
from pacsflow.flows.cli import app

from tests.helpers import answer_json


class _Metadata(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ok = self.path.split("?")[0] == "/fhir/metadata"
        answer_json(self, 200 if ok else 404, {"resourceType": "CapabilityStatement"} if ok else {})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fhir_on_other_port() -> Iterator[str]:
    """A FHIR endpoint answering /metadata on a port the OS picks (never the default 8090)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield fhir_server.base_url(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _record_running_server(run_dir: Path, url: str | None) -> None:
    # What start.sh leaves behind: the PID file, and the URL file once the server answers.
    run_dir.mkdir(parents=True)
    (run_dir / fhir_server.PID_NAME).write_text(f"{os.getpid()}\n")
    if url is not None:
        (run_dir / fhir_server.URL_NAME).write_text(f"{url}\n")


def test_status_reports_the_port_stack_up_chose(tmp_path, monkeypatch, fhir_on_other_port):
    assert fhir_on_other_port != fhir_server.base_url(stack_cli.FHIR_PORT)
    monkeypatch.chdir(tmp_path)
    _record_running_server(tmp_path / stack_cli.FHIR_RUN_DIR, fhir_on_other_port)

    result = CliRunner().invoke(app, ["stack", "status", "--work-dir", str(tmp_path / "orthanc")])
    assert f"fhir: running, {fhir_on_other_port}" in result.output, result.output
    assert stack_cli.running_fhir_url() == fhir_on_other_port
    assert stack_cli.ensure_fhir(stack_cli.FHIR_PORT) == fhir_on_other_port  # found, not started twice


def test_no_url_file_or_no_answer_is_not_running(tmp_path, fhir_on_other_port):
    starting = tmp_path / "starting"
    _record_running_server(starting, None)
    assert stack_cli.running_fhir_url(starting) is None
    gone = tmp_path / "gone"
    _record_running_server(gone, fhir_on_other_port.replace("/fhir", "/nothing-here"))
    assert stack_cli.running_fhir_url(gone) is None
    assert stack_cli.running_fhir_url(tmp_path / "never-started") is None
