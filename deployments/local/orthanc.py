"""Our local Orthanc PACS (Debian's Orthanc 1.10.1), started and stopped by us.

Plain Python, no Prefect: used by ``pacsflow stack``, by the shell scripts next to this file and
by the integration-test fixtures.

Security model (facts about Orthanc 1.10.1, checked against ``Orthanc --config=x.json`` and the
binary's option names):

* Orthanc 1.10.1 has **no option to choose the listening address**. CivetWeb is configured with
  ``listening_ports=<HttpPort>`` and DCMTK's ``ASC_initializeNetwork`` listens on all interfaces,
  so both ports are bound to ``0.0.0.0``. What keeps it local:
  - HTTP: ``RemoteAccessAllowed: false`` makes Orthanc answer 401 to every client that is not
    the loopback address (measured from this host's eth0 address; authentication is therefore
    left off);
  - DICOM: ``DicomAlwaysAllowStore/Find/Move/Get: false`` (only the AEs listed in
    ``DicomModalities`` may use these services), ``DicomCheckModalityHost: true`` (the caller's IP
    must be the host registered for its AE; all ours are 127.0.0.1) and
    ``DicomCheckCalledAet: true``. C-ECHO stays open to anyone (``DicomAlwaysAllowEcho``); it
    reveals nothing. An unlisted AE (or a listed AE from another IP) gets its C-FIND/C-STORE
    association *aborted* (A-ABORT), not a failure status; a wrong called AE is rejected
    ("Called AE Title Not Recognized").
* ``MaximumStorageCacheSize: 0`` disables the in-RAM copy of recently written files, so a file
  removed from the storage area (``break_study``) really makes C-MOVE/C-GET fail.
* ``StorageAccessOnFind: "Never"``: C-FIND is answered from the SQLite index only, so a "broken"
  study stays findable (like a PACS whose archive tier fails) and C-FIND stays fast. Tags outside
  Orthanc's main DICOM tags then come back empty; override through ``OrthancConfig.extra``.
* ``DefaultEncoding: "Utf8"``: with Orthanc's default (Latin1) C-FIND answers silently drop
  characters outside Latin-1 from names.

Behaviour measured with this config (pynetdicom and DCMTK as SCU):

* ``LimitFindResults = N`` (patient/study/series level; instance level is ``LimitFindInstances``):
  more than N matches -> exactly N pending answers, then final status 0xFE00 (Cancel,
  "matching terminated due to cancel request"); exactly N matches -> 0x0000 Success.
* A retrieve touching a missing storage file fails with final status 0xC000 (Unable to process):
  if the first file read fails, no sub-operation happens; if a later one fails, the instances
  before it are sent (pending responses count them) and the final 0xC000 response of C-MOVE
  carries Completed=0/Failed=0, while C-GET's carries the completed count. So count what
  arrived; do not trust the final counters. ``movescu`` exits 69 on it, ``getscu`` 3.6.7 exits 0
  and ``findscu`` exits 0 even when its association is aborted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

log = logging.getLogger(__name__)

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORK_DIR = REPO_ROOT / "var" / "orthanc"

CONFIG_NAME = "orthanc.json"
PID_NAME = "orthanc.pid"
LOG_NAME = "orthanc.log"
STORAGE_NAME = "storage"
INDEX_NAME = "index"
TMP_NAME = "tmp"
BROKEN_NAME = "broken"

# Port registered for AEs that only act as SCU towards Orthanc (they push or query and never
# receive). Orthanc rejects port 0 in DicomModalities; nothing listens on this one.
DUMMY_PORT = 104


def default_modalities() -> dict[str, tuple[str, str, int]]:
    """name -> (AE title, host, port)."""
    return {
        # Our pynetdicom Storage SCP that C-MOVE sends to; also our C-FIND/C-MOVE/C-GET SCU.
        "PACSFLOW": ("PACSFLOW", "127.0.0.1", 11113),
        # storescu that seeds sample data.
        "SEEDER": ("SEEDER", "127.0.0.1", DUMMY_PORT),
        # DCMTK tools from tests (findscu/movescu/getscu; storescp as move destination).
        "DCMTK": ("DCMTK", "127.0.0.1", DUMMY_PORT),
    }


class _InWorkDir:
    """A read-only attribute of an ``OrthancConfig``: the path ``name`` inside its ``work_dir``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, config: OrthancConfig | None, owner: type | None = None) -> Path:
        if config is None:
            raise AttributeError(f"a path in an OrthancConfig's work_dir: {self.name}")
        return config.work_dir / self.name

    def __set__(self, config: OrthancConfig, value: object) -> None:
        raise AttributeError(f"{self.name} follows work_dir; set work_dir instead")


