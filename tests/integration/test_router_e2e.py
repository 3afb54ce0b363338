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
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.route.outbox import DeliveryState, Outbox
from pacsflow.tasks.settings import load_settings

from tests.helpers import dcmtk_env, free_port
from tests.integration.conftest import hapi  # noqa: F401  (session fixture)
from tests.integration.prefect_server import (
    ROOT,
    ingest_worker,
    prefect_server,  # noqa: F401  (fixture re-export)
    worker_env,
)

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


def _wait(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S, poll_s: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


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

    def start(self) -> ListenProcess:
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
            "listener": {"ae_title": LISTENER_AE, "port": free_port(), "allowed_aes": [SENDER_AE], "engine": "dcmtk",
                         "stable_after_s": WINDOW_S, "rules_file": str(rules_file), "metrics_port": free_port(),
                         "max_attempts": MAX_ATTEMPTS, "retry_backoff_s": BACKOFF_S, "retry_max_delay_s": 8.0,
                         "timeout_s": 10.0},
        }
        config_path = root / "pacsflow.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.env = worker_env(api_url, root / "prefect-home", PACSFLOW_CONFIG=str(config_path))
        self.config_path = config_path
        self.settings = load_settings(**self.config)
        self.listener = ListenProcess(self.env, self.config["listener"]["port"], root / "listen.log")
        self._generated = 0

    @contextmanager
    def configured(self, **top: Any) -> Iterator[None]:
        """These top-level settings in the shared config file for a while: the worker's flow runs
        read it when they start (the listener needs no restart for what only the flow uses)."""
        self.config.update(top)
        self.config_path.write_text(yaml.safe_dump(self.config))
        try:
            yield
        finally:
            for key in top:
                self.config.pop(key)
            self.config_path.write_text(yaml.safe_dump(self.config))

    def reconfigure(self, **listener: Any) -> None:
        """Restart the listener (SIGTERM, same state) with these listener settings changed."""
        if all(self.config["listener"].get(k) == v for k, v in listener.items()):
            return
        assert self.listener.stop() in (0, 128 + signal.SIGTERM), self.listener.log_tail()
        self.config["listener"].update(listener)
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.listener.start()

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
        env = {**self.env, "COLUMNS": "400"}  # rich wraps a pipe's lines at 80 columns otherwise
        return subprocess.run([str(PACSFLOW), *args], capture_output=True, text=True, env=env, timeout=120,
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
        except Exception as exc:
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
    sop = min(mg)
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


def _ingest_runs(ref: str) -> list[Any]:
    """The ingest-study flow runs of one study (by its pseudonym), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
            any_=["ingest-study"])))
    return sorted((r for r in runs if r.parameters.get("study") == ref), key=lambda r: r.parameters["generation"])


def _cataloged_once(site: Site, ref: str, sops: set[str], series: int) -> None:
    _wait(lambda: site.cataloged(ref) == {"number_of_series": series, "number_of_instances": len(sops)},
          "the whole study in the catalog")
    rows = site.catalog("SELECT count(*) AS n, count(DISTINCT sop_instance_uid) AS u FROM instances "
                        "WHERE study_uid = ?", [ref])
    assert rows == [{"n": len(sops), "u": len(sops)}]
    runs = _wait(lambda: [r for r in _ingest_runs(ref) if r.state and r.state.is_final()], "ingest runs")
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]


@pytest.fixture(params=["dcmtk", "pynetdicom"])
def engine(site: Site, request) -> Iterator[str]:
    """The listener runs with this receive engine (same state); dcmtk again afterwards."""
    site.reconfigure(engine=request.param)
    try:
        yield request.param
    finally:
        site.reconfigure(engine="dcmtk")


def test_a_listener_killed_mid_study_completes_it_delivering_and_cataloging_each_object_once(site, engine):
    [study] = site.studies(("MG",), seed=22 if engine == "dcmtk" else 23, series=(2, 2), instances=(40, 40))
    files = files_of(study)
    sops = {_sop(f) for f in files}
    zone = site.settings.listener_dir
    cmd = ["storescu", "-aet", SENDER_AE, "-aec", LISTENER_AE, "127.0.0.1", str(site.listener.port), *map(str, files)]
    sender = subprocess.Popen(cmd, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def received() -> int:  # storescp's files (incoming/) or staged ones (inbox/)
        return sum(p.is_file() and p.suffix != ".pid" for d in ("incoming", "inbox") for p in (zone / d).rglob("*"))

    already = received()
    _wait(lambda: received() >= already + 2 or sender.poll() is not None, "the first objects", timeout_s=60,
          poll_s=0.005)
    assert sender.poll() is None  # killed while the association runs
    site.listener.kill()  # mid-association, within the study's stability window: nothing of it routed yet
    sender.wait(timeout=60)  # dcmtk: storescp finishes the association on its own; pynetdicom: aborted
    site.listener.start()  # the same state_root
    sent = site.send(*files)  # the modality sends the whole study again
    assert sent.returncode == 0, sent.stderr[-1000:]

    _wait(lambda: site.delivered(sops, {"main-pacs": sops, "ai-archive": sops}), "delivery")
    assert set(site.main.instances(study.study_uid)) == sops == set(site.second.instances(study.study_uid))
    _delivered_once(site, sops, sops)
    _cataloged_once(site, site.study_ref(study.study_uid), sops, series=2)


def _status_counts(site: Site, destination: str) -> dict[str, int]:
    """`pacsflow route status`'s counts of one destination, by state."""
    done = site.pacsflow("route", "status")
    assert done.returncode == 0, done.stdout + done.stderr
    header, *lines = done.stdout.splitlines()
    [line] = [line for line in lines if line.split()[:1] == [destination]]
    return dict(zip(header.split()[1:], map(int, line.split()[1:])))


def test_objects_for_a_down_archive_wait_in_the_outbox_dead_letter_and_are_sent_by_route_retry(site):
    first, second = site.studies(("MG", "MG"), seed=33, series=(1, 1), instances=(2, 2))
    sops1, sops2 = ({_sop(f) for f in files_of(s)} for s in (first, second))
    archive = site.second.server

    archive.stop(graceful=False)
    try:
        assert site.send(*files_of(first)).returncode == 0
        _wait(lambda: {(r.state, r.attempts >= 1) for r in site.outbox_rows(sops1) if r.destination == "ai-archive"}
              == {(DeliveryState.QUEUED, True)}, "a failed attempt", timeout_s=60)
        counts = _status_counts(site, "ai-archive")  # a row is "sending" while an attempt is under way
        assert (counts["queued"] + counts["sending"], counts["dead"]) == (len(sops1), 0)
        _wait(lambda: set(site.main.instances(first.study_uid)) == sops1, "the main PACS's copies", timeout_s=60)
    finally:
        archive.start(timeout_s=60)
    _wait(lambda: site.delivered(sops1, {"main-pacs": sops1, "ai-archive": sops1}), "delivery once it is back")

    archive.stop(graceful=False)
    try:
        assert site.send(*files_of(second)).returncode == 0

        def dead_letters() -> list[Any]:
            rows = [r for r in site.outbox_rows(sops2) if r.destination == "ai-archive"]
            return rows if rows and all(r.state == DeliveryState.DEAD for r in rows) else []

        dead = _wait(dead_letters, "dead letters", timeout_s=90)
        assert len(dead) == len(sops2) and {r.attempts for r in dead} == {MAX_ATTEMPTS}
        counts = _status_counts(site, "ai-archive")
        assert counts["dead"] == len(sops2)
        status = site.pacsflow("route", "status").stdout
        ref = site.study_ref(second.study_uid)
        assert f"ai-archive study {ref} after {MAX_ATTEMPTS} attempt(s)" in status
        assert f"{archive.aet}@127.0.0.1:{archive.dicom_port}" in status
        assert second.study_uid not in status
    finally:
        archive.start(timeout_s=60)
    time.sleep(3)  # dead letters stay dead while the archive is back
    assert all(r.state == DeliveryState.DEAD for r in site.outbox_rows(sops2) if r.destination == "ai-archive")

    retry = site.pacsflow("route", "retry", "--destination", "ai-archive")
    assert retry.returncode == 0 and f"{len(sops2)} dead-lettered objects queued again" in retry.stdout
    _wait(lambda: site.delivered(sops2, {"main-pacs": sops2, "ai-archive": sops2}), "delivery after route retry")
    assert set(site.second.instances(second.study_uid)) == sops2
    _delivered_once(site, sops1 | sops2, sops1 | sops2)


def test_a_stranger_is_refused_and_a_malformed_object_does_not_stop_the_rest(site, tmp_path):
    [study] = site.studies(("US",), seed=44, series=(1, 1), instances=(3, 3))
    files = files_of(study)
    sops = {_sop(f) for f in files}
    before = site.metrics()

    stranger = site.send(*files, calling_ae="INTRUDER")
    assert stranger.returncode != 0
    assert not site.listener.echo("INTRUDER")

    broken = pydicom.dcmread(files[0])
    del broken.StudyInstanceUID  # no study to file it under
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    broken_path = tmp_path / "broken.dcm"
    broken.save_as(broken_path, enforce_file_format=True)
    sent = site.send(broken_path, *files)  # the broken object first: the rest must still go
    assert sent.returncode == 0, sent.stderr[-1000:]
    _wait(lambda: site.delivered(sops, {"main-pacs": sops}), "delivery")
    assert set(site.main.instances(study.study_uid)) == sops
    _delivered_once(site, sops, set())

    after = site.metrics()
    grew = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert grew[("pacsflow_listener_received_total", ())] == len(files)  # the stranger's: none
    assert grew[("pacsflow_listener_refused_total", (("reason", "calling_ae"),))] == 2  # store and echo
    assert grew[("pacsflow_listener_refused_total", (("reason", "undecodable"),))] == 1
    # The malformed object is refused, counted and quarantined with its reason; it goes nowhere.
    uid = str(broken.SOPInstanceUID)
    quarantine = Path(site.config["state_root"]) / "quarantine" / "listener"
    [kept] = [p for p in quarantine.iterdir() if pydicom.dcmread(p, force=True).get("SOPInstanceUID") == uid]
    reasons = {e["object_ref"]: e["reason"] for e in Ledger(Path(site.config["state_root"]) / "ledger.sqlite")
               .quarantine_entries()}
    assert reasons[kept.name].startswith(f"undecodable object from '{SENDER_AE}'")
    assert uid not in site.main.stores() and site.outbox_rows({uid}) == []


def test_a_study_resumed_after_its_window_is_routed_and_ingested_again_for_its_new_series_only(site):
    [study] = site.studies(("MG",), seed=55, series=(2, 2), instances=(2, 3))
    by_series: dict[str, list[Path]] = {}
    for f in files_of(study):
        by_series.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID), []).append(f)
    early, late = by_series.values()
    sops_early, sops = {_sop(f) for f in early}, {_sop(f) for f in files_of(study)}
    ref = site.study_ref(study.study_uid)

    assert site.send(*early).returncode == 0
    _wait(lambda: site.delivered(sops_early, {"main-pacs": sops_early, "ai-archive": sops_early}), "first series")
    _cataloged_once(site, ref, sops_early, series=1)

    assert site.send(*late).returncode == 0
    _wait(lambda: site.delivered(sops, {"main-pacs": sops, "ai-archive": sops}), "second series")
    _cataloged_once(site, ref, sops, series=2)
    _delivered_once(site, sops, sops)
    assert set(site.main.instances(study.study_uid)) == sops == set(site.second.instances(study.study_uid))
    series = site.catalog("SELECT number_of_instances AS n FROM series WHERE study_uid = ? ORDER BY n", [ref])
    assert [r["n"] for r in series] == sorted([len(early), len(late)])
    runs = _ingest_runs(ref)
    assert [r.parameters["generation"] for r in runs] == [1, 2]  # one run per generation


def test_an_ingested_study_reaches_fhir_when_fhir_is_configured(site, hapi):  # noqa: F811
    [study] = site.studies(("CT",), seed=66, series=(1, 1), instances=(3, 3))
    ref = site.study_ref(study.study_uid)
    fhir = httpx.Client(base_url=hapi.base_url, headers={"Accept": "application/fhir+json"}, timeout=60)
    with site.configured(fhir={"base_url": hapi.base_url, "pseudonym_system": f"urn:t:{uuid.uuid4().hex}"}):
        sent = site.send(*files_of(study))
        assert sent.returncode == 0, sent.stderr[-1000:]
        _wait(lambda: site.cataloged(ref), "the CT study in the catalog")
        entries = _wait(lambda: fhir.get("ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{ref}"})
                        .json().get("entry"), "its ImagingStudy on the FHIR server")
    [entry] = entries
    assert entry["resource"]["numberOfInstances"] == 3 and entry["resource"]["numberOfSeries"] == 1
    assert entry["resource"]["subject"]["reference"].startswith("Patient/")
