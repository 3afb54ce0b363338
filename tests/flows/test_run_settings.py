"""``run_settings``: settings handed to a flow run without the process environment, under the real engine."""

from __future__ import annotations

import os
import threading

import pytest
from prefect import flow, task

from pacsflow.flows.fhir_resync import fhir_resync
from pacsflow.flows.secrets import load_run_settings, run_settings
from pacsflow.tasks.settings import load_settings

pytestmark = pytest.mark.integration


@task(persist_result=False)
def _catalog_seen_by_task() -> tuple[str, int]:
    return str(load_run_settings().catalog_root), threading.get_ident()


@flow(persist_result=False)
def _probe() -> dict:
    submitted = _catalog_seen_by_task.submit()  # the thread-pool task runner: another thread
    task_root, task_thread = submitted.result()
    return {"flow": str(load_run_settings().catalog_root), "task": task_root, "task_thread": task_thread}


def _pacsflow_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PACSFLOW_")}


def test_the_flow_body_and_its_tasks_see_the_given_settings(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(tmp_path / "from-env"))
    given = load_settings(catalog_root=tmp_path / "given")
    env = _pacsflow_env()

    with run_settings(given):
        seen = _probe()
    assert seen["flow"] == seen["task"] == str(tmp_path / "given")
    assert seen["task_thread"] != threading.get_ident()
    assert _pacsflow_env() == env

    after = _probe()  # the block is over: the environment counts again
    assert after["flow"] == after["task"] == str(tmp_path / "from-env")


def test_the_fhir_resync_flow_uses_the_given_settings(prefect_api, tmp_path, monkeypatch):
    """The environment names a FHIR server; the settings given to the run have none, so the real
    flow stops at once instead of trying to reach it."""
    monkeypatch.setenv("PACSFLOW_FHIR__BASE_URL", "http://127.0.0.1:9/fhir")
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(tmp_path / "catalog"))
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))  # were the env used: a ledger there
    given = load_settings(fhir={"base_url": None})
    assert load_settings().fhir.base_url == "http://127.0.0.1:9/fhir"

    with run_settings(given):
        result = fhir_resync()
    assert result == {"selected": 0, "aborted": "fhir.base_url is not set"}


def test_overrides_apply_on_top_of_the_given_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_OVERLAP_DAYS", "9")
    given = load_settings(overlap_days=3)
    with run_settings(given):
        assert load_run_settings().overlap_days == 3
        changed = load_run_settings(catalog_root=tmp_path / "other")
        assert (changed.catalog_root, changed.overlap_days) == (tmp_path / "other", 3)
    assert load_run_settings().overlap_days == 9
