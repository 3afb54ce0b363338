"""The event-triggered ingest end to end: `prefect deploy` registers the ingest-study deployment of
prefect.yaml with its trigger on a real `prefect server`, a process worker of the pool runs what the
server starts, and `emit_study_stable` (what the listener calls) makes a study of a hand-off folder
appear in the catalog."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.events import announce_waiting, emit_study_stable
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.handoff import handoff_dir
from pacsflow.tasks.settings import load_settings
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
)
from prefect.events.worker import EventsWorker

from tests.integration.prefect_server import (
    ingest_worker,
    prefect_server,  # noqa: F401  (fixture re-export)
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RUN_WAIT_S = 60.0


@pytest.fixture
def site(tmp_path, monkeypatch, prefect_server) -> dict[str, str]:  # noqa: F811
    """The environment of the worker (and of this test's settings): a fresh lake and state."""
    env = {
        "PACSFLOW_STORAGE_ROOT": str(tmp_path / "lake" / "dicom"),
        "PACSFLOW_CATALOG_ROOT": str(tmp_path / "lake" / "catalog"),
        "PACSFLOW_STATE_ROOT": str(tmp_path / "state"),
        "PACSFLOW_DEID_KEY": "trigger-test-key-0123456789",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return worker_env(prefect_server, tmp_path / "prefect-home", **env)


@pytest.fixture
def worker(site: dict[str, str], tmp_path) -> Iterator[subprocess.Popen]:
    with ingest_worker(site, tmp_path / "worker.log") as process:
        yield process


def _deployment_runs(ref: str, deadline: float):
    """The ingest-study runs of study ``ref`` (the server is shared by the tests), once one ended."""
    with get_client(sync_client=True) as client:
        while True:
            runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["ingest-study"])), flow_run_filter=FlowRunFilter())
                if r.parameters.get("study") == ref]
            if any(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


@pytest.mark.parametrize("how", ["emitted", "announced again at start"])
def test_a_stable_study_event_runs_the_deployment_and_catalogs_the_study(site, worker, tmp_path, how):
    with get_client(sync_client=True) as client:
        [automation] = client.read_automations_by_name("ingest-study__automation_1")
    assert automation.trigger.expect == {"pacsflow.study.stable"}
    assert "event.resource" in str(automation.actions[0].parameters)  # templates, not values rendered at deploy

    settings = load_settings()
    [study] = sampledata.generate(tmp_path / "in", studies=1, series_per_study=(2, 2),
                                  instances_per_series=(2, 2), modalities=("MR",), end_date=dt.date.today(),
                                  seed=5 if how == "emitted" else 6)  # another study: another event id
    ref = Deidentifier.from_settings(settings.resolve_deid_key(), settings.deid).study_ref(study.study_uid)
    folder = handoff_dir(settings, ref, 2)
    folder.mkdir(parents=True)
    for f in study.path.rglob("*.dcm"):
        os.link(f, folder / f.name)

    if how == "emitted":  # what the listener does for a stable study
        emit_study_stable(ref, 2, objects=4, modalities=["MR"])
    else:  # a listener or serve that died before the event went out: the folder waits, the next start tells
        assert announce_waiting(settings) == 1
    EventsWorker.drain_all(timeout=10)

    [run] = _deployment_runs(ref, time.monotonic() + RUN_WAIT_S)
    log = (tmp_path / "worker.log").read_text()[-3000:]
    assert run.state is not None and run.state.is_completed(), (run.state, log)
    assert run.parameters == {"study": ref, "generation": 2}
    assert run.name == f"ingest-study {ref} #2"
    assert not folder.exists()
    rows = query(settings.catalog_root, "SELECT number_of_series, number_of_instances FROM studies").to_pylist()
    assert rows == [{"number_of_series": 2, "number_of_instances": 4}]
