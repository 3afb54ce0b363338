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
    flow = load_flow_from_entrypoint(str(ROOT / nightly["entrypoint"].split(":")[0]) + ":nightly_ingest")
    assert set(flow.parameters.properties) == {"since", "until"}
