"""Our local FHIR R4 server (HAPI FHIR JPA 8.8.0 on H2), built and started by us.

Plain Python, no Prefect: used by our CLI and by the integration-test fixtures. The work is done by
the scripts in ``deployments/fhir-server/`` (``build.sh``, ``start.sh``, ``stop.sh``), so the shell
and Python paths behave the same; this module adds typed errors, logging and a handle.

Facts worth knowing (measured on the 2-core machines, see ``deployments/fhir-server/README.md``):

* The server binds to 127.0.0.1 only and serves ``http://127.0.0.1:PORT/fhir``.
* The first build downloads ~250 MB from Maven Central and packages a ~200 MB jar; ``build()``
  then records a class-data-sharing archive with one in-memory training start (~30-50 s). Later
  calls are no-ops unless the Java sources or ``pom.xml`` changed.
* A start takes ~12-25 s to answer ``/fhir/metadata`` (longer while other jobs load the CPU); the
  first ``$validate`` then loads the R4 definitions (~3-6 s more). RSS is 0.6-1.1 GB (``-Xmx1g``).
* Client-assigned ids are accepted (``PUT Patient/abc`` creates it); server-assigned ids are UUIDs.
  Search results are never reused from a cache, so a search sees the writes just made.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

SERVER_DIR = Path(__file__).resolve().parent / "fhir-server"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN_DIR = REPO_ROOT / "var" / "fhir-server"
DEFAULT_PORT = 8090
HOST = "127.0.0.1"
BASE_PATH = "/fhir"
HAPI_FHIR_VERSION = "8.8.0"
MIN_JAVA_MAJOR = 17

PID_NAME = "fhir-server.pid"
LOG_NAME = "fhir-server.log"
URL_NAME = "fhir-server.url"

# start.sh: 0 ready, 1 failed, 3 already running from that run dir.
_ALREADY_RUNNING = 3


class FhirServerError(RuntimeError):
    """The FHIR server could not be built, started or stopped; the message says why."""


def jar_path() -> Path:
    """The single runnable jar that ``build()`` produces (it may not exist yet)."""
    return SERVER_DIR / "target" / "pacsflow-fhir-server.jar"


def base_url(port: int) -> str:
    return f"http://{HOST}:{port}{BASE_PATH}"


def _java_major(java: str) -> int | None:
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def java_available() -> bool:
    """True when ``java`` on PATH is Java 17 or newer (enough to run the server)."""
    java = shutil.which("java")
    if java is None:
        return False
    major = _java_major(java)
    return major is not None and major >= MIN_JAVA_MAJOR


def maven_available() -> bool:
    return shutil.which("mvn") is not None


def _sources_newer_than(jar: Path) -> bool:
    if not jar.exists():
        return True
    built = jar.stat().st_mtime
    candidates = [SERVER_DIR / "pom.xml", *(p for p in (SERVER_DIR / "src").rglob("*") if p.is_file())]
    return any(p.stat().st_mtime > built for p in candidates)


def _script_env(**values: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(values)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _log_output(text: str, level: int) -> None:
    for line in text.strip().splitlines():
        log.log(level, "%s", line)


def build(quiet: bool = True) -> Path:
    """Build the server if it is missing or out of date (``build.sh``) and return the jar's path.

    Needs Java 17+; needs Maven only when the jar must be (re)built. Raises ``FhirServerError``
    naming what is missing, or with the tail of the build output when the build fails. With
    ``quiet`` the script's progress lines are logged at DEBUG instead of INFO.
    """
    if shutil.which("java") is None:
        raise FhirServerError("Java not found: `java` (JDK 17 or newer) is not on PATH; "
                              "install it (Debian: apt-get install openjdk-17-jdk-headless)")
    if not java_available():
        raise FhirServerError(f"Java too old or unusable: `java -version` must report {MIN_JAVA_MAJOR} or newer")
    jar = jar_path()
    if _sources_newer_than(jar) and not maven_available():
        raise FhirServerError(f"Maven not found: `mvn` is not on PATH and {jar} is missing or older than "
                              "its sources (Debian: apt-get install maven)")
    script = SERVER_DIR / "build.sh"
    log.info("Checking the FHIR server build (%s)", script)
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, env=_script_env())
    except OSError as exc:
        raise FhirServerError(f"could not run {script}: {exc}") from exc
    _log_output(proc.stdout, logging.DEBUG if quiet else logging.INFO)
    if proc.returncode != 0:
        raise FhirServerError(f"FHIR server build failed (exit {proc.returncode}):\n"
                              f"{_tail(proc.stdout + proc.stderr)}")
    if not jar.exists():
        raise FhirServerError(f"build.sh succeeded but {jar} is missing")
    return jar


def is_ready(base_url: str, timeout_s: float = 5.0) -> bool:
    """True when ``{base_url}/metadata`` answers 200 with a CapabilityStatement."""
    try:
        resp = httpx.get(f"{base_url.rstrip('/')}/metadata", timeout=timeout_s,
                         headers={"Accept": "application/fhir+json"})
    except httpx.HTTPError:
        return False
    if resp.status_code != 200:
        return False
    try:
        return resp.json().get("resourceType") == "CapabilityStatement"
    except ValueError:
        return False


def read_pid(run_dir: Path) -> int | None:
    """The PID recorded in ``run_dir``'s PID file, or None."""
    try:
        text = (Path(run_dir) / PID_NAME).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class FhirServerHandle:
    """A server started by ``start()``. ``data_dir`` is None for an in-memory database."""

    base_url: str
    port: int
    pid: int
    run_dir: Path
    data_dir: Path | None

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME

    def is_ready(self) -> bool:
        return is_ready(self.base_url)

    def stop(self, timeout_s: float = 60) -> bool:
        return stop(self.run_dir, timeout_s=timeout_s)


