"""The IPF XDS.b peer of deployments/xds-peer for tests: start/stop it, and run its client modes.

``start_peer(run_dir, ...)`` runs ``start.sh`` on a free port and returns an ``XdsPeer`` (URLs, PID);
``peer.stop()`` runs ``stop.sh``. ``peer.client("submit" | "consume", out_dir, *args)`` runs the
jar's IPF producers once and returns ``(exit status, summary.json)``. ``unavailable_reason()`` says
why the peer cannot run here (no Java 17, no jar and no Maven, a failed build), or None.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import free_port

PEER_DIR = Path(__file__).resolve().parents[1] / "deployments" / "xds-peer"
JAR_NAME = "pacsflow-xds-peer.jar"
# the affinity domain of the tests: patient IDs under TEST_AUTHORITY are known, all others are not
TEST_AUTHORITY = "2.25.300184447563520924736125305104377418712"
TEST_REPOSITORY_ID = "2.25.96601356405722183017853081209402434530"


def unavailable_reason() -> str | None:
    """Why the peer cannot run here, or None once its jar is built and up to date."""
    if shutil.which("java") is None:
        return "java is not on PATH (the XDS peer needs Java 17+)"
    jar = PEER_DIR / "target" / JAR_NAME
    if shutil.which("mvn") is None and not jar.exists():
        return f"Maven is not installed and {jar} was not built"
    build = subprocess.run([str(PEER_DIR / "build.sh")], capture_output=True, text=True, timeout=1200)
    if build.returncode != 0 or not jar.exists():
        tail = (build.stdout + build.stderr).strip().splitlines()[-5:]
        return "the XDS peer did not build: " + " | ".join(tail)
    return None


@dataclass
class XdsPeer:
    port: int
    pid: int
    run_dir: Path
    rad69_dir: Path
    authority: str = TEST_AUTHORITY
    repository_id: str = TEST_REPOSITORY_ID

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services"

    def url(self, service: str) -> str:
        return f"{self.base_url}/{service}"

    def patient(self, pseudonym: str, authority: str | None = None) -> str:
        """A CX patient ID, ``pseudonym^^^&OID&ISO``, under the peer's authority unless told."""
        return f"{pseudonym}^^^&{authority or self.authority}&ISO"

    def client(self, mode: str, out: Path, *args: str, timeout: float = 300) -> tuple[int, dict[str, Any]]:
        """Runs ``java -jar peer.jar MODE --out OUT ARGS``; returns its exit status and summary."""
        jar = self.run_dir / JAR_NAME  # start.sh's copy: a rebuild during the tests cannot touch it
        done = subprocess.run(["java", "-Xmx256m", "-XX:TieredStopAtLevel=1", "-jar", str(jar), mode,
                               "--out", str(out), *args], capture_output=True, text=True, timeout=timeout)
        summary = out / "summary.json"
        if not summary.exists():
            raise AssertionError(f"{mode} wrote no summary (exit {done.returncode}): {done.stderr[-2000:]}")
        return done.returncode, json.loads(summary.read_text())

    def stop(self) -> None:
        env = {**os.environ, "XDS_PEER_RUN_DIR": str(self.run_dir)}
        subprocess.run([str(PEER_DIR / "stop.sh")], env=env, check=True, capture_output=True, timeout=120)


def start_peer(run_dir: Path, attempts: int = 2) -> XdsPeer:
    """Starts the peer on a free port (a new port if another process took it first)."""
    rad69_dir = run_dir / "rad69-source"
    rad69_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDS_PEER_RUN_DIR": str(run_dir), "XDS_PEER_ASSIGNING_AUTHORITY": TEST_AUTHORITY,
           "XDS_PEER_REPOSITORY_ID": TEST_REPOSITORY_ID, "XDS_PEER_RAD69_DIR": str(rad69_dir),
           "XDS_PEER_START_TIMEOUT": "300"}
    failure = ""
    for _attempt in range(attempts):
        port = free_port()
        done = subprocess.run([str(PEER_DIR / "start.sh"), str(port)], env=env, capture_output=True,
                              text=True, timeout=400)
        if done.returncode == 0:
            pid = int((run_dir / "xds-peer.pid").read_text())
            return XdsPeer(port=port, pid=pid, run_dir=run_dir, rad69_dir=rad69_dir)
        failure = done.stdout[-1000:] + done.stderr[-3000:]
    raise RuntimeError(f"the XDS peer did not start: {failure}")
