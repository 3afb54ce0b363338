"""Issue 15, item 5: a full lake or catalog. A small tmpfs is the lake (or the catalog) of a real nightly
run against a real Orthanc: the studies that do not fit fail transiently with one line naming the setting
and the place, no temp file is left, a catalog keeps its previous snapshot, and the next run (with room
again) catalogs them. A run also refuses to start when a zone has less than ``min_free_mb`` free."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest

from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.tasks.core.errors import InsufficientSpace
from pacsflow.tasks.ingest.ledger import Ledger

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_lake_fails_studies_in_one_line_and_leaves_no_temp_file(lake, tmp_path, monkeypatch, small_disk):
    monkeypatch.setenv("PACSFLOW_STORAGE_ROOT", str(small_disk / "dicom"))
    monkeypatch.setenv("PACSFLOW_MIN_FREE_MB", "0")
    monkeypatch.setenv("PACSFLOW_RETRY_DELAY_S", "0")
    studies = sampledata.generate(tmp_path / "in", studies=4, modalities=("CT", "MR"), days=2,
                                  end_date=dt.date.today(), seed=5, instances_per_series=(8, 10))
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)

    first = run_result(nightly_ingest(return_state=True))  # studies failed: a Failed run
    assert first["failed"] >= 1 and first["cataloged"] + first["failed"] == len(studies)
    failed = Ledger(lake.state / "ledger.sqlite").failed()
    assert failed and all(not f.permanent for f in failed)
    reason = failed[0].reason or ""
    assert "storage_root" in reason and str(small_disk) in reason and "No space left on device" in reason
    assert "\n" not in reason and len(reason) < 300
    assert [p for p in small_disk.rglob("*") if p.name.endswith(".part")] == []

    monkeypatch.setenv("PACSFLOW_STORAGE_ROOT", str(tmp_path / "roomy" / "dicom"))
    second = nightly_ingest()
    assert second["failed"] == 0 and first["cataloged"] + second["cataloged"] == len(studies)


def _fill(disk: Path) -> Path:
    """A file that takes every free byte of ``disk``."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def _seed(lake, tmp_path: Path, name: str, studies: int, seed: int) -> list:
    generated = sampledata.generate(tmp_path / name, studies=studies, modalities=("CT",), days=2,
                                    end_date=dt.date.today(), seed=seed, instances_per_series=(2, 3))
    sampledata.load([tmp_path / name], "127.0.0.1", lake.orthanc.dicom_port)
    return generated


def test_a_full_catalog_fails_the_batch_in_one_line_and_keeps_the_snapshot(lake, tmp_path, monkeypatch, small_disk):
    catalog = small_disk / "catalog"
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(catalog))
    monkeypatch.setenv("PACSFLOW_MIN_FREE_MB", "0")
    first_studies = _seed(lake, tmp_path, "first", studies=2, seed=11)
    assert nightly_ingest()["cataloged"] == len(first_studies)
    version = CatalogStore(catalog).snapshot_version
    before = query(catalog, "SELECT study_uid FROM studies ORDER BY study_uid")

    more = _seed(lake, tmp_path, "more", studies=2, seed=12)
    filler = _fill(small_disk)
    second = run_result(nightly_ingest(return_state=True))
    assert second["cataloged"] == 0 and second["failed"] == len(more)
    failed = Ledger(lake.state / "ledger.sqlite").failed()
    assert len(failed) == len(more) and all(not f.permanent for f in failed)
    reason = failed[0].reason or ""
    assert reason.startswith("CatalogWriteError: catalog_root: ") and str(catalog) in reason
    assert "No space left on device" in reason and f"current snapshot v{version} is unchanged" in reason
    assert "\n" not in reason and len(reason) < 400
    # the previous snapshot is still the one readers see, whole; nothing of the failed build stays
    assert CatalogStore(catalog).snapshot_version == version
    assert query(catalog, "SELECT study_uid FROM studies ORDER BY study_uid").equals(before)
    leftovers = [p.name for p in catalog.rglob("*") if p.name.startswith((".build-", ".current-"))
                 or p.name.endswith(".part")]
    assert leftovers == []

    filler.unlink()
    third = nightly_ingest()
    assert third["failed"] == 0 and third["cataloged"] == len(more)
    assert query(catalog, "SELECT count(*) AS n FROM studies")["n"][0].as_py() == len(first_studies) + len(more)


def test_a_run_does_not_start_below_the_free_space_floor(lake, monkeypatch):
    monkeypatch.setenv("PACSFLOW_MIN_FREE_MB", str(10**9))
    with pytest.raises(InsufficientSpace) as err:
        nightly_ingest()
    message = str(err.value)
    assert "min_free_mb" in message and str(lake.catalog) in message and "\n" not in message
    assert not (lake.state / "ledger.sqlite").exists()  # nothing was started
