"""Batch planning for the FHIR sync (tasks.fhir_sync.plan_batches) on a catalog built by the real pieces."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.catalog.views import connect
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.fhir.sync import plan_batches
from tests.helpers import build_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("fhirbatches")
    studies = build_catalog(root, key=b"fhir-batch-test-key-0123456789", studies=12, patients=3, days=30,
                            end_date=dt.date(2026, 11, 27), seed=5, instances_per_series=(1, 2),
                            modalities=("CT", "MR", "MG"))
    assert len(studies) == 12
    con = connect(root / "catalog")
    patient_of = dict(con.execute("SELECT study_uid, patient_pseudo_id FROM studies").fetchall())
    yield con, patient_of, FhirSyncLedger(root / "state" / "fhir.sqlite")
    con.close()


def test_a_patients_studies_are_contiguous_so_bundles_repeat_few_patients(catalog):
    con, patient_of, ledger = catalog
    assert len(set(patient_of.values())) == 3
    batches = plan_batches(con, ledger, batch_size=4)
    flat = [uid for b in batches for uid in b]
    assert sorted(flat) == sorted(patient_of)
    assert all(0 < len(b) <= 4 for b in batches)
    runs = [p for i, p in enumerate(patient_of[u] for u in flat) if i == 0 or patient_of[flat[i - 1]] != p]
    assert len(runs) == 3, "each patient's studies follow one another"
    patient_entries = sum(len({patient_of[u] for u in b}) for b in batches)
    assert patient_entries <= 3 + len(batches) - 1


def test_given_studies_keep_patient_order_and_the_instance_budget(catalog):
    con, patient_of, ledger = catalog
    some = sorted(patient_of)[::2]
    batches = plan_batches(con, ledger, some, batch_size=50, max_instances=1)
    assert all(len(b) == 1 for b in batches), "a study over the instance budget is a batch of its own"
    flat = [b[0] for b in batches]
    assert sorted(flat) == some
    assert [patient_of[u] for u in flat] == sorted(patient_of[u] for u in flat)
    assert plan_batches(con, ledger, [], batch_size=50) == []
