from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pacsflow.tasks.deid.choices import Option, PixelPolicy, SafePrivateList
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


def test_deid_closed_sets_are_enums_read_from_the_same_strings(monkeypatch, tmp_path):
    cfg = tmp_path / "pacsflow.yaml"
    cfg.write_text("deid:\n  options: [Retain UIDs, Clean Descriptors]\n  pixel_policy: allow\n"
                   "  safe_private_list: ps3.15-table-e.3.10-1\n")
    monkeypatch.setenv("PACSFLOW_CONFIG", str(cfg))
    s = load_settings()
    assert s.deid.options == [Option.RETAIN_UIDS, Option.CLEAN_DESCRIPTORS]
    assert s.deid.pixel_policy is PixelPolicy.ALLOW
    assert s.deid.safe_private_list is SafePrivateList.PS3_15_TABLE_E_3_10_1
    monkeypatch.setenv("PACSFLOW_DEID__PIXEL_POLICY", "mask")
    monkeypatch.setenv("PACSFLOW_DEID__OPTIONS", '["Retain Long. Full Dates"]')
    s = load_settings()
    assert (s.deid.options, s.deid.pixel_policy) == ([Option.RETAIN_FULL_DATES], PixelPolicy.MASK)
    dumped = json.loads(s.model_dump_json())["deid"]  # what `pacsflow settings` prints: the same strings
    assert dumped["options"] == ["Retain Long. Full Dates"] and dumped["pixel_policy"] == "mask"
    assert dumped["safe_private_list"] == "ps3.15-table-e.3.10-1"


@pytest.mark.parametrize("deid, name, choice", [
    ({"options": ["Retain Everything"]}, "deid.options", "'Retain Safe Private'"),
    ({"pixel_policy": "export"}, "deid.pixel_policy", "'allow'"),
    ({"safe_private_list": "my-list"}, "deid.safe_private_list", "'ps3.15-table-e.3.10-1'"),
])
def test_deid_closed_sets_name_the_setting_and_the_choices(deid, name, choice):
    with pytest.raises(SettingsError) as exc:
        load_settings(deid=deid)
    assert name in str(exc.value) and choice in str(exc.value)


def test_settings_module_does_not_load_the_deidentifier():
    """Settings type their fields with the small choices module; pydicom and the de-identifier
    (which is built from settings) stay unloaded."""
    code = ("import sys, pacsflow.tasks.settings as s; s.load_settings(); "
            "print(sorted(m for m in sys.modules if m == 'pydicom' or m.startswith('pacsflow.tasks.deid.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pacsflow.tasks.deid.choices']"


def test_receiver_admits_the_pacs_and_listed_aes_only_up_to_a_size(monkeypatch):
    s = load_settings()
    assert s.receiver.allowed_aes == [] and s.receiver.max_object_mb == 2048
    monkeypatch.setenv("PACSFLOW_RECEIVER__ALLOWED_AES", '["ROUTER ", "ARCHIVE2"]')
    monkeypatch.setenv("PACSFLOW_RECEIVER__MAX_OBJECT_MB", "64")
    s = load_settings()
    assert (s.receiver.allowed_aes, s.receiver.max_object_mb) == (["ROUTER", "ARCHIVE2"], 64)


@pytest.mark.parametrize("field, value", [
    ("allowed_aes", ["THIS-AE-TITLE-IS-TOO-LONG"]),
    ("allowed_aes", ["BACK\\SLASH"]),
    ("allowed_aes", [" "]),
    ("max_object_mb", 0),
])
def test_invalid_receiver_limits_name_the_setting(field, value):
    with pytest.raises(SettingsError) as exc:
        load_settings(receiver={field: value})
    assert f"receiver.{field}" in str(exc.value)


def test_each_worker_gets_its_own_receiver_ae_title_and_port(monkeypatch):
    monkeypatch.setenv("PACSFLOW_RECEIVER__AE_TITLE", "PACSFLOW{worker}")
    monkeypatch.setenv("PACSFLOW_RECEIVER__PORT", "11200")
    monkeypatch.setenv("PACSFLOW_SHARDS__WORKER", "3")
    settings = load_settings()
    receiver = settings.shards.receiver_of(settings.receiver)
    assert (receiver.ae_title, receiver.port) == ("PACSFLOW3", 11203)
    assert settings.receiver.ae_title == "PACSFLOW{worker}"  # as configured: resolved per shard run


def test_without_a_worker_number_the_receiver_is_as_configured_and_a_placeholder_is_refused(monkeypatch):
    settings = load_settings()
    assert settings.shards.receiver_of(settings.receiver) == settings.receiver
    monkeypatch.setenv("PACSFLOW_RECEIVER__AE_TITLE", "PACS{worker}")
    settings = load_settings()
    with pytest.raises(SettingsError, match="shards.worker"):
        settings.shards.receiver_of(settings.receiver)


def test_further_pacs_by_name_from_the_environment(monkeypatch):
    env = {"PACS__PORT": "4242", "SOURCES__B__PORT": "4343", "SOURCES__B__CALLED_AE": "LEGACY",
           "SOURCES__B__TLS__ENABLED": "true", "SOURCES__OLD-2__HOST": "pacs2.example"}
    for name, value in env.items():
        monkeypatch.setenv(f"PACSFLOW_{name}", value)
    settings = load_settings()
    assert sorted(settings.sources) == ["b", "old-2"]  # names are read in lower case
    b = settings.for_source("b")
    assert (b.pacs.port, b.pacs.called_ae, b.pacs.tls.enabled, b.pacs.host) == (4343, "LEGACY", True, "127.0.0.1")
    assert b.receiver == settings.receiver and b.sources == settings.sources  # only the PACS changes
    assert settings.for_source("old-2").pacs.host == "pacs2.example"
    assert settings.for_source(None) is settings and settings.for_source("pacs") is settings
    with pytest.raises(SettingsError, match="no PACS named 'c'"):
        settings.for_source("c")


def test_no_sources_by_default_and_from_yaml(monkeypatch, tmp_path):
    assert load_settings().sources == {}
    cfg = tmp_path / "pacsflow.yaml"
    cfg.write_text("sources:\n  legacy:\n    host: old.example\n    port: 11112\n")
    monkeypatch.setenv("PACSFLOW_CONFIG", str(cfg))
    assert load_settings().for_source("legacy").pacs.port == 11112


@pytest.mark.parametrize("name", ["pacs", "with_underscore", "with/slash", "a-name-longer-than-16", ""])
def test_a_source_name_is_a_short_safe_token(name):
    with pytest.raises(SettingsError, match="sources"):
        load_settings(sources={name: {"port": 104}})
