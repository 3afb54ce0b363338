"""storage_root on S3 (moto's server on loopback): the nightly run writes every object to the bucket with
the checksum the catalog records, WADO-RS serves the bytes from S3, and S3 going away in the middle of a
night fails exactly the studies whose writes failed, transiently, for the next run to catalog."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
from fastapi.testclient import TestClient

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.tasks.core.errors import LakeWriteError
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.lake.steps import DEID_RETRY_DELAYS_S
from pacsflow.tasks.lake.storage import LakeStorage
from pacsflow.tasks.settings import load_settings
from pacsflow.tasks.web.app import create_app
from pacsflow.tasks.web.tokens import Scope, TokenStore
from tests.dicomweb_lake import bearer, parse_multipart
from tests.s3 import ACCESS_KEY, SECRET_KEY, S3Server, s3_server  # noqa: F401  (fixture import)

pytestmark = pytest.mark.integration

TODAY = dt.date.today()
NO_US = ("CT", "MR", "MG")  # no burned-in ultrasound: every instance goes to the lake


@pytest.fixture
def s3_lake(lake, s3_server: S3Server, monkeypatch):
    """The flow tests' lake with storage_root in a fresh bucket; keys named through StorageSettings."""
    bucket = s3_server.create_bucket()
    env = {"PACSFLOW_STORAGE_ROOT": f"s3://{bucket}/lake",
           "PACSFLOW_STORAGE__ENDPOINT_URL": s3_server.endpoint_url,
           "PACSFLOW_STORAGE__REGION": "us-east-1",
           "PACSFLOW_STORAGE__ACCESS_KEY_ENV": "LAKE_TEST_KEY_ID",
           "PACSFLOW_STORAGE__SECRET_KEY_ENV": "LAKE_TEST_SECRET",
           "LAKE_TEST_KEY_ID": ACCESS_KEY, "LAKE_TEST_SECRET": SECRET_KEY}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lake.bucket = bucket
    return lake


def _seed(lake, out: Path, **kw: Any) -> list[sampledata.StudySummary]:
    studies = sampledata.generate(out, modalities=NO_US, end_date=TODAY, **kw)
    sampledata.load([out], "127.0.0.1", lake.orthanc.dicom_port)
    return studies


def _objects(s3: S3Server, bucket: str) -> dict[str, dict[str, Any]]:
    """Every object under the lake prefix: key -> its listing entry (ETag, LastModified, Size)."""
    client, out = s3.boto3_client(), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="lake/"):
        out.update({o["Key"]: o for o in page.get("Contents", [])})
    return out


def _catalog_matches_bucket(lake, s3: S3Server) -> list[dict[str, Any]]:
    """The catalog's instances, each checked against its object in the bucket (bytes and SHA-256)."""
    rows = query(lake.catalog, "SELECT study_uid, file_path, file_size, file_sha256 FROM instances").to_pylist()
    client = s3.boto3_client()
    for row in rows:
        assert row["file_path"].startswith(f"s3://{lake.bucket}/lake/")
        key = row["file_path"].removeprefix(f"s3://{lake.bucket}/")
        data = client.get_object(Bucket=lake.bucket, Key=key)["Body"].read()
        assert len(data) == row["file_size"] and hashlib.sha256(data).hexdigest() == row["file_sha256"]
    return rows


