from __future__ import annotations

import pytest

from pacsflow.tasks.settings import RetrieveMethod, SettingsError, load_settings


def test_defaults_point_at_the_local_stack(monkeypatch):
    s = load_settings()
    assert (s.pacs.host, s.pacs.port, s.pacs.called_ae) == ("127.0.0.1", 4242, "ORTHANC")
    assert s.retrieve_method is RetrieveMethod.C_MOVE
    assert s.overlap_days == 2


def test_env_and_yaml(monkeypatch, tmp_path):
    cfg = tmp_path / "pacsflow.yaml"
    cfg.write_text("pacs:\n  host: pacs.example\n  port: 104\nretrieve_method: c-get\noverlap_days: 5\n")
    monkeypatch.setenv("PACSFLOW_CONFIG", str(cfg))
    monkeypatch.setenv("PACSFLOW_OVERLAP_DAYS", "3")
    s = load_settings()
    assert (s.pacs.host, s.pacs.port, s.retrieve_method, s.overlap_days) == ("pacs.example", 104, RetrieveMethod.C_GET, 3)


@pytest.mark.parametrize(
    "env, name",
    [
        ({"PACSFLOW_PACS__PORT": "70000"}, "pacs.port"),
        ({"PACSFLOW_CALLING_AE": "THIS-AE-TITLE-IS-TOO-LONG"}, "calling_ae"),
        ({"PACSFLOW_RETRIEVE_METHOD": "ftp"}, "retrieve_method"),
        ({"PACSFLOW_INITIAL_SINCE": "2026-01-01"}, "initial_since"),
    ],
)
def test_invalid_settings_name_the_setting(monkeypatch, env, name):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert name in str(exc.value)


def test_key_never_in_messages_or_dumps(monkeypatch, tmp_path):
    monkeypatch.setenv("PACSFLOW_DEID_KEY", "super-secret-key-value-123")
    s = load_settings()
    assert s.resolve_deid_key() == b"super-secret-key-value-123"
    assert "super-secret" not in repr(s) and "super-secret" not in s.model_dump_json()
    monkeypatch.setenv("PACSFLOW_DEID_KEY", "short")
    with pytest.raises(SettingsError) as exc:
        load_settings().resolve_deid_key()
    assert "short" not in str(exc.value)


def test_key_file(monkeypatch, tmp_path):
    f = tmp_path / "k"
    f.write_text("0123456789abcdef-key\n")
    monkeypatch.setenv("PACSFLOW_DEID_KEY_FILE", str(f))
    assert load_settings().resolve_deid_key() == b"0123456789abcdef-key"


@pytest.mark.parametrize("storage, catalog, state", [
    ("lake/dicom", "lake/catalog", "lake/dicom/state"),
    ("lake/dicom", "lake/catalog", "lake/catalog"),
    ("lake", "lake/catalog", "lake/state"),
])
def test_phi_zone_cannot_live_in_the_lake(monkeypatch, tmp_path, storage, catalog, state):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as exc:
        load_settings(storage_root=storage, catalog_root=catalog, state_root=state)
    assert "state_root" in str(exc.value)


def test_phi_zone_beside_the_lake_is_fine(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    s = load_settings(storage_root="s3://bucket/lake", catalog_root="lake/catalog", state_root="state")
    assert s.state_root.name == "state"
