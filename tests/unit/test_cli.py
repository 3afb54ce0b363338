"""The pacsflow command line, called as a user would (typer's runner, real catalog)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from pacsflow.flows.cli import app, demo_settings
from pacsflow.tasks.settings import load_settings

runner = CliRunner()

COMMANDS = {
    (): ["demo", "deidentify", "init", "settings", "report", "stack", "run", "catalog", "alerts", "xdsi"],
    ("stack",): ["up", "down", "status", "seed"],
    ("alerts",): ["apply", "webhook"],
    ("run",): ["nightly", "plan", "compact", "fhir-resync", "xdsi-publish"],
    ("xdsi",): ["status", "consent"],
    ("xdsi", "consent"): ["grant", "revoke", "list"],
    ("catalog",): ["query", "views", "stats"],
}


@pytest.mark.parametrize("group", list(COMMANDS))
def test_help_lists_commands(group):
    result = runner.invoke(app, [*group, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Usage" in result.output
    for name in COMMANDS[group]:
        assert f" {name} " in result.output, name


@pytest.mark.parametrize("command", [[*group, name] for group, names in COMMANDS.items() for name in names
                                     if (*group, name) not in COMMANDS])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: pacsflow {' '.join(command)}" in " ".join(result.output.split())


def test_commands_that_do_not_drive_the_local_stack_do_not_load_it(tmp_path):
    """Only `stack` and `demo` import Orthanc, the FHIR server and the sample generator; the rest
    (and --help) also leave Prefect alone."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from pacsflow.flows.cli import app\n"
        "for args in (['--help'], ['settings'], ['catalog', 'stats'], ['catalog', 'query', 'SELECT 1 AS one']):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('pacsflow.deployments', 'prefect')))))\n"
    )
    (tmp_path / "catalog").mkdir()  # an empty catalog; a missing folder is an error (test_cli_errors)
    env = {**os.environ, "PACSFLOW_CATALOG_ROOT": str(tmp_path / "catalog")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["pacsflow.deployments", "pacsflow.deployments.local",
                                   "pacsflow.deployments.local.cli"]


def test_stack_status_of_a_stopped_orthanc_exits_1(tmp_path):
    result = runner.invoke(app, ["stack", "status", "--work-dir", str(tmp_path / "orthanc")])
    assert result.exit_code == 1
    assert "running: False" in result.output and "fhir: " in result.output


def test_demo_settings_make_a_private_key_once_and_leave_the_environment_alone(tmp_path, monkeypatch):
    for name in ("PACSFLOW_DEID_KEY", "PACSFLOW_DEID_KEY_FILE", "PACSFLOW_DEID_KEY_BLOCK", "PACSFLOW_FHIR__BASE_URL",
                 "PACSFLOW_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    env = dict(os.environ)
    key = tmp_path / "state" / "deid.key"
    settings = load_settings()

    run = demo_settings(settings, "http://127.0.0.1:8090/fhir", key_path=key)
    assert run.deid_key_file == key and run.fhir.base_url == "http://127.0.0.1:8090/fhir"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(run.resolve_deid_key()) >= 32
    assert demo_settings(settings, None, key_path=key).resolve_deid_key() == run.resolve_deid_key()  # kept
    assert settings.deid_key_file is None and settings.fhir.base_url is None
    assert dict(os.environ) == env


def test_demo_settings_keep_a_configured_key_and_fhir_server(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_DEID_KEY", "configured-key-0123456789")
    monkeypatch.setenv("PACSFLOW_FHIR__BASE_URL", "https://fhir.example.org/r4")
    run = demo_settings(load_settings(), "http://127.0.0.1:8090/fhir", key_path=tmp_path / "deid.key")
    assert run.resolve_deid_key() == b"configured-key-0123456789" and run.deid_key_file is None
    assert run.fhir.base_url == "https://fhir.example.org/r4"
    assert not (tmp_path / "deid.key").exists()


def test_settings_hides_the_key(monkeypatch):
    monkeypatch.setenv("PACSFLOW_DEID_KEY", "never-show-this-key-123")
    result = runner.invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    assert "never-show-this-key" not in result.output
    assert json.loads(result.output)["pacs"]["port"] == 4242


def test_invalid_setting_is_reported_by_name(monkeypatch):
    monkeypatch.setenv("PACSFLOW_PACS__PORT", "not-a-port")
    result = runner.invoke(app, ["settings"])
    assert result.exit_code == 2
    assert "pacs.port" in result.output


def test_catalog_query_on_an_empty_catalog_and_bad_sql(monkeypatch, tmp_path):
    (tmp_path / "catalog").mkdir()
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(tmp_path / "catalog"))
    result = runner.invoke(app, ["catalog", "query", "SELECT count(*) AS n FROM series WHERE modality = $1", "-p", "CT"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["catalog", "query", "SELECT count(*) AS n FROM instances"])
    assert result.exit_code == 0, result.output
    assert "0" in result.output
    bad = runner.invoke(app, ["catalog", "query", "SELEC nonsense"])
    assert bad.exit_code == 2 and "query failed" in bad.output


def test_run_nightly_rejects_a_bad_date():
    result = runner.invoke(app, ["run", "nightly", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "--since" in result.output


def test_run_plan_needs_the_server_whose_workers_run_the_shards(monkeypatch, tmp_path):
    monkeypatch.delenv("PACSFLOW_CONFIG", raising=False)
    monkeypatch.setenv("PACSFLOW_DEID_KEY", "cli-test-key-0123456789")
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    # A settings context, not the environment: an earlier test's harness may hold one with its URL.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(app, ["run", "plan"])
    assert result.exit_code == 2
    assert "PREFECT_API_URL" in result.output


def test_run_fhir_resync_needs_a_base_url(monkeypatch):
    monkeypatch.delenv("PACSFLOW_FHIR__BASE_URL", raising=False)
    monkeypatch.delenv("PACSFLOW_CONFIG", raising=False)
    result = runner.invoke(app, ["run", "fhir-resync"])
    assert result.exit_code == 2
    assert "fhir.base_url is not set" in result.output
    assert "--only-failed" in runner.invoke(app, ["run", "fhir-resync", "--help"]).output


def test_run_xdsi_publish_needs_a_repository_url(monkeypatch):
    monkeypatch.delenv("PACSFLOW_XDSI__REPOSITORY_URL", raising=False)
    monkeypatch.delenv("PACSFLOW_CONFIG", raising=False)
    result = runner.invoke(app, ["run", "xdsi-publish"])
    assert result.exit_code == 2
    assert "xdsi.repository_url is not set" in result.output and "PACSFLOW_XDSI__REPOSITORY_URL" in result.output
    assert "--only-failed" in runner.invoke(app, ["run", "xdsi-publish", "--help"]).output


def test_nightly_exit_status_counts_fhir_failures():
    from pacsflow.flows.cli import nightly_exit_code

    clean = {"found": 3, "cataloged": 3, "failed": 0, "fhir_sent": 3, "fhir_failed": 0}
    assert nightly_exit_code(clean) == 0
    assert nightly_exit_code({**clean, "failed": 1}) == 1
    assert nightly_exit_code({**clean, "fhir_sent": 0, "fhir_failed": 3}) == 1  # a FHIR outage is not a success
    assert nightly_exit_code({**clean, "xdsi_published": 2, "xdsi_failed": 1}) == 1
