"""catalog.backend=delta in a real nightly run: the flow's commits land in the Delta tables."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.catalog.backends import open_store
from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest

pytestmark = pytest.mark.integration


def test_a_nightly_run_commits_to_the_delta_backend(lake, tmp_path, monkeypatch):
    studies = sampledata.generate(tmp_path / "in", studies=4, days=2, end_date=dt.date.today(), seed=17,
                                  modalities=("CT",), series_per_study=(1, 1), instances_per_series=(2, 3))
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)
    monkeypatch.setenv("PACSFLOW_CATALOG__BACKEND", "delta")
    monkeypatch.setenv("PACSFLOW_COMMIT_BATCH", "2")
    monkeypatch.setenv("PACSFLOW_DEID_WORKERS", "0")

    result = nightly_ingest()

    assert (result["cataloged"], result["failed"]) == (4, 0)
    delta = open_store(lake.catalog, "delta")
    counts = query(delta, "SELECT (SELECT count(*) FROM studies), (SELECT count(*) FROM instances)").to_pylist()[0]
    assert list(counts.values()) == [4, sum(s.n_instances for s in studies)]
    assert CatalogStore(lake.catalog).snapshot().version == 0  # nothing went to the snapshot store
