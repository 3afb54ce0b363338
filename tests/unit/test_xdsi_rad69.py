"""RAD-69 Retrieve Imaging Document Set: the request read (good, malformed, hostile), the response
written (tasks/xdsi/rad69.py), and the route in ``pacsflow serve`` over a real lake (tasks/web/xdsi.py):
the lake's files byte for byte as MTOM parts, RegistryErrors for what is not served, SOAP Faults for
malformed requests, and one Export audit per RAD-69 and WADO-RS response at a loopback syslog
listener."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from lxml import etree

from pacsflow.catalog.views import query
from pacsflow.tasks.settings import XdsiSettings
from pacsflow.tasks.web.app import create_app
from pacsflow.tasks.web.xdsi import close_audit_log
from pacsflow.tasks.xdsi import mtom, rad69
from tests.dicomweb_lake import bearer, build_lake
from tests.net.syslog_listener import SyslogListener, parse

SOURCE = "2.25.240815122125463532138815542375011357226"
OTHER_REPOSITORY = "2.25.29632452958154128155236009934453312330"
LE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
NS = {"xdsb": rad69.XDSB, "rs": rad69.RS}


def request_body(documents: list[tuple[str, str, str, str]], syntaxes=LE_SYNTAXES) -> etree._Element:
    """A RetrieveImagingDocumentSetRequest of (study, series, repository, document) tuples."""
    root = etree.Element(f"{{{rad69.RAD}}}RetrieveImagingDocumentSetRequest", nsmap={"iherad": rad69.RAD,
                                                                                     "ihe": rad69.XDSB})
    for study, series, repository, document in documents:
        s = etree.SubElement(root, f"{{{rad69.RAD}}}StudyRequest", studyInstanceUID=study)
        r = etree.SubElement(s, f"{{{rad69.RAD}}}SeriesRequest", seriesInstanceUID=series)
        d = etree.SubElement(r, f"{{{rad69.XDSB}}}DocumentRequest")
        etree.SubElement(d, f"{{{rad69.XDSB}}}RepositoryUniqueId").text = repository
        etree.SubElement(d, f"{{{rad69.XDSB}}}DocumentUniqueId").text = document
    syntax_list = etree.SubElement(root, f"{{{rad69.RAD}}}TransferSyntaxUIDList")
    for syntax in syntaxes:
        etree.SubElement(syntax_list, f"{{{rad69.RAD}}}TransferSyntaxUID").text = syntax
    return root


def soap(body: etree._Element, message_id: str = "urn:uuid:42") -> bytes:
    return mtom.envelope(rad69.REQUEST_ACTION, body, message_id=message_id)


def mtom_request(body: etree._Element) -> tuple[str, bytes]:
    content_type, chunks = mtom.package(soap(body), [], action=rad69.REQUEST_ACTION)
    return content_type, b"".join(chunks)


# -- the request -------------------------------------------------------------------------------


def test_a_plain_and_an_mtom_request_read_the_same() -> None:
    body = request_body([("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.5"), ("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.6"),
                         ("1.2.9", "1.2.9.1", OTHER_REPOSITORY, "1.2.9.1.1")])
    plain = rad69.parse_request("application/soap+xml; charset=utf-8", soap(body))
    packaged = rad69.parse_request(*mtom_request(body))
    assert plain == packaged
    assert plain.message_id == "urn:uuid:42" and plain.transfer_syntaxes == LE_SYNTAXES
    assert [(d.study_uid, d.series_uid, d.repository_unique_id, d.document_unique_id) for d in plain.documents] == [
        ("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.5"), ("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.6"),
        ("1.2.9", "1.2.9.1", OTHER_REPOSITORY, "1.2.9.1.1")]
    assert list(plain.uids())[:3] == ["1.2.3", "1.2.3.4", "1.2.3.4.5"]


def _without(tag: str) -> etree._Element:
    body = request_body([("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.5")])
    for element in body.iter(f"{{*}}{tag}"):
        element.getparent().remove(element)
        break
    return body


@pytest.mark.parametrize(("body", "message"), [
    (etree.Element(f"{{{rad69.XDSB}}}RetrieveDocumentSetRequest"), "not a RetrieveImagingDocumentSetRequest"),
    (_without("TransferSyntaxUIDList"), "TransferSyntaxUIDList"),
    (_without("DocumentUniqueId"), "no DocumentUniqueId"),
    (_without("RepositoryUniqueId"), "no RepositoryUniqueId"),
    (_without("DocumentRequest"), "no DocumentRequest"),
    (_without("SeriesRequest"), "no SeriesRequest"),
    (_without("StudyRequest"), "names no document"),
    (request_body([("", "1.2.3.4", SOURCE, "1.2.3.4.5")]), "no studyInstanceUID"),
    (request_body([("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.5")], syntaxes=()), "TransferSyntaxUIDList"),
])
def test_a_malformed_request_is_named_in_one_line(body: etree._Element, message: str) -> None:
    with pytest.raises(rad69.Rad69Error, match=message) as raised:
        rad69.parse_request("application/soap+xml", soap(body))
    assert "\n" not in str(raised.value) and "1.2.3" not in str(raised.value)


def test_another_action_is_refused() -> None:
    envelope = mtom.envelope("urn:ihe:iti:2007:RetrieveDocumentSet",
                             request_body([("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.5")]))
    with pytest.raises(rad69.Rad69Error, match="Action"):
        rad69.parse_request("application/soap+xml", envelope)


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE s:Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>
<r:RetrieveImagingDocumentSetRequest xmlns:r="urn:ihe:rad:xdsi-b:2009" xmlns:x="urn:ihe:iti:xds-b:2007">
<r:StudyRequest studyInstanceUID="1.2"><r:SeriesRequest seriesInstanceUID="1.2.3"><x:DocumentRequest>
<x:RepositoryUniqueId>1.2</x:RepositoryUniqueId><x:DocumentUniqueId>&x;</x:DocumentUniqueId></x:DocumentRequest>
</r:SeriesRequest></r:StudyRequest><r:TransferSyntaxUIDList>
<r:TransferSyntaxUID>1.2.840.10008.1.2.1</r:TransferSyntaxUID></r:TransferSyntaxUIDList>
</r:RetrieveImagingDocumentSetRequest></s:Body></s:Envelope>"""
BILLION_LAUGHS = XXE.replace(b'<!ENTITY x SYSTEM "file:///etc/passwd">', (
    b'<!ENTITY a "aaaaaaaaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY x "&c;&c;&c;&c;&c;&c;&c;&c;&c;">'))
