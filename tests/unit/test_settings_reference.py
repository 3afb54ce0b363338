"""`pacsflow init` and the settings reference: both are generated from the settings model, so the
README's table, the starter file and the model cannot drift apart."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pacsflow.flows.cli import app
from pacsflow.tasks.settings import Settings, load_settings
from pacsflow.tasks.settings_cli import write_starter_files
from pacsflow.tasks.settings_reference import readme_with_reference, reference_table, setting_entries

README = Path(__file__).resolve().parents[2] / "README.md"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_pacsflow_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PACSFLOW_"):
            monkeypatch.delenv(name)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leaves(mapping: dict, prefix: str = "") -> set[str]:
    names: set[str] = set()
    for key, value in mapping.items():
        # A section is a non-empty mapping; an empty one is a dict-valued setting (hl7.identifier_systems).
        names |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key}
    return names


def test_every_setting_has_a_description_and_nested_models_are_expanded():
    entries = {e.name: e for e in setting_entries()}
    assert not [name for name, e in entries.items() if not e.description.strip()]
    for name in ("pacs.port", "pacs.http_url", "pacs.tls.server_name", "receiver.tls.require_client_cert",
                 "deid.options", "fhir.base_url", "deid_key_file", "deid_workers"):
        assert name in entries, name
    assert not [n for n in entries if n.split(".")[0] in ("pacs", "receiver", "deid", "fhir") and n.count(".") == 0]
    assert entries["pacs.tls.ca_bundle"].env_var == "PACSFLOW_PACS__TLS__CA_BUNDLE"
    assert entries["deid_workers"].computed and not entries["deid.options"].computed


def test_the_readme_table_is_the_generated_one():
    """Fails when a setting or its description changes without the README: regenerate it with
    `python -m pacsflow.tasks.settings_reference README.md`."""
    text = README.read_text(encoding="utf-8")
    assert readme_with_reference(text) == text, "README settings table is stale: regenerate it (see docstring)"
    assert f"`PACSFLOW_FHIR__BASE_URL`" in text


def test_the_environment_variable_names_in_the_table_are_the_ones_read(monkeypatch):
    entries = {e.name: e for e in setting_entries()}
    monkeypatch.setenv(entries["pacs.tls.server_name"].env_var, "pacs-cert-name")
    monkeypatch.setenv(entries["deid.quarantine_retention_days"].env_var, "9")
    monkeypatch.setenv(entries["fhir.batch_size"].env_var, "7")
    s = load_settings()
    assert (s.pacs.tls.server_name, s.deid.quarantine_retention_days, s.fhir.batch_size) == ("pacs-cert-name", 9, 7)


def test_settings_reference_command_prints_the_table():
    result = runner.invoke(app, ["settings", "--reference"])
    assert result.exit_code == 0, result.output
    assert result.stdout == reference_table()


def test_init_writes_private_files_that_load_back_to_the_defaults(tmp_path, monkeypatch):
    config = tmp_path / "etc" / "pacsflow" / "pacsflow.yaml"
    result = runner.invoke(app, ["init", str(config)])
    assert result.exit_code == 0, result.output
    key = config.parent / "deid.key"
    assert result.stdout == f"export PACSFLOW_CONFIG={config}\n"
    assert (_mode(config), _mode(key)) == (0o600, 0o600)
    assert (_mode(config.parent), _mode(config.parent.parent)) == (0o700, 0o700)

    defaults = load_settings()
    monkeypatch.setenv("PACSFLOW_CONFIG", str(config))
    loaded = load_settings()
    assert loaded.deid_key_file == key
    assert loaded.model_dump(exclude={"deid_key_file"}) == defaults.model_dump(exclude={"deid_key_file"})
    assert len(loaded.resolve_deid_key()) >= 32


def test_init_writes_every_setting_but_no_secret(tmp_path):
    config, key = write_starter_files(tmp_path / "p.yaml", tmp_path / "k")
    text = config.read_text(encoding="utf-8")
    written = _leaves(yaml.safe_load(text))
    entries = setting_entries()
    assert written == {e.name for e in entries if not (e.secret or e.computed)}
    for e in entries:
        if e.secret or e.computed:
            assert f"# {e.path[-1]}: " in text, e.name  # there, commented out
    assert key.read_text().strip() not in text
    assert all(e.name.split(".")[-1] in ("deid_key", "token", "password") for e in entries if e.secret)
    for e in entries:  # every description is in the file (as a comment, possibly wrapped)
        assert " ".join(e.description.split()[:3]) in " ".join(text.replace("#", " ").split()), e.name


def test_init_refuses_to_overwrite_without_force(tmp_path):
    config = tmp_path / "pacsflow.yaml"
    key = tmp_path / "custom.key"
    assert runner.invoke(app, ["init", str(config), "--key-file", str(key)]).exit_code == 0
    first_key = key.read_bytes()
    config.write_text("pacs: {port: 104}\n")

    again = runner.invoke(app, ["init", str(config), "--key-file", str(key)])
    assert again.exit_code != 0 and "--force" in str(again.exception)
    assert key.read_bytes() == first_key and config.read_text() == "pacs: {port: 104}\n"

    only_key = runner.invoke(app, ["init", str(tmp_path / "other.yaml"), "--key-file", str(key)])
    assert only_key.exit_code != 0 and not (tmp_path / "other.yaml").exists()

    forced = runner.invoke(app, ["init", str(config), "--key-file", str(key), "--force"])
    assert forced.exit_code == 0, forced.output
    assert key.read_bytes() != first_key and "port: 4242" in config.read_text()
    assert "replaced" in forced.stderr
    assert (_mode(config), _mode(key)) == (0o600, 0o600)


def test_defaults_of_the_model_match_a_fresh_settings_object():
    """The table's defaults are the model's, not hand-written copies."""
    entries = {e.name: e for e in setting_entries()}
    fresh = Settings.model_construct()
    assert entries["pacs.port"].default == fresh.pacs.port
    assert entries["deid.options"].default == [o.value for o in fresh.deid.options]
    assert entries["retrieve_method"].default == fresh.retrieve_method.value
