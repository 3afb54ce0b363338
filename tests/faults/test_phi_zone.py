"""Issue 15, item 7: files in the PHI zone are owner-only, PHI never sits in the lake, leftovers go.

A real nightly run against a real Orthanc, with ultrasound objects the pixel policy quarantines and a
crosswalk: every file under state_root is 0600 and every folder 0700, whatever the umask was.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from pacsflow.catalog.store import CatalogStore
from pacsflow.deployments.local import sampledata
from pacsflow.flows.compact import compact_catalog
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.tasks.settings import SettingsError, load_settings

pytestmark = pytest.mark.integration


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_phi_zone_files_are_owner_only_after_a_run(lake, tmp_path, monkeypatch):
    crosswalk = tmp_path / "private" / "crosswalk.csv"
    monkeypatch.setenv("PACSFLOW_DEID__CROSSWALK_PATH", str(crosswalk))
    studies = sampledata.generate(tmp_path / "in", studies=3, modalities=("CT", "US"), days=3,
                                  end_date=dt.date.today(), seed=15)
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)
    old_umask = os.umask(0o022)  # the usual umask: files would be world-readable without our care
    try:
        result = run_result(nightly_ingest(return_state=True))  # an all-quarantined study fails the run
    finally:
        os.umask(old_umask)
    assert result["cataloged"] + result["failed"] == len(studies) and result["quarantined_objects"] > 0
    modes = _modes(lake.state)
    assert any(name.startswith("quarantine/") and not name.endswith("quarantine") for name in modes)
    assert any(name.endswith("ledger.sqlite") for name in modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o700 if (lake.state / name).is_dir() else 0o600)}
    assert wrong == {}
    assert stat.S_IMODE(crosswalk.stat().st_mode) == 0o600
    assert not (lake.state / "runs").exists() or not any((lake.state / "runs").iterdir())


@pytest.mark.parametrize("inside", ["storage", "catalog"])
def test_a_crosswalk_inside_the_lake_is_refused(tmp_path, monkeypatch, inside):
    lake = {"storage": tmp_path / "lake" / "dicom", "catalog": tmp_path / "lake" / "catalog"}
    monkeypatch.setenv("PACSFLOW_STORAGE_ROOT", str(lake["storage"]))
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(lake["catalog"]))
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("PACSFLOW_DEID__CROSSWALK_PATH", str(lake[inside] / "crosswalk.csv"))
    with pytest.raises(SettingsError, match="deid.crosswalk_path must be outside"):
        load_settings()


def test_leftovers_of_a_killed_run_are_cleaned(lake, tmp_path):
    """A run killed mid-way leaves its row folder and a half-built snapshot: the next run and compact remove them."""
    stale_rows = lake.state / "runs" / "20000101T000000Z-dead00" / "rows"
    stale_rows.mkdir(parents=True)
    (stale_rows / "studies.parquet").write_bytes(b"half")
    two_days_ago = dt.datetime.now().timestamp() - 2 * 86400
    for p in (stale_rows / "studies.parquet", stale_rows, stale_rows.parent):
        os.utime(p, (two_days_ago, two_days_ago))
    sampledata.generate(tmp_path / "in", studies=1, modalities=("CT",), days=1, end_date=dt.date.today(), seed=7)
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)
    assert nightly_ingest()["cataloged"] == 1
    assert not stale_rows.parent.exists()

    half_built = lake.catalog / "_snapshots" / ".build-0123456789abcdef"
    half_built.mkdir(parents=True)
    (half_built / "part.parquet").write_bytes(b"half")
    compact_catalog(vacuum_grace_s=0)
    assert not half_built.exists()
    assert CatalogStore(lake.catalog).stats()["tables"]["studies"]["rows"] == 1
