"""The ``xdsi-publish`` flow and the nightly run's XDS-I.b step against the real IPF XDS.b peer
(deployments/xds-peer), over a catalog of the demo's 12 studies made by a real nightly run from a
real Orthanc.

One peer (test_xds_peer's fixture) and one catalog for the module; the tests run in file order and
build on each other (published first, then found, grown, refused, consent). What the registry kept
is read with the peer's own IPF consumer (ITI-18 FindDocuments, ITI-43), never with our code. Tests
that need a ledger of their own get a fresh ``state_root``; the outage test stops and starts peers
of its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from lxml import etree
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from pacsflow.catalog.views import connect
from pacsflow.deployments.local import sampledata
from pacsflow.flows.cli import app
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.flows.xdsi_publish import xdsi_publish
from pacsflow.tasks.settings import Settings, load_settings
from pacsflow.tasks.xdsi import ebxml
from pacsflow.tasks.xdsi.client import SubmissionResult, XdsRepositoryClient
from pacsflow.tasks.xdsi.ledger import PublishStatus, XdsiLedger
from pacsflow.tasks.xdsi.manifest import KOS_SOP_CLASS_UID, build_manifest, load_inputs
from pacsflow.tasks.xdsi.publish import publish_catalog
from tests.flows.conftest import Lake
from tests.helpers import free_port
from tests.net.syslog_listener import SyslogListener, parse
from tests.integration.conftest import orthanc_factory  # noqa: F401  (session fixture)
from tests.integration.test_xds_peer import peer  # noqa: F401  (fixture re-export: one peer, skips without Java)
from tests.xds_peer import XdsPeer, start_peer
from tests.xdsi_samples import SOURCE_OID

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

TODAY = dt.date.today()
STUDIES, PATIENTS = 12, 4
NO_US = ("CT", "MR", "MG")  # ultrasound with burned-in text is quarantined: keep every study whole
OTHER_AUTHORITY = "2.25.77777777777777777777777777777777"
FORMAT = (KOS_SOP_CLASS_UID, "1.2.840.10008.2.6.1")


@contextmanager
def own_peer(run_dir: Path) -> Iterator[XdsPeer]:
    """A peer of the test's own (the outage test stops one), stopped at the end unless it was."""
    handle = start_peer(run_dir)
    try:
        yield handle
    finally:
        if (run_dir / "xds-peer.pid").exists():
            handle.stop()


@dataclass
class Site(Lake):
    """The flow tests' lake (Orthanc, catalog, state) and the studies generated into its Orthanc."""

    studies: list[sampledata.StudySummary] = field(default_factory=list)

    def ledger(self, state: Path | None = None) -> XdsiLedger:
        return XdsiLedger.under(state or self.state)

    def rows(self) -> dict[str, dict[str, Any]]:
        con = connect(self.catalog)
        try:
            return {r["study_uid"]: r for r in con.sql("SELECT * FROM studies").to_arrow_table().to_pylist()}
        finally:
            con.close()

    def manifests(self, settings: Settings) -> dict[str, Any]:
        """Each study's KOS as pacsflow builds it from the catalog now."""
        con = connect(self.catalog)
        try:
            return {uid: build_manifest(inp, settings.xdsi) for uid, inp in load_inputs(con, list(self.rows())).items()}
        finally:
            con.close()

    def originals(self) -> set[str]:
        """Identifying values of the generated (identified) files: none may leave."""
        found: set[str] = set()
        for path in (self.root / "in").rglob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "PatientBirthDate"):
                value = str(ds.get(keyword, "") or "")
                if len(value) >= 5:
                    found.add(value)
        return found


def _xdsi_env(peer: XdsPeer, **extra: str) -> dict[str, str]:
    return {"PACSFLOW_XDSI__REPOSITORY_URL": peer.url("xds-iti41"), "PACSFLOW_XDSI__SOURCE_OID": SOURCE_OID,
            "PACSFLOW_XDSI__PSEUDONYM_OID": peer.authority,
            "PACSFLOW_XDSI__RETRIEVE_URL": "https://pacsflow.test/dicom-web", "PACSFLOW_XDSI__MAX_RETRIES": "1",
            "PACSFLOW_XDSI__RETRY_BACKOFF_S": "0.1", **extra}


