"""The XDS-I.b publish loop (pacsflow.tasks.xdsi.publish) over a catalog built by the real pipeline
pieces, with a fake repository object in place of the network boundary: selection, consent, the RPLC
target, what the ledger records for each kind of error, and --only-failed. The real repository is in
tests/integration/test_xdsi_publish.py."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pydicom
import pytest
from lxml import etree

from pacsflow.catalog.views import connect
from pacsflow.tasks.core.errors import XdsConfigurationError, XdsRegistryError, XdsUnavailable
from pacsflow.tasks.settings import Settings, load_settings
from pacsflow.tasks.xdsi import ebxml, publish
from pacsflow.tasks.xdsi.client import SubmissionResult
from pacsflow.tasks.xdsi.ledger import PublishStatus, XdsiLedger
from pacsflow.tasks.xdsi.manifest import build_manifest, load_inputs
from pacsflow.tasks.xdsi.publish import owed_studies, publish_batch, publish_catalog
from tests.net.syslog_listener import SyslogListener, parse
from tests.unit.test_xdsi_manifest import catalog  # noqa: F401  (fixture re-export: one catalog per module)

SOURCE_OID = "1.2.826.0.1.3680043.10.1234.1"
PSEUDONYM_OID = "1.2.826.0.1.3680043.10.1234.2"


@dataclass(frozen=True)
class Sent:
    study_uid: str
    kos_uid: str
    pseudonym: str
    replaces: str | None


class FakeRepository:
    """Answers Success unless told to refuse a study (a registry error code) or to be down."""

    def __init__(self) -> None:
        self.requests = 0
        self.sent: list[Sent] = []
        self.refuse: dict[str, str] = {}
        self.down_after: int | None = None  # requests answered before it goes down

    def provide_and_register(self, request: etree._Element, kos: bytes) -> SubmissionResult:
        self.requests += 1
        if self.down_after is not None and self.requests > self.down_after:
            raise XdsUnavailable("ITI-41 to fake: ConnectError (no answer), after 2 attempts")
        ds = pydicom.dcmread(io.BytesIO(kos))
        rplc = request.xpath(f"//rim:Association[@associationType='{ebxml.RPLC}']/@targetObject",
                             namespaces={"rim": ebxml.RIM})
        self.sent.append(Sent(ds.StudyInstanceUID, ds.SOPInstanceUID, ds.PatientID, rplc[0] if rplc else None))
        code = self.refuse.get(ds.StudyInstanceUID)
        if code:
            raise XdsRegistryError(f"ITI-41 to fake: Failure, {code} (…)", code=code)
        return SubmissionResult("Success", "urn:uuid:fake", 1)


@pytest.fixture(scope="module")
def catalog_root(catalog) -> Path:  # noqa: F811
    """The manifest tests' catalog: five studies of two patients (CT, MR, MG), de-identified and cataloged."""
    return catalog.root / "catalog"


def _settings(catalog_root: Path, state: Path, **xdsi: object) -> Settings:
    options = {"repository_url": "http://repository.test/xds-iti41", "source_oid": SOURCE_OID,
               "pseudonym_oid": PSEUDONYM_OID, "retrieve_url": "https://pacsflow.test/dicom-web", **xdsi}
    return load_settings(catalog_root=catalog_root, state_root=state, xdsi=options)


def _studies(catalog_root: Path) -> dict[str, str]:
    """study UID -> patient pseudonym, read from the catalog."""
    con = connect(catalog_root)
    try:
        return dict(con.execute("SELECT study_uid, patient_pseudo_id FROM studies").fetchall())
    finally:
        con.close()


def _ledger(settings: Settings) -> XdsiLedger:
    return XdsiLedger.under(settings.state_root)


def test_every_study_is_published_once_with_its_manifest(catalog_root, tmp_path):
    settings, repo = _settings(catalog_root, tmp_path), FakeRepository()
    studies = _studies(catalog_root)
    report = publish_catalog(settings, client=repo)
    assert report.ok and (report.selected, report.published, report.replaced, report.requests) == (5, 5, 0, 5)
    assert {s.study_uid for s in repo.sent} == set(studies) and all(s.replaces is None for s in repo.sent)
    assert all(s.pseudonym == studies[s.study_uid] for s in repo.sent)

    con = connect(catalog_root)
    try:
        manifests = {uid: build_manifest(inp, settings.xdsi) for uid, inp in load_inputs(con, list(studies)).items()}
    finally:
        con.close()
    rows = _ledger(settings).entries()
    for uid, row in rows.items():
        assert row.status is PublishStatus.PUBLISHED
        assert row.kos_uid == manifests[uid].sop_instance_uid and row.content_hash == manifests[uid].content_hash
        assert row.entry_uuid == ebxml.entry_uuid(row.kos_uid)

    again = publish_catalog(settings, client=repo)
    assert (again.selected, again.unchanged, again.published, again.requests) == (5, 5, 0, 0)
    assert len(repo.sent) == 5


