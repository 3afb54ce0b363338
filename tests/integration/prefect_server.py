"""A real `prefect server start` for tests that need its services (triggers, actions, the foreman),
which the in-process test harness does not run: a module-scoped fixture, ``prefect_server``
(its API URL, set as PREFECT_API_URL while the module's tests run). Import it into a test module.
``ingest_worker(env, log_path)`` deploys the ingest-study deployment of prefect.yaml (with its
trigger) and runs a process worker of its pool with ``env`` until the block ends; ``deploy`` and
``pool_worker`` do each half for other deployments, and ``running_prefect_server`` starts a
server with more settings (its database)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
POOL = "pacsflow-local"  # the pool prefect.yaml names


def _healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with suppress(urllib.error.URLError, OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
        time.sleep(0.3)
    return False


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; the foreman
    checks workers every second so a silent worker is noticed in seconds, not minutes."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@contextmanager
def running_prefect_server(home: Path, **server_env: str) -> Iterator[str]:
    """The server of :func:`prefect_server` (``server_env`` added to its environment, e.g. its
    database URL), set as PREFECT_API_URL for the block: its API URL."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS="1", **server_env)
    for _ in range(3):  # another process may take the port first
        port = free_port()
        env["PREFECT_UI_URL"] = f"http://127.0.0.1:{port}"  # what notifications link to
        with open(home / "server.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/api"
        if _healthy(url, process):
            break
        process.kill()
        process.wait()
    else:
        pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            APILogWorker.drain_all(timeout=5)  # the runs' last events go out while the server is up
            EventsWorker.drain_all(timeout=5)
    finally:
        process.terminate()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        process.kill()  # a no-op once it has exited
        process.wait()


def prefect_cli(*args: str, env: dict[str, str]) -> str:
    """``prefect --no-prompt ARGS`` in the repository (where prefect.yaml is); fails the test on error."""
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def worker_env(api_url: str, home: Path, **env: str) -> dict[str, str]:
    """The environment of a worker polling ``api_url`` every second (its flow runs inherit it)."""
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1"}


@contextmanager
def ingest_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """The pool, the ingest-study deployment (``prefect deploy``) and a process worker started
    with ``env`` (the server is the one of PREFECT_API_URL in the caller's Prefect settings and
    in ``env``); the worker is stopped when the block ends."""
    deploy(env, "ingest-study")
    with pool_worker(env, log_path) as process:
        yield process


def deploy(env: dict[str, str], *names: str) -> None:
    """The process pool of prefect.yaml and its deployments ``names`` (``prefect deploy``)."""
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    prefect_cli("deploy", *(a for name in names for a in ("--name", name)), env=env)


@contextmanager
def pool_worker(env: dict[str, str], log_path: Path, *args: str) -> Iterator[subprocess.Popen]:
    """A process worker of the pool (``args`` added to `prefect worker start`), stopped when the block ends."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                    "--type", "process", *args], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        process.kill()
        process.wait()