@dataclass
class OrthancConfig:
    work_dir: Path
    dicom_port: int = 4242
    http_port: int = 8042
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=default_modalities)
    limit_find_results: int = 0  # Orthanc's LimitFindResults; 0 = unlimited
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the JSON config

    # Where Orthanc's files go (read-only: they follow work_dir).
    config_path = _InWorkDir(CONFIG_NAME)
    pid_path = _InWorkDir(PID_NAME)
    log_path = _InWorkDir(LOG_NAME)
    storage_dir = _InWorkDir(STORAGE_NAME)
    broken_dir = _InWorkDir(BROKEN_NAME)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()


def instance_name(work_dir: Path) -> str:
    """Orthanc's ``Name`` (shown by GET /system): unique per work dir, so a readiness check
    cannot mistake another Orthanc that already holds the HTTP port for ours."""
    digest = hashlib.sha1(str(Path(work_dir).resolve()).encode()).hexdigest()[:10]
    return f"pacsflow-local-{digest}"


class OrthancError(RuntimeError):
    """Starting, stopping or talking to the local Orthanc failed."""


def render_config(cfg: OrthancConfig) -> dict[str, Any]:
    """The Orthanc JSON configuration for ``cfg`` (reachable from this machine only)."""
    wd = cfg.work_dir
    modalities = {
        name: {
            "AET": aet,
            "Host": host,
            "Port": port,
            "AllowEcho": True,
            "AllowFind": True,
            "AllowMove": True,
            "AllowGet": True,
            "AllowStore": True,
            "AllowStorageCommitment": False,
            "AllowTranscoding": True,
        }
        for name, (aet, host, port) in cfg.modalities.items()
    }
    config: dict[str, Any] = {
        "Name": instance_name(wd),
        "StorageDirectory": str(wd / STORAGE_NAME),
        "IndexDirectory": str(wd / INDEX_NAME),
        "TemporaryDirectory": str(wd / TMP_NAME),
        "StorageCompression": False,
        "MaximumStorageCacheSize": 0,
        "SyncStorageArea": False,  # test/dev stack: speed over durability
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
        # HTTP: loopback only (Orthanc 1.10.1 cannot bind to 127.0.0.1; see module docstring).
        "HttpServerEnabled": True,
        "HttpPort": cfg.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "RegisteredUsers": {},
        "SslEnabled": False,
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        # DICOM: only the configured modalities, from their registered host.
        "DicomServerEnabled": True,
        "DicomAet": cfg.aet,
        "DicomPort": cfg.dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": modalities,
        "OrthancPeers": {},
        "DicomTlsEnabled": False,
        # Latin1 (Orthanc's default) drops characters outside Latin-1 from C-FIND answers
        # ("Łukasiewicz" came back as "ukasiewicz"); UTF-8 answers (ISO_IR 192) are lossless.
        "DefaultEncoding": "Utf8",
        "UnknownSopClassAccepted": False,
        "DicomScpTimeout": 30,
        "DicomScuTimeout": 10,
        "SynchronousCMove": True,
        "LimitFindResults": cfg.limit_find_results,
        "LimitFindInstances": 0,
        "StorageAccessOnFind": "Never",
        "OverwriteInstances": False,
        "SaveJobs": False,
        "JobsHistorySize": 10,
        "LogExportedResources": False,
        "DeidentifyLogs": True,
        "StableAge": 60,
    }
    config.update(cfg.extra)
    return config


