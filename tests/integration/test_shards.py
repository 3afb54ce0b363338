"""Shards as flow runs across workers (issue 17, tests 3 and 4): a real `prefect server` on
PostgreSQL, the plan and ingest-shard deployments of prefect.yaml on a process pool, three
`prefect worker` processes, each with its own receiver (``PACSFLOW{worker}`` at receiver.port +
worker), the state in PostgreSQL, the de-identification key in a Prefect Secret block, the lake
and the Delta catalog on moto's S3 server: the README's "More than one machine" steps. Two Orthanc PACS: the one in
``pacs`` and the named source ``b`` (``PACSFLOW_SOURCES__B__*``), each knowing every worker's
receiver as a C-MOVE destination, each loaded with studies of its own.

Test 3: plan once; every study of both PACS is cataloged exactly once (B's by shards keyed
``b/...``), by shard runs on more than one worker, and DuckDB counts over the catalog equal the
sum of both PACS's counts (Orthanc REST); `migrate inventory` and `reconcile` of each PACS (its
own passes, the studies that came from it) find no difference; a second plan finds nothing to do
and both watermarks are at the window's end. Test 4 (studies on the first PACS only): a worker
and its flow-run process are killed with SIGKILL mid-shard; a new worker starts, the next plan
starts the dead shard again, every study is cataloged exactly once, and every stored object's
SHA-256 equals the catalog's (`migrate reconcile` over all of them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import psycopg
import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactCollectionFilter,
    ArtifactCollectionFilterKey,
    DeploymentFilter,
    DeploymentFilterName,
)

from pacsflow.catalog.backends import open_store
from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.deployments.local.orthanc import OrthancServer
from pacsflow.flows.migrate import migrate_inventory, migrate_reconcile
from pacsflow.flows.plan import plan
from pacsflow.tasks.ingest.leases import Leases
from tests.integration.prefect_server import deploy, pool_worker, running_prefect_server, worker_env
from tests.postgres import PostgresServer
from tests.s3 import REGION, S3Server, s3_server  # noqa: F401  (fixture import)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

WORKERS = 3
LEASE_S = 6.0
TODAY = dt.date.today()
WAIT_S = 240.0


def _free_run(n: int) -> int:
    """A port p with p..p+n-1 free now (the receivers of workers 0..n-1), below the ephemeral
    range: there no outgoing connection (to the Prefect server, to Orthanc) takes one of them as
    its local port before a worker's receiver binds it, seconds or minutes later."""
    for _ in range(100):
        base = random.randrange(20000, 32768 - n)
        try:
            for p in range(base, base + n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


@dataclass
class Site:
    root: Path
    orthanc: OrthancServer
    env: dict[str, str]  # the settings every worker shares (PACSFLOW_*, PREFECT_*)
    state_url: str
    stack: ExitStack
    workers: dict[int, Popen] = field(default_factory=dict)
    orthanc_b: OrthancServer | None = None  # the named source "b"
    catalog_location: str = ""  # catalog.location ("" = <catalog_root>/delta) and its storage options
    catalog_options: dict[str, str] = field(default_factory=dict)

    @property
    def pacs(self) -> list[OrthancServer]:
        return [self.orthanc, *([self.orthanc_b] if self.orthanc_b else [])]

    @property
    def catalog(self) -> Path:
        return self.root / "lake" / "catalog"

    def start_worker(self, number: int) -> Popen:
        env = {**self.env, "PACSFLOW_SHARDS__WORKER": str(number)}
        process = self.stack.enter_context(pool_worker(env, self.root / f"worker{number}.log", "--limit", "1",
                                                       "--name", f"shards-{number}"))
        self.workers[number] = process
        return process

    def leases(self) -> Leases:
        return Leases.under(self.root / "state", self.state_url)

    def catalog_counts(self) -> tuple[int, int, int]:
        """Study rows, distinct studies, instance rows."""
        sql = ("SELECT (SELECT count(*) FROM studies), (SELECT count(DISTINCT study_uid) FROM studies), "
               "(SELECT count(*) FROM instances)")
        store = open_store(self.catalog, "delta", self.catalog_location, self.catalog_options)
        return tuple(query(store, sql).to_pylist()[0].values())  # type: ignore[return-value]

    def wait_all_done(self, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            shards = self.leases().shards()
            if shards and all(p.finished for p in shards):
                return
            time.sleep(1.0)
        logs = "\n".join((self.root / f"worker{n}.log").read_text()[-1500:] for n in self.workers)
        pytest.fail(f"shards not done: {self.leases().shards()}\n{logs}")


@pytest.fixture(scope="module")
def site(postgresql: PostgresServer, orthanc_factory, s3_server: S3Server,  # noqa: F811
         tmp_path_factory) -> Iterator[Site]:
    """README "More than one machine", step by step: the Prefect server and the state on PostgreSQL,
    the key in a Secret block, the lake and the catalog on S3, one settings set for every worker."""
    root = tmp_path_factory.mktemp("shards")
    bucket = s3_server.create_bucket()
    catalog_options = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true",
                       "aws_conditional_put": "etag"}
    prefect_db = postgresql.new_database().replace("postgresql://", "postgresql+asyncpg://", 1)
    state_url = postgresql.new_database()
    base = _free_run(WORKERS + 4)  # workers 1-3, and up to three that replace killed ones
    aes = {f"PACSFLOW{n}": (f"PACSFLOW{n}", "127.0.0.1", base + n) for n in range(1, WORKERS + 4)}
    orthanc, orthanc_b = orthanc_factory(modalities=aes), orthanc_factory(modalities=aes)
    with running_prefect_server(root, PREFECT_API_DATABASE_CONNECTION_URL=prefect_db) as api:
        Secret(value="shards-test-key-0123456789").save("pacsflow-deid-key", overwrite=True)
        settings = {**s3_server.env,  # the S3 credentials, from the environment as on AWS
            "PACSFLOW_PACS__PORT": str(orthanc.dicom_port), "PACSFLOW_PACS__HTTP_URL": orthanc.rest_url,
            "PACSFLOW_SOURCES__B__PORT": str(orthanc_b.dicom_port), "PACSFLOW_SOURCES__B__HTTP_URL": orthanc_b.rest_url,
            "PACSFLOW_RECEIVER__AE_TITLE": "PACSFLOW{worker}", "PACSFLOW_RECEIVER__PORT": str(base),
            "PACSFLOW_RECEIVER__ENGINE": "pynetdicom",
            "PACSFLOW_STORAGE_ROOT": f"s3://{bucket}/dicom", "PACSFLOW_STORAGE__ENDPOINT_URL": s3_server.endpoint_url,
            "PACSFLOW_STORAGE__REGION": REGION, "PACSFLOW_CATALOG_ROOT": str(root / "lake" / "catalog"),
            "PACSFLOW_CATALOG__BACKEND": "delta", "PACSFLOW_CATALOG__LOCATION": f"s3://{bucket}/catalog",
            "PACSFLOW_CATALOG__STORAGE_OPTIONS": json.dumps(catalog_options), "PACSFLOW_STATE_ROOT": str(root / "state"),
            "PACSFLOW_STATE__URL": state_url, "PACSFLOW_DEID_KEY_BLOCK": "pacsflow-deid-key",
            "PACSFLOW_DEID_WORKERS": "0", "PACSFLOW_SHARDS__MAX_STUDIES": "2",
            "PACSFLOW_SHARDS__LEASE_S": str(LEASE_S), "PACSFLOW_RETRY_DELAY_S": "0.2",
            "PACSFLOW_MAX_ASSOCIATIONS": "3", "PACSFLOW_MIN_FREE_MB": "0",
        }
        env = worker_env(api, root / "prefect-home", **settings)
        deploy(env, "plan", "ingest-shard")
        with ExitStack() as stack:
            s = Site(root, orthanc, env, state_url, stack, orthanc_b=orthanc_b,
                     catalog_location=f"s3://{bucket}/catalog", catalog_options=catalog_options)
            for n in range(1, WORKERS + 1):
                s.start_worker(n)
            yield s


@pytest.fixture
def planner_env(site: Site, monkeypatch) -> None:
    """The plan flow runs in this process with the workers' settings (no worker number) and S3
    credentials."""
    for k, v in site.env.items():
        if k.startswith(("PACSFLOW_", "AWS_")):
            monkeypatch.setenv(k, v)


def _seed(site: Site, folder: Path, studies: int, end: dt.date, seed: int,
          days: int = 4, pacs: OrthancServer | None = None) -> list[sampledata.StudySummary]:
    """Generated studies loaded into ``pacs`` (default: the first PACS)."""
    made = sampledata.generate(folder, studies=studies, days=days, end_date=end, seed=seed, modalities=("CT", "MR"),
                               series_per_study=(1, 2), instances_per_series=(2, 3), rows=32, cols=32)
    sampledata.load([folder], "127.0.0.1", (pacs or site.orthanc).dicom_port)
    return made


def _shard_runs() -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["ingest-shard"])))


