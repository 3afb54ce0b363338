"""Issue 12 end to end with real parts: DCMTK ``storescu`` pushes studies to ``pacsflow listen``
(a subprocess, configured by PACSFLOW_CONFIG, routing by a copy of the shipped mammography rules);
two real Orthancs play the main PACS and the second archive; a real ``prefect server`` with the
ingest-study deployment of prefect.yaml and a process worker turns the listener's events into
catalog rows.

Each Orthanc logs every C-STORE it receives (a Lua ``ReceivedInstanceFilter``), so "delivered
exactly once" is counted on the wire, not read from Orthanc's index (which would hide a second
store of the same object). The listener, the Orthancs and the Prefect server are shared by the
module; every test uses its own studies and counts only those.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.route.outbox import DeliveryState, Outbox
from pacsflow.tasks.settings import load_settings
from tests.helpers import dcmtk_env, free_port
from tests.integration.prefect_server import ROOT, ingest_worker, worker_env
from tests.integration.prefect_server import prefect_server  # noqa: F401  (fixture re-export)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

SENDER_AE = "MODALITY"
LISTENER_AE = "PACSFLOW"  # registered at the test Orthancs, so they take its C-STOREs
WINDOW_S = 2.0
KEY = "router-e2e-test-key-0123456789"
PACSFLOW = Path(sys.executable).parent / "pacsflow"
RULES = ROOT / "deployments" / "router" / "mammography.yaml"
WAIT_S = 150.0  # a flow run in a fresh process on a loaded machine
MAX_ATTEMPTS = 4
BACKOFF_S = 2.0  # 2, 4, 8 s (upper quarter): dead about 11-14 s after the first failure

STORE_LOG_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("{log}", "a")
  f:write(dicom.SOPInstanceUID .. "\\n")
  f:close()
  return true
end
"""


