"""The nightly run with state.url on PostgreSQL: the ledger lives in the database, not under state_root."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.tasks.deid.crosswalk import DbCrosswalk
from pacsflow.tasks.ingest.ledger import Ledger

pytestmark = pytest.mark.integration

TODAY = dt.date.today()


def test_a_night_keeps_its_ledger_in_postgresql(lake, tmp_path, monkeypatch, postgresql_url):
    monkeypatch.setenv("PACSFLOW_STATE__URL", postgresql_url)
    monkeypatch.setenv("PACSFLOW_DEID__CROSSWALK_PATH", str(tmp_path / "phi" / "crosswalk.csv"))
    studies = sampledata.generate(tmp_path / "in", studies=3, days=2, end_date=TODAY, seed=31,
                                  modalities=("CT", "MR", "MG"))
    sampledata.load([tmp_path / "in"], "127.0.0.1", lake.orthanc.dicom_port)
    broken = studies[0]
    lake.orthanc.break_study(broken.study_uid)

    first = run_result(nightly_ingest(return_state=True))

    assert (first["cataloged"], first["failed"]) == (2, 1)
    ledger = Ledger(tmp_path / "nowhere.sqlite", postgresql_url)  # another machine's view of the same state
    assert [e.study_uid for e in ledger.failed()] == [broken.study_uid]
    assert sorted(ledger.entries()) == sorted(s.study_uid for s in studies)
    assert ledger.watermark == broken.study_date
    assert not (lake.state / "ledger.sqlite").exists()
    # the crosswalk went to PostgreSQL too (schema pacsflow_phi), not to the CSV file
    assert not (tmp_path / "phi" / "crosswalk.csv").exists()
    assert {r[2] for r in DbCrosswalk(postgresql_url).rows()} >= {s.study_uid for s in studies[1:]}

    lake.orthanc.repair_study(broken.study_uid)
    retry = nightly_ingest()

    assert (retry["queued"], retry["cataloged"], retry["failed"]) == (1, 1, 0)
    assert ledger.failed() == [] and ledger.watermark == TODAY
    crosswalk = DbCrosswalk(postgresql_url).rows()
    assert {r[2] for r in crosswalk} == {s.study_uid for s in studies} and len(crosswalk) == len(studies)
    total = query(lake.catalog, "SELECT count(*) FROM instances").column(0)[0].as_py()
    assert total == sum(s.n_instances for s in studies)
