"""The migration workbench against a real Orthanc (issue 17, tests 6 and 5's first half): inventory
counts equal Orthanc's own, a later pass reports added and changed studies, reconcile after a real
night finds nothing and then finds a corrupted object, and with the window closed nothing reaches the PACS."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from pacsflow.deployments.local import sampledata
from pacsflow.flows.migrate import (
    RATE_LIMIT,
    MigrationNotReady,
    ensure_rate_limit,
    migrate_inventory,
    migrate_reconcile,
    migrate_run,
    migration_gate,
    migration_store,
)
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.tasks.deid.deidentifier import pseudonymize_uid
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.migrate.control import MigrationConfig, MigrationPaused, MigrationWindowClosed
from pacsflow.tasks.settings import load_settings

pytestmark = pytest.mark.integration

TODAY = dt.date.today()
NO_US = ("CT", "MR", "MG")  # ultrasound with burned-in text is quarantined: keep exact counts simple


def _orthanc_counts(orthanc) -> Counter:
    """(StudyDate, Modality) -> [studies, series, instances], from Orthanc's REST API."""
    counts: Counter = Counter()
    for study in orthanc.client.get("/studies?expand").json():
        day = study["MainDicomTags"]["StudyDate"]
        modalities = set()
        for series in orthanc.client.get(f"/studies/{study['ID']}/series?expand").json():
            modality = series["MainDicomTags"]["Modality"]
            modalities.add(modality)
            counts[(day, modality, "series")] += 1
            counts[(day, modality, "instances")] += len(series["Instances"])
        for modality in modalities:
            counts[(day, modality, "studies")] += 1
    return counts


def _inventory_counts(pass_id: int) -> Counter:
    counts: Counter = Counter()
    for study in migration_store(load_settings()).studies(pass_id):
        for modality in {s.modality for s in study.series}:
            counts[(study.study_date, modality, "studies")] += 1
        for s in study.series:
            counts[(study.study_date, s.modality, "series")] += 1
            counts[(study.study_date, s.modality, "instances")] += s.instances
    return counts


def _pseudo(uid: str) -> str:
    return pseudonymize_uid(load_settings().resolve_deid_key(), uid)


