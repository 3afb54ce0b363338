"""RAD-69 Retrieve Imaging Document Set (IHE RAD TF-3 4.69), the Imaging Document Source's side:
the request read, the response written. Pure: the route in :mod:`pacsflow.tasks.web.xdsi` looks the
instances up in the catalog and streams the lake's files as the response's MTOM parts.

The request (namespace ``urn:ihe:rad:xdsi-b:2009``) names instances by study, series and
``DocumentUniqueId`` (the SOP Instance UID) with the ``RepositoryUniqueId`` of the source each
lives in (ours: ``xdsi.source_oid``), and the transfer syntaxes the consumer accepts. The answer is
ITI-43's RetrieveDocumentSetResponse: one ``application/dicom`` document per instance found, a
RegistryError per instance not served: XDSMissingDocument (unknown here, or another repository) or
``urn:dicom:wado:0007`` (stored in a transfer syntax the consumer did not list: the lake's files
are sent as stored, never transcoded). Status Success, PartialSuccess or Failure.

Messages of errors never quote the request: a malformed one is named by what is wrong with it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from lxml import etree

from pacsflow.tasks.xdsi import mtom

RAD = "urn:ihe:rad:xdsi-b:2009"
XDSB = "urn:ihe:iti:xds-b:2007"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
REQUEST_ACTION = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
RESPONSE_ACTION = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
DICOM = "application/dicom"
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
MISSING_DOCUMENT = "XDSMissingDocument"
NOT_IN_SYNTAX = "urn:dicom:wado:0007"  # PS3.18 WADO-WS: not available in the requested transfer syntax
MAX_DOCUMENTS = 20_000
MAX_SYNTAXES = 64
_HOME = re.compile(r"urn:oid:[0-9]+(\.[0-9]+)*")


class Rad69Error(ValueError):
    """A malformed RAD-69 request (one line, never quoting the request)."""


class Status(str, enum.Enum):
    SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
    FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"


@dataclass(frozen=True)
class DocumentRequest:
    """One requested instance. The UIDs are as sent: the route checks them before any lookup."""

    study_uid: str
    series_uid: str
    repository_unique_id: str
    document_unique_id: str
    home_community_id: str | None = None


@dataclass(frozen=True)
class RetrieveRequest:
    documents: tuple[DocumentRequest, ...]
    transfer_syntaxes: tuple[str, ...]
    message_id: str | None = None

    def uids(self) -> Iterable[str]:
        """Every DICOM UID of the request: the study, series and document UIDs, and the syntaxes."""
        for d in self.documents:
            yield from (d.study_uid, d.series_uid, d.document_unique_id)
        yield from self.transfer_syntaxes


@dataclass(frozen=True)
class Served:
    """A requested instance that goes out, as the MTOM part ``content_id``."""

    request: DocumentRequest
    content_id: str


@dataclass(frozen=True)
class NotServed:
    """A requested instance that does not go out, and why (a RegistryError code and its context)."""

    request: DocumentRequest
    error_code: str
    context: str


def _q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def parse_request(content_type: str, body: bytes) -> RetrieveRequest:
    """The RetrieveImagingDocumentSetRequest of a SOAP 1.2 message (plain or MTOM); Rad69Error or
    :class:`~pacsflow.tasks.xdsi.mtom.MtomError` when it is not one."""
    package = mtom.unpackage(content_type, body)
    action = package.header("Action")
    if action is not None and action != REQUEST_ACTION:
        raise Rad69Error("the WS-Addressing Action is not RetrieveImagingDocumentSet")
    root = package.body
    if root.tag != _q(RAD, "RetrieveImagingDocumentSetRequest"):
        raise Rad69Error("the SOAP body is not a RetrieveImagingDocumentSetRequest")
    documents = tuple(_documents(root))
    if not documents:
        raise Rad69Error("the request names no document")
    if len(documents) > MAX_DOCUMENTS:
        raise Rad69Error(f"the request names more than {MAX_DOCUMENTS} documents")
    syntaxes = tuple(_text(e, "TransferSyntaxUID") for e in root.iterfind(
        f"{_q(RAD, 'TransferSyntaxUIDList')}/{_q(RAD, 'TransferSyntaxUID')}"))
    if not syntaxes or len(syntaxes) > MAX_SYNTAXES:
        raise Rad69Error(f"the request needs a TransferSyntaxUIDList of 1 to {MAX_SYNTAXES} UIDs")
    return RetrieveRequest(documents, syntaxes, package.header("MessageID"))


def _documents(root: etree._Element) -> Iterable[DocumentRequest]:
    for study in root.iterfind(_q(RAD, "StudyRequest")):
        study_uid = _attribute(study, "studyInstanceUID")
        series_requests = study.findall(_q(RAD, "SeriesRequest"))
        if not series_requests:
            raise Rad69Error("a StudyRequest has no SeriesRequest")
        for series in series_requests:
            series_uid = _attribute(series, "seriesInstanceUID")
            requests = series.findall(_q(XDSB, "DocumentRequest"))
            if not requests:
                raise Rad69Error("a SeriesRequest has no DocumentRequest")
            for request in requests:
                home = request.findtext(_q(XDSB, "HomeCommunityId"))
                yield DocumentRequest(study_uid, series_uid, _child_text(request, "RepositoryUniqueId"),
                                      _child_text(request, "DocumentUniqueId"),
                                      home.strip() if home and _HOME.fullmatch(home.strip()) else None)


def _attribute(element: etree._Element, name: str) -> str:
    value = (element.get(name) or "").strip()
    if not value:
        raise Rad69Error(f"a {etree.QName(element).localname} has no {name}")
    return value


def _child_text(element: etree._Element, name: str) -> str:
    child = element.find(_q(XDSB, name))
    if child is None:
        raise Rad69Error(f"a DocumentRequest has no {name}")
    return _text(child, name)


def _text(element: etree._Element, name: str) -> str:
    value = "".join(element.itertext()).strip()
    if not value or len(element):
        raise Rad69Error(f"a {name} is empty or not plain text")
    return value


def status_of(served: int, not_served: int) -> Status:
    if not not_served:
        return Status.SUCCESS
    return Status.PARTIAL_SUCCESS if served else Status.FAILURE


def response_envelope(served: Sequence[Served], not_served: Sequence[NotServed], *,
                      relates_to: str | None) -> bytes:
    """The SOAP envelope of the RetrieveDocumentSetResponse; each served instance's Document is an
    ``xop:Include`` of its part, which the caller sends after the envelope in the same order."""
    response = etree.Element(_q(XDSB, "RetrieveDocumentSetResponse"), nsmap={"xdsb": XDSB, "rs": RS})
    registry = etree.SubElement(response, _q(RS, "RegistryResponse"),
                                status=status_of(len(served), len(not_served)).value)
    if not_served:
        errors = etree.SubElement(registry, _q(RS, "RegistryErrorList"))
        for failed in not_served:
            etree.SubElement(errors, _q(RS, "RegistryError"), errorCode=failed.error_code,
                             codeContext=failed.context, location=failed.request.document_unique_id,
                             severity=SEVERITY_ERROR)
    for item in served:
        document = etree.SubElement(response, _q(XDSB, "DocumentResponse"))
        if item.request.home_community_id:
            _sub(document, "HomeCommunityId", item.request.home_community_id)
        _sub(document, "RepositoryUniqueId", item.request.repository_unique_id)
        _sub(document, "DocumentUniqueId", item.request.document_unique_id)
        _sub(document, "mimeType", DICOM)
        etree.SubElement(document, _q(XDSB, "Document")).append(mtom.include(item.content_id))
    return mtom.envelope(RESPONSE_ACTION, response, relates_to=relates_to or mtom.ANONYMOUS)


def _sub(parent: etree._Element, name: str, text: str) -> None:
    etree.SubElement(parent, _q(XDSB, name)).text = text


def missing(request: DocumentRequest, repository_unique_id: str | None) -> NotServed:
    """XDSMissingDocument: in another repository, or not in our catalog."""
    if repository_unique_id is None or request.repository_unique_id != repository_unique_id:
        return NotServed(request, MISSING_DOCUMENT, "the document is not in this Imaging Document Source's repository")
    return NotServed(request, MISSING_DOCUMENT, "no such instance in the study and series named")


def not_in_syntax(request: DocumentRequest, stored: str) -> NotServed:
    return NotServed(request, NOT_IN_SYNTAX, f"the instance is stored in transfer syntax {stored}, which the "
                                             "request does not accept (instances are sent as stored)")