ENTITY_IN_BODY = XXE.replace(b"<!DOCTYPE s:Envelope [<!ENTITY x SYSTEM \"file:///etc/passwd\">]>\n", b"")


@pytest.mark.parametrize("hostile", [XXE, BILLION_LAUGHS, ENTITY_IN_BODY])
def test_entities_are_never_resolved_or_expanded(hostile: bytes) -> None:
    with pytest.raises(mtom.MtomError) as raised:
        rad69.parse_request("application/soap+xml", hostile)
    assert "root" not in str(raised.value) and "aaaa" not in str(raised.value)


# -- the response ------------------------------------------------------------------------------


def test_the_response_names_each_document_and_each_error() -> None:
    served = [rad69.Served(rad69.DocumentRequest("1.2", "1.2.3", SOURCE, "1.2.3.4", "urn:oid:1.9"), "0.a@pacsflow")]
    missing = [rad69.missing(rad69.DocumentRequest("1.2", "1.2.3", SOURCE, "1.2.3.5"), SOURCE),
               rad69.missing(rad69.DocumentRequest("1.2", "1.2.3", OTHER_REPOSITORY, "1.2.3.6"), SOURCE)]
    root = etree.fromstring(rad69.response_envelope(served, missing, relates_to="urn:uuid:42"))
    assert root.findtext(f".//{{{mtom.WSA}}}Action") == rad69.RESPONSE_ACTION
    assert root.findtext(f".//{{{mtom.WSA}}}RelatesTo") == "urn:uuid:42"
    registry = root.find(".//rs:RegistryResponse", NS)
    assert registry.get("status") == rad69.Status.PARTIAL_SUCCESS.value
    errors = registry.findall("rs:RegistryErrorList/rs:RegistryError", NS)
    assert [(e.get("errorCode"), e.get("location")) for e in errors] == [
        ("XDSMissingDocument", "1.2.3.5"), ("XDSMissingDocument", "1.2.3.6")]
    assert all(e.get("severity") == rad69.SEVERITY_ERROR for e in errors)
    [document] = root.findall(".//xdsb:DocumentResponse", NS)
    assert [c.tag.split("}")[1] for c in document] == ["HomeCommunityId", "RepositoryUniqueId", "DocumentUniqueId",
                                                       "mimeType", "Document"]
    assert document.findtext("xdsb:DocumentUniqueId", namespaces=NS) == "1.2.3.4"
    assert document.find(f"xdsb:Document/{{{mtom.XOP}}}Include", NS).get("href") == "cid:0.a@pacsflow"


def test_the_status_follows_what_was_served() -> None:
    assert rad69.status_of(3, 0) is rad69.Status.SUCCESS
    assert rad69.status_of(3, 1) is rad69.Status.PARTIAL_SUCCESS
    assert rad69.status_of(0, 1) is rad69.Status.FAILURE


