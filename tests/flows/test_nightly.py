"""End to end under Prefect: studies in a real Orthanc → exactly their instances in the catalog."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
from pathlib import Path

import pydicom
import pytest

from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.compact import compact_catalog
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.tasks.ingest.ledger import Ledger

pytestmark = pytest.mark.integration

TODAY = dt.date.today()
NO_US = ("CT", "MR", "MG")  # ultrasound with burned-in text is quarantined: keep exact counts simple


def _seed(lake, out: Path, **kw) -> list[sampledata.StudySummary]:
    studies = sampledata.generate(out, **kw)
    sampledata.load([out], "127.0.0.1", lake.orthanc.dicom_port)
    return studies


def _count(lake, sql: str, params=None) -> int:
    return query(lake.catalog, sql, params).column(0)[0].as_py()


def _identifiers(paths: list[Path]) -> set[bytes]:
    """Every original identifying value, as encoded in the files: names, IDs, accession
    numbers, birth dates, institution, and the study/series/instance UIDs."""
    found: set[bytes] = set()
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        found.add(ds.PatientName.original_string)
        for kw in ("PatientID", "AccessionNumber", "PatientBirthDate", "InstitutionName", "StudyInstanceUID",
                   "SeriesInstanceUID", "SOPInstanceUID", "DeviceSerialNumber"):
            found.add(str(ds.get(kw, "")).encode())
    return {v for v in found if len(v) >= 6}


def _persisted_results() -> list[Path]:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    root = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _burned_in(paths: list[Path]) -> int:
    return sum(pydicom.dcmread(p, stop_before_pixels=True).get("BurnedInAnnotation") == "YES" for p in paths)


def test_first_run_catalogs_every_instance_and_a_second_run_changes_nothing(lake, tmp_path, caplog):
    studies = _seed(lake, tmp_path / "in", studies=6, days=5, end_date=TODAY, seed=3)
    burned = _burned_in(sorted((tmp_path / "in").rglob("*.dcm")))
    assert burned  # the sample has ultrasound with burned-in annotation: it must not leave
    expected = sum(s.n_instances for s in studies) - burned

    caplog.set_level("DEBUG")
    result = nightly_ingest()

    # Nothing identifying in the logs or the returned result: not names, IDs, nor original UIDs.
    text = caplog.text + repr(result)
    for s in studies:
        assert s.study_uid not in text and s.patient_id not in text

    assert (result["found"], result["cataloged"], result["failed"]) == (6, 6, 0)
    assert result["instances"] == expected
    assert result["quarantined_objects"] == burned
    quarantine = Ledger(lake.state / "ledger.sqlite").quarantine_entries()
    assert len(quarantine) == burned and all("burned" in q["reason"].lower() for q in quarantine)
    assert _count(lake, "SELECT count(*) FROM instances WHERE burned_in_annotation") == 0
    assert _count(lake, "SELECT count(*) FROM studies") == 6
    assert _count(lake, "SELECT count(*) FROM instances") == expected
    assert _count(lake, "SELECT count(DISTINCT sop_instance_uid) FROM instances") == expected
    assert _count(lake, "SELECT sum(number_of_instances) FROM series") == expected

    # The lake holds exactly those de-identified files, and the catalog's hashes match them.
    rows = query(lake.catalog, "SELECT file_path, file_size, file_sha256 FROM instances").to_pylist()
    on_disk = sorted(lake.storage.rglob("*.dcm"))
    assert len(on_disk) == expected
    for row in rows[:25]:
        data = Path(row["file_path"]).read_bytes()
        assert len(data) == row["file_size"] and hashlib.sha256(data).hexdigest() == row["file_sha256"]

    # No original patient identifier in any stored file or catalog file; DCMTK reads the output.
    originals = _identifiers(sorted((tmp_path / "in").rglob("*.dcm")))
    assert len(originals) > expected  # every instance contributes at least its SOP UID
    for path in on_disk + sorted(lake.catalog.rglob("*.parquet")) + _persisted_results():
        data = path.read_bytes()
        assert not any(v in data for v in originals), path.name
    text = caplog.text
    assert not any(v.decode("latin-1") in text for v in originals)
    dump = subprocess.run(["dcmdump", "+E", str(on_disk[0])], capture_output=True, text=True, errors="replace")
    assert dump.returncode == 0 and "PatientIdentityRemoved" in dump.stdout

    # Staging (PHI zone) is purged after cataloging.
    assert not any((lake.state / "staging").rglob("*.dcm"))

    version = CatalogStore(lake.catalog).snapshot_version
    again = nightly_ingest()
    assert (again["queued"], again["cataloged"], again["failed"]) == (0, 0, 0)
    assert CatalogStore(lake.catalog).snapshot_version == version
    assert _count(lake, "SELECT count(*) FROM instances") == expected
    assert len(sorted(lake.storage.rglob("*.dcm"))) == expected

    # Compaction keeps every row and leaves one file per partition and table.
    stats = compact_catalog(vacuum_grace_s=0)
    assert _count(lake, "SELECT count(*) FROM instances") == expected
    store = CatalogStore(lake.catalog)
    for table in ("studies", "series", "instances"):
        parts = [Path(f).parent.name for f in store.files(table)]
        assert len(parts) == len(set(parts)), table
    assert stats


def test_only_new_and_grown_studies_are_processed(lake, tmp_path):
    studies = _seed(lake, tmp_path / "in", studies=4, days=4, end_date=TODAY, seed=5, modalities=NO_US)
    first = nightly_ingest()
    assert first["cataloged"] == 4
    assert Ledger(lake.state / "ledger.sqlite").watermark == TODAY

    # A late study dated inside the overlap window, and a new series in a study already cataloged.
    late = _seed(lake, tmp_path / "late", studies=1, days=1, end_date=TODAY - dt.timedelta(days=1), seed=77, modalities=NO_US)
    grown = max(studies, key=lambda s: s.study_date)
    series = sampledata.add_series(grown, tmp_path / "added", instances=5, seed=9)
    sampledata.load([series.path], "127.0.0.1", lake.orthanc.dicom_port)
    before = _count(lake, "SELECT count(*) FROM instances")

    second = nightly_ingest()

    assert (second["queued"], second["cataloged"], second["failed"]) == (2, 2, 0)
    assert second["instances"] == late[0].n_instances + grown.n_instances + 5
    after = _count(lake, "SELECT count(*) FROM instances")
    assert after == before + late[0].n_instances + 5
    assert _count(lake, "SELECT count(DISTINCT sop_instance_uid) FROM instances") == after
    assert _count(lake, "SELECT count(*) FROM studies") == 5
    assert _count(lake, "SELECT max(number_of_series) FROM studies WHERE number_of_instances = $1",
                  [grown.n_instances + 5]) == grown.n_series + 1


def test_a_failing_study_is_reported_and_retried_next_run(lake, tmp_path):
    studies = _seed(lake, tmp_path / "in", studies=4, days=3, end_date=TODAY, seed=11, modalities=NO_US)
    broken = studies[1]
    lake.orthanc.break_study(broken.study_uid)

    result = run_result(nightly_ingest(return_state=True))

    assert (result["found"], result["cataloged"], result["failed"]) == (4, 3, 1)
    ledger = Ledger(lake.state / "ledger.sqlite")
    [failed] = ledger.failed()
    assert failed.study_uid == broken.study_uid and "0xC000" in failed.reason and not failed.permanent
    # the watermark holds at the failed study's day, so the window still covers it
    assert ledger.watermark == broken.study_date
    assert _count(lake, "SELECT count(*) FROM studies") == 3

    lake.orthanc.repair_study(broken.study_uid)
    retry = nightly_ingest()

    assert (retry["queued"], retry["cataloged"], retry["failed"]) == (1, 1, 0)
    assert ledger.failed() == []
    assert _count(lake, "SELECT count(*) FROM instances") == sum(s.n_instances for s in studies)
    assert ledger.watermark == TODAY


def test_c_get_retrieves_the_same(lake, tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_RETRIEVE_METHOD", "c-get")
    studies = _seed(lake, tmp_path / "in", studies=3, days=2, end_date=TODAY, seed=21, modalities=NO_US)
    result = nightly_ingest()
    assert (result["cataloged"], result["instances"]) == (3, sum(s.n_instances for s in studies))
    assert _count(lake, "SELECT count(*) FROM instances") == result["instances"]


def test_a_receiver_the_pacs_does_not_know_fails_every_study_permanently_at_once(lake, tmp_path, monkeypatch):
    # Orthanc answers a C-MOVE to an AE it does not know with 0xC000 and no sub-operation (not
    # 0xA801), as it answers a study it cannot read; the same object coming by C-GET tells them apart.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    monkeypatch.setenv("PACSFLOW_RECEIVER__AE_TITLE", "NOSUCHAE")
    studies = _seed(lake, tmp_path / "in", studies=2, days=1, end_date=TODAY, seed=31, modalities=NO_US)

    state = nightly_ingest(return_state=True)

    first = run_result(state)
    assert (first["cataloged"], first["failed"]) == (0, 2)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.type is StateType.FAILED
    assert run.state.message == "2 of 2 studies failed (2 move destination unknown)"
    ledger = Ledger(lake.state / "ledger.sqlite")
    entries = list(ledger.entries().values())
    port = lake.receiver_port
    assert all(e.permanent and e.attempts == 1 and e.reason.startswith("MoveDestinationUnknown: C-MOVE for study ")
               and e.reason.endswith(f"the PACS may not know our move destination NOSUCHAE at 127.0.0.1:{port}; "
                                     "check receiver.ae_title and the PACS's modality list") for e in entries)
    assert len(ledger.quarantine_entries()) == 2
    assert ledger.watermark == TODAY  # a permanent failure does not hold it
    assert not any(s.study_uid in e.reason for s in studies for e in entries)
    again = run_result(nightly_ingest(return_state=True))
    assert (again["queued"], again["failed"]) == (0, 0)  # nothing changed at the PACS: not asked for again


def test_fhir_sync_follows_the_catalog_and_survives_an_outage(lake, tmp_path, monkeypatch, hapi):
    import uuid

    import httpx

    from tests.helpers import free_port

    system = f"urn:pacsflow:test:{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PACSFLOW_FHIR__PSEUDONYM_SYSTEM", system)
    monkeypatch.setenv("PACSFLOW_FHIR__MAX_RETRIES", "0")
    monkeypatch.setenv("PACSFLOW_FHIR__BASE_URL", f"http://127.0.0.1:{free_port()}/fhir")  # nothing listens
    studies = _seed(lake, tmp_path / "in", studies=3, days=2, end_date=TODAY, seed=61, modalities=NO_US)

    down = nightly_ingest()
    assert (down["cataloged"], down["fhir_sent"], down["fhir_failed"]) == (3, 0, 3)

    monkeypatch.setenv("PACSFLOW_FHIR__BASE_URL", hapi.base_url)
    up = nightly_ingest()  # nothing new at the PACS: only what FHIR is owed is sent
    assert (up["queued"], up["fhir_sent"], up["fhir_failed"], up["fhir_differences"]) == (0, 3, 0, 0)

    uids = [r["study_uid"] for r in query(lake.catalog, "SELECT study_uid FROM studies").to_pylist()]
    for uid in uids:
        found = httpx.get(f"{hapi.base_url}/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{uid}"},
                          timeout=60).json()
        assert found.get("total") == 1
        [entry] = found["entry"]
        counts = query(lake.catalog, "SELECT number_of_series, number_of_instances FROM studies WHERE study_uid = $1",
                       [uid]).to_pylist()[0]
        assert entry["resource"]["numberOfSeries"] == counts["number_of_series"]
        assert entry["resource"]["numberOfInstances"] == counts["number_of_instances"]
    patients = httpx.get(f"{hapi.base_url}/Patient", params={"identifier": f"{system}|", "_summary": "count"},
                         timeout=60).json()
    assert patients["total"] == len({s.patient_id for s in studies})

    again = nightly_ingest()
    assert (again["fhir_sent"], again["fhir_failed"]) == (0, 0)
