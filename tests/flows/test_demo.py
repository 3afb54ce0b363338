"""``pacsflow demo`` end to end: its own Orthanc, sample studies, one nightly run under Prefect, the
DuckDB table and the FHIR counts. The key it makes and the FHIR server it finds reach the flow
through ``run_settings``; the process environment is left as it was."""

from __future__ import annotations

import os
import re
import stat

import pytest
from typer.testing import CliRunner

from pacsflow.catalog.views import query
from pacsflow.deployments.local import cli as stack_cli
from pacsflow.deployments.local.orthanc import ORTHANC_BINARY, stop_by_pidfile
from pacsflow.flows.cli import app
from tests.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _pacsflow_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PACSFLOW_")}


def _number(output: str, label: str) -> int:
    [value] = re.findall(rf"^{re.escape(label)}: (\d+)$", output, flags=re.MULTILINE)
    return int(value)


def test_demo_runs_with_its_key_and_fhir_server_without_writing_the_environment(
        prefect_api, hapi, tmp_path, monkeypatch):
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"{ORTHANC_BINARY} not installed")
    monkeypatch.chdir(tmp_path)  # the demo works under ./var
    for name in _pacsflow_env():
        monkeypatch.delenv(name)
    http_port = free_port()
    ports = {"PACSFLOW_PACS__PORT": str(free_port()), "PACSFLOW_PACS__HTTP_URL": f"http://127.0.0.1:{http_port}",
             "PACSFLOW_RECEIVER__PORT": str(free_port())}
    for name, value in ports.items():
        monkeypatch.setenv(name, value)
    # The demo starts its own HAPI server on a fixed port; the session's server stands in for it.
    monkeypatch.setattr(stack_cli, "ensure_fhir", lambda port=stack_cli.FHIR_PORT: hapi.base_url)
    env = _pacsflow_env()

    try:
        result = CliRunner().invoke(app, ["demo", "--studies", "4"])
    finally:
        stop_by_pidfile(tmp_path / "var" / "orthanc", graceful=False)
    assert result.exit_code == 0, result.output[-3000:]
    assert _pacsflow_env() == env

    key = tmp_path / "var" / "state" / "deid.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text()) >= 16
    cataloged = _number(result.output, "cataloged")
    assert cataloged >= 1
    assert _number(result.output, "fhir_sent") == cataloged  # the URL reached the flow only through run_settings
    studies = query(tmp_path / "var" / "lake" / "catalog", "SELECT count(*) FROM studies").column(0)[0].as_py()
    assert studies == cataloged
    modalities = query(tmp_path / "var" / "lake" / "catalog", "SELECT DISTINCT modality FROM series").column(0)
    for modality in modalities.to_pylist():  # a row of the DuckDB table per modality
        assert re.search(rf"^\W*{modality}\W", result.output, flags=re.MULTILINE), modality
    assert _number(result.output, f"ImagingStudy resources on {hapi.base_url}") >= cataloged