# -- the route over a real lake --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    return build_lake(tmp_path_factory.mktemp("rad69"), studies=2, modalities=("CT", "MR"),
                      extra=("SC_rgb_jpeg_dcmtk.dcm",))


@pytest.fixture(scope="module")
def listener():
    with SyslogListener("udp") as found:
        yield found


@pytest.fixture(scope="module")
def client(lake, listener):
    settings = lake.settings.model_copy(update={"xdsi": XdsiSettings(
        source_oid=SOURCE, pseudonym_oid="2.25.148916393427916262813366327018432151561", audit_url=listener.url)})
    app = create_app(settings)
    with TestClient(app, headers=bearer(lake.token)) as found:
        yield found
    close_audit_log(app)


def rows(lake, sql, *params):
    return query(lake.catalog, sql, list(params)).to_pylist()


def post(client, body: bytes, content_type: str = "application/soap+xml; charset=utf-8", **kw):
    return client.post("/xdsi/rad69", content=body, headers={"Content-Type": content_type, **kw})


def received(client, listener, before: int) -> list[bytes]:
    assert client.app.state.audit_log.flush()
    return listener.wait_for(before + 1)[before:]


def test_every_instance_of_a_study_comes_back_byte_for_byte(client, lake, listener) -> None:
    [study] = rows(lake, "SELECT study_uid, patient_pseudo_id FROM studies "
                   "WHERE list_contains(modalities, 'CT') LIMIT 1")
    files = rows(lake, "SELECT series_uid, sop_instance_uid, file_sha256, sop_class_uid FROM instances "
                 "WHERE study_uid = ? ORDER BY sop_instance_uid", study["study_uid"])
    body = request_body([(study["study_uid"], f["series_uid"], SOURCE, f["sop_instance_uid"]) for f in files])
    before = len(listener.messages)
    r = post(client, *reversed(mtom_request(body)))
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    answer = mtom.unpackage(r.headers["content-type"], r.content)
    assert answer.header("Action") == rad69.RESPONSE_ACTION and answer.header("RelatesTo") == "urn:uuid:42"
    assert answer.body.find("rs:RegistryResponse", NS).get("status") == rad69.Status.SUCCESS.value
    documents = answer.body.findall("xdsb:DocumentResponse", NS)
    got = {d.findtext("xdsb:DocumentUniqueId", namespaces=NS): answer.resolve(d.find("xdsb:Document", NS))
           for d in documents}
    assert {uid: hashlib.sha256(data).hexdigest() for uid, data in got.items()} == \
        {f["sop_instance_uid"]: f["file_sha256"] for f in files}
    assert {d.findtext("xdsb:mimeType", namespaces=NS) for d in documents} == {"application/dicom"}
    assert {d.findtext("xdsb:RepositoryUniqueId", namespaces=NS) for d in documents} == {SOURCE}

    [message] = received(client, listener, before)
    xml = etree.fromstring(parse(message)[1][3:])
    assert xml.find("EventIdentification/EventTypeCode").get("csd-code") == "RAD-69"
    assert xml.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    objects = {p.get("ParticipantObjectID"): p for p in xml.iter("ParticipantObjectIdentification")}
    assert set(objects) == {f"{study['patient_pseudo_id']}^^^&2.25.148916393427916262813366327018432151561&ISO",
                            study["study_uid"]}
    counts = {c.get("UID"): int(c.get("NumberOfInstances")) for c in objects[study["study_uid"]].iter("SOPClass")}
    assert sum(counts.values()) == len(files) and set(counts) == {f["sop_class_uid"] for f in files}
    assert [p.get("UserID") for p in xml.iter("ActiveParticipant")] == ["http://testserver/xdsi/rad69", "viewer"]


def test_unknown_instances_and_another_repository_are_missing_documents(client, lake, listener) -> None:
    [f] = rows(lake, "SELECT study_uid, series_uid, sop_instance_uid, file_sha256 FROM instances "
               "WHERE transfer_syntax_uid = '1.2.840.10008.1.2.1' LIMIT 1")
    body = request_body([(f["study_uid"], f["series_uid"], SOURCE, f["sop_instance_uid"]),
                         (f["study_uid"], f["series_uid"], SOURCE, "2.25.1"),
                         (f["study_uid"], "2.25.2", SOURCE, f["sop_instance_uid"]),
                         (f["study_uid"], f["series_uid"], OTHER_REPOSITORY, f["sop_instance_uid"])])
    before = len(listener.messages)
    r = post(client, soap(body))
    answer = mtom.unpackage(r.headers["content-type"], r.content)
    registry = answer.body.find("rs:RegistryResponse", NS)
    assert registry.get("status") == rad69.Status.PARTIAL_SUCCESS.value
    assert [(e.get("errorCode"), e.get("location")) for e in registry.iterfind(".//rs:RegistryError", NS)] == [
        ("XDSMissingDocument", "2.25.1"), ("XDSMissingDocument", f["sop_instance_uid"]),
        ("XDSMissingDocument", f["sop_instance_uid"])]
    [document] = answer.body.findall("xdsb:DocumentResponse", NS)
    assert hashlib.sha256(answer.resolve(document.find("xdsb:Document", NS))).hexdigest() == f["file_sha256"]
    [message] = received(client, listener, before)
    assert b'EventOutcomeIndicator="4"' in message


