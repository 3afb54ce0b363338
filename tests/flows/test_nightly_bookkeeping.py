"""The nightly flow's bookkeeping under the real Prefect engine, against the in-process fake PACS
(tests/net/fake_pacs.py) instead of Orthanc: what the ledger, the watermark, the catalog and the
run's result and artifacts say after clean, failing and quarantined studies."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import NightlyRun, RunParts, nightly_ingest, release_task_runs, run_result
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.settings import load_settings
from tests.helpers import free_port
from tests.net.fake_pacs import FakePacs, held_files

TODAY = dt.date.today()
NO_US = ("CT", "MR", "MG")  # ultrasound carries burned-in text: quarantined
RESULT_KEYS = {"run_id", "window", "outcome", "message", "cataloged_partial", "found", "pacs_queries", "queued",
               "retrieved", "deidentified", "cataloged", "failed", "instances", "quarantined_objects", "missing_objects",
               "rejected_objects", "fhir_sent", "fhir_failed", "fhir_differences", "xdsi_published", "xdsi_failed",
               "seconds", "instances_per_second"}
ARTIFACT_KEYS = {"nightly-deid-manifest", "nightly-ingest-summary", "nightly-ingest-studies", "nightly-progress",
                 "nightly-run-report", "nightly-run-report-page"}


@dataclass
class Site:
    pacs: FakePacs
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def catalog(self) -> Path:
        return self.root / "lake" / "catalog"

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.state / "ledger.sqlite")

    def seed(self, name: str, **kw) -> list[sampledata.StudySummary]:
        studies = sampledata.generate(self.root / name, end_date=TODAY, **kw)
        self.pacs.add_files(held_files(self.root / name))
        return studies

    def count(self, sql: str) -> int:
        return query(self.catalog, sql).column(0)[0].as_py()


@pytest.fixture
def site(tmp_path, monkeypatch, prefect_api):
    receiver_port = free_port()
    with FakePacs() as pacs:
        pacs.add_destination("PACSFLOW", receiver_port)
        env = {
            "PACSFLOW_PACS__PORT": str(pacs.port),
            "PACSFLOW_PACS__CALLED_AE": pacs.ae_title,
            "PACSFLOW_PACS__TIMEOUT_S": "10",
            "PACSFLOW_RECEIVER__PORT": str(receiver_port),
            "PACSFLOW_STORAGE_ROOT": str(tmp_path / "lake" / "dicom"),
            "PACSFLOW_CATALOG_ROOT": str(tmp_path / "lake" / "catalog"),
            "PACSFLOW_STATE_ROOT": str(tmp_path / "state"),
            "PACSFLOW_DEID_KEY": "fake-pacs-test-key-0123456789",
            "PACSFLOW_RETRY_DELAY_S": "0.1",
            "PACSFLOW_RETRIEVE_RETRIES": "0",
            "PACSFLOW_DEID_WORKERS": "0",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        yield Site(pacs, tmp_path)


def _run() -> tuple[dict, list[dict]]:
    """One flow run: its result (whatever its state) and its artifacts (key and data)."""
    state = nightly_ingest(return_state=True)
    return run_result(state), _artifacts(state.state_details.flow_run_id)


def _artifacts(flow_run_id) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return [{"key": a.key, "data": a.data} for a in artifacts]


def _flow_run(state):
    """The flow run as the Prefect API has it (what the UI shows)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