@pytest.fixture(scope="module")
def site(tmp_path_factory, orthanc_factory, peer) -> Iterator[Site]:  # noqa: F811
    """The demo's 12 studies (4 patients) in a real Orthanc, cataloged by one nightly run (XDS-I.b
    off); afterwards the settings point at the peer."""
    root = tmp_path_factory.mktemp("xdsi-site")
    receiver_port = free_port()
    orthanc = orthanc_factory(receiver_port=receiver_port)
    studies = sampledata.generate(root / "in", studies=STUDIES, patients=PATIENTS, days=10, end_date=TODAY, seed=18,
                                  instances_per_series=(2, 3), modalities=NO_US)
    sampledata.load([root / "in"], "127.0.0.1", orthanc.dicom_port)
    env = {"PACSFLOW_PACS__PORT": str(orthanc.dicom_port), "PACSFLOW_PACS__HTTP_URL": orthanc.rest_url,
           "PACSFLOW_RECEIVER__PORT": str(receiver_port), "PACSFLOW_STORAGE_ROOT": str(root / "lake" / "dicom"),
           "PACSFLOW_CATALOG_ROOT": str(root / "lake" / "catalog"), "PACSFLOW_STATE_ROOT": str(root / "state"),
           "PACSFLOW_DEID_KEY": "xdsi-publish-test-key-0123456789", "PACSFLOW_RETRY_DELAY_S": "0.2",
           "PACSFLOW_RETRIEVE_RETRIES": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PACSFLOW_CONFIG": ""}
    with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=120):
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("PACSFLOW_FHIR__BASE_URL", raising=False)
        night = run_result(nightly_ingest(return_state=True))
        assert (night["cataloged"], night["failed"], night["xdsi_published"]) == (STUDIES, 0, 0), night
        for k, v in _xdsi_env(peer).items():
            mp.setenv(k, v)
        yield Site(root, orthanc, receiver_port, studies)
    orthanc.stop(graceful=False)


def _consume(peer: XdsPeer, out: Path, pseudonym: str) -> dict[str, Any]:
    """FindDocuments (Approved and Deprecated) for the patient, and ITI-43 of everything found."""
    status, summary = peer.client("consume", out, "--registry-url", peer.url("xds-iti18"),
                                  "--repository-url", peer.url("xds-iti43"),
                                  "--patient-id", ebxml.cx_patient_id(pseudonym, peer.authority))
    assert status == 0, summary
    return summary


