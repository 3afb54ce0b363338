"""SOAP 1.2 envelopes with WS-Addressing, and MTOM/XOP packages (``multipart/related``), both ways.

XDS.b sends documents as MTOM: the SOAP envelope is the first MIME part and each document a part of
its own, referenced from the XML by ``xop:Include href="cid:..."`` where base64 text would otherwise
be. Both the ITI-41 client and the RAD-69 route use this module; it has no sockets. XML from peers
is parsed with entities, DTDs and the network off, and without lxml's huge-tree mode, so a hostile
request cannot expand or fetch anything.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass, field
from email.message import Message
from typing import BinaryIO, Callable, Iterator, Sequence
from urllib.parse import unquote

from lxml import etree

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
XOP = "http://www.w3.org/2004/08/xop/include"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
_ROOT_ID = "root.message@pacsflow"
_CHUNK = 1 << 20

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                          remove_blank_text=False)


class MtomError(ValueError):
    """A malformed SOAP message or MIME package (one line; it never quotes the input)."""


@dataclass(frozen=True)
class Attachment:
    """One MIME part after the envelope: bytes in memory, or a file read in chunks at sending time
    (through ``opener`` when the file is not local, e.g. fsspec's ``open``)."""

    content_id: str
    content_type: str
    data: bytes | None = None
    path: str | None = None
    opener: Callable[[str], BinaryIO] | None = None

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        if self.path is None:
            raise ValueError(f"attachment {self.content_id}: neither data nor path")
        with (self.opener or _open_local)(self.path) as handle:
            while block := handle.read(_CHUNK):
                yield block


def _open_local(path: str) -> BinaryIO:
    return open(path, "rb")


def new_message_id() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def envelope(action: str, body: etree._Element, *, to: str | None = None, message_id: str | None = None,
             relates_to: str | None = None) -> bytes:
    """A SOAP 1.2 envelope around ``body`` with the WS-Addressing headers of a request (``ReplyTo``
    anonymous) or, with ``relates_to``, of a response."""
    root = etree.Element(_q(SOAP12, "Envelope"), nsmap={"s": SOAP12, "a": WSA})
    header = etree.SubElement(root, _q(SOAP12, "Header"))
    _header(header, "Action", action, must_understand=True)
    _header(header, "MessageID", message_id or new_message_id())
    if relates_to is None:
        reply_to = etree.SubElement(header, _q(WSA, "ReplyTo"))
        etree.SubElement(reply_to, _q(WSA, "Address")).text = ANONYMOUS
    else:
        _header(header, "RelatesTo", relates_to)
    if to is not None:
        _header(header, "To", to, must_understand=True)
    etree.SubElement(root, _q(SOAP12, "Body")).append(body)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _header(parent: etree._Element, name: str, text: str, *, must_understand: bool = False) -> None:
    element = etree.SubElement(parent, _q(WSA, name))
    element.text = text
    if must_understand:
        element.set(_q(SOAP12, "mustUnderstand"), "true")


def fault(code: str, reason: str, *, relates_to: str | None = None) -> bytes:
    """A SOAP 1.2 Fault envelope; ``code`` is ``Sender`` (the request is wrong) or ``Receiver``."""
    if code not in ("Sender", "Receiver"):
        raise ValueError("a SOAP 1.2 fault code is Sender or Receiver")
    body = etree.Element(_q(SOAP12, "Fault"))
    value = etree.SubElement(etree.SubElement(body, _q(SOAP12, "Code")), _q(SOAP12, "Value"))
    value.text = f"s:{code}"
    text = etree.SubElement(etree.SubElement(body, _q(SOAP12, "Reason")), _q(SOAP12, "Text"))
    text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    text.text = reason
    return envelope("http://www.w3.org/2005/08/addressing/soap/fault", body, relates_to=relates_to or ANONYMOUS)


def include(content_id: str) -> etree._Element:
    """The ``xop:Include`` that stands for the part ``content_id``."""
    element = etree.Element(_q(XOP, "Include"), nsmap={"xop": XOP})
    element.set("href", f"cid:{content_id}")
    return element


def package(envelope_bytes: bytes, attachments: Sequence[Attachment], *, action: str) -> tuple[str, Iterator[bytes]]:
    """The MTOM package: its ``Content-Type`` header value and its body as chunks (files are read as
    the chunks are taken, so a large answer is never whole in memory)."""
    boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
    content_type = (f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
                    f'start="<{_ROOT_ID}>"; start-info="application/soap+xml"; action="{action}"')
    return content_type, _parts(boundary, envelope_bytes, attachments, action)


def _parts(boundary: str, envelope_bytes: bytes, attachments: Sequence[Attachment], action: str) -> Iterator[bytes]:
    root_type = f'application/xop+xml; charset=UTF-8; type="application/soap+xml"; action="{action}"'
    yield _part_head(boundary, root_type, _ROOT_ID, first=True) + envelope_bytes
    for attachment in attachments:
        yield _part_head(boundary, attachment.content_type, attachment.content_id, first=False)
        yield from attachment.chunks()
    yield f"\r\n--{boundary}--\r\n".encode("ascii")


def _part_head(boundary: str, content_type: str, content_id: str, *, first: bool) -> bytes:
    lead = "" if first else "\r\n"
    return (f"{lead}--{boundary}\r\nContent-Type: {content_type}\r\nContent-Transfer-Encoding: binary\r\n"
            f"Content-ID: <{content_id}>\r\n\r\n").encode("ascii")


@dataclass
class Package:
    """A received SOAP message: the envelope's root, and the MIME parts after it by content id."""

    envelope: etree._Element
    attachments: dict[str, bytes] = field(default_factory=dict)

    @property
    def body(self) -> etree._Element:
        """The first element in ``soap:Body``."""
        found = self.envelope.find(_q(SOAP12, "Body"))
        if found is None or len(found) == 0:
            raise MtomError("the SOAP message has no Body content")
        return found[0]

    def header(self, name: str) -> str | None:
        """The text of a WS-Addressing header (``Action``, ``MessageID``, ``To``), if present."""
        found = self.envelope.find(f"{_q(SOAP12, 'Header')}/{_q(WSA, name)}")
        return None if found is None or found.text is None else found.text.strip()

    def fault_reason(self) -> str | None:
        """The reason of a SOAP Fault, or None when the body is not one."""
        body = self.body
        if body.tag != _q(SOAP12, "Fault"):
            return None
        text = body.findtext(f"{_q(SOAP12, 'Reason')}/{_q(SOAP12, 'Text')}")
        return " ".join((text or "no reason given").split())

    def resolve(self, element: etree._Element) -> bytes:
        """The bytes ``element`` carries: its ``xop:Include``'s part, or its inline base64 text."""
        included = element.find(_q(XOP, "Include"))
        if included is not None:
            href = included.get("href", "")
            if not href.startswith("cid:"):
                raise MtomError("an xop:Include href is not a cid: URL")
            content_id = unquote(href[4:])
            if content_id not in self.attachments:
                raise MtomError("an xop:Include names a MIME part the message does not have")
            return self.attachments[content_id]
        try:
            return base64.b64decode("".join((element.text or "").split()), validate=True)
        except binascii.Error:
            raise MtomError("a document's inline content is not base64") from None


def unpackage(content_type: str, body: bytes) -> Package:
    """Parses a SOAP 1.2 message: plain ``application/soap+xml`` or an MTOM ``multipart/related``."""
    header = Message()
    header["Content-Type"] = content_type or ""
    kind = header.get_content_type()
    if kind in ("application/soap+xml", "text/xml", "application/xop+xml"):
        return Package(_parse_envelope(body))
    if kind != "multipart/related":
        raise MtomError("the message is neither application/soap+xml nor multipart/related")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise MtomError("the multipart/related message has no boundary")
    parts = _split(body, boundary.encode("ascii", "replace"))
    start = header.get_param("start")
    root_id = start.strip("<>") if isinstance(start, str) else None
    root = next((p for p in parts if p[0] == root_id), parts[0]) if root_id else parts[0]
    attachments = {p[0]: p[1] for p in parts if p is not root and p[0] is not None}
    return Package(_parse_envelope(root[1]), attachments)


def _split(body: bytes, boundary: bytes) -> list[tuple[str | None, bytes]]:
    """The MIME parts as (content id without ``<>``, decoded bytes)."""
    delimiter = b"--" + boundary
    pieces = body.split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise MtomError("the multipart/related body is not closed by its boundary")
    parts = []
    for piece in pieces[1:-1]:  # before the first delimiter: the preamble; after the last: the epilogue
        piece = piece.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise MtomError("a MIME part has no blank line after its headers")
        parts.append(_decode_part(head, data))
    return parts


def _decode_part(head: bytes, data: bytes) -> tuple[str | None, bytes]:
    headers = Message()
    for line in head.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    encoding = (headers.get("Content-Transfer-Encoding") or "binary").strip().lower()
    if encoding == "base64":
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except binascii.Error:
            raise MtomError("a base64 MIME part is not base64") from None
    elif encoding not in ("binary", "8bit", "7bit"):
        raise MtomError("a MIME part has an unsupported Content-Transfer-Encoding")
    content_id = headers.get("Content-ID")
    return (content_id.strip().strip("<>") if content_id else None), data


def _parse_envelope(data: bytes) -> etree._Element:
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError:
        raise MtomError("the SOAP envelope is not well-formed XML") from None
    if root.getroottree().docinfo.doctype:
        raise MtomError("a SOAP message must not carry a document type declaration")
    if root.tag != _q(SOAP12, "Envelope"):
        raise MtomError("the message is not a SOAP 1.2 envelope")
    return root
