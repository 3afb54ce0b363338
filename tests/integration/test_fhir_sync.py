"""FHIR sync against the real HAPI FHIR JPA server (8.8.0, R4), one in-memory server per session.

Catalogs are built by the real pieces (sampledata → process_study → CatalogStore.commit). Every test
uses its own de-identification key (so its own study UIDs) and its own pseudonym system, so the tests
share the server without seeing each other's resources. Faults (server down, 503 + Retry-After) come
from a small in-process reverse proxy in front of the real server, not from a stand-in server.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import logging
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import connect
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.core.errors import FhirConfigurationError, FhirRejected
from pacsflow.tasks.fhir.client import FhirClient, errors_in, redact
from pacsflow.tasks.fhir.mapping import MappingOptions, build_study, resource_json, study_identity
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.fhir.sync import catalog_study_uids, load_study_rows, send_studies, sync_catalog
from pacsflow.tasks.lake.study import process_study, read_rows
from pacsflow.tasks.settings import FhirSettings, Settings, SettingsError, load_settings
from pacsflow.tasks.lake.storage import LakeStorage
from tests.helpers import free_port
from tests.integration.conftest import hapi  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def raw_studies(tmp_path_factory) -> list[sampledata.StudySummary]:
    """Twelve original studies (4 patients; CT, MR, MG: ultrasound may be quarantined for burned-in text),
    shared read-only by the tests."""
    root = tmp_path_factory.mktemp("fhir-raw")
    return sampledata.generate(root, studies=12, patients=4, days=20, end_date=dt.date(2026, 11, 27), seed=21,
                               instances_per_series=(2, 4), modalities=("CT", "MR", "MG"))


@pytest.fixture
def client(hapi) -> Iterator[FhirClient]:
    with FhirClient(hapi.base_url, timeout_s=120, max_retries=2, backoff_s=0.05) as c:
        yield c


@dataclass
class Lake:
    root: Path
    key: bytes
    pseudonym_system: str

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def storage(self) -> Path:
        return self.root / "dicom"

    def settings(self, base_url: str, places: dict[str, Any] | None = None, **fhir: Any) -> Settings:
        options = {"base_url": base_url, "pseudonym_system": self.pseudonym_system, "max_retries": 2,
                   "retry_backoff_s": 0.05, "timeout_s": 120, **fhir}
        where = {"catalog_root": self.catalog, "state_root": self.state, **(places or {})}
        return load_settings(storage_root=str(self.storage), fhir=options, **where)

    def ingest(self, study_dirs: list[Path]) -> list[str]:
        """De-identify, store and catalog these original study folders (again: replaces their rows)."""
        deid = Deidentifier(self.key)
        dirs = []
        for d in study_dirs:
            staged = self.root / "staging" / d.name
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
            for f in Path(d).rglob("*.dcm"):
                shutil.copy(f, staged / f.name)
            out = process_study(staged, deid.study_ref(d.name), deid, LakeStorage(self.storage),
                                self.root / "quarantine", self.root / "rows" / d.name)
            assert out.rows_dir and not out.quarantined, (out.written, out.quarantined)
            dirs.append(out.rows_dir)
        CatalogStore(self.catalog).commit(read_rows(dirs))
        return catalog_study_uids(dirs)

    def studies(self) -> list[dict[str, Any]]:
        con = connect(self.catalog)
        try:
            return con.sql("SELECT * FROM studies ORDER BY study_uid").to_arrow_table().to_pylist()
        finally:
            con.close()


@pytest.fixture
def make_lake(tmp_path, request):
    def make(study_dirs: list[Path]) -> Lake:
        tag = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
        lake = Lake(tmp_path / "lake", f"fhir-sync-test-{tag}".encode(), f"urn:pacsflow:test:{uuid.uuid4().hex}")
        lake.ingest(study_dirs)
        return lake
    return make


def count(client: FhirClient, resource_type: str, token: str) -> int:
    return len(client.search_by_identifier(resource_type, [token]))


def patient_token(lake: Lake, pseudo: str) -> str:
    return f"{lake.pseudonym_system}|{pseudo}"


# -- a reverse proxy for faults ------------------------------------------------------------------
class FaultProxy:
    """Forwards to the real server; can answer 503 with Retry-After a number of times first, and records
    the Authorization header it saw. ``stop()`` closes the port (connection refused)."""

    def __init__(self, target_base_url: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.target = target_base_url.split("/fhir")[0]
        self.port = port
        self.tls = tls  # serve HTTPS with this server-side context
        self.unavailable = 0  # answer this many requests with 503 before forwarding
        self.retry_after = "1"
        self.seen_503 = 0
        self.requests: list[tuple[str, str, float]] = []  # (method, path, time)
        self.authorization: list[str | None] = []
        self._http = httpx.Client(timeout=120)
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/fhir"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path, time.monotonic()))
                proxy.authorization.append(self.headers.get("Authorization"))
                if proxy.unavailable > 0:
                    proxy.unavailable -= 1
                    proxy.seen_503 += 1
                    payload = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"}]}'
                    self.send_response(503)
                    self.send_header("Retry-After", proxy.retry_after)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
                resp = proxy._http.request(self.command, proxy.target + self.path, content=body, headers=headers)
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self.stop()
        self._http.close()


# -- the tests --------------------------------------------------------------------------------------
def test_create(hapi, client, raw_studies, make_lake):
    lake = make_lake([s.path for s in raw_studies[:6]])
    report = sync_catalog(lake.settings(hapi.base_url))
    assert report.aborted is None and not report.failed
    assert report.sent == report.selected == 6 and report.skipped_unchanged == 0
    assert report.transactions == 1  # one Bundle for the batch
    assert report.differences == []  # reconciliation: catalog counts == server counts
    rows = lake.studies()
    for st in rows:
        found = client.search_by_identifier("ImagingStudy", [study_identity(st["study_uid"]).token])
        assert len(found) == 1
        assert found[0]["numberOfSeries"] == st["number_of_series"]
        assert found[0]["numberOfInstances"] == st["number_of_instances"]
        patients = client.search_by_identifier("Patient", [patient_token(lake, st["patient_pseudo_id"])])
        assert len(patients) == 1
        assert found[0]["subject"]["reference"] == f"Patient/{patients[0]['id']}"
        assert "name" not in patients[0] and "birthDate" not in patients[0]
    ledger = FhirSyncLedger(lake.state / "fhir_sync.sqlite").entries()
    assert {r.status for r in ledger.values()} == {"synced"} and len(ledger) == 6
    assert all(r.server_id and r.server_id.startswith("pfs-") for r in ledger.values())


def test_replay_leaves_one_resource_per_identity(hapi, client, raw_studies, make_lake):
    lake = make_lake([s.path for s in raw_studies[:6]])
    settings = lake.settings(hapi.base_url, batch_size=4)
    first = sync_catalog(settings)
    assert first.sent == 6 and first.transactions == 2
    again = sync_catalog(settings)
    assert again.sent == 0 and again.skipped_unchanged == 6 and again.transactions == 0
    forced = sync_catalog(settings, force=True)  # the same Bundles once more
    assert forced.sent == 6 and not forced.failed and forced.differences == []
    for st in lake.studies():
        found = client.search_by_identifier("ImagingStudy", [study_identity(st["study_uid"]).token])
        assert len(found) == 1
        assert len(client.history("ImagingStudy", found[0]["id"])) == 1  # no change, no new version
        assert count(client, "Patient", patient_token(lake, st["patient_pseudo_id"])) == 1


def test_study_grows_new_version_with_new_series(hapi, client, raw_studies, make_lake, tmp_path):
    pacs = tmp_path / "pacs"
    for s in raw_studies[:2]:
        shutil.copytree(s.path, pacs / s.path.name)
    lake = make_lake([pacs / s.path.name for s in raw_studies[:2]])
    settings = lake.settings(hapi.base_url)
    assert sync_catalog(settings).sent == 2
    before = {st["study_uid"]: st for st in lake.studies()}

    grown_dir = pacs / raw_studies[0].path.name
    added = sampledata.add_series(grown_dir, pacs, instances=3, seed=5)
    [grown_uid] = lake.ingest([grown_dir])  # re-processed from the PACS folder: rows replaced
    report = sync_catalog(settings)
    assert report.sent == 1 and report.skipped_unchanged == 1 and not report.failed
    assert report.differences == []
    found = client.search_by_identifier("ImagingStudy", [study_identity(grown_uid).token])
    assert len(found) == 1
    study = found[0]
    assert study["numberOfSeries"] == before[grown_uid]["number_of_series"] + 1
    assert study["numberOfInstances"] == before[grown_uid]["number_of_instances"] + added.n_instances
    assert len(study["series"]) == study["numberOfSeries"]
    history = client.history("ImagingStudy", study["id"])
    assert sorted(h["meta"]["versionId"] for h in history) == ["1", "2"]
    patient = client.search_by_identifier("Patient", [patient_token(lake, before[grown_uid]["patient_pseudo_id"])])
    assert len(patient) == 1 and len(client.history("Patient", patient[0]["id"])) == 1


def test_two_syncs_of_the_same_study_at_once_make_one_resource(hapi, client, raw_studies, make_lake):
    lake = make_lake([s.path for s in raw_studies[:3]])
    settings = lake.settings(hapi.base_url, max_retries=6)
    barrier = threading.Barrier(4)
    reports = []

    def run() -> None:
        barrier.wait()
        reports.append(sync_catalog(settings, force=True))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reports) == 4
    for r in reports:
        assert not r.failed and r.aborted is None and r.sent == 3
    for st in lake.studies():
        assert count(client, "ImagingStudy", study_identity(st["study_uid"]).token) == 1
        assert count(client, "Patient", patient_token(lake, st["patient_pseudo_id"])) == 1


def test_bundle_with_one_bad_entry_lands_the_others(hapi, client, raw_studies, make_lake):
    """Two Patients already carry one pseudonym (someone else's doing): the conditional update of that
    Patient is ambiguous (HTTP 412), so its studies fail; the others land; nothing of theirs is committed."""
    lake = make_lake([s.path for s in raw_studies[:8]])
    rows = lake.studies()
    bad_pseudo = rows[0]["patient_pseudo_id"]
    bad = {st["study_uid"] for st in rows if st["patient_pseudo_id"] == bad_pseudo}
    assert 0 < len(bad) < len(rows)
    dupes = []
    for _ in range(2):
        resp = httpx.post(f"{hapi.base_url}/Patient", json={"resourceType": "Patient", "identifier": [
            {"system": lake.pseudonym_system, "value": bad_pseudo}]}, headers={"Content-Type": "application/fhir+json"})
        assert resp.status_code == 201
        dupes.append(resp.json()["id"])

    settings = lake.settings(hapi.base_url)
    report = sync_catalog(settings)
    assert set(report.failed) == bad
    assert report.sent == len(rows) - len(bad) and report.aborted is None
    assert report.transactions > 1  # the Bundle was split until the bad studies were alone
    for uid in bad:
        reason = report.failed[uid]
        assert "FhirRejected" in reason and "412" in reason and "HAPI-2207" in reason
        assert bad_pseudo not in reason  # identifier values are redacted
        assert count(client, "ImagingStudy", study_identity(uid).token) == 0
    for st in rows:
        if st["study_uid"] not in bad:
            assert count(client, "ImagingStudy", study_identity(st["study_uid"]).token) == 1
    ledger = FhirSyncLedger(lake.state / "fhir_sync.sqlite")
    assert set(ledger.failed()) == bad
    assert all(not e.transient for e in ledger.entries(bad).values())

    # Someone fixes the server; the next run retries exactly the failed studies.
    for pid in dupes:
        assert httpx.delete(f"{hapi.base_url}/Patient/{pid}").status_code in (200, 204)
    retry = sync_catalog(settings, only_failed=True)
    assert retry.selected == len(bad) and retry.sent == len(bad) and not retry.failed
    assert ledger.failed() == []


def test_rejected_entry_content_is_isolated_by_bisection(hapi, client, raw_studies, make_lake):
    """An entry the server cannot parse (HTTP 400) fails alone; the rest of the batch is committed."""
    lake = make_lake([s.path for s in raw_studies[:4]])
    con = connect(lake.catalog)
    try:
        rows = load_study_rows(con, [st["study_uid"] for st in lake.studies()])
    finally:
        con.close()
    options = MappingOptions(pseudonym_system=lake.pseudonym_system)
    built = [build_study(*r, options) for r in rows.values()]
    broken = dataclasses.replace(built[1], study_json={**built[1].study_json, "status": "bogus"})
    outcome = send_studies(client, [built[0], broken, built[2], built[3]])
    assert [u for u, _, _ in outcome.failed] == [broken.study_uid]
    reason = outcome.failed[0][1]
    assert "HTTP 400" in reason and "bogus" in reason and outcome.failed[0][2] is False  # permanent
    assert sorted(u for u, _, _ in outcome.synced) == sorted(b.study_uid for b in (built[0], built[2], built[3]))
    assert outcome.transactions == 5  # [0,1,2,3] → [0,1] → [0] [1]; [2,3]
    assert count(client, "ImagingStudy", broken.study_identity.token) == 0


def test_server_down_then_up_sends_failures_without_dicom(hapi, client, raw_studies, make_lake):
    lake = make_lake([s.path for s in raw_studies[:5]])
    proxy = FaultProxy(hapi.base_url, free_port())  # not started: connection refused
    settings = lake.settings(proxy.base_url, batch_size=2, max_retries=1)
    try:
        down = sync_catalog(settings)
        assert down.sent == 0 and down.aborted and "FhirUnavailable" in down.aborted
        assert len(down.failed) == 2 and down.not_attempted == 3  # later batches are not attempted
        ledger = FhirSyncLedger(lake.state / "fhir_sync.sqlite")
        assert all(e.status == "failed" and e.transient for e in ledger.entries().values())

        # The sync reads the catalog only: no de-identified file, no staged original is needed.
        shutil.rmtree(lake.storage)
        shutil.rmtree(lake.root / "staging")
        proxy.start()
        up = sync_catalog(settings)
        assert up.sent == 5 and not up.failed and up.aborted is None and up.differences == []
        assert ledger.failed() == []
        for st in lake.studies():
            assert count(client, "ImagingStudy", study_identity(st["study_uid"]).token) == 1
    finally:
        proxy.close()


def test_503_with_retry_after_is_honoured(hapi, client, raw_studies, make_lake):
    lake = make_lake([s.path for s in raw_studies[:2]])
    proxy = FaultProxy(hapi.base_url, free_port()).start()
    try:
        proxy.unavailable, proxy.retry_after = 1, "1"
        settings = lake.settings(proxy.base_url, retry_backoff_s=0.01)
        report = sync_catalog(settings)
        assert report.sent == 2 and not report.failed
        assert proxy.seen_503 == 1
        (m1, p1, t1), (m2, p2, t2) = proxy.requests[:2]
        # The batch's first request (the search for its Patients, then merged into) sent again.
        assert (m1, p1) == (m2, p2) == ("POST", "/fhir/Patient/_search")
        assert t2 - t1 >= 0.95  # waited for Retry-After, not the 10 ms backoff
    finally:
        proxy.close()


def test_bearer_token_is_sent_and_never_logged(hapi, raw_studies, make_lake, caplog):
    lake = make_lake([s.path for s in raw_studies[:1]])
    proxy = FaultProxy(hapi.base_url, free_port()).start()
    token = "s3cr3t-" + uuid.uuid4().hex
    try:
        caplog.set_level(logging.DEBUG)
        report = sync_catalog(lake.settings(proxy.base_url, token=token))
        assert report.sent == 1
        assert proxy.authorization and set(proxy.authorization) == {f"Bearer {token}"}
        assert token not in caplog.text and token not in repr(lake.settings(proxy.base_url, token=token))
        basic = sync_catalog(lake.settings(proxy.base_url, username="pacsflow", password="pw"), force=True)
        assert basic.sent == 1 and proxy.authorization[-1].startswith("Basic ")
    finally:
        proxy.close()


def test_identifier_search_escapes_commas_and_dollars(hapi, client):
    """A comma separates alternatives in a token search: a value holding one must be escaped, or the
    search for "a,b$c" would find the Patient "a" instead."""
    system = f"urn:pacsflow:test:{uuid.uuid4().hex}"
    for value in ("a,b$c", "a"):
        resp = httpx.post(f"{hapi.base_url}/Patient", json={"resourceType": "Patient", "identifier": [
            {"system": system, "value": value}]}, headers={"Content-Type": "application/fhir+json"})
        assert resp.status_code == 201
    found = client.search_by_identifier("Patient", [f"{system}|a,b$c"])
    assert [i["value"] for p in found for i in p["identifier"]] == ["a,b$c"]
    both = client.search_by_identifier("Patient", [f"{system}|a,b$c", f"{system}|a"])
    assert sorted(i["value"] for p in both for i in p["identifier"]) == ["a", "a,b$c"]


def test_hapi_validate_reports_no_errors(hapi, client, raw_studies, make_lake):
    lake = make_lake([s.path for s in raw_studies[:4]])
    settings = lake.settings(hapi.base_url, study_timezone="Europe/Zurich",
                             wado_rs_base_url="http://127.0.0.1:8042/dicom-web")
    assert sync_catalog(settings).sent == 4
    con = connect(lake.catalog)
    try:
        rows = load_study_rows(con, [st["study_uid"] for st in lake.studies()])
    finally:
        con.close()
    options = MappingOptions.from_settings(settings.fhir)
    for r in rows.values():
        built = build_study(*r, options)
        assert "T" in resource_json(built.imaging_study)["started"]  # date and time, with an offset
        for resource in built.resources():
            issues = client.validate(resource_json(resource))
            assert errors_in(issues) == [], (resource.get_resource_type(), errors_in(issues))
        stored = client.get(f"ImagingStudy/{built.imaging_study.id}")
        assert stored is not None and stored["endpoint"][0]["reference"].startswith("Endpoint/")
        assert errors_in(client.validate(stored)) == []


def test_reconciliation_reports_and_requeues_differences(hapi, client, raw_studies, make_lake):
    lake = make_lake([s.path for s in raw_studies[:3]])
    settings = lake.settings(hapi.base_url)
    assert sync_catalog(settings).sent == 3
    uids = [st["study_uid"] for st in lake.studies()]
    # Someone edits one study on the server and deletes another.
    edited = client.search_by_identifier("ImagingStudy", [study_identity(uids[0]).token])[0]
    edited["numberOfInstances"] += 7
    assert client.put(f"ImagingStudy/{edited['id']}", edited).status_code == 200
    gone = client.search_by_identifier("ImagingStudy", [study_identity(uids[1]).token])[0]
    assert httpx.delete(f"{hapi.base_url}/ImagingStudy/{gone['id']}").status_code in (200, 204)

    report = sync_catalog(settings)  # unchanged in the catalog: skipped, but reconciled
    assert report.skipped_unchanged == 3
    found = {(d.study_uid, d.field) for d in report.differences}
    assert found == {(uids[0], "numberOfInstances"), (uids[1], "missing")}
    assert "Reconciliation" in report.markdown()
    again = sync_catalog(settings)  # the differing studies were marked for re-sending
    assert again.sent == 2 and again.differences == []


def test_configuration_errors_stop_the_run(tmp_path, raw_studies, make_lake, hapi):
    lake = make_lake([s.path for s in raw_studies[:1]])
    wrong = sync_catalog(lake.settings(hapi.base_url.replace("/fhir", "/nope")))
    assert wrong.sent == 0 and wrong.aborted and "FhirConfigurationError" in wrong.aborted
    with pytest.raises(FhirConfigurationError):
        FhirClient.from_settings(load_settings(fhir={}).fhir)


def test_fhir_resync_flow(hapi, client, raw_studies, make_lake, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from pacsflow.flows.fhir_resync import fhir_resync

    lake = make_lake([s.path for s in raw_studies[:3]])
    for k, v in {"PACSFLOW_CATALOG_ROOT": str(lake.catalog), "PACSFLOW_STATE_ROOT": str(lake.state),
                 "PACSFLOW_FHIR__BASE_URL": hapi.base_url, "PACSFLOW_FHIR__PSEUDONYM_SYSTEM": lake.pseudonym_system,
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        monkeypatch.setenv(k, v)
    with prefect_test_harness(server_startup_timeout=120):
        first = fhir_resync()
        assert first["sent"] == 3 and first["failed"] == 0 and first["differences"] == 0
        replay = fhir_resync(only_failed=False, force=False)
        assert replay["sent"] == 0 and replay["skipped_unchanged"] == 3
        forced = fhir_resync(force=True)
        assert forced["sent"] == 3
        from typer.testing import CliRunner

        from pacsflow.flows.cli import app

        cli = CliRunner().invoke(app, ["run", "fhir-resync", "--only-failed"])
        assert cli.exit_code == 0, cli.output
        assert "selected: 0" in cli.output and "failed: 0" in cli.output
        cli = CliRunner().invoke(app, ["run", "fhir-resync"])
        assert cli.exit_code == 0, cli.output
        assert "skipped_unchanged: 3" in cli.output
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        with get_client(sync_client=True) as api:
            artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                any_=["fhir-resync-summary"])))
        assert len(artifacts) == 5 and all("| sent |" in a.data for a in artifacts)
    for st in lake.studies():
        assert count(client, "ImagingStudy", study_identity(st["study_uid"]).token) == 1


def test_the_sync_and_its_flow_tasks_read_a_delta_catalog(hapi, client, raw_studies, make_lake, tmp_path):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from pacsflow.tasks.fhir.steps import sync_with_tasks

    lake = make_lake([s.path for s in raw_studies[:3]])
    # no snapshot store under this catalog_root: only the Delta tables hold the studies
    settings = lake.settings(hapi.base_url, {"catalog_root": tmp_path / "delta-catalog", "catalog": {"backend": "delta"}})
    settings.catalog.open_store(settings.catalog_root).commit(read_rows(sorted((lake.root / "rows").iterdir())))
    report = sync_catalog(settings)
    assert report.aborted is None and report.sent == report.selected == 3 and report.differences == []

    @flow
    def resend() -> Any:
        return sync_with_tasks(settings, force=True)

    with prefect_test_harness(server_startup_timeout=120):
        again = resend()
    assert again.aborted is None and again.sent == again.selected == 3 and again.differences == []
    for st in lake.studies():
        assert count(client, "ImagingStudy", study_identity(st["study_uid"]).token) == 1


# -- the client's pure helpers (no server) ---------------------------------------------------------
def test_redaction():
    text = 'HAPI-2207: Invalid match URL "Patient?identifier=urn:pacsflow:pseudonym|PFA03ED8" - Multiple'
    assert "PFA03ED8" not in redact(text) and "urn:pacsflow:pseudonym|<redacted>" in redact(text)
    assert redact(text, strict=True) == "HAPI-2207"
    assert len(redact("x" * 5000)) <= 600


def test_credentials_from_a_secret_block_value():
    blocks = {"tok": "tok", "basic": {"username": "u", "password": "p"}, "json": '{"token": "t"}',
              "bad": {"user": "secret-user"}}
    seen: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization", ""))
        return httpx.Response(200, json={"resourceType": "CapabilityStatement"})

    def metadata_with(name: str) -> str:
        settings = load_settings(fhir=FhirSettings(base_url="http://127.0.0.1:9/fhir", credentials_block=name))
        fhir = settings.with_secret_blocks(blocks.__getitem__).fhir
        with FhirClient.from_settings(fhir, transport=httpx.MockTransport(server)) as client:
            client.metadata()
        return seen[-1]

    assert metadata_with("tok") == "Bearer tok"
    assert metadata_with("basic") == "Basic dTpw"  # base64 of "u:p"
    assert metadata_with("json") == "Bearer t"
    with pytest.raises(SettingsError) as err:
        metadata_with("bad")
    assert "fhir.credentials_block" in str(err.value) and "secret-user" not in str(err.value)
    with pytest.raises(FhirConfigurationError, match="credentials_block"):  # a block nobody loaded
        FhirClient.from_settings(FhirSettings(base_url="http://127.0.0.1:9/fhir", credentials_block="tok"))


def test_a_new_ledger_opened_by_several_runs_at_once(tmp_path):
    errors: list[BaseException] = []
    for trial in range(10):
        path = tmp_path / f"l{trial}" / "fhir_sync.sqlite"
        barrier = threading.Barrier(6)

        def open_it() -> None:
            barrier.wait()
            try:
                FhirSyncLedger(path).mark_failed([("1.2.3", "x", True)], "run")
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