def _by_patient(rows: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for uid, row in rows.items():
        out.setdefault(row["patient_pseudo_id"], set()).add(uid)
    return out


# -- the tests, in order -----------------------------------------------------------------------------
def test_publish_sends_one_submission_per_study(site, peer, monkeypatch):
    with SyslogListener("tcp") as listener:
        monkeypatch.setenv("PACSFLOW_XDSI__AUDIT_URL", listener.url)
        state = xdsi_publish(return_state=True)
        audits = listener.wait_for(STUDIES)
        time.sleep(0.2)
        assert len(listener.messages) == STUDIES and not listener.frame_errors  # one Export per submission
    monkeypatch.delenv("PACSFLOW_XDSI__AUDIT_URL")
    result = run_result(state)
    assert state.is_completed(), state.message
    assert (result["selected"], result["published"], result["replaced"], result["failed"]) == (STUDIES, STUDIES, 0, 0)
    assert result["requests"] == STUDIES  # each answered Success at the first attempt
    rows = site.ledger().entries()
    assert len(rows) == STUDIES and {r.status for r in rows.values()} == {PublishStatus.PUBLISHED}
    assert set(rows) == set(site.rows())

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as api:
        [artifact] = api.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["xdsi-publish-summary"])))
    assert f"| published | {STUDIES} |" in artifact.data

    again = run_result(xdsi_publish(return_state=True))
    assert (again["unchanged"], again["published"], again["requests"]) == (STUDIES, 0, 0)

    originals = site.originals()
    named = set()
    for message in audits:
        root = etree.fromstring(parse(message)[1].removeprefix(b"\xef\xbb\xbf"))
        assert root.find("EventIdentification/EventID").get("csd-code") == "110106"
        assert root.find("EventIdentification").get("EventOutcomeIndicator") == "0"
        assert not {v for e in root.iter() for v in (*e.attrib.values(), e.text or "")} & originals
        named |= {o.get("ParticipantObjectID") for o in root.iter("ParticipantObjectIdentification")
                  if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"}
    assert named == set(rows)


def test_the_registry_finds_exactly_our_manifests_and_returns_them_unchanged(site, peer, tmp_path):
    settings = load_settings()
    catalog, ledger, manifests = site.rows(), site.ledger().entries(), site.manifests(settings)
    originals = site.originals()
    for n, (pseudonym, uids) in enumerate(sorted(_by_patient(catalog).items())):
        found = _consume(peer, tmp_path / f"patient-{n}", pseudonym)
        entries = {e["uniqueId"]: e for e in found["documentEntries"]}
        assert set(entries) == {ledger[uid].kos_uid for uid in uids}  # exactly ours, nothing else
        for uid in uids:
            entry, row, manifest = entries[ledger[uid].kos_uid], catalog[uid], manifests[uid]
            assert entry["entryUuid"] == ledger[uid].entry_uuid and entry["availabilityStatus"] == "Approved"
            assert entry["patientId"] == entry["sourcePatientId"] == ebxml.cx_patient_id(pseudonym, peer.authority)
            assert entry["mimeType"] == "application/dicom"
            assert (entry["formatCode"]["code"], entry["formatCode"]["scheme"]) == FORMAT
            # the accession only when the catalog has one: the default de-identification empties it
            accession = {(row["accession_number"], ebxml.ACCESSION_ID_TYPE)} if row["accession_number"] else set()
            assert {(r["id"], r["idType"]) for r in entry["referenceIdList"]} == {
                (uid, ebxml.STUDY_UID_ID_TYPE), *accession}
            assert {(c["code"], c["scheme"]) for c in entry["eventCodeList"]} == {
                (m, ebxml.MODALITY_SCHEME) for m in row["modalities"]}
            assert (entry["size"], entry["hash"]) == (len(manifest.part10), hashlib.sha1(manifest.part10).hexdigest())
        retrieved = {d["uniqueId"]: Path(d["file"]).read_bytes() for d in found["retrieve"]["documents"]}
        assert found["retrieve"]["status"] == "Success"
        assert retrieved == {manifests[uid].sop_instance_uid: manifests[uid].part10 for uid in uids}  # byte-identical
        # no PHI: nothing the registry or a consumer got names an original patient, accession or UID
        shown = json.dumps(found) + "".join(data.decode("latin-1") for data in retrieved.values())
        assert not [value for value in originals if value in shown]


def test_a_new_series_is_published_by_the_nightly_run_as_a_replacement(site, peer, tmp_path):
    before = site.rows()
    published = site.ledger().entries()
    grown = max(site.studies, key=lambda s: s.study_date)  # inside the next run's overlap window
    series = sampledata.add_series(grown, tmp_path / "added", instances=3, seed=9)
    sampledata.load([series.path], "127.0.0.1", site.orthanc.dicom_port)

    night = run_result(nightly_ingest(return_state=True))
    assert (night["cataloged"], night["failed"], night["xdsi_published"], night["xdsi_failed"]) == (1, 0, 1, 0)
    after = site.rows()
    [uid] = [u for u in after if after[u]["number_of_instances"] != before[u]["number_of_instances"]]
    row = site.ledger().entries()[uid]
    assert row.status is PublishStatus.PUBLISHED and row.kos_uid != published[uid].kos_uid
    assert row.replaced_entry_uuid == published[uid].entry_uuid

    found = _consume(peer, tmp_path / "grown", after[uid]["patient_pseudo_id"])
    statuses = {e["uniqueId"]: e["availabilityStatus"] for e in found["documentEntries"]}
    assert statuses[published[uid].kos_uid] == "Deprecated" and statuses[row.kos_uid] == "Approved"
    assert [s for k, s in statuses.items() if k not in (published[uid].kos_uid, row.kos_uid)] == ["Approved"] * (
        len(statuses) - 2)  # the patient's other studies are untouched


def test_a_registry_of_another_authority_refuses_each_study_once(site, peer, tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))  # a ledger of its own
    monkeypatch.setenv("PACSFLOW_XDSI__PSEUDONYM_OID", OTHER_AUTHORITY)  # not the registry's patient ID domain

    state = xdsi_publish(return_state=True)
    result = run_result(state)
    assert state.is_failed() and "12 XDSUnknownPatientId" in state.message  # a run with failures is not green
    assert (result["published"], result["failed"], result["failed_by_code"]) == (0, STUDIES,
                                                                                 {"XDSUnknownPatientId": STUDIES})
    assert result["requests"] == STUDIES  # one request per study: registry errors are not retried
    rows = site.ledger(tmp_path / "state").entries()
    assert {(r.status, r.error_code, r.transient) for r in rows.values()} == {
        (PublishStatus.FAILED, "XDSUnknownPatientId", False)}

    again_state = xdsi_publish(return_state=True)
    again = run_result(again_state)
    assert (again["requests"], again["refused_before"], again["failed"]) == (0, STUDIES, 0)  # no retry storm
    assert "refused before" in again_state.message

    # asked for: sent once more (one request each), refused again; the command says so with exit status 1
    asked = CliRunner().invoke(app, ["run", "xdsi-publish", "--only-failed"])
    assert asked.exit_code == 1, asked.output
    assert f"failed: {STUDIES}" in asked.output and f"requests: {STUDIES}" in asked.output
    status = CliRunner().invoke(app, ["xdsi", "status"])
    assert f"{STUDIES} XDSUnknownPatientId (permanent)" in status.output