# -- process helpers ---------------------------------------------------------------------------


def _read_pid(pid_path: Path) -> int | None:
    try:
        return int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_our_orthanc(pid: int, config_path: Path) -> bool:
    """True if ``pid`` is alive and is an Orthanc started with ``config_path`` (guards PID reuse)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not args or not args[0].endswith("Orthanc"):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # zombie: exited, not yet reaped
            return False
    except (FileNotFoundError, IndexError):
        return False
    return str(config_path) in args


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _wait_gone(pid: int, config_path: Path, timeout_s: float, proc: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not _is_our_orthanc(pid, config_path):
            return True
        time.sleep(0.05)
    return False


def _terminate(pid: int, config_path: Path, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
               graceful: bool = True) -> bool:
    """SIGTERM, wait ``timeout_s``, then SIGKILL (straight SIGKILL if not ``graceful``).

    Returns True if a process was stopped.
    """
    if proc is None and not _is_our_orthanc(pid, config_path):
        return False
    if proc is not None and proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM if graceful else signal.SIGKILL)
    if not _wait_gone(pid, config_path, timeout_s, proc):
        log.warning("Orthanc pid %d did not stop within %.0f s; sending SIGKILL", pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, config_path, 5.0, proc):
            raise OrthancError(f"Orthanc pid {pid} survived SIGKILL")
    return True


class OrthancServer:
    """One Orthanc process with its own config, storage, index, log and PID file in ``work_dir``."""

    def __init__(self, cfg: OrthancConfig) -> None:
        self.cfg = cfg
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self._owned = True

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.http_port}"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def dicom_port(self) -> int:
        return self.cfg.dicom_port

    @property
    def aet(self) -> str:
        return self.cfg.aet

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return _read_pid(self.cfg.pid_path)

    def write_config(self) -> Path:
        cfg = self.cfg
        for d in (cfg.work_dir, cfg.storage_dir, cfg.work_dir / INDEX_NAME, cfg.work_dir / TMP_NAME):
            d.mkdir(parents=True, exist_ok=True)
        tmp = cfg.config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(render_config(cfg), indent=2, sort_keys=True))
        tmp.replace(cfg.config_path)
        return cfg.config_path

    def start(self, timeout_s: float = 30) -> "OrthancServer":
        cfg = self.cfg
        if self.is_running():
            raise OrthancError(f"Orthanc already running for {cfg.work_dir} (pid {self.pid})")
        if not ORTHANC_BINARY.exists():
            raise OrthancError(f"{ORTHANC_BINARY} not found (apt-get install orthanc)")
        config_path = self.write_config()
        env = dict(os.environ)
        env["TCP_NODELAY"] = "1"  # Nagle delay in Debian's DCMTK: ~50 ms per instance without it
        with open(cfg.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [str(ORTHANC_BINARY), str(config_path)],
                cwd=cfg.work_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the CLI that started it; no stray Ctrl-C
            )
        cfg.pid_path.write_text(f"{self._proc.pid}\n")
        log.info(
            "Orthanc pid %d starting: http %d, dicom %d, work dir %s",
            self._proc.pid, cfg.http_port, cfg.dicom_port, cfg.work_dir,
        )
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                cfg.pid_path.unlink(missing_ok=True)
                raise OrthancError(f"Orthanc exited with status {code} during start; log tail:\n{_tail(cfg.log_path)}")
            try:
                r = httpx.get(f"{self.rest_url}/system", timeout=1.0, trust_env=False)
                if r.status_code == 200 and r.json().get("Name") == instance_name(cfg.work_dir):
                    log.info("Orthanc %s ready", r.json().get("Version"))
                    return self
                last_error = OrthancError(f"GET /system answered {r.status_code} from another server")
            except httpx.TransportError as exc:
                last_error = exc
            time.sleep(0.1)
        self.stop()
        raise OrthancError(
            f"Orthanc did not answer GET /system within {timeout_s:.0f} s ({last_error!r}); "
            f"log tail:\n{_tail(cfg.log_path)}"
        )

    def stop(self, timeout_s: float = 15, graceful: bool = True) -> bool:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout_s``). True if one was running.

        Orthanc 1.10.1 needs ~3 s to shut down cleanly (its HTTP and DICOM servers poll);
        ``graceful=False`` sends SIGKILL at once, fine for throw-away test instances.
        """
        if self._client is not None:
            self._client.close()
            self._client = None
        pid = self.pid
        stopped = False
        if pid is not None:
            stopped = _terminate(pid, self.cfg.config_path, timeout_s, self._proc, graceful)
        self._proc = None
        self.cfg.pid_path.unlink(missing_ok=True)
        if stopped:
            log.info("Orthanc pid %d stopped", pid)
        return stopped

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        pid = _read_pid(self.cfg.pid_path)
        return pid is not None and _is_our_orthanc(pid, self.cfg.config_path)

    def __enter__(self) -> "OrthancServer":
        """Start unless already running; ``__exit__`` stops only what ``__enter__`` started."""
        self._owned = not self.is_running()
        if self._owned:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self.stop()
        elif self._client is not None:
            self._client.close()
            self._client = None

    # -- REST helpers --------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.rest_url, timeout=60.0, trust_env=False)
        return self._client

    def _get(self, path: str) -> Any:
        r = self.client.get(path)
        r.raise_for_status()
        return r.json()

    def system(self) -> dict[str, Any]:
        return self._get("/system")

    def statistics(self) -> dict[str, Any]:
        return self._get("/statistics")

    def studies(self) -> list[str]:
        """Orthanc ids of all studies."""
        return list(self._get("/studies"))

    def study_count(self) -> int:
        return int(self.statistics()["CountStudies"])

    def instance_count(self) -> int:
        return int(self.statistics()["CountInstances"])

    def delete_all(self) -> int:
        """Delete every patient (and so every study). Returns the number of patients deleted."""
        patients = self._get("/patients")
        for pid in patients:
            self.client.delete(f"/patients/{pid}").raise_for_status()
        return len(patients)

    def find_study(self, study_instance_uid: str) -> str | None:
        r = self.client.post("/tools/lookup", content=study_instance_uid)
        r.raise_for_status()
        for hit in r.json():
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def study_instances(self, study_instance_uid: str) -> list[str]:
        """Orthanc ids of the instances of a study."""
        oid = self._require_study(study_instance_uid)
        return [i["ID"] for i in self._get(f"/studies/{oid}/instances")]

    def _require_study(self, study_instance_uid: str) -> str:
        oid = self.find_study(study_instance_uid)
        if oid is None:
            raise OrthancError(f"study {study_instance_uid} not in Orthanc")
        return oid

    def _attachment_files(self, study_instance_uid: str) -> Iterator[Path]:
        """Storage-relative paths of every attachment file of the study's instances."""
        for iid in self.study_instances(study_instance_uid):
            for name in self._get(f"/instances/{iid}/attachments"):
                uuid = self._get(f"/instances/{iid}/attachments/{name}/info")["Uuid"]
                yield Path(uuid[0:2]) / uuid[2:4] / uuid

    def break_study(self, study_instance_uid: str) -> int:
        """Make C-MOVE/C-GET of the study fail for real.

        Moves the study's attachment files out of the storage area into ``work_dir/broken/``
        (kept, so ``repair_study`` can put them back). The index still lists the study, so
        C-FIND keeps finding it. Returns the number of files moved.
        """
        moved = self._move_attachments(study_instance_uid, self.cfg.storage_dir, self.cfg.broken_dir)
        log.info("broke study %s: %d files moved aside", study_instance_uid, moved)
        return moved

    def repair_study(self, study_instance_uid: str) -> int:
        """Put back the files ``break_study`` moved aside. Returns the number restored."""
        restored = self._move_attachments(study_instance_uid, self.cfg.broken_dir, self.cfg.storage_dir)
        log.info("repaired study %s: %d files restored", study_instance_uid, restored)
        return restored

    def _move_attachments(self, study_instance_uid: str, from_root: Path, to_root: Path) -> int:
        """Move the study's attachment files found under ``from_root`` to the same place under ``to_root``."""
        moved = 0
        for rel in list(self._attachment_files(study_instance_uid)):
            src, dst = from_root / rel, to_root / rel
            if not src.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved += 1
        return moved


