"""Alerts end to end: `pacsflow alerts` puts the automations on a real `prefect server` (its triggers
and actions services; the in-process test harness runs no actions), real flow runs and a work pool
losing its worker make them fire, and a local HTTP receiver records what the webhook block POSTs."""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events.schemas.automations import AutomationCore
from typer.testing import CliRunner

from pacsflow.flows.cli import app
from tests.integration.prefect_server import prefect_server  # noqa: F401  (fixture re-export)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POOL = "alerts-test-pool"
DEADLINE_S = 10  # Prefect's least `within` for a proactive trigger
SECRET = "Doe^Jane 1957"  # stands for PHI in an error message: it must not reach the webhook
NOTIFY_S = 45.0


@dataclass
class Receiver:
    """The webhook's far end: every JSON body POSTed to it, in order."""

    url: str
    posts: list[dict] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, wanted: Callable[[dict], bool], timeout: float = NOTIFY_S) -> dict:
        with self.arrived:
            if self.arrived.wait_for(lambda: any(wanted(p) for p in self.posts), timeout):
                return next(p for p in self.posts if wanted(p))
        raise AssertionError(f"no such notification within {timeout:.0f}s; got {self.posts}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with found.arrived:
                found.posts.append(body)
                found.arrived.notify_all()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.url = f"http://127.0.0.1:{server.server_port}/hook"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield found
    server.shutdown()
    server.server_close()


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@dataclass
class Heartbeats:
    """A worker of POOL, as far as the server can tell: heartbeats every half second until stopped."""

    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.stop.is_set():
                client.send_worker_heartbeat(POOL, "alerts-test-worker", heartbeat_interval_seconds=1)
                self.stop.wait(0.5)


@pytest.fixture(scope="module")
def worker(prefect_server: str) -> Iterator[Heartbeats]:
    """A work pool with an online worker before the automations exist (a new pool is not ready and
    says so, which is not what is tested)."""
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    beats = Heartbeats()
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beats.run,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while client.read_work_pool(POOL).status.value != "READY":
            assert time.monotonic() < deadline, "the work pool did not become ready"
            time.sleep(0.2)
    yield beats
    beats.stop.set()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def applied(prefect_server: str, receiver: Receiver, worker: Heartbeats) -> str:
    """The block and the automations, made by the documented commands as an operator runs them."""
    out = _cli("alerts", "webhook", receiver.url)
    assert "custom-webhook/pacsflow-alerts" in out
    out = _cli("alerts", "apply", "--work-pool", POOL, "--nightly-hours", str(DEADLINE_S / 3600))
    assert out.count(": created") == 3, out
    return "custom-webhook/pacsflow-alerts"


def _pacsflow_automations() -> dict[str, list]:
    with get_client(sync_client=True) as client:
        found: dict[str, list] = {}
        for automation in client.read_automations():
            found.setdefault(automation.name, []).append(automation)
    return found


def test_applying_again_updates_by_name(applied: str):
    before = _pacsflow_automations()
    assert sorted(before) == ["pacsflow-nightly-overdue", "pacsflow-run-failed", "pacsflow-work-pool-not-ready"]
    with get_client(sync_client=True) as client:  # a copy made by hand (`prefect automation create`)
        client.create_automation(AutomationCore.model_validate(before["pacsflow-run-failed"][0].model_dump(exclude={"id"})))

    out = _cli("alerts", "apply", "--block", applied, "--work-pool", POOL, "--nightly-hours", str(DEADLINE_S / 3600))

    assert "pacsflow-run-failed: updated, 1 duplicates deleted" in out
    after = _pacsflow_automations()
    assert {name: len(copies) for name, copies in after.items()} == {name: 1 for name in before}
    for name in ("pacsflow-nightly-overdue", "pacsflow-work-pool-not-ready"):  # the same ones, updated
        assert after[name][0].id == before[name][0].id
    overdue = after["pacsflow-nightly-overdue"][0].trigger
    assert overdue.posture == "Proactive" and overdue.within.total_seconds() == DEADLINE_S


@flow(name="nightly-ingest", persist_result=False)
def failing_nightly() -> None:
    raise RuntimeError(f"cannot reach {SECRET}")


def test_a_failed_run_is_named_in_a_notification_without_its_error(applied: str, receiver: Receiver,
                                                                   prefect_server: str):
    state = failing_nightly(return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)

    post = receiver.wait_for(lambda p: run.name in p["subject"] and "Failed" in p["subject"])

    assert post["subject"] == f"pacsflow: nightly-ingest run {run.name} is Failed"
    assert f"{prefect_server.removesuffix('/api')}/runs/flow-run/{run.id}" in post["body"]
    assert post["text"].startswith(post["subject"])
    assert not [p for p in receiver.posts if SECRET in json.dumps(p)]


def test_a_nightly_still_running_after_the_deadline_is_reported(applied: str, receiver: Receiver):
    release = threading.Event()
    names: list[str] = []

    @flow(name="nightly-ingest", persist_result=False)
    def hanging_nightly() -> None:
        from prefect.runtime import flow_run

        names.append(flow_run.name)
        release.wait(NOTIFY_S + DEADLINE_S)

    started = time.monotonic()
    thread = threading.Thread(target=contextvars.copy_context().run, args=(hanging_nightly,))
    thread.start()
    try:
        while not names:
            assert time.monotonic() - started < 30, "the flow run did not start"
            time.sleep(0.1)
        post = receiver.wait_for(lambda p: names[0] in p["subject"] and "not finished" in p["subject"])
    finally:
        release.set()
        thread.join()
    assert time.monotonic() - started >= DEADLINE_S  # not before the deadline
    assert post["subject"] == f"pacsflow: nightly run {names[0]} not finished after {DEADLINE_S} s"
    assert "Running" in post["body"]


def test_a_work_pool_whose_worker_went_silent_is_reported(applied: str, receiver: Receiver, worker: Heartbeats):
    worker.stop.set()
    post = receiver.wait_for(lambda p: POOL in p["subject"])
    assert post["subject"] == f"pacsflow: work pool {POOL} is not ready"
    assert f"prefect worker start --pool {POOL}" in post["body"]
    assert len([p for p in receiver.posts if POOL in p["subject"]]) == 1  # its creation was before the alerts
