"""Two nightly runs under Prefect against a real Orthanc: a run history of two rows, each run's
report page beside the catalog, its artifacts (the charts, a link to the page), and `pacsflow report`."""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pacsflow.deployments.local import sampledata
from pacsflow.flows.cli import app
from pacsflow.flows.nightly import nightly_ingest
from pacsflow.tasks.ingest.history import RunHistory, history_path

pytestmark = pytest.mark.integration

TODAY = dt.date.today()
NO_US = ("CT", "MR", "MG")  # ultrasound with burned-in text is quarantined: keep exact counts simple


def _seed(lake, out: Path, **kw) -> list[sampledata.StudySummary]:
    studies = sampledata.generate(out, end_date=TODAY, modalities=NO_US, **kw)
    sampledata.load([out], "127.0.0.1", lake.orthanc.dicom_port)
    return studies


def _run() -> tuple[dict, dict[str, str]]:
    """One flow run: its result and its artifacts (key -> data)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state = nightly_ingest(return_state=True)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return state.result(), {a.key: str(a.data) for a in artifacts if a.key}


def _instances_by_modality(studies: list[sampledata.StudySummary]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for s in studies:
        counts[s.modality] += s.n_instances
    return dict(counts)


def test_two_nights_make_a_history_a_report_and_its_artifacts(lake, tmp_path, monkeypatch):
    first_studies = _seed(lake, tmp_path / "in1", studies=3, days=3, seed=61)
    first, first_artifacts = _run()
    later_studies = _seed(lake, tmp_path / "in2", studies=2, days=2, seed=62)
    second, artifacts = _run()
    assert (first["cataloged"], second["cataloged"]) == (3, 2)

    runs = RunHistory(history_path(lake.state)).last(10)
    assert [r.run_id for r in runs] == [first["run_id"], second["run_id"]]
    for run, result, studies in ((runs[0], first, first_studies), (runs[1], second, later_studies)):
        assert {k: run.count(k) for k in ("found", "cataloged", "failed", "instances")} == {
            k: result[k] for k in ("found", "cataloged", "failed", "instances")}
        assert {m.modality: m.instances for m in run.modalities} == _instances_by_modality(studies)
        assert sum(m.studies for m in run.modalities) == len(studies)

    page = lake.catalog / "_reports" / f"{second['run_id']}.html"
    html = page.read_text()
    assert first["run_id"] in html and second["run_id"] in html  # the trend holds both nights
    assert (lake.catalog / "_reports" / "nightly-latest.html").read_text() == html
    assert (lake.catalog / "_reports" / f"{first['run_id']}.html").is_file()

    for keys in (first_artifacts, artifacts):
        assert {"nightly-run-report", "nightly-run-report-page"} <= set(keys)
    assert page.resolve().as_uri() in artifacts["nightly-run-report-page"]
    images = re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", artifacts["nightly-run-report"])
    assert len(images) == 6 and b"<svg" in base64.b64decode(images[0])

    # No PHI in what the report keeps or shows: not the original UIDs, not the patients' IDs.
    kept = html + artifacts["nightly-run-report"] + history_path(lake.state).read_bytes().decode("latin-1")
    for s in first_studies + later_studies:
        assert s.study_uid not in kept and s.patient_id not in kept

    monkeypatch.setenv("COLUMNS", "200")
    done = CliRunner().invoke(app, ["report", "--nights", "1"])
    assert done.exit_code == 0, done.output
    written = Path(done.output.strip())
    assert written == lake.catalog / "_reports" / "nightly-last-1.html"
    assert second["run_id"] in written.read_text() and first["run_id"] not in written.read_text()


def test_report_without_a_history_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(tmp_path / "catalog"))
    done = CliRunner().invoke(app, ["report"])
    assert done.exit_code == 1 and "no run history" in done.output
    assert not (tmp_path / "catalog").exists()