def test_with_consent_required_only_consenting_patients_are_published(site, peer, tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("PACSFLOW_XDSI__CONSENT_REQUIRED", "true")
    # another WADO-RS base: new manifests (new KOS UIDs), so the registry tells them from the first test's
    monkeypatch.setenv("PACSFLOW_XDSI__RETRIEVE_URL", "https://consent.pacsflow.test/dicom-web")
    patients = _by_patient(site.rows())
    yes, no = sorted(patients)[:2], sorted(patients)[2:]
    site.ledger(tmp_path / "state").grant(yes)

    report = publish_catalog(load_settings())
    assert report.ok and report.published == sum(len(patients[p]) for p in yes)
    assert report.pending_consent == sum(len(patients[p]) for p in no) and report.requests == report.published
    rows = site.ledger(tmp_path / "state").entries()
    assert {uid for uid, r in rows.items() if r.status is PublishStatus.PUBLISHED} == set().union(
        *(patients[p] for p in yes))
    ours = {r.kos_uid for r in rows.values() if r.kos_uid}
    not_consented = _consume(peer, tmp_path / "no-consent", no[0])
    assert not ours & {e["uniqueId"] for e in not_consented["documentEntries"]}


class StoppingClient(XdsRepositoryClient):
    """The real client; the peer is stopped right after the answer to the ``after``-th submission."""

    def __init__(self, url: str, peer: XdsPeer, after: int, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.peer, self.after, self.answered = peer, after, 0

    def provide_and_register(self, request: Any, kos: bytes) -> SubmissionResult:
        result = super().provide_and_register(request, kos)
        self.answered += 1
        if self.answered == self.after:
            self.peer.stop()
        return result


def test_a_peer_stopped_during_publish_gets_the_rest_once_it_is_back(site, peer, tmp_path, monkeypatch):
    """Against peers of its own: one stopped after three answers, then another one. The peer keeps its
    store in memory, so the second one starts empty: what it holds afterwards is what the second run
    sent (the studies the first run could not), not all 12; the ledger has all 12 published."""
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    settings = load_settings()
    with own_peer(tmp_path / "first") as first:
        client = StoppingClient(first.url("xds-iti41"), first, after=3, max_retries=1, backoff_s=0.1)
        with client:
            down = publish_catalog(settings, client=client)
    assert down.published == 3 and down.aborted and "XdsUnavailable" in down.aborted
    assert down.failed_by_code() == {"XdsUnavailable": STUDIES - 3}
    assert down.requests == 3 + 2  # the fourth submission: the first try and the client's one retry, then stop
    rows = site.ledger(tmp_path / "state").entries()
    failed = {uid for uid, r in rows.items() if r.status is PublishStatus.FAILED}
    assert len(failed) == STUDIES - 3 and all(rows[uid].transient for uid in failed)

    with own_peer(tmp_path / "back") as back:
        monkeypatch.setenv("PACSFLOW_XDSI__REPOSITORY_URL", back.url("xds-iti41"))
        up = run_result(xdsi_publish(return_state=True))
        assert (up["published"], up["unchanged"], up["failed"], up["requests"]) == (STUDIES - 3, 3, 0, STUDIES - 3)
        rows = site.ledger(tmp_path / "state").entries()
        assert {r.status for r in rows.values()} == {PublishStatus.PUBLISHED}

        catalog = site.rows()
        pseudonym = catalog[sorted(failed)[0]]["patient_pseudo_id"]
        found = _consume(back, tmp_path / "after-outage", pseudonym)
    expected = {rows[uid].kos_uid for uid in failed if catalog[uid]["patient_pseudo_id"] == pseudonym}
    assert {e["uniqueId"] for e in found["documentEntries"]} == expected