# -- module-level helpers for the CLI ------------------------------------------------------------


def _load_written_config(work_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(work_dir) / CONFIG_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stop_by_pidfile(work_dir: Path, timeout_s: float = 15, graceful: bool = True) -> bool:
    """Stop the Orthanc whose PID file is in ``work_dir``. True if one was running.

    Only a process that is an Orthanc started with this work dir's config is signalled.
    """
    work_dir = Path(work_dir).resolve()
    pid_path, config_path = work_dir / PID_NAME, work_dir / CONFIG_NAME
    pid = _read_pid(pid_path)
    stopped = False
    if pid is not None:
        stopped = _terminate(pid, config_path, timeout_s, graceful=graceful)
        if stopped:
            log.info("Orthanc pid %d stopped", pid)
    pid_path.unlink(missing_ok=True)
    return stopped


def status(work_dir: Path) -> dict[str, Any]:
    """State of the Orthanc in ``work_dir``: running, pid, ports, counts (if it answers)."""
    work_dir = Path(work_dir).resolve()
    config = _load_written_config(work_dir) or {}
    pid = _read_pid(work_dir / PID_NAME)
    running = pid is not None and _is_our_orthanc(pid, work_dir / CONFIG_NAME)
    http_port = config.get("HttpPort")
    out: dict[str, Any] = {
        "work_dir": str(work_dir),
        "running": running,
        "pid": pid if running else None,
        "aet": config.get("DicomAet"),
        "dicom_port": config.get("DicomPort"),
        "http_port": http_port,
        "rest_url": f"http://127.0.0.1:{http_port}" if http_port else None,
        "healthy": False,
    }
    if running and http_port:
        try:
            with httpx.Client(base_url=out["rest_url"], timeout=5.0, trust_env=False) as c:
                system = c.get("/system").json()
                stats = c.get("/statistics").json()
            out.update(
                healthy=system.get("Name") == instance_name(work_dir),
                version=system.get("Version"),
                studies=stats.get("CountStudies"),
                series=stats.get("CountSeries"),
                instances=stats.get("CountInstances"),
                disk_size_mb=stats.get("TotalDiskSizeMB"),
            )
        except (httpx.HTTPError, ValueError) as exc:
            out["error"] = repr(exc)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacsflow.deployments.local.orthanc",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument("--http-port", type=int, default=8042)
    parser.add_argument("--aet", default="ORTHANC")
    parser.add_argument("--receiver-port", type=int, default=11113, help="port of the PACSFLOW Storage SCP")
    parser.add_argument("--limit-find-results", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    if args.command == "start":
        modalities = default_modalities()
        modalities["PACSFLOW"] = ("PACSFLOW", "127.0.0.1", args.receiver_port)
        cfg = OrthancConfig(
            work_dir=args.work_dir,
            dicom_port=args.dicom_port,
            http_port=args.http_port,
            aet=args.aet,
            modalities=modalities,
            limit_find_results=args.limit_find_results,
        )
        server = OrthancServer(cfg)
        if server.is_running():
            log.info("Orthanc already running (pid %s) in %s", server.pid, cfg.work_dir)
            return 0
        try:
            server.start(timeout_s=args.timeout)
        except OrthancError as exc:
            log.error("%s", exc)
            return 1
        return 0
    if args.command == "stop":
        if not stop_by_pidfile(args.work_dir):
            log.info("no Orthanc running in %s", args.work_dir.resolve())
        return 0
    st = status(args.work_dir)
    sys.stdout.write(json.dumps(st, indent=2) + "\n")
    return 0 if st["running"] else 3


if __name__ == "__main__":
    sys.exit(main())
