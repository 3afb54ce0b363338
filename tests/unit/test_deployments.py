"""Every deployment in prefect.yaml points at a flow that imports and builds without network."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[2]


def _deployments():
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_every_entrypoint_loads(monkeypatch):
    monkeypatch.chdir(ROOT)
    names = set()
    for dep in _deployments():
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        names.add(dep["name"])
        params = set(flow.parameters.properties)
        assert set(dep.get("parameters") or {}) <= params, dep["name"]
        assert dep["work_pool"]["name"] == "pacsflow-local"
    assert {"nightly", "compact"} <= names


def test_nightly_has_a_cron_schedule_with_a_time_zone():
    [nightly] = [d for d in _deployments() if d["name"] == "nightly"]
    [schedule] = nightly["schedules"]
    assert schedule["cron"].count(" ") == 4 and schedule["timezone"]
    flow = load_flow_from_entrypoint(nightly["entrypoint"])
    assert set(flow.parameters.properties) == {"since", "until"}


def test_entrypoints_name_the_installed_package():
    """Module paths, not files: a worker loads the same module objects the package defines."""
    from pacsflow.flows.nightly import nightly_ingest

    entrypoints = [d["entrypoint"] for d in _deployments()]
    assert all(e.startswith("pacsflow.flows.") and ".py" not in e for e in entrypoints)
    [nightly] = [d for d in _deployments() if d["name"] == "nightly"]
    assert load_flow_from_entrypoint(nightly["entrypoint"]) is nightly_ingest