def test_nothing_found_is_a_failure_and_a_stored_syntax_not_asked_for_is_not_transcoded(client, lake) -> None:
    [jpeg] = rows(lake, "SELECT study_uid, series_uid, sop_instance_uid FROM instances "
                  "WHERE transfer_syntax_uid = '1.2.840.10008.1.2.4.50'")
    r = post(client, soap(request_body([(jpeg["study_uid"], jpeg["series_uid"], SOURCE, jpeg["sop_instance_uid"])])))
    answer = mtom.unpackage(r.headers["content-type"], r.content)
    registry = answer.body.find("rs:RegistryResponse", NS)
    assert registry.get("status") == rad69.Status.FAILURE.value
    [error] = registry.iterfind(".//rs:RegistryError", NS)
    assert error.get("errorCode") == rad69.NOT_IN_SYNTAX and "1.2.840.10008.1.2.4.50" in error.get("codeContext")
    assert answer.body.find("xdsb:DocumentResponse", NS) is None


def _fault_reason(r) -> str:
    assert r.headers["content-type"].startswith("application/soap+xml")
    reason = mtom.unpackage(r.headers["content-type"], r.content).fault_reason()
    assert reason is not None
    return reason


@pytest.mark.parametrize(("body", "content_type"), [
    (soap(request_body([("1.2.3/../..", "1.2.3.4", SOURCE, "1.2.3.4.5")])), "application/soap+xml"),
    (soap(request_body([("1.2.3", "1.2.3.4", SOURCE, "1.2.3.4.5 OR 1=1")])), "application/soap+xml"),
    (soap(request_body([("1.2.3", "1.2.3.4", SOURCE, "1" * 65)])), "application/soap+xml"),
    (XXE, "application/soap+xml"),
    (BILLION_LAUGHS, "application/soap+xml"),
    (b"<not xml", "application/soap+xml"),
    (b"{}", "application/json"),
])
def test_a_malformed_or_hostile_request_gets_a_one_line_fault_without_an_echo(client, body, content_type) -> None:
    r = post(client, body, content_type)
    assert r.status_code == 400
    reason = _fault_reason(r)
    assert "\n" not in reason and "1=1" not in reason and ".." not in reason and "root:" not in r.text


def test_a_request_larger_than_the_cap_is_refused(client) -> None:
    r = post(client, b"<" * (8 << 20) + b"<")
    assert r.status_code == 413 and "larger than" in _fault_reason(r)


def test_rad69_needs_a_read_token(lake) -> None:
    with TestClient(create_app(lake.settings)) as anonymous:
        r = anonymous.post("/xdsi/rad69", content=soap(request_body([("1.2", "1.2.3", SOURCE, "1.2.3.4")])),
                           headers={"Content-Type": "application/soap+xml"})
    assert r.status_code == 401


def test_a_wado_rs_retrieve_is_audited_once_and_names_only_pseudonymous_uids(client, lake, listener) -> None:
    [study] = rows(lake, "SELECT study_uid, patient_pseudo_id, accession_number FROM studies "
                   "WHERE list_contains(modalities, 'MR') LIMIT 1")
    before = len(listener.messages)
    r = client.get(f"/dicom-web/studies/{study['study_uid']}")
    assert r.status_code == 200
    [message] = received(client, listener, before)
    header, msg = parse(message)
    assert (header.pri, header.msgid) == (85, "IHE+RFC-3881")
    xml = etree.fromstring(msg[3:])
    assert xml.find("EventIdentification/EventTypeCode").get("csd-code") == "RAD-107"
    assert [p.get("ParticipantObjectID") for p in xml.iter("ParticipantObjectIdentification")] == [
        f"{study['patient_pseudo_id']}^^^&2.25.148916393427916262813366327018432151561&ISO", study["study_uid"]]
    if study["accession_number"]:
        assert study["accession_number"].encode() not in message
    # metadata and frames are not audited, and neither is a 404
    assert client.get(f"/dicom-web/studies/{study['study_uid']}/metadata").status_code == 200
    assert client.get("/dicom-web/studies/2.25.404").status_code == 404
    assert client.app.state.audit_log.flush()
    assert len(listener.wait_for(before + 2, timeout=0.5)) == before + 1