@pytest.mark.parametrize(("method", "workers"), [("c-move", "1"), ("c-get", "0")])
def test_a_clean_run_catalogs_every_study_and_advances_the_watermark(site, monkeypatch, method, workers):
    monkeypatch.setenv("PACSFLOW_RETRIEVE_METHOD", method)
    monkeypatch.setenv("PACSFLOW_DEID_WORKERS", workers)
    studies = site.seed("in", studies=3, days=3, seed=41, modalities=NO_US)
    instances = sum(s.n_instances for s in studies)

    result, artifacts = _run()

    assert set(result) == RESULT_KEYS and result["outcome"] == "completed"
    assert result["pacs_queries"] >= 1  # discovery's C-FIND requests
    assert (result["found"], result["queued"], result["retrieved"], result["cataloged"], result["failed"]) == (
        3, 3, 3, 3, 0)
    assert result["instances"] == instances == site.count("SELECT count(*) FROM instances")
    assert site.count("SELECT count(*) FROM studies") == 3
    entries = site.ledger.entries()
    assert {uid: (e.status, e.instances) for uid, e in entries.items()} == {
        s.study_uid: ("cataloged", s.n_instances) for s in studies
    }
    assert site.ledger.watermark == TODAY
    assert not any((site.state / "staging").rglob("*.dcm")) and not list((site.state / "runs").glob("*"))
    assert {a["key"] for a in artifacts} == ARTIFACT_KEYS
    assert not any(s.study_uid in repr(artifacts) + repr(result) for s in studies)

    again, _ = _run()
    assert (again["found"], again["queued"], again["cataloged"]) == (3, 0, 0)
    assert site.count("SELECT count(*) FROM instances") == instances


def test_a_transient_failure_holds_the_watermark_and_is_retried_next_run(site):
    studies = sorted(site.seed("in", studies=3, days=3, seed=43, modalities=NO_US), key=lambda s: s.study_date)
    broken = studies[0]
    assert broken.study_date < TODAY
    site.pacs.fail_study(broken.study_uid)

    first, _ = _run()

    assert (first["found"], first["cataloged"], first["failed"]) == (3, 2, 1)
    [failed] = site.ledger.failed()
    assert failed.study_uid == broken.study_uid and not failed.permanent and "0xC000" in failed.reason
    assert site.ledger.watermark == broken.study_date
    assert site.count("SELECT count(*) FROM studies") == 2

    site.pacs.repair_study(broken.study_uid)
    second, _ = _run()

    assert (second["queued"], second["cataloged"], second["failed"]) == (1, 1, 0)
    assert site.pacs.retrieve_count(broken.study_uid) == 2
    assert site.ledger.failed() == []
    assert site.ledger.watermark == TODAY
    assert site.count("SELECT count(*) FROM instances") == sum(s.n_instances for s in studies)


def test_a_study_whose_grouped_retrieval_failed_is_tried_again_alone_within_its_retries(site, monkeypatch):
    """Small studies are fetched several to a task; one that fails there transiently is tried again
    in a task of its own, which has the rest of its tries (retrieve_retries after the first)."""
    _fresh_events_worker()
    monkeypatch.setenv("PACSFLOW_RETRIEVE_RETRIES", "2")
    studies = sorted(site.seed("in", studies=3, days=3, seed=53, modalities=NO_US), key=lambda s: s.study_date)
    flaky, broken = studies[0], studies[1]
    site.pacs.fail_study(flaky.study_uid, times=2)  # the group's try and the first of its own
    site.pacs.fail_study(broken.study_uid)

    state = nightly_ingest(return_state=True)
    result = run_result(state)

    assert (result["cataloged"], result["failed"]) == (2, 1)
    assert site.pacs.retrieve_count(flaky.study_uid) == 2  # its second whole-study try brought it
    assert site.pacs.retrieve_count(broken.study_uid) == 3  # 1 + retrieve_retries, as a study alone has
    assert site.pacs.retrieve_count(studies[2].study_uid) == 1
    names = _task_run_names(state.state_details.flow_run_id, "retrieve", 3)
    assert sum(n.startswith("retrieve 3 studies (") for n in names) == 1, names
    assert site.count("SELECT count(*) FROM instances") == flaky.n_instances + studies[2].n_instances


def test_a_study_failing_max_attempts_runs_becomes_permanent(site, monkeypatch):
    monkeypatch.setenv("PACSFLOW_MAX_ATTEMPTS", "2")
    studies = sorted(site.seed("in", studies=2, days=2, seed=47, modalities=NO_US), key=lambda s: s.study_date)
    broken = studies[0]
    site.pacs.fail_study(broken.study_uid)

    first, _ = _run()
    assert (first["cataloged"], first["failed"]) == (1, 1)
    assert site.ledger.watermark == broken.study_date and site.ledger.quarantine_entries() == []

    second, _ = _run()
    assert (second["queued"], second["failed"]) == (1, 1)
    entry = site.ledger.entries()[broken.study_uid]
    assert entry.permanent and entry.reason.startswith("gave up after 2 runs") and entry.attempts == 2
    [quarantined] = site.ledger.quarantine_entries()
    assert quarantined["pseudo_uid"] == entry.pseudo_uid and quarantined["object_ref"] == ""
    assert site.ledger.watermark == TODAY

    third, _ = _run()
    assert third["queued"] == 0
    assert site.pacs.retrieve_count(broken.study_uid) == 2


