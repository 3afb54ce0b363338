"""RAD-69 and WADO-RS of ``pacsflow serve`` against a real, independent Imaging Document Consumer: the
IPF peer's ``consume`` mode (deployments/xds-peer) asks for every instance of a small lake with a
bearer token and gets each file back byte for byte (SHA-256 = the catalog's ``file_sha256``); an
unknown UID is an XDSMissingDocument; a loopback syslog listener (TCP, octet counting) gets exactly
one Export audit message per RAD-69 and per WADO-RS response, naming no original identifier."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from lxml import etree
from pydicom import dcmread

from pacsflow.catalog.views import query
from pacsflow.flows.serve import build_app
from pacsflow.tasks.settings import XdsiSettings
from pacsflow.tasks.web.xdsi import close_audit_log
from tests.dicomweb_lake import WebLake, bearer, build_lake
from tests.helpers import free_port
from tests.integration.served_app import serving
from tests.net.syslog_listener import SyslogListener, parse
from tests.integration.test_xds_peer import peer  # noqa: F401  (fixture re-export: skips without Java)
from tests.xds_peer import XdsPeer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

SOURCE = "2.25.240815122125463532138815542375011357226"  # our Imaging Document Source (xdsi.source_oid)
PSEUDONYM_OID = "2.25.148916393427916262813366327018432151561"


class Served:
    def __init__(self, lake: WebLake, root: Path, url: str, app: object, listener: SyslogListener) -> None:
        self.lake, self.root, self.url, self.app, self.listener = lake, root, url, app, listener

    def rows(self, sql: str, *params: object) -> list[dict]:
        return query(self.lake.catalog, sql, list(params)).to_pylist()

    def audit_messages(self, before: int, expected: int = 1) -> list[bytes]:
        """The audit messages that arrived since ``before`` (after the app's audit worker is done)."""
        assert self.app.state.audit_log.flush()  # type: ignore[attr-defined]
        return self.listener.wait_for(before + expected)[before:]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("rad69-lake")
    port = free_port()
    lake = build_lake(root, studies=3, host="127.0.0.1", port=port)
    with SyslogListener("tcp") as listener:
        settings = lake.settings.model_copy(update={"xdsi": XdsiSettings(
            source_oid=SOURCE, pseudonym_oid=PSEUDONYM_OID, audit_url=listener.url)})
        app = build_app(settings)
        try:
            with serving(app, port) as url:
                yield Served(lake, root, url, app, listener)
        finally:
            close_audit_log(app)
        assert listener.frame_errors == []


def _originals(root: Path) -> set[bytes]:
    """What the lake must never show: the original files' patient IDs, names, accessions, UIDs."""
    found: set[bytes] = set()
    for path in (root / "originals").rglob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                found.add(value.encode())
    assert found
    return found


def _check_audit(message: bytes, served: Served, event_type: str, outcome: str, studies: set[str]) -> None:
    header, msg = parse(message)
    assert (header.pri, header.version, header.app_name, header.msgid) == (85, 1, "pacsflow", "IHE+RFC-3881")
    assert msg.startswith(b"\xef\xbb\xbf")
    xml = etree.fromstring(msg[3:])
    ident = xml.find("EventIdentification")
    assert ident.find("EventID").get("csd-code") == "110106" and ident.get("EventActionCode") == "R"
    assert ident.find("EventTypeCode").get("csd-code") == event_type
    assert ident.get("EventOutcomeIndicator") == outcome
    source, destination = xml.findall("ActiveParticipant")
    assert source.find("RoleIDCode").get("csd-code") == "110153" and source.get("UserIsRequestor") == "false"
    assert destination.find("RoleIDCode").get("csd-code") == "110152" and destination.get("UserIsRequestor") == "true"
    assert (destination.get("UserID"), destination.get("NetworkAccessPointID")) == ("viewer", "127.0.0.1")
    objects = xml.findall("ParticipantObjectIdentification")
    named_studies = {o.get("ParticipantObjectID") for o in objects if o.get("ParticipantObjectTypeCode") == "2"}
    assert named_studies == studies
    patients = {o.get("ParticipantObjectID") for o in objects if o.get("ParticipantObjectTypeCode") == "1"}
    pseudonyms = {r["patient_pseudo_id"] for s in studies for r in served.rows(
        "SELECT patient_pseudo_id FROM studies WHERE study_uid = ?", s)}
    assert patients == {f"{p}^^^&{PSEUDONYM_OID}&ISO" for p in pseudonyms}
    leaked = [value for value in _originals(served.root) if value in message]
    assert leaked == []


def test_the_ipf_consumer_gets_every_instance_byte_for_byte_and_each_response_is_audited(
        served: Served, peer: XdsPeer, tmp_path: Path) -> None:  # noqa: F811
    files = served.rows("SELECT study_uid, series_uid, sop_instance_uid, file_sha256, transfer_syntax_uid "
                        "FROM instances ORDER BY study_uid, series_uid, sop_instance_uid")
    assert len(files) >= 10
    images = [a for f in files for a in ("--image", f"{f['study_uid']}/{f['series_uid']}/{f['sop_instance_uid']}")]
    syntaxes = [a for s in sorted({f["transfer_syntax_uid"] for f in files}) for a in ("--transfer-syntax", s)]
    before = len(served.listener.messages)
    status, summary = peer.client("consume", tmp_path / "all", "--rad69-url", f"{served.url}/xdsi/rad69",
                                  "--rad69-repository-id", SOURCE, *images, *syntaxes,
                                  "--header", f"Authorization: Bearer {served.lake.token}")
    assert status == 0, summary.get("failure")
    assert summary["rad69"]["status"] == "Success" and summary["rad69"]["errors"] == []
    got = {d["uniqueId"]: hashlib.sha256(Path(d["file"]).read_bytes()).hexdigest()
           for d in summary["rad69"]["documents"]}
    assert got == {f["sop_instance_uid"]: f["file_sha256"] for f in files}
    assert {d["mimeType"] for d in summary["rad69"]["documents"]} == {"application/dicom"}

    [message] = served.audit_messages(before)
    _check_audit(message, served, "RAD-69", "0", {f["study_uid"] for f in files})


def test_an_unknown_instance_is_a_missing_document(
        served: Served, peer: XdsPeer, tmp_path: Path) -> None:  # noqa: F811
    [known] = served.rows("SELECT study_uid, series_uid, sop_instance_uid, file_sha256, transfer_syntax_uid "
                          "FROM instances ORDER BY sop_instance_uid LIMIT 1")
    unknown = "2.25.123456789012345678901234567890"
    before = len(served.listener.messages)
    status, summary = peer.client(
        "consume", tmp_path / "partial", "--rad69-url", f"{served.url}/xdsi/rad69", "--rad69-repository-id", SOURCE,
        "--image", f"{known['study_uid']}/{known['series_uid']}/{known['sop_instance_uid']}",
        "--image", f"{known['study_uid']}/{known['series_uid']}/{unknown}",
        "--transfer-syntax", known["transfer_syntax_uid"], "--header", f"Authorization: Bearer {served.lake.token}")
    assert status == 2
    assert summary["rad69"]["status"] == "PartialSuccess"
    assert [(e["errorCode"], e["location"]) for e in summary["rad69"]["errors"]] == [("XDSMissingDocument", unknown)]
    [document] = summary["rad69"]["documents"]
    assert hashlib.sha256(Path(document["file"]).read_bytes()).hexdigest() == known["file_sha256"]
    [message] = served.audit_messages(before)
    _check_audit(message, served, "RAD-69", "4", {known["study_uid"]})


def test_without_a_token_the_consumer_gets_nothing(
        served: Served, peer: XdsPeer, tmp_path: Path) -> None:  # noqa: F811
    [known] = served.rows("SELECT study_uid, series_uid, sop_instance_uid FROM instances LIMIT 1")
    before = len(served.listener.messages)
    status, summary = peer.client(
        "consume", tmp_path / "anonymous", "--rad69-url", f"{served.url}/xdsi/rad69", "--rad69-repository-id",
        SOURCE, "--image", f"{known['study_uid']}/{known['series_uid']}/{known['sop_instance_uid']}")
    assert status == 1 and "401" in summary["failure"]
    assert not (tmp_path / "anonymous" / "rad69").exists()
    assert served.audit_messages(before, expected=0) == []


def test_a_wado_rs_retrieve_is_audited_once(served: Served) -> None:
    [study] = served.rows("SELECT study_uid, number_of_instances FROM studies ORDER BY study_uid LIMIT 1")
    before = len(served.listener.messages)
    r = httpx.get(f"{served.url}/dicom-web/studies/{study['study_uid']}", headers=bearer(served.lake.token),
                  timeout=60)
    assert r.status_code == 200
    [message] = served.audit_messages(before)
    _check_audit(message, served, "RAD-107", "0", {study["study_uid"]})