def test_inventory_counts_a_night_reconciles_and_later_passes_report_changes(lake, tmp_path):
    studies = sampledata.generate(tmp_path / "in", studies=5, days=4, end_date=TODAY, seed=11, modalities=NO_US)
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)
    since = TODAY - dt.timedelta(days=10)

    first = migrate_inventory(since=since, until=TODAY)
    assert first["studies"] == 5 and first["instances"] == sum(s.n_instances for s in studies)
    assert _inventory_counts(first["pass"]) == _orthanc_counts(lake.orthanc)
    assert "TB" in first["estimate"] and first["added"] == [] and first["changed"] == []
    assert not any(s.study_uid in repr(first) for s in studies)  # pseudonyms only

    night = run_result(nightly_ingest(since=since, return_state=True))
    assert night["cataloged"] == 5
    clean = migrate_reconcile(sample=1.0)
    assert (clean["studies"], clean["differences"], clean["checksum_findings"]) == (5, 0, 0)
    assert clean["objects_checked"] == first["instances"] and clean["migrated"] == clean["on_pacs"] == 5
    report = Path(clean["report"])
    text = report.read_text() + report.with_name(report.stem + "-progress.svg").read_text()
    assert text.count(",ok\n") == 5 + sum(s.n_series for s in studies)
    assert not any(s.study_uid in text or s.patient_id in text for s in studies)

    victim = sorted(lake.storage.rglob("*.dcm"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one bit pattern changed, same size
    broken = migrate_reconcile(sample=1.0)
    assert (broken["differences"], broken["checksum_findings"]) == (0, 1)
    findings = Path(broken["report"].replace(".csv", "-checksums.csv")).read_text().splitlines()
    assert len(findings) == 2 and findings[1].endswith(",checksum mismatch")

    # Later: one study gains a neighbour on the PACS, another loses an instance after it was migrated.
    late = sampledata.generate(tmp_path / "late", studies=1, days=1, end_date=TODAY, seed=12, modalities=NO_US)
    sampledata.load([tmp_path / "late"], "127.0.0.1", lake.orthanc.dicom_port)
    shrunk = studies[0]
    lake.orthanc.client.delete(f"/instances/{lake.orthanc.study_instances(shrunk.study_uid)[0]}").raise_for_status()
    second = migrate_inventory()  # the previous pass's range
    assert second["pass"] == first["pass"] + 1 and second["studies"] == 6
    assert _inventory_counts(second["pass"]) == _orthanc_counts(lake.orthanc)
    assert second["added"] == [_pseudo(late[0].study_uid)]
    assert second["changed"] == [_pseudo(shrunk.study_uid)]
    after = migrate_reconcile(sample=0.5)
    assert after["differences"] >= 2  # the late study is not cataloged; the shrunk one has an extra object


def _closed_now() -> str:
    """A window that opened two hours from now and closes an hour later: closed now."""
    now = dt.datetime.now()
    start, end = now + dt.timedelta(hours=2), now + dt.timedelta(hours=3)
    return f"{start:%H:%M}-{end:%H:%M}"


def _dicom_lines(orthanc, after: int = 0) -> list[str]:
    """Orthanc's (verbose) log lines about DICOM associations and requests, from line ``after`` on."""
    lines = orthanc.cfg.log_path.read_text(errors="replace").splitlines()[after:]
    return [line for line in lines if "association" in line.lower() or "incoming" in line.lower()
            or "C-MOVE" in line.upper() or "C-FIND" in line.upper()]


def test_with_the_window_closed_or_paused_nothing_reaches_the_pacs(lake, tmp_path, monkeypatch):
    sampledata.generate(tmp_path / "in", studies=2, days=2, end_date=TODAY, seed=5, modalities=NO_US)
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)
    lake.orthanc.client.put("/tools/log-level", content="verbose").raise_for_status()
    settings = load_settings()
    store = migration_store(settings)
    assert migrate_run() == {"status": "no migration configured"}
    migration_gate(3, settings=settings)  # no migration: a no-op

    plans: list[tuple] = []

    @flow(name="plan")
    def fake_plan(since=None, until=None):
        plans.append((since, until))
        return {"shards": 0}

    store.save_config(MigrationConfig(_closed_now(), rate_per_min=60))
    before = len(lake.orthanc.cfg.log_path.read_text(errors="replace").splitlines())
    monkeypatch.setitem(sys.modules, "pacsflow.flows.plan", types.SimpleNamespace(plan=fake_plan))
    status = migrate_run()["status"]
    assert status.startswith("window closed until ") and plans == []
    with pytest.raises(MigrationWindowClosed):
        migration_gate(1, settings=settings)
    store.save_config(MigrationConfig("always", paused=False))
    store.set_paused(True)
    assert migrate_run() == {"status": "paused"}
    with pytest.raises(MigrationPaused):
        migration_gate(1, settings=settings)
    time.sleep(0.5)
    assert _dicom_lines(lake.orthanc, before) == []
    assert not list(lake.storage.rglob("*")) and not list(lake.state.rglob("staging/*"))
    PacsClient(settings).echo()  # the log would show ours: an association now appears
    time.sleep(0.5)
    assert _dicom_lines(lake.orthanc, before)

    # Open and resumed: the plan flow runs (here a stand-in: the real one is another part's).
    assert store.set_paused(False).paused is False
    assert migrate_run(since=TODAY)["status"] == "started" and plans == [(TODAY, None)]
    monkeypatch.setitem(sys.modules, "pacsflow.flows.plan", None)
    with pytest.raises(MigrationNotReady, match="plan flow"):
        migrate_run()


def test_the_rate_limit_paces_retrieves_over_all_callers(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    settings = load_settings()
    migration_store(settings).save_config(MigrationConfig("always", rate_per_min=120))
    migration_gate(1, settings=settings)  # the first gate on a fresh server makes the limit
    ensure_rate_limit(120)  # unchanged: the slot just taken stays taken
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(RATE_LIMIT)
    assert (limit.limit, limit.slot_decay_per_second) == (120, 2.0)
    time.sleep(1)  # the first gate's slot decays
    started = time.monotonic()
    migration_gate(120, settings=settings)  # a minute's worth at once: the burst
    burst = time.monotonic() - started
    migration_gate(4, settings=settings)  # then the slots come back at 2 a second
    waited = time.monotonic() - started - burst
    assert burst < 1.5 <= waited < 20, (burst, waited)


def test_a_shards_retrieval_slot_passes_the_gate_before_it_takes_a_pacs_slot(prefect_api, tmp_path, monkeypatch):
    from pacsflow.flows.ingest_shard import slot_of
    from pacsflow.tasks.pacs.steps import PACS_LIMIT

    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("PACSFLOW_MAX_ASSOCIATIONS", "2")
    settings = load_settings()
    slot = slot_of(settings, "shard-gate-test", logging.getLogger("test"))

    def taken() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(PACS_LIMIT).active_slots

    with slot(3):  # no migration configured: only the PACS slot
        assert taken() == 1
    assert taken() == 0
    migration_store(settings).save_config(MigrationConfig(_closed_now()))
    with pytest.raises(MigrationWindowClosed), slot(3):
        pytest.fail("a closed window let a retrieval start")
    assert taken() == 0  # refused before any PACS slot was taken
    with slot_of(settings, "plan-test", logging.getLogger("test"), gated=False)(1):  # the plan's C-FIND slot
        assert taken() == 1