def test_an_all_quarantined_study_is_recorded_and_does_not_hold_the_watermark(site):
    clean = site.seed("in", studies=2, days=2, seed=53, modalities=NO_US)
    # One series of ultrasound with burned-in text: every object is quarantined.
    [burned] = site.seed("us", studies=1, days=1, seed=59, modalities=("US",), series_per_study=(1, 1))

    result, artifacts = _run()

    assert (result["found"], result["deidentified"], result["cataloged"], result["failed"]) == (3, 3, 2, 1)
    assert result["quarantined_objects"] == burned.n_instances
    entry = site.ledger.entries()[burned.study_uid]
    assert (entry.status, entry.permanent, entry.reason) == ("failed", True, "all objects quarantined")
    quarantine = site.ledger.quarantine_entries()
    assert sorted(bool(q["object_ref"]) for q in quarantine) == [False] + [True] * burned.n_instances
    assert all(q["pseudo_uid"] == entry.pseudo_uid for q in quarantine)
    assert len(list((site.state / "quarantine" / entry.pseudo_uid).glob("*.dcm"))) == burned.n_instances
    assert site.ledger.watermark == TODAY
    assert site.count("SELECT count(*) FROM instances") == sum(s.n_instances for s in clean)
    [table] = [a for a in artifacts if a["key"] == "nightly-ingest-studies"]
    assert sorted(row["outcome"] for row in json.loads(table["data"])) == ["cataloged", "cataloged", "quarantined"]

    again, _ = _run()
    assert again["queued"] == 0  # the PACS still reports the same count: it waits for an operator