def test_a_changed_manifest_replaces_the_entry_published_last(catalog_root, tmp_path):
    settings, repo = _settings(catalog_root, tmp_path), FakeRepository()
    publish_catalog(settings, client=repo)
    first = _ledger(settings).entries()
    moved = _settings(catalog_root, tmp_path, retrieve_url="https://elsewhere.test/dicom-web")  # every KOS changes

    report = publish_catalog(moved, client=repo)
    assert (report.published, report.replaced, report.unchanged) == (0, 5, 0)
    replacements = repo.sent[5:]
    assert {s.study_uid: s.replaces for s in replacements} == {uid: row.entry_uuid for uid, row in first.items()}
    rows = _ledger(settings).entries()
    for uid, row in rows.items():
        assert row.replaced_entry_uuid == first[uid].entry_uuid and row.kos_uid != first[uid].kos_uid
    # only the given studies are considered
    assert publish_catalog(moved, [next(iter(rows))], client=repo).selected == 1


def test_a_registry_error_fails_one_study_and_is_not_sent_again_until_asked(catalog_root, tmp_path):
    settings, repo = _settings(catalog_root, tmp_path), FakeRepository()
    refused = sorted(_studies(catalog_root))[1]
    repo.refuse[refused] = "XDSUnknownPatientId"

    report = publish_catalog(settings, client=repo)
    assert (report.published, report.requests) == (4, 5)  # the others went on
    assert not report.ok and report.failed_by_code() == {"XDSUnknownPatientId": 1}
    assert report.as_dict()["failed_by_code"] == {"XDSUnknownPatientId": 1}
    assert "XDSUnknownPatientId" in report.markdown() and refused in report.markdown()
    row = _ledger(settings).entries()[refused]
    assert (row.status, row.error_code, row.transient, row.kos_uid) == (PublishStatus.FAILED, "XDSUnknownPatientId",
                                                                       False, None)

    again = publish_catalog(settings, client=repo)
    assert (again.requests, again.unchanged, again.refused_before, again.failed) == (0, 4, 1, {})  # no retry storm
    assert again.ok and "1 refused before" in again.message()
    assert owed_studies(_ledger(settings)) == []

    del repo.refuse[refused]
    retried = publish_catalog(settings, only_failed=True, client=repo)
    assert (retried.selected, retried.published, retried.requests) == (1, 1, 1)
    assert repo.sent[-1].study_uid == refused
    assert _ledger(settings).entries()[refused].status is PublishStatus.PUBLISHED
    assert publish_catalog(settings, only_failed=True, client=repo).selected == 0


