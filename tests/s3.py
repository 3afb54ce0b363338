"""moto's standalone S3 server on loopback for tests of ``s3://`` storage.

``s3_server`` (session-scoped) starts moto's server (``python -m tests.moto_server``) on 127.0.0.1 on a free port, waits until it
answers and yields an :class:`S3Server`: its endpoint URL, dummy credentials (as fsspec ``storage_options``
and as ``AWS_*`` environment variables), ``create_bucket`` through boto3, and ``restart`` on the same port.
Import the fixture into a test module (``from tests.s3 import s3_server``).

moto keeps its state in memory. The server records every request to a file as it arrives, and a restart
replays that file, so a restarted server holds what the killed one held, like a real object store coming
back after an outage (and unlike a fresh moto). The server is stopped by its PID at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

# Dummy keys: moto accepts any; real ones are never needed on loopback.
ROOT = Path(__file__).resolve().parents[1]  # where `python -m tests.moto_server` finds the tests package
ACCESS_KEY = "pacsflow-test-key"
SECRET_KEY = "pacsflow-test-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    """One moto server process; ``endpoint_url`` stays the same across ``restart``."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """What ``fsspec.filesystem("s3", **storage_options)`` (s3fs) needs to reach this server."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint_url,
                "client_kwargs": {"region_name": REGION}}

    @property
    def env(self) -> dict[str, str]:
        """The same through the standard AWS variables (for subprocesses, or ``monkeypatch.setenv``)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    @property
    def log_path(self) -> Path:
        return self.workdir / "moto.log"

    def boto3_client(self) -> Any:
        import boto3  # imported here: collecting tests must not need boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def create_bucket(self, name: str | None = None) -> str:
        """A new, empty bucket (a fresh unique name unless given); returns its name."""
        name = name or f"pacsflow-{uuid.uuid4().hex[:12]}"
        self.boto3_client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def start(self) -> None:
        """Start the server on ``port`` and replay what an earlier process on this port recorded."""
        recording = self.workdir / "recording.jsonl"
        replay = recording.exists() and recording.stat().st_size > 0
        env = {**os.environ, "MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)}
        with open(self.log_path, "ab") as log:
            # tests.moto_server: moto.server with a recorder that cannot interleave two requests' lines.
            self.process = subprocess.Popen([sys.executable, "-m", "tests.moto_server", "-H", "127.0.0.1",
                                             "-p", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=ROOT)
        if not _answers(self.endpoint_url, self.process):
            self.stop()
            raise RuntimeError(f"moto server did not start: {self.log_path.read_text()[-2000:]}")
        if replay:
            _post(f"{self.endpoint_url}/moto-api/recorder/replay-recording")

    def stop(self) -> None:
        """Kill the server by its PID (SIGKILL: S3 goes away without a goodbye) and wait for it."""
        if self.process is None:
            return
        with suppress(ProcessLookupError):
            os.kill(self.process.pid, 9)
        self.process.wait(timeout=30)
        self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop, stay away ``down_seconds``, start again on the same port with the same objects."""
        self.stop()
        time.sleep(down_seconds)
        self.start()


def _answers(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with suppress(urllib.error.URLError, OSError), \
                urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2):
            return True
        time.sleep(0.2)
    return False


def _post(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=60):
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server for the whole session; tests make their own buckets with ``create_bucket``."""
    workdir = tmp_path_factory.mktemp("moto")
    last: Exception | None = None
    for _ in range(3):  # another process may take the free port before moto binds it
        server = S3Server(port=free_port(), workdir=workdir)
        try:
            server.start()
            break
        except RuntimeError as error:
            last = error
    else:
        pytest.fail(str(last))
    try:
        yield server
    finally:
        server.stop()
