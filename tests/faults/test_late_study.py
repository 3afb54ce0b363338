"""Issue 15, item 9: a study that reaches the PACS ten days after its StudyDate is outside every nightly
window; the reconciliation sweep finds it, retrieves only it, and reports what it cost at the PACS."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest
from pacsflow.flows.sweep import reconciliation_sweep

pytestmark = pytest.mark.integration

TODAY = dt.date.today()


def _seed(lake, folder, end_date: dt.date, seed: int) -> list[sampledata.StudySummary]:
    studies = sampledata.generate(folder, studies=1, modalities=("CT",), days=1, end_date=end_date, seed=seed)
    sampledata.load([folder], "127.0.0.1", lake.orthanc.dicom_port)
    return studies


def test_the_sweep_finds_a_study_that_arrived_ten_days_late(lake, tmp_path):
    _seed(lake, tmp_path / "on-time", TODAY, seed=1)
    assert nightly_ingest()["cataloged"] == 1

    [late] = _seed(lake, tmp_path / "late", TODAY - dt.timedelta(days=10), seed=2)
    assert nightly_ingest()["found"] == 1  # the window starts at the watermark minus the overlap: not there

    result = reconciliation_sweep(lookback_days=14)
    assert result["found"] == 2 and result["queued"] == 1 and result["cataloged"] == 1
    assert result["pacs_queries"] >= 14  # one C-FIND per day of the lookback (no cap known)
    sizes = query(lake.catalog, "SELECT number_of_instances FROM studies").column(0).to_pylist()
    assert len(sizes) == 2 and late.n_instances in sizes  # (catalog dates are shifted: compare sizes)
    assert reconciliation_sweep(lookback_days=14)["queued"] == 0  # nothing new: C-FIND only
