"""Issue 15, item 4 (validation part): objects that arrive broken are quarantined with their reason,
and the rest of their study is cataloged. Broken files are loaded into a real Orthanc with DCMTK and
retrieved by a real nightly run."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest
from pacsflow.tasks.ingest.ledger import Ledger

pytestmark = pytest.mark.integration


def _set_raw(path: Path, keyword: str, vr: str, value: bytes) -> None:
    """Write an invalid value as raw bytes: pydicom would refuse to encode it from a Python value."""
    ds = pydicom.dcmread(path)
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(path)


def _truncate_pixels(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)


def test_broken_objects_are_quarantined_with_their_reason_and_the_study_goes_on(lake, tmp_path):
    [study] = sampledata.generate(tmp_path / "in", studies=1, modalities=("CT",), days=1,
                                  end_date=dt.date.today(), seed=4, instances_per_series=(6, 6))
    files = sorted(study.path.rglob("*.dcm"))
    _truncate_pixels(files[0])
    _set_raw(files[1], "SliceThickness", "DS", b"abc ")
    _set_raw(files[2], "ContentTime", "TM", b"99x ")
    sampledata.load([study.path], "127.0.0.1", lake.orthanc.dicom_port)

    result = nightly_ingest()
    assert result["cataloged"] == 1 and result["quarantined_objects"] == 3
    assert query(lake.catalog, "SELECT count(*) FROM instances").column(0)[0].as_py() == len(files) - 3
    reasons = sorted(q["reason"] for q in Ledger(lake.state / "ledger.sqlite").quarantine_entries())
    assert reasons == [
        "pixel data shorter than Rows x Columns x SamplesPerPixel x frames x BitsAllocated "
        f"({len(pydicom.dcmread(files[0]).PixelData)} of {2 * len(pydicom.dcmread(files[0]).PixelData)} bytes)",
        "unparseable DS value in (0018,0050) SliceThickness",
        "unparseable TM value in (0008,0033) ContentTime",
    ]
    quarantined = list((lake.state / "quarantine").rglob("*.dcm"))
    assert len(quarantined) == 3  # the originals wait in the PHI zone for someone to look
