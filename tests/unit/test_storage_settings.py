"""StorageSettings: s3fs options from settings and named environment variables, never a key in a
settings value or an error; a local storage_root is opened as before, whatever the S3 settings say."""

from __future__ import annotations

import pytest
from fsspec.implementations.local import LocalFileSystem

from pacsflow.tasks.lake.storage import LakeStorage, open_root
from pacsflow.tasks.settings import SettingsError, StorageSettings, load_settings


def test_defaults_give_no_options_and_the_local_lake_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_STORAGE_ROOT", str(tmp_path / "lake"))
    settings = load_settings()
    assert settings.storage == StorageSettings() and settings.storage.fsspec_options() == {}
    storage = LakeStorage(settings.storage_root, settings.storage)
    assert storage.local and not storage.conditional
    assert storage.put("a/b/c.dcm", b"DICM") == str((tmp_path / "lake" / "a/b/c.dcm").resolve())
    assert (tmp_path / "lake" / "a/b/c.dcm").read_bytes() == b"DICM"


def test_s3_options_come_from_settings_and_keys_from_the_named_variables(monkeypatch):
    monkeypatch.setenv("PACSFLOW_STORAGE__ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("PACSFLOW_STORAGE__REGION", "eu-central-2")
    monkeypatch.setenv("PACSFLOW_STORAGE__ACCESS_KEY_ENV", "MY_LAKE_KEY")
    monkeypatch.setenv("PACSFLOW_STORAGE__SECRET_KEY_ENV", "MY_LAKE_SECRET")
    monkeypatch.setenv("MY_LAKE_KEY", "key-id-1")
    monkeypatch.setenv("MY_LAKE_SECRET", "very-secret-2")
    storage = load_settings().storage
    assert "very-secret-2" not in repr(storage) + storage.model_dump_json()
    assert storage.fsspec_options() == {"endpoint_url": "http://127.0.0.1:9000", "key": "key-id-1",
                                        "secret": "very-secret-2",
                                        "client_kwargs": {"region_name": "eu-central-2"}}


def test_a_named_variable_that_is_not_set_is_an_error_naming_it(monkeypatch):
    monkeypatch.delenv("MY_LAKE_SECRET", raising=False)
    monkeypatch.setenv("MY_LAKE_KEY", "key-id-1")
    storage = StorageSettings(access_key_env="MY_LAKE_KEY", secret_key_env="MY_LAKE_SECRET")
    with pytest.raises(SettingsError, match="MY_LAKE_SECRET") as caught:
        storage.fsspec_options()
    assert "key-id-1" not in str(caught.value)
    with pytest.raises(ValueError, match="go together"):
        StorageSettings(access_key_env="MY_LAKE_KEY")


def test_s3_settings_reach_s3_roots_only(tmp_path):
    storage = StorageSettings(endpoint_url="http://127.0.0.1:9000")
    fs, path = open_root(tmp_path / "lake", storage)
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "lake")
    fs, path = open_root("memory://lake", storage)
    assert "memory" in fs.protocol
    fs, path = open_root("s3://bucket/lake", storage)
    assert path == "bucket/lake" and fs.storage_options["endpoint_url"] == "http://127.0.0.1:9000"
