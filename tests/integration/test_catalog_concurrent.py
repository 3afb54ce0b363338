"""Issue 17, test 1: three OS processes commit into one Delta catalog at once, on local disk and on S3 (moto).

Each process commits 15 batches: two new studies of its own, a re-commit of the previous batch's
studies with changed rows (fewer or more instances, another description), and every third batch
two studies all three processes commit with identical rows. Afterwards every table holds exactly
the rows each study had in its last commit, no key twice, and every process ended normally.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pacsflow.catalog import views
from pacsflow.catalog.backends import open_store
from pacsflow.catalog.schema import PRIMARY_KEYS
from pacsflow.catalog.store import TABLES
from tests.s3 import REGION, s3_server  # noqa: F401 (the fixture)
from tests.unit.test_catalog_store import make_study

PROCESSES = 3
BATCHES = 15
SHARED = ("1.2.9.99.1", "1.2.9.99.2")


def version_of(uid: str, batch: int) -> dict[str, pa.Table]:
    """A study's rows as committed in ``batch``: its shape changes from one commit to the next."""
    if uid in SHARED:
        return make_study(uid, series=2, per_series=2)
    return make_study(uid, series=1 + batch % 2, per_series=1 + batch % 3, description=f"CT v{batch}")


def plan(process: int) -> list[list[str]]:
    """The study UIDs of each of the process's batches."""
    batches = []
    for b in range(BATCHES):
        uids = [f"1.2.9.{process}.{b}.{n}" for n in (1, 2)]
        if b:
            uids += [f"1.2.9.{process}.{b - 1}.{n}" for n in (1, 2)]  # re-commit, changed rows
        if b % 3 == 0:
            uids += list(SHARED)
        batches.append(uids)
    return batches


def writer(location: str, options: dict[str, str], process: int) -> None:
    store = open_store("", "delta", location, options)
    for b, uids in enumerate(plan(process)):
        studies = [version_of(uid, b) for uid in uids]
        store.commit({t: pa.concat_tables([s[t] for s in studies]) for t in TABLES})


def expected() -> dict[str, pa.Table]:
    last: dict[str, int] = {}
    for process in range(PROCESSES):
        for b, uids in enumerate(plan(process)):
            last.update({uid: b for uid in uids})
    studies = [version_of(uid, b) for uid, b in sorted(last.items())]
    return {t: pa.concat_tables([s[t] for s in studies]) for t in TABLES}


def run_writers(location: str, options: dict[str, str], env: dict[str, str] | None = None) -> None:
    store = open_store("", "delta", location, options)
    store.ensure_initialized()
    ctx = mp.get_context("spawn")  # delta-rs runs threads: no fork
    procs = [ctx.Process(target=writer, args=(location, options, k)) for k in range(PROCESSES)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=600)
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES  # every process finished
    check(store)


def check(store: Any) -> None:
    want = expected()
    for t in TABLES:
        keys = list(PRIMARY_KEYS[t])
        order = ", ".join(keys)
        have = views.query(store, f"SELECT * EXCLUDE (study_month) FROM {t} ORDER BY {order}")
        assert have.num_rows == have.group_by(keys).aggregate([]).num_rows  # no key twice
        wanted = want[t].sort_by([(k, "ascending") for k in keys])
        assert have.num_rows == wanted.num_rows
        for column in keys + (["study_description"] if t == "studies" else []):
            assert have[column].to_pylist() == wanted[column].to_pylist(), (t, column)


def test_three_processes_commit_to_a_local_catalog(tmp_path: Path):
    run_writers(str(tmp_path / "delta"), {})


def test_three_processes_commit_to_a_catalog_on_s3(s3_server, monkeypatch):  # noqa: F811 (the fixture)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)  # credentials from the environment, as in production
    bucket = s3_server.create_bucket()
    options = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true",
               "aws_conditional_put": "etag"}
    run_writers(f"s3://{bucket}/catalog", options)
    objects = s3_server.boto3_client().list_objects_v2(Bucket=bucket, Prefix="catalog/studies/_delta_log/")
    assert objects.get("KeyCount", 0) > BATCHES  # the commits are on the S3 server
