"""SOAP 1.2 envelopes and MTOM packages (tasks/xdsi/mtom.py): what we write, an independent MIME
parser (the standard library's ``email``) reads back; what peers send, we read, and hostile XML
is refused."""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path

import pytest
from lxml import etree

from pacsflow.tasks.xdsi import mtom

ACTION = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
NS = "urn:example:test"
# bytes a naive splitter would trip on: CRLFs, a fake boundary prefix, NULs
AWKWARD = b"DICM\r\n\r\n--MIMEBoundary_\x00\xff\r\n--\r\n" * 100


def _body(*cids: str) -> etree._Element:
    body = etree.Element(f"{{{NS}}}Request")
    for cid in cids:
        etree.SubElement(body, f"{{{NS}}}Document", id=cid).append(mtom.include(cid))
    return body


def _joined(content_type: str, chunks) -> tuple[str, bytes]:
    return content_type, b"".join(chunks)


def test_package_round_trip_keeps_every_byte(tmp_path: Path) -> None:
    on_disk = tmp_path / "b.dcm"
    on_disk.write_bytes(AWKWARD[::-1] * 50)
    env = mtom.envelope(ACTION, _body("a@x", "b@x"), to="http://repo.example/iti41")
    parts = [mtom.Attachment("a@x", "application/dicom", data=AWKWARD),
             mtom.Attachment("b@x", "application/dicom", path=str(on_disk))]
    content_type, body = _joined(*mtom.package(env, parts, action=ACTION))

    got = mtom.unpackage(content_type, body)
    assert got.header("Action") == ACTION
    assert got.header("To") == "http://repo.example/iti41"
    assert got.header("MessageID", ).startswith("urn:uuid:")
    documents = got.body.findall(f"{{{NS}}}Document")
    assert [got.resolve(d) for d in documents] == [AWKWARD, on_disk.read_bytes()]


def test_an_independent_mime_parser_reads_our_package() -> None:
    env = mtom.envelope(ACTION, _body("a@x"))
    content_type, body = _joined(*mtom.package(env, [mtom.Attachment("a@x", "application/dicom", data=AWKWARD)],
                                               action=ACTION))
    message = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body,
                                       policy=email.policy.HTTP)
    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/xop+xml"
    assert message.get_param("start-info") == "application/soap+xml"
    root, part = list(message.iter_parts())
    assert f"<{message.get_param('start').strip('<>')}>" == root["Content-ID"]
    assert root.get_content_type() == "application/xop+xml"
    assert etree.fromstring(root.get_payload(decode=True)).tag == f"{{{mtom.SOAP12}}}Envelope"
    assert part["Content-ID"] == "<a@x>" and part.get_content_type() == "application/dicom"
    assert part.get_payload(decode=True) == AWKWARD


def test_a_request_has_reply_to_and_a_response_relates_to() -> None:
    request = etree.fromstring(mtom.envelope(ACTION, _body()))
    response = etree.fromstring(mtom.envelope(ACTION + "Response", _body(), relates_to="urn:uuid:1"))
    wsa = {"a": mtom.WSA}
    assert request.findtext(".//a:ReplyTo/a:Address", namespaces=wsa) == mtom.ANONYMOUS
    assert request.find(".//a:RelatesTo", namespaces=wsa) is None
    assert response.findtext(".//a:RelatesTo", namespaces=wsa) == "urn:uuid:1"
    assert response.find(".//a:ReplyTo", namespaces=wsa) is None


def test_plain_soap_with_inline_base64_and_a_peer_style_package() -> None:
    body = etree.Element(f"{{{NS}}}Document")
    body.text = base64.b64encode(b"inline bytes").decode()
    plain = mtom.unpackage("application/soap+xml; charset=UTF-8", mtom.envelope(ACTION, body))
    assert plain.resolve(plain.body) == b"inline bytes"
    # As CXF writes it: a quoted boundary, a preamble-less body, a percent-encoded cid, no start param
    env = mtom.envelope(ACTION, _body("1.part%40cxf"))
    cxf = (b"--uuid:42\r\nContent-Type: application/xop+xml; charset=UTF-8; type=\"application/soap+xml\"\r\n"
           b"Content-Transfer-Encoding: binary\r\nContent-ID: <root.message@cxf.apache.org>\r\n\r\n" + env +
           b"\r\n--uuid:42\r\nContent-Type: application/dicom\r\nContent-Transfer-Encoding: binary\r\n"
           b"Content-ID: <1.part@cxf>\r\n\r\n" + AWKWARD + b"\r\n--uuid:42--")
    got = mtom.unpackage('multipart/related; type="application/xop+xml"; boundary="uuid:42"', cxf)
    assert got.resolve(got.body.find(f"{{{NS}}}Document")) == AWKWARD


def test_a_fault_round_trips() -> None:
    got = mtom.unpackage("application/soap+xml", mtom.fault("Sender", "the request is not a RAD-69 request"))
    assert got.fault_reason() == "the request is not a RAD-69 request"
    assert mtom.unpackage("application/soap+xml", mtom.envelope(ACTION, _body())).fault_reason() is None


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE s:Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><r>&x;</r></s:Body></s:Envelope>"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><r>&c;</r></s:Body></s:Envelope>"""


@pytest.mark.parametrize(("content_type", "body", "message"), [
    ("application/soap+xml", XXE, "document type declaration"),
    ("application/soap+xml", LAUGHS, "document type declaration"),
    ("application/soap+xml", b"<not-closed>", "not well-formed"),
    ("application/soap+xml", b"<Envelope/>", "not a SOAP 1.2 envelope"),
    ("application/json", b"{}", "neither"),
    ("multipart/related", b"--x\r\n\r\n", "no boundary"),
    ('multipart/related; boundary="x"', b"--x\r\nContent-ID: <a>\r\n\r\n<e/>", "not closed"),
    ('multipart/related; boundary="x"', b"--x\r\nno blank line--x--", "no blank line"),
])
def test_malformed_and_hostile_messages_are_refused_in_one_line(content_type: str, body: bytes, message: str) -> None:
    with pytest.raises(mtom.MtomError, match=message) as raised:
        mtom.unpackage(content_type, body)
    assert "\n" not in str(raised.value) and "passwd" not in str(raised.value)


def test_an_include_of_a_missing_part_is_an_error() -> None:
    env = mtom.envelope(ACTION, _body("missing@x"))
    content_type, body = _joined(*mtom.package(env, [], action=ACTION))
    got = mtom.unpackage(content_type, body)
    with pytest.raises(mtom.MtomError, match="does not have"):
        got.resolve(got.body.find(f"{{{NS}}}Document"))
