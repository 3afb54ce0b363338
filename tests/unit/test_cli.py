"""The pacsflow command line, called as a user would (typer's runner, real catalog)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pacsflow.flows.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["stack"], ["run"], ["catalog"]])
def test_help_lists_commands(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


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


def test_run_fhir_resync_needs_a_base_url(monkeypatch):
    monkeypatch.delenv("PACSFLOW_FHIR__BASE_URL", raising=False)
    monkeypatch.delenv("PACSFLOW_CONFIG", raising=False)
    result = runner.invoke(app, ["run", "fhir-resync"])
    assert result.exit_code == 2
    assert "fhir.base_url is not set" in result.output
    assert "--only-failed" in runner.invoke(app, ["run", "fhir-resync", "--help"]).output
