"""Issue 15, item 1: a killed run never blocks the next.

`pacsflow run nightly` runs as a real command (its own PREFECT_HOME, so its own temporary Prefect
server) against a real Orthanc and is killed mid-retrieval: with SIGKILL the next run takes the
slots back once the dead run's lease has run out, with SIGTERM the run stops cleanly at once. No
process of the stopped run may be left. A run that must wait says so and gives up in time.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from prefect.client.orchestration import get_client

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.concurrency import LEASE_S, SlotWaitTimeout, hold_slots
from pacsflow.tasks.ingest.ledger import Ledger
from tests.flows.conftest import prefect_api  # noqa: F401  (fixture re-export)
from tests.helpers import free_port
from tests.integration.conftest import orthanc_factory  # noqa: F401  (fixture re-export)

pytestmark = pytest.mark.integration

STUDIES = 16
INSTANCES = 2 * 4  # per study: 2 series of 4


@dataclass
class Site:
    root: Path
    env: dict[str, str]
    instances: int

    @property
    def lake_files(self) -> list[Path]:
        return list((self.root / "lake" / "dicom").rglob("*.dcm"))

    def ledger(self) -> Ledger:
        return Ledger(self.root / "state" / "ledger.sqlite")

    def cataloged(self) -> tuple[int, int]:
        catalog = self.root / "lake" / "catalog"
        studies = query(catalog, "SELECT count(*) FROM studies").column(0)[0].as_py()
        return studies, query(catalog, "SELECT count(*) FROM instances").column(0)[0].as_py()


@pytest.fixture
def site(tmp_path, orthanc_factory) -> Site:  # noqa: F811
    receiver_port = free_port()
    orthanc = orthanc_factory(receiver_port=receiver_port)
    sampledata.generate(tmp_path / "in", studies=STUDIES, series_per_study=(2, 2), instances_per_series=(4, 4),
                        modalities=("CT", "MR"), end_date=dt.date.today(), days=3, seed=15)
    sent = sampledata.load([tmp_path / "in"], "127.0.0.1", orthanc.dicom_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PACSFLOW_"))}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PACSFLOW_PACS__PORT": str(orthanc.dicom_port),
        "PACSFLOW_PACS__HTTP_URL": orthanc.rest_url,
        "PACSFLOW_RECEIVER__PORT": str(receiver_port),
        "PACSFLOW_STORAGE_ROOT": str(tmp_path / "lake" / "dicom"),
        "PACSFLOW_CATALOG_ROOT": str(tmp_path / "lake" / "catalog"),
        "PACSFLOW_STATE_ROOT": str(tmp_path / "state"),
        "PACSFLOW_DEID_KEY": "faults-test-key-0123456789",
        "PACSFLOW_MAX_ASSOCIATIONS": "1",  # one study at a time: the signal lands mid-retrieval
        "PACSFLOW_DEID_WORKERS": "1",
        "PACSFLOW_RETRIEVE_RETRIES": "0",
        "PACSFLOW_SLOT_WAIT_S": str(LEASE_S * 4),
    })
    return Site(tmp_path, env, sent)


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _cmdlines(pids: set[int]) -> list[str]:
    return [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode() for p in _alive(pids)]


@dataclass
class Run:
    process: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _start(site: Site, name: str) -> Run:
    log = site.root / f"{name}.log"
    process = subprocess.Popen([sys.executable, "-m", "pacsflow.flows.cli", "run", "nightly"], env=site.env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=site.root)
    return Run(process, log)


def _signal_mid_retrieval(site: Site, run: Run, signum: int) -> set[int]:
    """Once the first study is in the lake (de-identification workers are up, later studies are
    still being retrieved): the run's processes, then the signal."""
    deadline = time.monotonic() + 180
    while not site.lake_files:
        assert run.process.poll() is None, run.text()[-3000:]
        assert time.monotonic() < deadline, run.text()[-3000:]
        time.sleep(0.05)
    processes = _descendants(run.process.pid)
    cmdlines = " | ".join(_cmdlines(processes))
    assert "uvicorn" in cmdlines and "multiprocessing" in cmdlines, cmdlines  # the server and a worker
    run.process.send_signal(signum)
    return processes