def test_a_repository_that_goes_down_stops_the_run_and_the_next_one_sends_the_rest(catalog_root, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(publish, "BATCH_STUDIES", 2)
    settings, repo = _settings(catalog_root, tmp_path), FakeRepository()
    repo.down_after = 1

    report = publish_catalog(settings, client=repo)
    assert report.published == 1 and report.aborted and "XdsUnavailable" in report.aborted
    assert report.failed_by_code() == {"XdsUnavailable": 1}  # the batch's other study
    assert report.not_attempted == 3 and repo.requests == report.requests == 2  # later batches were not tried
    rows = _ledger(settings).entries()
    assert sorted(r.status.value for r in rows.values()) == ["failed", "pending", "pending", "pending", "published"]
    assert all(r.transient for r in rows.values() if r.status is PublishStatus.FAILED)
    assert all(r.reason.startswith("not attempted: XdsUnavailable") for r in rows.values()
               if r.status is PublishStatus.PENDING)
    assert len(owed_studies(_ledger(settings))) == 4

    repo.down_after = None
    after = publish_catalog(settings, client=repo)
    assert after.ok and (after.published, after.unchanged) == (4, 1)
    assert {r.status for r in _ledger(settings).entries().values()} == {PublishStatus.PUBLISHED}


def test_with_consent_required_only_consented_patients_are_published(catalog_root, tmp_path):
    settings, repo = _settings(catalog_root, tmp_path, consent_required=True), FakeRepository()
    studies = _studies(catalog_root)
    [yes, no] = sorted(set(studies.values()))
    _ledger(settings).grant([yes])

    report = publish_catalog(settings, client=repo)
    assert report.ok  # waiting for consent is not a failure
    assert {s.pseudonym for s in repo.sent} == {yes}
    assert report.published == sum(p == yes for p in studies.values())
    assert report.pending_consent == sum(p == no for p in studies.values())
    rows = _ledger(settings).entries()
    waiting = {uid for uid, p in studies.items() if p == no}
    assert {uid for uid, r in rows.items() if r.status is PublishStatus.PENDING} == waiting
    assert all("consent" in rows[uid].reason for uid in waiting)
    assert set(owed_studies(_ledger(settings))) == waiting

    _ledger(settings).grant([no])
    later = publish_catalog(settings, owed_studies(_ledger(settings)), client=repo)
    assert (later.published, later.pending_consent) == (len(waiting), 0)


def test_a_study_without_a_manifest_fails_alone(tmp_path):
    """A catalog row without a pseudonym (ManifestError): recorded failed for good; the next study is sent."""
    con = duckdb.connect()
    con.execute("CREATE TABLE studies (study_uid VARCHAR, patient_pseudo_id VARCHAR, accession_number VARCHAR, "
                "study_date DATE, study_time VARCHAR)")
    con.execute("CREATE TABLE series (study_uid VARCHAR, series_uid VARCHAR, modality VARCHAR)")
    con.execute("CREATE TABLE instances (study_uid VARCHAR, series_uid VARCHAR, sop_class_uid VARCHAR, "
                "sop_instance_uid VARCHAR, \"rows\" INTEGER)")
    con.execute("INSERT INTO studies VALUES ('2.25.1', NULL, 'A1', DATE '2026-11-02', '101500'), "
                "('2.25.2', 'PSEUDO2', 'A2', DATE '2026-11-03', '111500')")
    con.execute("INSERT INTO series VALUES ('2.25.1', '2.25.11', 'CT'), ('2.25.2', '2.25.21', 'MR')")
    con.execute("INSERT INTO instances VALUES ('2.25.1', '2.25.11', '1.2.840.10008.5.1.4.1.1.2', '2.25.111', 64), "
                "('2.25.2', '2.25.21', '1.2.840.10008.5.1.4.1.1.4', '2.25.211', 64)")
    settings, repo = _settings(tmp_path / "catalog", tmp_path / "state"), FakeRepository()
    ledger = _ledger(settings)

    result = publish_batch(repo, ledger, con, settings.xdsi, ["2.25.1", "2.25.2"], run_id="r1")
    assert result.published == ["2.25.2"] and [s.study_uid for s in repo.sent] == ["2.25.2"]
    assert result.failed["2.25.1"].code == "ManifestError" and not result.failed["2.25.1"].transient
    row = ledger.entries()["2.25.1"]
    assert (row.status, row.error_code, row.transient) == (PublishStatus.FAILED, "ManifestError", False)
    assert "pseudonym" in row.reason

    # a Prefect retry of the same batch in the same run sends nothing again
    again = publish_batch(repo, ledger, con, settings.xdsi, ["2.25.1", "2.25.2"], run_id="r1")
    assert (again.published, list(again.failed), repo.requests) == (["2.25.2"], ["2.25.1"], 1)


def test_an_already_registered_manifest_counts_as_published(catalog_root, tmp_path):
    settings, repo = _settings(catalog_root, tmp_path), FakeRepository()
    lost = sorted(_studies(catalog_root))[0]
    repo.refuse[lost] = publish.ALREADY_REGISTERED  # e.g. the ledger was rebuilt after a publication
    report = publish_catalog(settings, client=repo)
    assert report.ok and report.published == 5
    assert _ledger(settings).entries()[lost].status is PublishStatus.PUBLISHED


def test_missing_settings_stop_before_anything_is_sent(catalog_root, tmp_path):
    repo = FakeRepository()
    with pytest.raises(XdsConfigurationError, match="PACSFLOW_XDSI__REPOSITORY_URL"):
        publish_catalog(load_settings(catalog_root=catalog_root, state_root=tmp_path), client=repo)
    unset_url = _settings(catalog_root, tmp_path, retrieve_url=None)
    with pytest.raises(XdsConfigurationError, match="xdsi.retrieve_url"):
        publish_catalog(unset_url, client=repo)
    assert repo.requests == 0


def test_each_submission_accepted_or_refused_is_audited_with_pseudonymous_values_only(catalog_root, tmp_path):
    studies = _studies(catalog_root)
    refused = sorted(studies)[0]
    with SyslogListener("udp") as listener:
        settings, repo = _settings(catalog_root, tmp_path, audit_url=listener.url), FakeRepository()
        repo.refuse[refused] = "XDSUnknownPatientId"
        publish_catalog(settings, client=repo)
        messages = listener.wait_for(5)
        time.sleep(0.2)
        assert len(listener.messages) == 5  # one per submission, none more
    rows = _ledger(settings).entries()
    seen = {}
    for message in messages:
        header, body = parse(message)
        assert (header.pri, header.msgid) == (85, "IHE+RFC-3881")
        root = etree.fromstring(body.removeprefix(b"\xef\xbb\xbf"))
        event = root.find("EventIdentification")
        assert event.find("EventID").get("csd-code") == "110106"
        assert event.find("EventTypeCode").get("csd-code") == "ITI-41"
        objects = {o.get("ParticipantObjectIDTypeCode") or o.find("ParticipantObjectIDTypeCode").get("csd-code"):
                   o.get("ParticipantObjectID") for o in root.iter("ParticipantObjectIdentification")}
        study = objects["110180"]
        seen[study] = event.get("EventOutcomeIndicator")
        assert objects["2"] == f"{studies[study]}^^^&{PSEUDONYM_OID}&ISO"
        if study != refused:
            assert objects["9"] == rows[study].kos_uid  # the document, as ITI-41 names it (Report Number)
    assert seen == {uid: ("8" if uid == refused else "0") for uid in studies}