def _wait(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def files_of(study: Any) -> list[Path]:
    return sorted(Path(study.path).rglob("*.dcm"))


class Archive:
    """An Orthanc that appends the SOP Instance UID of every C-STORE it receives to a log."""

    def __init__(self, factory: Callable[..., Any], root: Path, name: str) -> None:
        self.store_log = root / f"{name}-stores.txt"
        lua = root / f"{name}.lua"
        lua.write_text(STORE_LOG_LUA.replace("{log}", str(self.store_log)))
        self.server = factory(extra={"LuaScripts": [str(lua)]})

    def stores(self) -> Counter[str]:
        return Counter(self.store_log.read_text().split()) if self.store_log.exists() else Counter()

    def instances(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> Orthanc id of the study's instances."""
        oid = self.server.find_study(study_uid)
        if oid is None:
            return {}
        found = self.server.client.get(f"/studies/{oid}/instances").json()
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in found}

    def download(self, instance_id: str, target: Path) -> Path:
        response = self.server.client.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        target.write_bytes(response.content)
        return target


class ListenProcess:
    """``pacsflow listen`` as a subprocess."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env, self.port, self.log_path = env, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ListenProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(PACSFLOW), "listen"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self.echo():
            assert self.proc.poll() is None, f"pacsflow listen exited {self.proc.returncode}: {self.log_tail()}"
            assert time.monotonic() < deadline, f"pacsflow listen does not answer C-ECHO: {self.log_tail()}"
            time.sleep(0.3)
        return self

    def echo(self, calling_ae: str = SENDER_AE) -> bool:
        cmd = ["echoscu", "-aet", calling_ae, "-aec", LISTENER_AE, "127.0.0.1", str(self.port)]
        return subprocess.run(cmd, capture_output=True, env=dcmtk_env(), timeout=30, check=False).returncode == 0

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


class Site:
    """The listener, its two destinations, its settings and the lake it feeds."""

    def __init__(self, root: Path, main: Archive, second: Archive, api_url: str) -> None:
        self.root, self.main, self.second = root, main, second
        rules = yaml.safe_load(RULES.read_text())
        for name, archive in (("main-pacs", main), ("ai-archive", second)):
            rules["destinations"][name].update(ae_title=archive.server.aet, port=archive.server.dicom_port)
        rules_file = root / "rules.yaml"
        rules_file.write_text(yaml.safe_dump(rules))
        self.config: dict[str, Any] = {
            "state_root": str(root / "state"), "storage_root": str(root / "lake" / "dicom"),
            "catalog_root": str(root / "lake" / "catalog"), "deid_key": KEY,
            "listener": {"ae_title": LISTENER_AE, "port": free_port(), "allowed_aes": [SENDER_AE],
                         "stable_after_s": WINDOW_S, "rules_file": str(rules_file), "metrics_port": free_port(),
                         "max_attempts": MAX_ATTEMPTS, "retry_backoff_s": BACKOFF_S, "retry_max_delay_s": 8.0,
                         "timeout_s": 10.0},
        }
        config_path = root / "pacsflow.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.env = worker_env(api_url, root / "prefect-home", PACSFLOW_CONFIG=str(config_path))
        self.settings = load_settings(**self.config)
        self.listener = ListenProcess(self.env, self.config["listener"]["port"], root / "listen.log")
        self._generated = 0

    # -- inputs ----------------------------------------------------------------------------
    def studies(self, modalities: tuple[str, ...], seed: int, series: tuple[int, int] = (1, 2),
                instances: tuple[int, int] = (2, 3)) -> list[Any]:
        self._generated += 1
        return sampledata.generate(self.root / "in" / str(self._generated), studies=len(modalities), days=1,
                                   end_date=dt.date.today(), seed=seed, modalities=modalities, rows=32, cols=32,
                                   series_per_study=series, instances_per_series=instances)

    def send(self, *files: Path, calling_ae: str = SENDER_AE) -> subprocess.CompletedProcess[str]:
        cmd = ["storescu", "-aet", calling_ae, "-aec", LISTENER_AE, "--no-halt", "127.0.0.1",
               str(self.listener.port), *map(str, files)]
        return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=120, check=False)

    def pacsflow(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PACSFLOW), *args], capture_output=True, text=True, env=self.env, timeout=120,
                              check=False)

    # -- outcomes --------------------------------------------------------------------------
    def study_ref(self, study_uid: str) -> str:
        from pacsflow.tasks.deid.deidentifier import Deidentifier

        return Deidentifier.from_settings(self.settings.resolve_deid_key(), self.settings.deid).study_ref(study_uid)

    def catalog(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Rows of a catalog query; none while the catalog has no snapshot yet."""
        if not (self.settings.catalog_root).exists():
            return []
        try:
            return query(self.settings.catalog_root, sql, params).to_pylist()
        except Exception as exc:  # noqa: BLE001 - no snapshot yet
            if "snapshot" in str(exc) or "catalog" in str(exc):
                return []
            raise

    def cataloged(self, ref: str) -> dict[str, Any] | None:
        rows = self.catalog("SELECT number_of_series, number_of_instances FROM studies WHERE study_uid = ?", [ref])
        return rows[0] if rows else None

    def outbox(self) -> Outbox:
        return Outbox.for_settings(self.settings)

    def outbox_rows(self, sops: set[str]) -> list[Any]:
        return [r for r in self.outbox().rows() if r.sop_uid in sops]

    def delivered(self, sops: set[str], destinations: dict[str, set[str]]) -> bool:
        """Every object of ``sops`` is delivered where ``destinations`` says, and nothing else is queued."""
        rows = self.outbox_rows(sops)
        done = {(r.destination, r.sop_uid) for r in rows if r.state == DeliveryState.DELIVERED}
        wanted = {(d, s) for d, wanted_sops in destinations.items() for s in wanted_sops}
        return done == wanted and len(rows) == len(wanted)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.config['listener']['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def site(orthanc_factory, prefect_server, tmp_path_factory) -> Iterator[Site]:  # noqa: F811
    for tool in ("storescu", "echoscu", "storescp", "dcmdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"DCMTK {tool} missing")
    root = tmp_path_factory.mktemp("router-e2e")
    bed = Site(root, Archive(orthanc_factory, root, "main"), Archive(orthanc_factory, root, "second"),
               prefect_server)
    with ingest_worker(bed.env, root / "worker.log"):
        bed.listener.start()
        try:
            yield bed
        finally:
            bed.listener.stop()
    for archive in (bed.main, bed.second):
        archive.server.stop(graceful=False)


def _dcmdump(path: Path) -> str:
    done = subprocess.run(["dcmdump", str(path)], capture_output=True, check=True)
    return done.stdout.decode("latin-1")  # the sample names are in ISO_IR 100


def _sops(studies: list[Any]) -> dict[str, Path]:
    return {_sop(f): f for s in studies for f in files_of(s)}


def _delivered_once(site: Site, everything: set[str], mg: set[str]) -> None:
    main, second = site.main.stores(), site.second.stores()
    assert {s: main[s] for s in everything} == dict.fromkeys(everything, 1)
    assert {s: n for s, n in second.items() if s in everything} == dict.fromkeys(mg, 1)


def test_mixed_set_is_routed_annotated_and_the_mg_and_ct_studies_ingested(site, tmp_path):
    studies = site.studies(("CT", "MR", "MG", "US"), seed=11)
    by_modality = {s.modality: s for s in studies}
    assert set(by_modality) == {"CT", "MR", "MG", "US"}
    sops = _sops(studies)
    mg = {_sop(f) for f in files_of(by_modality["MG"])}
    before = site.metrics()

    sent = site.send(*sops.values())
    assert sent.returncode == 0, sent.stderr[-1000:]
    _wait(lambda: site.delivered(set(sops), {"main-pacs": set(sops), "ai-archive": mg}), "delivery")

    for study in studies:
        assert set(site.main.instances(study.study_uid)) == {_sop(f) for f in files_of(study)}
    assert set(site.second.instances(by_modality["MG"].study_uid)) == mg
    for other in ("CT", "MR", "US"):
        assert site.second.instances(by_modality[other].study_uid) == {}
    _delivered_once(site, set(sops), mg)

    # The second archive's copy carries the block, the main PACS's copy is the original.
    sop = sorted(mg)[0]
    annotated = site.second.download(site.second.instances(by_modality["MG"].study_uid)[sop], tmp_path / "ai.dcm")
    plain = site.main.download(site.main.instances(by_modality["MG"].study_uid)[sop], tmp_path / "main.dcm")
    dump = _dcmdump(annotated)
    assert "(0013,0010) LO [AI_PRIORITY]" in dump
    assert "(0013,1010) LO [HIGH]" in dump
    assert "(0013," not in _dcmdump(plain)
    original = pydicom.dcmread(sops[sop])
    received = pydicom.dcmread(annotated)
    assert received.PixelData == original.PixelData
    del received[0x00130010], received[0x00131010]
    assert received == original
    assert pydicom.dcmread(plain) == original

    # MG and CT reach the catalog through the event-triggered flow; MR and US do not.
    refs = {m: site.study_ref(s.study_uid) for m, s in by_modality.items()}
    for modality in ("MG", "CT"):
        study = by_modality[modality]
        got = _wait(lambda ref=refs[modality]: site.cataloged(ref), f"{modality} study in the catalog")
        assert got == {"number_of_series": study.n_series, "number_of_instances": study.n_instances}
    assert site.cataloged(refs["MR"]) is None and site.cataloged(refs["US"]) is None

    after = site.metrics()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("pacsflow_listener_received_total") == len(sops)
    assert grew("pacsflow_listener_forwarded_total", destination="main-pacs", outcome="delivered") == len(sops)
    assert grew("pacsflow_listener_forwarded_total", destination="ai-archive", outcome="delivered") == len(mg)
    assert grew("pacsflow_listener_stable_total") == len(studies)