def _wait_gone(pids: set[int], timeout_s: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _cmdlines(pids)


def _finish(run: Run, timeout_s: float = 300) -> str:
    try:
        run.process.wait(timeout=timeout_s)
    finally:
        if run.process.poll() is None:
            run.process.kill()
    return run.text()


def test_a_killed_run_leaves_no_process_and_its_slots_come_back(site):
    killed = _start(site, "killed")
    processes = _signal_mid_retrieval(site, killed, signal.SIGKILL)
    killed.process.wait(timeout=10)
    assert _wait_gone(processes) == []  # worker and temporary server end with the run
    assert site.ledger().entries() == {}  # killed before its catalog commit

    text = _finish(_start(site, "rerun"))
    assert "slots taken" in text, text[-3000:]
    waited = float(re.search(r"pacs-associations: 1 slots taken after ([\d.]+)s", text).group(1))
    assert waited <= LEASE_S + 10, text[-3000:]
    assert re.search(r"holder run \S+ \(pid %d .* is gone" % killed.process.pid, text), text[-3000:]
    assert site.cataloged() == (STUDIES, site.instances)
    assert {e.status for e in site.ledger().entries().values()} == {"cataloged"}


def test_sigterm_stops_a_run_cleanly_and_the_next_run_retries_its_studies(site):
    run = _start(site, "terminated")
    processes = _signal_mid_retrieval(site, run, signal.SIGTERM)
    started = time.monotonic()
    text = _finish(run, timeout_s=120)
    assert run.process.returncode != 0, text[-3000:]
    assert time.monotonic() - started < 60
    assert _wait_gone(processes, timeout_s=5) == []

    entries = site.ledger().entries()
    assert len(entries) == STUDIES, text[-3000:]  # nothing cataloged, every study left for the next run
    assert {(e.status, e.permanent) for e in entries.values()} == {("failed", False)}
    assert {e.reason for e in entries.values()} == {"run interrupted (signal 15)"}

    text = _finish(_start(site, "rerun"))
    assert "is gone" not in text and "held by no live run" not in text, text[-3000:]  # the slots were given back
    assert site.cataloged() == (STUDIES, site.instances)
    assert {e.status for e in site.ledger().entries().values()} == {"cataloged"}


# -- a run that must wait (in process, Prefect's test API) ---------------------------------------
LIMIT = "faults-killed-run"


@pytest.fixture
def holder(prefect_api) -> Iterator[threading.Event]:  # noqa: F811
    """Another run holding the one slot of LIMIT until the event is set."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with hold_slots(LIMIT, 1, run_id="20261130T013000Z-holder", max_wait_s=10):
            taken.set()
            done.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(30)
    yield done
    done.set()
    thread.join(30)


def test_a_waiting_run_names_the_holder_and_gives_up_in_time(holder, caplog):
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    with pytest.raises(SlotWaitTimeout) as raised:
        with hold_slots(LIMIT, 1, run_id="20261130T020000Z-second", max_wait_s=3):
            pytest.fail("took a slot that another run holds")
    assert 3 <= time.monotonic() - started < 15
    message = str(raised.value)
    assert "gave up after" in message and LIMIT in message and "run 20261130T013000Z-holder (pid" in message
    assert "\n" not in message
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for 1 slots")]
    assert waiting and "held by run 20261130T013000Z-holder" in waiting[0]

    holder.set()  # the holder ends: the slot is free again at once
    with hold_slots(LIMIT, 1, run_id="20261130T020000Z-third", max_wait_s=10):
        pass


def test_slots_nobody_holds_are_given_back(prefect_api, caplog):  # noqa: F811
    """What an older version left after a SIGKILL: the limit full, and no holder anywhere."""
    caplog.set_level(logging.INFO)
    with hold_slots(LIMIT + "-leak", 2, run_id="20261130T010000Z-setup", max_wait_s=5):
        pass
    with get_client(sync_client=True) as client:
        client.increment_concurrency_slots([LIMIT + "-leak"], 2, mode="concurrency")
        assert client.read_global_concurrency_limit_by_name(LIMIT + "-leak").active_slots == 2
    with hold_slots(LIMIT + "-leak", 2, run_id="20261130T020000Z-next", max_wait_s=5):
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(LIMIT + "-leak").active_slots == 2
    assert any("2 of 2 slots held by no live run" in r.getMessage() for r in caplog.records)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(LIMIT + "-leak").active_slots == 0
