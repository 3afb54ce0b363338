"""The nightly run commits full batches while retrieval goes on, so a long night does not keep
every staged original until its end."""

from __future__ import annotations

import datetime as dt

import pytest
from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest
from pacsflow.tasks.ingest.ledger import Ledger

pytestmark = pytest.mark.integration


def test_full_batches_are_committed_and_their_staging_cleaned_before_retrieval_ends(lake, tmp_path, caplog,
                                                                                     monkeypatch):
    studies = sampledata.generate(tmp_path / "in", studies=8, days=3, end_date=dt.date.today(), seed=11,
                                  modalities=("CT", "MR"), series_per_study=(1, 1), instances_per_series=(3, 4))
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)
    monkeypatch.setenv("PACSFLOW_COMMIT_BATCH", "2")
    monkeypatch.setenv("PACSFLOW_MAX_ASSOCIATIONS", "1")  # one study retrieved after the other
    monkeypatch.setenv("PACSFLOW_DEID_WORKERS", "0")
    caplog.set_level("INFO")

    result = nightly_ingest()

    assert (result["cataloged"], result["failed"]) == (8, 0)
    assert result["instances"] == sum(s.n_instances for s in studies)
    assert query(lake.catalog, "SELECT count(*) FROM studies").column(0)[0].as_py() == 8
    assert {e.status for e in Ledger(lake.state / "ledger.sqlite").entries().values()} == {"cataloged"}
    assert not any((lake.state / "staging").iterdir())
    messages = [r.getMessage() for r in caplog.records]
    commits = [i for i, m in enumerate(messages) if m.startswith("catalog commit: ")]
    # A retrieval task logs its study, or its group of small studies (never more than a commit batch).
    retrieved = [i for i, m in enumerate(messages) if m.startswith(("retrieved study ", "retrieved 2 of 2 studies"))]
    fetched = sum(1 if messages[i].startswith("retrieved study ") else 2 for i in retrieved)
    assert len(commits) == 4 and fetched == 8
    assert commits[0] < retrieved[-1]  # the first batch went in while later studies were still coming