def test_a_night_on_s3_catalogs_every_study_and_wado_rs_serves_it_from_the_bucket(s3_lake, s3_server, tmp_path,
                                                                                  caplog):
    studies = _seed(s3_lake, tmp_path / "in", studies=3, days=2, seed=31)
    expected = sum(s.n_instances for s in studies)
    caplog.set_level("DEBUG")

    result = nightly_ingest()

    assert (result["found"], result["cataloged"], result["failed"]) == (3, 3, 0)
    rows = _catalog_matches_bucket(s3_lake, s3_server)
    assert len(rows) == expected == len(_objects(s3_server, s3_lake.bucket))
    assert not s3_lake.storage.exists()  # nothing went to the local default
    assert SECRET_KEY not in caplog.text  # (the key id is in botocore's own DEBUG lines: not a secret)

    settings = load_settings()
    token = TokenStore(settings.tokens_path).add("viewer", {Scope.READ})
    client = TestClient(create_app(settings), headers=bearer(token))
    study = rows[0]["study_uid"]
    r = client.get(f"/dicom-web/studies/{study}")
    assert r.status_code == 200
    served = sorted(hashlib.sha256(body).hexdigest() for _, body in parse_multipart(r.headers["content-type"],
                                                                                     r.content))
    assert served == sorted(row["file_sha256"] for row in rows if row["study_uid"] == study)
    checked = client.get(f"/api/studies/{study}", params={"check": "storage"}).json()["storage"]
    assert checked["present"] == len(served) and checked["checksum_mismatches"] == [] and not checked["missing"]


def _outage(monkeypatch, s3: S3Server, after_puts: int, failed_puts: int) -> list[int]:
    """S3 goes away (SIGKILL) right after the night's ``after_puts``-th object is written and comes
    back (same port, same objects) after ``failed_puts`` writes have failed. The run writes in its own
    process (deid_workers=0), and s3fs gives up on a PUT at once rather than after its usual ~6 s of
    retries (botocore's through fsspec's configuration, s3fs's own), so the outage costs seconds, not minutes."""
    original, counts = LakeStorage.put, [0, 0]  # written, failed

    def put(self: LakeStorage, rel: str, data: bytes) -> str:
        try:
            url = original(self, rel, data)
        except LakeWriteError:
            counts[1] += 1
            if counts[1] == failed_puts:
                s3.start()
            raise
        counts[0] += 1
        if counts[0] == after_puts:
            s3.stop()
        return url

    monkeypatch.setenv("PACSFLOW_DEID_WORKERS", "0")
    monkeypatch.setattr(LakeStorage, "put", put)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"retries": {"max_attempts": 1}}})
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    return counts


def test_s3_going_away_mid_night_fails_those_studies_transiently_and_the_next_night_catalogs_them(
        s3_lake, s3_server, tmp_path, monkeypatch):
    studies = _seed(s3_lake, tmp_path / "in", studies=5, days=3, seed=47)
    expected = sum(s.n_instances for s in studies)
    # A study has 1 + len(DEID_RETRY_DELAYS_S) tries, each ended by its first failed write: after
    # 2 * 5 + 1 failed writes among 5 studies, one of them has used all its tries, however they interleave.
    tries = 1 + len(DEID_RETRY_DELAYS_S)
    counts = _outage(monkeypatch, s3_server, after_puts=3, failed_puts=(tries - 1) * 5 + 1)

    first = run_result(nightly_ingest(return_state=True))

    assert counts[1] == (tries - 1) * 5 + 1 and s3_server.process is not None  # the outage happened, S3 is back
    assert first["found"] == 5 and first["cataloged"] + first["failed"] == 5
    assert first["failed"] >= 1  # at least the study being written when S3 went away
    ledger = Ledger(s3_lake.state / "ledger.sqlite")
    failed = ledger.failed()
    assert len(failed) == first["failed"]
    assert all(not f.permanent and "storage_root" in (f.reason or "") for f in failed)
    assert len(_catalog_matches_bucket(s3_lake, s3_server)) == sum(
        s.n_instances for s in studies if s.study_uid not in {f.study_uid for f in failed})
    before = _objects(s3_server, s3_lake.bucket)

    second = nightly_ingest()

    assert (second["queued"], second["cataloged"], second["failed"]) == (first["failed"], first["failed"], 0)
    assert ledger.failed() == []
    rows = _catalog_matches_bucket(s3_lake, s3_server)
    assert len(rows) == expected == len({r["file_path"] for r in rows})  # every instance, once
    after = _objects(s3_server, s3_lake.bucket)
    assert len(after) == expected
    # What the first night wrote (also of the failed studies) was re-put, identical: left untouched.
    assert {k: after[k]["LastModified"] for k in before} == {k: o["LastModified"] for k, o in before.items()}
