"""The temporary Prefect API of a command-line run, tied to the run's process.

Without ``PREFECT_API_URL`` Prefect starts a temporary server itself and stops it at interpreter
exit, which a SIGKILL (OOM, reboot) skips and a SIGTERM skips too: the server lived on. The one
started here is told by the kernel to end with the process that started it (Linux), and is
stopped when the run ends in any other way.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from typing import Iterator

from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STARTUP_S = 120.0


# Looked up here, not in the forked child: loading symbols there could wait on a lock held by a
# thread that does not exist in the child.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the parent's thread that forked it ends. Start such
    children from the main thread, which ends with the process. No-op off Linux."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect server did not answer within {STARTUP_S:.0f}s")


@contextmanager
def temporary_api() -> Iterator[None]:
    """A Prefect API for the block: the configured one, else a temporary server of this process
    (same database under PREFECT_HOME as Prefect's own temporary server)."""
    if PREFECT_API_URL.value():
        yield
        return
    port = _free_port()
    env = {**os.environ, "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT_UI_ENABLED": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only, no locks taken
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        log.info("temporary Prefect server on %s (ends with this run)", url)
        _wait_healthy(url, process)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield
            finally:
                # The run's last logs and events go out while the server is still there (otherwise
                # the senders retry a closed port for a minute at interpreter exit).
                APILogWorker.drain_all(timeout=5)
                EventsWorker.drain_all(timeout=5)
    finally:
        for stop in (process.terminate, process.kill):  # politely, then not
            stop()
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
                break
