"""LakeStorage on moto's S3 server: conditional writes (an identical re-put leaves the object alone, a
different object replaces only the version compared), failures as LakeWriteError, and the test server's
restart keeping what it held."""

from __future__ import annotations

import time

import pytest

from pacsflow.tasks.core.errors import LakeWriteError, is_transient
from pacsflow.tasks.lake.storage import LakeStorage
from pacsflow.tasks.settings import StorageSettings
from tests.s3 import ACCESS_KEY, SECRET_KEY, S3Server, s3_server  # noqa: F401  (fixture import)

pytestmark = pytest.mark.integration

REL = "1.2.3/1.2.3.4/1.2.3.4.5.dcm"


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch) -> str:
    monkeypatch.setenv("LAKE_KEY", ACCESS_KEY)
    monkeypatch.setenv("LAKE_SECRET", SECRET_KEY)
    return s3_server.create_bucket()


def _settings(s3: S3Server, **kw: object) -> StorageSettings:
    return StorageSettings(endpoint_url=s3.endpoint_url, region="us-east-1", access_key_env="LAKE_KEY",
                           secret_key_env="LAKE_SECRET", **kw)


def _head(s3: S3Server, bucket: str) -> dict:
    return s3.boto3_client().head_object(Bucket=bucket, Key=f"lake/{REL}")


def test_an_identical_re_put_leaves_the_object_alone(s3_server, bucket):
    storage = LakeStorage(f"s3://{bucket}/lake", _settings(s3_server))
    url = storage.put(REL, b"DICM-one")
    assert url == f"s3://{bucket}/lake/{REL}" and storage.exists(REL)
    first = _head(s3_server, bucket)
    time.sleep(1.1)  # LastModified has whole seconds: a rewrite would show

    assert storage.put(REL, b"DICM-one") == url

    again = _head(s3_server, bucket)
    assert (again["ETag"], again["LastModified"]) == (first["ETag"], first["LastModified"])


def test_a_different_object_replaces_the_one_compared_with_a_warning(s3_server, bucket, caplog):
    storage = LakeStorage(f"s3://{bucket}/lake", _settings(s3_server))
    storage.put(REL, b"DICM-old")
    caplog.set_level("WARNING", logger="pacsflow.tasks.lake.storage")

    storage.put(REL, b"DICM-new, longer")

    body = s3_server.boto3_client().get_object(Bucket=bucket, Key=f"lake/{REL}")["Body"].read()
    assert body == b"DICM-new, longer"
    assert REL in caplog.text and "replacing" in caplog.text


def test_an_object_changed_by_another_writer_meanwhile_is_not_overwritten(s3_server, bucket, monkeypatch):
    storage = LakeStorage(f"s3://{bucket}/lake", _settings(s3_server))
    storage.put(REL, b"DICM-old")
    look = storage.fs.info

    def look_then_someone_writes(path: str, **kw: object) -> dict:
        found = look(path, **kw)
        s3_server.boto3_client().put_object(Bucket=bucket, Key=f"lake/{REL}", Body=b"DICM-theirs")
        return found

    monkeypatch.setattr(storage.fs, "info", look_then_someone_writes)
    with pytest.raises(LakeWriteError) as caught:
        storage.put(REL, b"DICM-mine")

    assert is_transient(caught.value) and f"s3://{bucket}/lake" in str(caught.value)
    body = s3_server.boto3_client().get_object(Bucket=bucket, Key=f"lake/{REL}")["Body"].read()
    assert body == b"DICM-theirs"


def test_without_conditional_writes_a_put_overwrites(s3_server, bucket):
    storage = LakeStorage(f"s3://{bucket}/lake", _settings(s3_server, conditional_writes=False))
    assert not storage.conditional
    storage.put(REL, b"DICM-old")
    storage.put(REL, b"DICM-new")
    assert s3_server.boto3_client().get_object(Bucket=bucket, Key=f"lake/{REL}")["Body"].read() == b"DICM-new"


def test_a_missing_bucket_and_a_server_gone_are_lake_write_errors_naming_the_root(s3_server, bucket):
    with pytest.raises(LakeWriteError, match="storage_root: cannot write under s3://no-such-bucket-here/lake"):
        LakeStorage("s3://no-such-bucket-here/lake", _settings(s3_server)).put(REL, b"x")
    storage = LakeStorage(f"s3://{bucket}/lake", _settings(s3_server))
    storage.put(REL, b"DICM-kept")
    s3_server.stop()
    try:
        with pytest.raises(LakeWriteError) as caught:
            storage.put("9/9/9.dcm", b"DICM-lost")
        assert is_transient(caught.value) and SECRET_KEY not in str(caught.value)
    finally:
        s3_server.start()
    # The restarted server holds what the killed one held.
    assert storage.fs.cat_file(storage.path(REL)) == b"DICM-kept"
    assert not LakeStorage(f"s3://{bucket}/lake", _settings(s3_server)).exists("9/9/9.dcm")
