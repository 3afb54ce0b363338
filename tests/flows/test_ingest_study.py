"""The ingest-study flow under Prefect: a hand-off folder of originals → lake files and catalog rows,
a study growing over two generations, quarantine, and nothing identifying in run names or parameters."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pydicom
import pytest
from prefect.client.orchestration import get_client

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.ingest_study import ingest_study
from pacsflow.flows.nightly import run_result
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.handoff import handoff_dir
from pacsflow.tasks.settings import Settings, load_settings

pytestmark = pytest.mark.integration


def _ref(settings: Settings, study_uid: str) -> str:
    return Deidentifier.from_settings(settings.resolve_deid_key(), settings.deid).study_ref(study_uid)


def _hand_off(settings: Settings, ref: str, generation: int, files: list[Path]) -> Path:
    """What the listener does: hard links of the originals, flat, in the generation's folder."""
    folder = handoff_dir(settings, ref, generation)
    folder.mkdir(parents=True)
    for f in files:
        os.link(f, folder / f.name)
    return folder


def _rows(lake, sql: str, *params) -> list[dict]:
    return query(lake.catalog, sql, list(params)).to_pylist()


def _run(study: str, generation: int):
    state = ingest_study(study=study, generation=generation, return_state=True)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    return state, run


def _study(tmp_path: Path, series: int = 2, instances: int = 3) -> sampledata.StudySummary:
    [study] = sampledata.generate(tmp_path / "in", studies=1, series_per_study=(series, series),
                                  instances_per_series=(instances, instances), modalities=("CT",),
                                  end_date=dt.date.today(), seed=21)
    return study


def _identifying(files: list[Path]) -> set[str]:
    out: set[str] = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out |= {str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                str(ds.AccessionNumber)}
    return {v for v in out if len(v) >= 4}


def test_two_generations_of_a_study_make_one_study_with_every_series(lake, tmp_path):
    settings = load_settings()
    study = _study(tmp_path)
    ref = _ref(settings, study.study_uid)
    first = sorted(study.path.rglob("*.dcm"))
    folder = _hand_off(settings, ref, 1, first)

    state, run = _run(ref, 1)
    result = run_result(state)
    assert state.is_completed() and state.name == "Completed"
    assert (result["objects"], result["written"], result["quarantined"], result["earlier_instances"]) == (6, 6, 0, 0)
    assert not folder.exists()
    assert len(list(lake.storage.rglob("*.dcm"))) == 6
    [row] = _rows(lake, "SELECT study_uid, number_of_series, number_of_instances, modalities FROM studies")
    assert (row["number_of_series"], row["number_of_instances"], row["modalities"]) == (2, 6, ["CT"])

    # The study goes on: a new MR series arrives after it was stable; generation 2 holds it, and
    # (a listener that re-sends is harmless) one object of generation 1 again.
    added = sampledata.add_series(study, tmp_path / "late", instances=4, modality="MR")
    second = sorted(added.path.glob("*.dcm")) + first[:1]
    _hand_off(settings, ref, 2, second)
    state, run2 = _run(f"pacsflow.study.{ref}", 2)  # the event's resource id works as well
    result = run_result(state)
    assert (result["written"], result["earlier_instances"]) == (5, 6)

    [row] = _rows(lake, "SELECT study_uid, number_of_series, number_of_instances, modalities FROM studies")
    assert (row["number_of_series"], row["number_of_instances"], row["modalities"]) == (3, 10, ["CT", "MR"])
    counts = _rows(lake, "SELECT modality, number_of_instances AS n FROM series ORDER BY modality, n")
    assert [(c["modality"], c["n"]) for c in counts] == [("CT", 3), ("CT", 3), ("MR", 4)]
    [inst] = _rows(lake, "SELECT count(*) AS n, count(DISTINCT sop_instance_uid) AS d, "
                         "count(DISTINCT series_uid) AS s FROM instances WHERE study_uid = ?", row["study_uid"])
    assert (inst["n"], inst["d"], inst["s"]) == (10, 10, 3)
    assert len(list(lake.storage.rglob("*.dcm"))) == 10

    # Nothing identifying in what Prefect keeps of the runs: their names and parameters.
    assert run.name == f"ingest-study {ref} #1" and run2.name == f"ingest-study {ref} #2"
    shown = repr((run.name, run.parameters, run2.name, run2.parameters, result))
    assert not [v for v in _identifying(first + second) if v in shown]


def test_an_undecodable_object_is_quarantined_and_the_rest_goes_in(lake, tmp_path):
    settings = load_settings()
    study = _study(tmp_path, series=1)
    ref = _ref(settings, study.study_uid)
    folder = _hand_off(settings, ref, 1, sorted(study.path.rglob("*.dcm")))
    (folder / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)

    state, _ = _run(ref, 1)
    result = run_result(state)
    assert state.is_completed() and state.name == "Partial"
    assert (result["objects"], result["written"], result["quarantined"]) == (4, 3, 1)
    assert (settings.quarantine_dir / ref / "broken.dcm").is_file()
    assert _rows(lake, "SELECT number_of_instances AS n FROM studies") == [{"n": 3}]
    assert not folder.exists()


def test_a_study_of_nothing_but_undecodable_objects_fails_the_run(lake, tmp_path):
    settings = load_settings()
    ref = _ref(settings, "1.2.3.4.5")
    folder = handoff_dir(settings, ref, 3)
    folder.mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"not dicom at all")

    state, _ = _run(ref, 3)
    assert state.is_failed()
    assert run_result(state)["written"] == 0 and run_result(state)["quarantined"] == 1
    assert (settings.quarantine_dir / ref / "a.dcm").is_file()
    assert not lake.catalog.exists() or _rows(lake, "SELECT count(*) AS n FROM studies") == [{"n": 0}]


def test_a_generation_handed_off_twice_is_ingested_once(lake, tmp_path):
    settings = load_settings()
    study = _study(tmp_path, series=1)
    ref = _ref(settings, study.study_uid)
    _hand_off(settings, ref, 1, sorted(study.path.rglob("*.dcm")))
    assert run_result(_run(ref, 1)[0])["written"] == 3
    state, _ = _run(ref, 1)  # the event came again: its folder is gone
    assert state.is_completed() and state.name == "Skipped" and run_result(state)["written"] == 0
    assert _rows(lake, "SELECT number_of_instances AS n FROM studies") == [{"n": 3}]


def test_parameters_that_are_no_pseudonym_fail_without_being_shown(lake):
    state, run = _run("Doe^Jane 19570102", 1)
    assert state.is_failed()
    assert run.name == "ingest-study (invalid parameters)"
    assert "Doe" not in (state.message or "")


@pytest.mark.parametrize("given", ["", "1.2.3", "2.25.", "2.25.01", "2.25.1/../../etc", "2.25.1 x", "Doe^Jane",
                                   "pacsflow.study.", "2.25." + "9" * 40])
def test_only_a_study_pseudonym_names_a_hand_off_folder(given, tmp_path):
    settings = Settings(state_root=tmp_path)
    with pytest.raises(ValueError) as caught:
        handoff_dir(settings, given, 1)
    assert str(caught.value).startswith("not a pseudonymous study ref") and "Doe" not in str(caught.value)
    ref = "2.25.123456789"
    assert handoff_dir(settings, f"pacsflow.study.{ref}", 2) == tmp_path / "listener" / "handoff" / f"{ref}-2"
    with pytest.raises(ValueError):
        handoff_dir(settings, ref, 0)
