"""Shards and the PACS association cap (issue 17, test 5, second half): with
``max_associations=2`` the PACS never sees more than two of our associations at once, while three
``prefect worker`` processes run three shards at once, each retrieving its four studies one
association after another. Before a shard took one slot at a time, this set-up ended in every
shard holding one slot while it waited for a second (no slot left, no shard going on); before a
waiting run gave back only slots that two looks in a row found unaccounted, a run releasing its
slot between a waiter's two reads had it given back twice (room for a third association).

The set-up of tests/integration/test_shards.py (PostgreSQL, a Prefect server on it, the plan and
ingest-shard deployments on a process pool, a receiver per worker, Delta catalog), with a counting
TCP proxy (tests/net/counting_proxy.py) between our processes and Orthanc's DICOM port: every
C-FIND and C-MOVE association of the planner and of the shard runs passes through it, while
Orthanc's C-STOREs go straight to the workers' receivers. The proxy holds each answer back a few
tens of milliseconds, so that associations last long enough to overlap: with the cap raised (6),
this test sees more than two at once.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

from pacsflow.deployments.local import sampledata
from pacsflow.flows.plan import plan
from pacsflow.tasks.pacs.steps import PACS_LIMIT
from tests.integration.prefect_server import deploy, running_prefect_server, worker_env
from tests.integration.test_shards import Site, _free_run
from tests.net.counting_proxy import CountingProxy
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CAP = 2
WORKERS = 3
LATENCY_S = 0.06  # held back per request/response exchange through the proxy
END = dt.date.today() - dt.timedelta(days=20)


@pytest.fixture(scope="module")
def capped(postgresql: PostgresServer, orthanc_factory, tmp_path_factory) -> Iterator[tuple[Site, CountingProxy]]:
    """Three workers whose PACS is Orthanc behind the counting proxy, ``max_associations`` = CAP."""
    root = tmp_path_factory.mktemp("shard-limits")
    base = _free_run(WORKERS + 1)
    orthanc = orthanc_factory(modalities={f"PACSFLOW{n}": (f"PACSFLOW{n}", "127.0.0.1", base + n)
                                          for n in range(1, WORKERS + 1)})
    prefect_db = postgresql.new_database().replace("postgresql://", "postgresql+asyncpg://", 1)
    state_url = postgresql.new_database()
    with CountingProxy(orthanc.dicom_port, latency_s=LATENCY_S) as proxy, \
            running_prefect_server(root, PREFECT_API_DATABASE_CONNECTION_URL=prefect_db) as api:
        lake = root / "lake"
        env = worker_env(api, root / "prefect-home", PACSFLOW_PACS__PORT=str(proxy.port),
                         PACSFLOW_MAX_ASSOCIATIONS=str(CAP), PACSFLOW_SLOT_WAIT_S="60",
                         PACSFLOW_RECEIVER__AE_TITLE="PACSFLOW{worker}", PACSFLOW_RECEIVER__PORT=str(base),
                         PACSFLOW_RECEIVER__ENGINE="pynetdicom", PACSFLOW_STORAGE_ROOT=str(lake / "dicom"),
                         PACSFLOW_CATALOG_ROOT=str(lake / "catalog"), PACSFLOW_CATALOG__BACKEND="delta",
                         PACSFLOW_STATE_ROOT=str(root / "state"), PACSFLOW_STATE__URL=state_url,
                         PACSFLOW_DEID_KEY="shard-limits-key-0123456789", PACSFLOW_DEID_WORKERS="0",
                         # a shard a day, four studies each, retrieved two to a task: two slots a shard, one after the other
                         PACSFLOW_SHARDS__MAX_STUDIES="4", PACSFLOW_COMMIT_BATCH="2", PACSFLOW_MIN_FREE_MB="0")
        deploy(env, "plan", "ingest-shard")
        with ExitStack() as stack:
            site = Site(root, orthanc, env, state_url, stack)
            for n in range(1, WORKERS + 1):
                site.start_worker(n)
            yield site, proxy


def _final_shard_runs(timeout_s: float = 60.0) -> list:
    """The shard runs once all are over (a run marks its studies done, then writes its report)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["ingest-shard"])))
        if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _most_runs_at_once(runs: list) -> int:
    """The most of ``runs`` that were running at one time (from their start and end times)."""
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_the_pacs_never_sees_more_than_max_associations_of_ours_at_once(capped, monkeypatch, tmp_path):
    site, proxy = capped
    for k, v in site.env.items():  # the planner runs here, with the workers' settings
        if k.startswith("PACSFLOW_"):
            monkeypatch.setenv(k, v)
    made = sampledata.generate(tmp_path / "in", studies=12, days=3, end_date=END, seed=53, modalities=("CT", "MR"),
                               series_per_study=(1, 2), instances_per_series=(2, 3), rows=32, cols=32)
    sampledata.load([tmp_path / "in"], "127.0.0.1", site.orthanc.dicom_port)  # straight in, not through the proxy

    result = plan(since=END - dt.timedelta(days=2), until=END)

    assert (result["found"], result["queued"], result["started"]) == (12, 12, 3)
    site.wait_all_done(timeout_s=150)
    n_instances = sum(s.n_instances for s in made)
    assert site.catalog_counts() == (12, 12, n_instances)  # every study cataloged once
    runs = _final_shard_runs()
    assert len(runs) == 3 and {r.state.type.value for r in runs} == {"COMPLETED"}
    assert _most_runs_at_once(runs) == WORKERS  # three shards wanted the PACS at once ...
    assert proxy.connections >= 1 + 3 + 12  # the plan's C-FIND, a C-FIND per shard, a C-MOVE per study
    # ... and the PACS saw two of ours at once, never more
    assert proxy.most_at_once == CAP, f"{proxy.most_at_once} at once: {proxy.overlaps(CAP + 1)}"
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(PACS_LIMIT)
    assert (limit.limit, limit.active_slots) == (CAP, 0)
