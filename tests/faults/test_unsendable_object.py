"""Issue 15, item 4 (objects, not studies, fail): a study with objects the PACS cannot send is
cataloged without them; each is recorded by its pseudonym with the PACS's reason, asked for again
by the next runs and given up after ``max_attempts``.

Real Orthanc holds two objects of an unknown SOP class (stored over its REST API: its Storage SCP
would refuse them too). Our receiver does not accept that class, so Orthanc cannot send them and,
as measured, ends the whole C-MOVE with 0xC000 at the first of them, the objects after it unsent.
"""

from __future__ import annotations

import datetime as dt

import httpx
import pydicom
import pytest

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest
from pacsflow.tasks.deid.deidentifier import pseudonymize_uid
from pacsflow.tasks.ingest.ledger import Ledger

pytestmark = pytest.mark.integration

UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.10.1389.99.1"


@pytest.mark.parametrize("engine", ["dcmtk", "pynetdicom"])
def test_a_study_is_cataloged_minus_the_objects_the_pacs_cannot_send(lake, tmp_path, monkeypatch, engine):
    monkeypatch.setenv("PACSFLOW_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("PACSFLOW_RECEIVER__ENGINE", engine)  # both refuse the unknown class at negotiation
    [study] = sampledata.generate(tmp_path / "in", studies=1, modalities=("CT",), days=1,
                                  end_date=dt.date.today(), seed=11, instances_per_series=(8, 8))
    files = sorted(study.path.rglob("*.dcm"))
    unsendable = []
    for path in (files[1], files[len(files) // 2]):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UNKNOWN_SOP_CLASS
        ds.save_as(path)
        unsendable.append(str(ds.SOPInstanceUID))
    with httpx.Client(base_url=lake.orthanc.rest_url, trust_env=False) as orthanc:
        for path in files:
            orthanc.post("/instances", content=path.read_bytes()).raise_for_status()

    first = nightly_ingest()
    assert (first["cataloged"], first["failed"], first["missing_objects"]) == (1, 0, 2)
    cataloged = query(lake.catalog, "SELECT count(*) FROM instances").column(0)[0].as_py()
    assert cataloged == first["instances"] == len(files) - 2  # every sendable object, none lost after the abort

    ledger = Ledger(lake.state / "ledger.sqlite")
    key = b"flow-test-key-0123456789"
    refs = sorted(pseudonymize_uid(key, uid) for uid in unsendable)
    assert [(m.object_ref, m.attempts, m.permanent) for m in ledger.missing_entries()] == [(r, 1, False) for r in refs]
    assert {m.reason for m in ledger.missing_entries()} == {
        "the PACS did not send it (status 0xC000 (unable to process))"}

    second = nightly_ingest()  # asked for again: still refused, now given up
    assert (second["queued"], second["cataloged"], second["missing_objects"]) == (1, 1, 2)
    assert [(m.attempts, m.permanent) for m in ledger.missing_entries()] == [(2, True), (2, True)]
    assert query(lake.catalog, "SELECT count(*) FROM instances").column(0)[0].as_py() == len(files) - 2

    third = nightly_ingest()
    assert (third["queued"], third["failed"]) == (0, 0)