@pytest.fixture
def wrong_fhir_url():
    """An HTTP server that answers 404 to everything: a FHIR base URL that is wrong, which the FHIR
    step records per study without retrying (nothing listening would cost its retry delays)."""

    class NotFound(BaseHTTPRequestHandler):
        def _404(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = _404

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


def test_the_fhir_step_is_given_the_catalog_study_uids(site, monkeypatch, wrong_fhir_url):
    # Under Retain UIDs the catalog's StudyInstanceUIDs are the originals, not the pseudonymous
    # study refs: the FHIR step must be owed exactly those (a UID it cannot find in the catalog
    # would be recorded as "not in the catalog" instead).
    monkeypatch.setenv("PACSFLOW_DEID__OPTIONS", '["Retain UIDs"]')
    monkeypatch.setenv("PACSFLOW_FHIR__BASE_URL", wrong_fhir_url)
    monkeypatch.setenv("PACSFLOW_FHIR__MAX_RETRIES", "0")
    studies = site.seed("in", studies=2, days=2, seed=61, modalities=NO_US)

    result, _ = _run()

    assert (result["cataloged"], result["fhir_sent"], result["fhir_failed"]) == (2, 0, 2)
    catalog_uids = {r["study_uid"] for r in query(site.catalog, "SELECT study_uid FROM studies").to_pylist()}
    assert catalog_uids == {s.study_uid for s in studies}
    owed = FhirSyncLedger.under(load_settings().state_root).entries()
    assert set(owed) == catalog_uids
    assert all(e.status == "failed" and "not in the catalog" not in (e.reason or "") for e in owed.values())


def _fresh_events_worker() -> None:
    """Task runs reach the API as events. After a failed flow run in an earlier test of the session,
    Prefect's events worker was seen failing every event it handled: a test that reads task runs
    starts from a fresh one."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=5)


def _task_run_names(flow_run_id, prefix: str, expected: int) -> list[str]:
    """Task runs reach the API through Prefect's events worker, after the flow has returned: wait
    (bounded) until ``expected`` of them with ``prefix`` are there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names = [r.name for r in runs if r.name.startswith(prefix)]
        if len(names) >= expected or time.monotonic() > deadline:
            return names
        time.sleep(0.5)


def test_a_run_whose_studies_all_fail_is_failed_and_counts_them_by_kind(site):
    from prefect.client.schemas.objects import StateType

    from pacsflow.flows.nightly import StudiesFailed

    _fresh_events_worker()
    studies = sorted(site.seed("in", studies=3, days=3, seed=67, modalities=NO_US), key=lambda s: s.study_uid)
    site.pacs.fail_study(studies[0].study_uid)  # 0xC000: transient
    site.pacs.fail_study(studies[1].study_uid)
    site.pacs.fail_study(studies[2].study_uid, 0xA801)  # the PACS does not know our receiver

    state = nightly_ingest(return_state=True)
    result = run_result(state)
    run = _flow_run(state)

    assert run.state.type is StateType.FAILED
    assert run.state.message == "3 of 3 studies failed (2 PACS status, 1 move destination unknown)"
    assert (result["outcome"], result["failed"], result["message"]) == ("failed", 3, run.state.message)
    assert run.name == f"nightly {TODAY.isoformat()} ({result['window']})"
    artifacts = _artifacts(state.state_details.flow_run_id)
    [summary] = [a["data"] for a in artifacts if a["key"] == "nightly-ingest-summary"]
    assert run.state.message in summary
    [table] = [json.loads(a["data"]) for a in artifacts if a["key"] == "nightly-ingest-studies"]
    assert sorted((r["outcome"], r["kind"]) for r in table) == [
        ("failed", "PACS status"), ("failed", "PACS status"), ("failed", "move destination unknown")]
    [refused] = [r for r in table if r["kind"] == "move destination unknown"]
    assert "check receiver.ae_title and the PACS's modality list" in refused["error"]
    # Task runs are short and readable: modality, the de-identified (shifted) date, a short hash.
    # Small studies are fetched together (``retrieve 3 studies (<label> and 2 more)``); with retries,
    # one that failed there transiently is tried again in a task of its own, named after it.
    names = _task_run_names(state.state_details.flow_run_id, "retrieve", len(table))
    labels = {r["label"] for r in table}
    shapes = [re.fullmatch(r"retrieve (?:\d+ studies \((.+) and \d+ more\)|(.+))", n) for n in names]
    assert all(m and (m.group(1) or m.group(2)) in labels for m in shapes), names
    ledger = site.ledger.entries()
    for s in studies:
        label = next(r["label"] for r in table if r["pseudo_uid"] == ledger[s.study_uid].pseudo_uid)
        modality, day, short = label.split(" ")
        assert modality == s.modality and len(short) == 8
        assert day != s.study_date.isoformat()  # shifted, not the original
    assert not any(s.study_uid in repr(table) + run.name + " ".join(names) for s in studies)
    # Called without return_state, the run raises; its result is still there.
    with pytest.raises(StudiesFailed) as raised:
        nightly_ingest()
    assert raised.value.result["failed"] == 2  # the 0xA801 study is permanent: not asked for again
    assert str(raised.value) == "2 of 2 studies failed (2 PACS status)"


def test_a_run_that_cannot_reach_the_pacs_still_writes_its_summary(site, monkeypatch):
    from prefect.client.schemas.objects import StateType

    site.seed("in", studies=1, days=1, seed=71, modalities=NO_US)
    monkeypatch.setenv("PACSFLOW_PACS__PORT", str(free_port()))  # nothing listens: discovery fails

    state = nightly_ingest(return_state=True)

    run = _flow_run(state)
    assert run.state.type is StateType.FAILED and "PacsUnavailable" in run.state.message
    artifacts = _artifacts(state.state_details.flow_run_id)
    [summary] = [a["data"] for a in artifacts if a["key"] == "nightly-ingest-summary"]
    assert ": stopped" in summary and "run stopped: PacsUnavailable: no association with PACS FAKEPACS@127.0.0.1" in summary
    assert "nightly-ingest-studies" not in {a["key"] for a in artifacts}  # no study got that far
    with pytest.raises(Exception, match="no association with PACS"):
        run_result(state)


def test_a_study_cataloged_without_a_quarantined_object_is_partial(site):
    import pydicom
    from prefect.client.schemas.objects import StateType

    studies = sampledata.generate(site.root / "in", end_date=TODAY, studies=2, days=2, seed=73, modalities=("CT",))
    files = held_files(site.root / "in")
    flagged = pydicom.dcmread(files[0])
    flagged.BurnedInAnnotation = "YES"  # one object of one study: quarantined by the default pixel policy
    flagged.save_as(files[0])
    site.pacs.add_files(files)

    state = nightly_ingest(return_state=True)

    result = run_result(state)
    run = _flow_run(state)
    assert (run.state.type, run.state.name) == (StateType.COMPLETED, "Partial")
    assert (result["outcome"], result["cataloged"], result["cataloged_partial"], result["failed"]) == (
        "partial", 2, 1, 0)
    assert run.state.message == ("2 of 2 studies cataloged, 1 of them partly (1 objects quarantined, "
                                 "0 not sent by the PACS)")
    artifacts = _artifacts(state.state_details.flow_run_id)
    [table] = [json.loads(a["data"]) for a in artifacts if a["key"] == "nightly-ingest-studies"]
    assert sorted((r["outcome"], r["quarantined"]) for r in table) == [("cataloged", 0), ("cataloged-partial", 1)]
    [progress] = [a["data"] for a in artifacts if a["key"] == "nightly-progress"]
    assert float(progress) == 100.0
    assert site.count("SELECT count(*) FROM instances") == sum(s.n_instances for s in studies) - 1


def test_what_prefect_keeps_of_a_finished_task_run_is_released(prefect_api):
    from prefect import flow, task
    from prefect.context import FlowRunContext

    @task
    def outcome(n: int) -> list[list[int]]:
        return [list(range(n))]

    def linked(task_run_id) -> int:
        ctx = FlowRunContext.get()
        states = sum(state.state_details.task_run_id == task_run_id for state, *_ in ctx.run_results.values())
        return states + (task_run_id in ctx.task_run_assets)

    @flow
    def night() -> list[int]:
        kept, released = outcome.submit(3), outcome.submit(4)
        kept.result(), released.result()
        before = [linked(kept.task_run_id), linked(released.task_run_id)]
        release_task_runs({released.task_run_id})
        return before + [linked(kept.task_run_id), linked(released.task_run_id)]

    # The result and its list are linked to the task run's state, and its assets (none) kept, until
    # released (a night of thousands of studies would keep every one of them).
    assert night() == [3, 3, 3, 0]


def test_the_manifest_artifact_lists_a_bounded_number_of_quarantined_objects_and_counts_them_all(tmp_path):
    from pacsflow.tasks.deid.deidentifier import Deidentifier
    from pacsflow.tasks.ingest.bookkeeping import STUDY_ROWS, RunBook
    from pacsflow.tasks.lake.study import StudyOutcome
    from pacsflow.tasks.pacs.planning import Window, WorkItem

    ledger = Ledger(tmp_path / "ledger.sqlite")
    book = RunBook(ledger, "r1", Window(TODAY, TODAY), max_attempts=3, object_id=lambda rel: f"id({rel})")
    items = [WorkItem(f"1.2.840.{n}", f"2.25.{n}", "20261105", 3, "new") for n in range(3)]
    book.planned(3, items)
    for item in items:  # ultrasound nights: every object quarantined
        book.deidentified(item, StudyOutcome(item.pseudo_uid, quarantined=[(f"{i}.dcm", "BurnedIn") for i in range(90)]))
    book.settle()
    run = NightlyRun("r1", b"k" * 32, Deidentifier(b"k" * 32), ledger, None, tmp_path)  # type: ignore[arg-type]
    manifest = RunParts("r1", run=run, book=book).manifest()
    assert manifest is not None and manifest["quarantined_count"] == 270 and manifest["files"] == 270
    assert len(manifest["quarantined"]) == STUDY_ROWS and len(ledger.quarantine_entries()) == 273