def _final_shard_runs(timeout_s: float = 60.0) -> list:
    """The shard runs once none is still running (a run marks its studies done, then writes its report)."""
    deadline = time.monotonic() + timeout_s
    runs = _shard_runs()
    while any(not (r.state and r.state.is_final()) for r in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = _shard_runs()
    return runs


def _claimants(state_url: str) -> set[str]:
    with psycopg.connect(state_url) as con:
        rows = con.execute("SELECT DISTINCT worker FROM leases.claims WHERE worker IS NOT NULL").fetchall()
    return {r[0].split("/")[1] for r in rows}


def test_plan_spreads_the_shards_of_both_pacs_over_the_workers_and_catalogs_every_study_once(site, planner_env,
                                                                                            tmp_path):
    end = TODAY - dt.timedelta(days=10)
    made = _seed(site, tmp_path / "a", studies=8, end=end, seed=31)
    made_b = _seed(site, tmp_path / "b", studies=4, days=2, end=end, seed=32, pacs=site.orthanc_b)
    assert not {s.study_uid for s in made} & {s.study_uid for s in made_b}
    since, until = TODAY - dt.timedelta(days=14), end

    result = plan(since=since, until=until)

    assert (result["found"], result["queued"]) == (12, 12)
    assert {k: (v["found"], v["queued"]) for k, v in result["sources"].items()} == {"pacs": (8, 8), "b": (4, 4)}
    assert result["shards_cut"] == result["started"] >= 6 and result["restarted"] == 0
    keys = [p.shard for p in site.leases().shards()]
    assert sum(k.startswith("b/") for k in keys) == result["sources"]["b"]["shards_cut"] >= 2
    site.wait_all_done()
    on_pacs = [(o.study_count(), o.instance_count()) for o in site.pacs]  # Orthanc's REST API
    assert on_pacs == [(8, sum(s.n_instances for s in made)), (4, sum(s.n_instances for s in made_b))]
    studies, instances = sum(n for n, _ in on_pacs), sum(n for _, n in on_pacs)
    assert site.catalog_counts() == (studies, studies, instances)  # each study once, every instance of both
    assert len(_claimants(site.state_url) & {"1", "2", "3"}) >= 2  # the shards ran on more than one worker
    runs = _final_shard_runs()
    assert {r.state.type.value for r in runs} == {"COMPLETED"}
    assert any(r.parameters["shard"].startswith("b/") for r in runs)
    with get_client(sync_client=True) as client:  # one slot per retrieve: the limit keeps its size, all given back
        limit = client.read_global_concurrency_limit_by_name("pacs-associations")
    assert (limit.limit, limit.active_slots) == (3, 0)
    for source, n in (("pacs", 8), ("b", 4)):  # each PACS's inventory against the studies that came from it
        assert migrate_inventory(since, until, source)["studies"] == n
        checked = migrate_reconcile(1.0, source)
        assert (checked["studies"], checked["differences"], checked["checksum_findings"]) == (n, 0, 0), checked
        assert checked["migrated"] == checked["on_pacs"] == n

    again = plan(since=since, until=until)  # nothing left on either: no run, both watermarks at the window's end
    assert (again["queued"], again["started"], again["restarted"], again["unfinished"]) == (0, 0, 0, 0)
    assert {k: v["watermark"] >= until.isoformat() for k, v in again["sources"].items()} == {"pacs": True, "b": True}


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descendants(pid: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    found, frontier = [], {pid}
    while frontier:
        children = [p for p in pids if _parent(p) in frontier]
        found += children
        frontier = set(children)
    return found


def _kill_mid_shard(site: Site) -> str | None:
    """SIGKILL a worker and its flow-run process while that run holds leases on studies of its
    shard (claimed, not done): the shard's key, or None when no run is in that state right now."""
    processes = {n: [*_descendants(w.pid), w.pid] for n, w in site.workers.items() if w.poll() is None}
    runs = {int(r.infrastructure_pid): r.parameters["shard"] for r in _shard_runs()
            if r.state and r.state.is_running() and r.infrastructure_pid}
    working = {p.shard for p in site.leases().shards() if p.held and not p.finished}
    for number, pids in processes.items():
        shard = next((runs[pid] for pid in pids if pid in runs and runs[pid] in working), None)
        if shard is None:
            continue
        for pid in pids:  # the flow-run process and its worker, no clean-up
            os.kill(pid, signal.SIGKILL)
        site.workers.pop(number).wait()
        return shard
    return None


def _cataloged(site: Site) -> int:
    return sum(p.done for p in site.leases().shards())


def test_a_killed_worker_s_shard_is_started_again_by_the_next_plan_and_cataloged_once(site, planner_env,
                                                                                       tmp_path):
    before = site.catalog_counts()
    made = _seed(site, tmp_path / "in", studies=9, days=3, end=TODAY - dt.timedelta(days=5), seed=47)
    since, until = TODAY - dt.timedelta(days=7), TODAY - dt.timedelta(days=5)
    done_before = _cataloged(site)

    first = plan(since=since, until=until)
    assert first["queued"] == 9 and first["started"] == 6  # 3 studies a day, at most 2 a shard

    deadline, shard, spare = time.monotonic() + WAIT_S, None, iter(range(WORKERS + 1, WORKERS + 4))
    while shard is None and time.monotonic() < deadline:
        if _cataloged(site) - done_before >= 3:  # a third of the studies
            hit = _kill_mid_shard(site)
            if hit is not None:
                site.start_worker(next(spare))
                # the run may have marked its studies done between the look and the kill: try another
                shard = hit if hit in {p.shard for p in site.leases().shards() if not p.finished} else None
        time.sleep(0.2)
    assert shard is not None, f"no shard run to kill: {site.leases().shards()}"

    # the other shards end; the killed one stays unfinished, its run RUNNING, until the next plan
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        open_shards = [p for p in site.leases().shards() if not p.finished]
        if [p.shard for p in open_shards] == [shard] and open_shards[0].held == 0:
            break
        time.sleep(1.0)
    assert [p.shard for p in site.leases().shards() if not p.finished] == [shard], site.leases().shards()
    time.sleep(LEASE_S)  # its run has been RUNNING longer than a lease by now

    second = plan(since=since, until=until)
    assert (second["shards_cut"], second["started"], second["restarted_by_reason"]) == (0, 0, {"stale": 1})
    with get_client(sync_client=True) as client:  # the plan's artifact names the dead shard and what it did
        [artifact] = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=["plan-shards"])))
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [(r["shard"], r["started"]) for r in rows] == [(shard, "stale")]
    site.wait_all_done()

    n_instances = sum(s.n_instances for s in made)
    assert site.catalog_counts() == (before[0] + 9, before[1] + 9, before[2] + n_instances)
    assert sum(o.study_count() for o in site.pacs) == before[0] + 9
    killed = [r for r in _final_shard_runs() if r.parameters.get("shard") == shard]
    assert sorted(r.state.type.value for r in killed) == ["COMPLETED", "CRASHED"]
    checked = migrate_reconcile(1.0, "pacs")  # every stored object's SHA-256 against the catalog's
    assert (checked["differences"], checked["checksum_findings"]) == (0, 0), checked