def start(port: int, run_dir: Path, data_dir: Path | None = None, timeout_s: float = 240) -> FhirServerHandle:
    """Build if needed, start the server in the background on 127.0.0.1:``port``, wait until ready.

    ``run_dir`` receives the PID file, the log and the URL file. With ``data_dir`` the H2 database
    lives in files there (kept across restarts); with None it is in memory (gone at stop).
    Raises ``FhirServerError`` with the log tail if the server dies or is not ready in ``timeout_s``.
    """
    if not 0 < port < 65536:
        raise FhirServerError(f"port must be 1-65535, got {port}")
    build(quiet=True)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "FHIR_PORT": str(port),
        "FHIR_RUN_DIR": str(run_dir),
        "FHIR_START_TIMEOUT": str(max(1, math.ceil(timeout_s))),
    }
    if data_dir is None:
        values["FHIR_IN_MEMORY"] = "true"
    else:
        data_dir = Path(data_dir).resolve()
        values["FHIR_IN_MEMORY"] = "false"
        values["FHIR_DATA_DIR"] = str(data_dir)
    script = SERVER_DIR / "start.sh"
    log.info("Starting the FHIR server on %s:%d (%s)", HOST, port,
             "in memory" if data_dir is None else f"data in {data_dir}")
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, env=_script_env(**values), timeout=timeout_s + 120)
    except subprocess.TimeoutExpired as exc:
        stop(run_dir)
        raise FhirServerError(f"{script} did not return within {timeout_s + 120:.0f} s") from exc
    _log_output(proc.stdout, logging.DEBUG)
    if proc.returncode == _ALREADY_RUNNING:
        raise FhirServerError(f"a FHIR server is already running from {run_dir} (pid {read_pid(run_dir)}); "
                              "stop it first")
    if proc.returncode != 0:
        raise FhirServerError(f"FHIR server did not start (exit {proc.returncode}):\n"
                              f"{_tail(proc.stderr or proc.stdout)}")
    pid = read_pid(run_dir)
    url = base_url(port)
    if pid is None or not is_ready(url):
        stop(run_dir)
        raise FhirServerError(f"start.sh reported ready but {url}/metadata does not answer (pid {pid})")
    log.info("FHIR server ready at %s (pid %d)", url, pid)
    return FhirServerHandle(base_url=url, port=port, pid=pid, run_dir=run_dir, data_dir=data_dir)


def stop(run_dir: Path, timeout_s: float = 60) -> bool:
    """Stop the server whose PID file is in ``run_dir`` (``stop.sh``) and wait until it has exited.

    Returns True if a running server was stopped, False if none was running.
    """
    run_dir = Path(run_dir).resolve()
    was_running = read_pid(run_dir) is not None
    script = SERVER_DIR / "stop.sh"
    env = _script_env(FHIR_RUN_DIR=str(run_dir), FHIR_STOP_TIMEOUT=str(max(1, math.ceil(timeout_s))))
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, env=env, timeout=timeout_s + 30)
    except subprocess.TimeoutExpired as exc:
        raise FhirServerError(f"{script} did not return within {timeout_s + 30:.0f} s") from exc
    _log_output(proc.stdout, logging.INFO)
    if proc.returncode != 0:
        raise FhirServerError(f"could not stop the FHIR server in {run_dir}:\n{_tail(proc.stderr or proc.stdout)}")
    return was_running and "stopped (pid" in proc.stdout
