"""ATNA: DICOM audit messages (PS3.15 A.5) of what the Imaging Document Source exports, sent as
RFC 5424 syslog (IHE ITI-20) to ``xdsi.audit_url``.

One Export (DCM 110106) message per RAD-68 submission (audited as its ITI-41 Document Source) and
per RAD-69 or WADO-RS (RAD-107) response. :func:`audit_message` is pure: an :class:`AuditEvent`
in, XML bytes out. A message names pseudonymous things only (the patient pseudonym as a CX under
the pseudonym OID, Study Instance UIDs, the submission set's and documents' uniqueIds, SOP Class
UIDs) and the network endpoints and token names that took part; no image's header value reaches it.

Each participant object carries the DICOM schema's ``ParticipantObjectName`` only where naming
it reveals nothing: the patient's is its pseudonym. IHE's audit tables leave the name optional for
studies and documents, so those have none.

:class:`SyslogSender` is the one network boundary: UDP (RFC 5426, one datagram a message) or TCP
framed by octet counting (RFC 6587), one connection kept open. Sending never raises into the
caller: a failed send is counted (``failed``) and logged in one line without the message's content,
once when sending starts to fail (not again until a send has succeeded). :class:`AuditLog` is what
a process holds: it sends now, or queues the event for its worker thread.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import logging
import os
import queue
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable
from urllib.parse import urlsplit

from lxml import etree

from pacsflow.tasks.settings import XdsiSettings

log = logging.getLogger(__name__)

# ITI-20: facility 10 (security/authorization) at severity 5 (notice): 10 * 8 + 5.
PRI_AUDIT = 85
MSGID = "IHE+RFC-3881"  # ITI-20 names this MSGID for every audit message it carries
APP_NAME = "pacsflow"
BOM = b"\xef\xbb\xbf"  # RFC 5424 MSG-UTF8: the BOM says the MSG is UTF-8
WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
_PRINTABLE = re.compile(r"[^\x21-\x7e]")
_AUDIT_URL = re.compile(r"syslog\+(udp|tcp)://([^/:]+):([0-9]{1,5})/?")
QUEUE_SIZE = 10_000  # events waiting for the worker; past that they are dropped and counted


@dataclass(frozen=True)
class Code:
    """A coded value, written as the schema's CodedValueType (``csd-code``, ``codeSystemName``,
    ``originalText``: IHE's EV(code, scheme, meaning))."""

    code: str
    scheme: str
    meaning: str


EXPORT = Code("110106", "DCM", "Export")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
REPORT_NUMBER = Code("9", "RFC-3881", "Report Number")
SUBMISSION_SET = Code("urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd", "IHE XDS Metadata",
                      "submission set classificationNode")
APPLICATION_SERVER = "4"  # AuditSourceTypeCode: application server process


class Transaction(enum.Enum):
    """The EventTypeCode: the IHE transaction audited. RAD-68 is audited as its ITI-41."""

    PROVIDE_AND_REGISTER = Code("ITI-41", "IHE Transactions", "Provide and Register Document Set-b")
    RETRIEVE_IMAGING_DOCUMENT_SET = Code("RAD-69", "IHE Transactions", "Retrieve Imaging Document Set")
    WADO_RS_RETRIEVE = Code("RAD-107", "IHE Transactions", "WADO-RS Retrieve")


class Outcome(str, enum.Enum):
    """EventOutcomeIndicator."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"  # e.g. PartialSuccess: some documents missing
    SERIOUS_FAILURE = "8"  # e.g. Failure: nothing exported
    MAJOR_FAILURE = "12"


class Transport(str, enum.Enum):
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant. ``host`` is its NetworkAccessPointID, a machine name or an IP address
    (the type code follows from which)."""

    user_id: str
    requestor: bool
    host: str | None = None
    alternative_user_id: str | None = None


@dataclass(frozen=True)
class Study:
    """A study exported: its UID and, when known, its instances per SOP Class UID."""

    uid: str
    sop_classes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Document:
    """An XDS document exported (the KOS, or an instance served by RAD-69), by uniqueId."""

    unique_id: str
    repository_unique_id: str | None = None


@dataclass(frozen=True)
class AuditEvent:
    """One Export: who sent (``source``, 110153) what (``patients`` as CX, ``studies``,
    ``submission_set``, ``documents``) to whom (``destination``, 110152), when, and how it ended."""

    transaction: Transaction
    outcome: Outcome
    source: Participant
    destination: Participant
    audit_source_id: str
    when: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    patients: tuple[str, ...] = ()
    studies: tuple[Study, ...] = ()
    submission_set: str | None = None
    documents: tuple[Document, ...] = ()


def patient_cx(pseudonym: str, authority: str | None) -> str:
    """The pseudonym as an HL7 CX under its assigning authority (ISO OID); bare without one."""
    return f"{pseudonym}^^^&{authority}&ISO" if authority else pseudonym


def access_point_type(host: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "1"
    return "2"


# -- the message (pure) ------------------------------------------------------------------------


def audit_message(event: AuditEvent) -> bytes:
    """The DICOM audit message of ``event``, UTF-8 XML with a declaration."""
    root = etree.Element("AuditMessage")
    when = event.when if event.when.tzinfo else event.when.replace(tzinfo=timezone.utc)
    ident = etree.SubElement(root, "EventIdentification", EventActionCode="R",
                             EventDateTime=when.isoformat(timespec="milliseconds"),
                             EventOutcomeIndicator=event.outcome.value)
    _coded(ident, "EventID", EXPORT)
    _coded(ident, "EventTypeCode", event.transaction.value)
    _participant(root, event.source, SOURCE_ROLE)
    _participant(root, event.destination, DESTINATION_ROLE)
    source = etree.SubElement(root, "AuditSourceIdentification", AuditSourceID=event.audit_source_id)
    etree.SubElement(source, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})
    for cx in event.patients:
        patient = _object(root, cx, PATIENT_NUMBER, type_code="1", role="1")
        patient.insert(1, _text("ParticipantObjectName", cx.split("^", 1)[0]))
    for study in event.studies:
        _study(root, study)
    if event.submission_set:
        _object(root, event.submission_set, SUBMISSION_SET, type_code="2", role="20")
    for document in event.documents:
        element = _object(root, document.unique_id, REPORT_NUMBER, type_code="2", role="3")
        if document.repository_unique_id:
            value = base64.b64encode(document.repository_unique_id.encode("utf-8")).decode("ascii")
            etree.SubElement(element, "ParticipantObjectDetail", type="Repository Unique Id", value=value)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _coded(parent: etree._Element, tag: str, code: Code) -> etree._Element:
    return etree.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.scheme,
                                          "originalText": code.meaning})


def _text(tag: str, text: str) -> etree._Element:
    element = etree.Element(tag)
    element.text = text
    return element


def _participant(root: etree._Element, who: Participant, role: Code) -> None:
    attributes = {"UserID": who.user_id, "UserIsRequestor": "true" if who.requestor else "false"}
    if who.alternative_user_id:
        attributes["AlternativeUserID"] = who.alternative_user_id
    if who.host:
        attributes["NetworkAccessPointID"] = who.host
        attributes["NetworkAccessPointTypeCode"] = access_point_type(who.host)
    _coded(etree.SubElement(root, "ActiveParticipant", attributes), "RoleIDCode", role)


def _object(root: etree._Element, object_id: str, id_type: Code, *, type_code: str, role: str) -> etree._Element:
    element = etree.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=object_id,
                               ParticipantObjectTypeCode=type_code, ParticipantObjectTypeCodeRole=role)
    _coded(element, "ParticipantObjectIDTypeCode", id_type)
    return element


def _study(root: etree._Element, study: Study) -> None:
    element = _object(root, study.uid, STUDY_INSTANCE_UID, type_code="2", role="3")
    if study.sop_classes:
        description = etree.SubElement(element, "ParticipantObjectDescription")
        for uid, count in study.sop_classes:
            etree.SubElement(description, "SOPClass", UID=uid, NumberOfInstances=str(count))


# -- events of our transactions ---------------------------------------------------------------


def local_participant(user_id: str, *, requestor: bool) -> Participant:
    """pacsflow itself: ``user_id`` (an endpoint URL, or WS-Addressing's anonymous reply address),
    this machine's name and the process id."""
    return Participant(user_id, requestor, host=socket.gethostname(), alternative_user_id=str(os.getpid()))


def submission_event(*, outcome: Outcome, repository_url: str, audit_source_id: str, patient: str,
                     submission_set: str, documents: tuple[Document, ...] = (),
                     studies: tuple[Study, ...] = ()) -> AuditEvent:
    """A RAD-68 submission as its ITI-41 Document Source audits it: we ask (source, requestor;
    UserID = our ReplyTo address), the repository receives (destination)."""
    repository = Participant(repository_url, False, host=urlsplit(repository_url).hostname)
    return AuditEvent(Transaction.PROVIDE_AND_REGISTER, outcome, local_participant(WSA_ANONYMOUS, requestor=True),
                      repository, audit_source_id, patients=(patient,), studies=studies,
                      submission_set=submission_set, documents=documents)


def retrieve_event(transaction: Transaction, *, outcome: Outcome, endpoint_url: str, audit_source_id: str,
                   client_host: str | None, client_user: str | None, patients: tuple[str, ...] = (),
                   studies: tuple[Study, ...] = (), documents: tuple[Document, ...] = ()) -> AuditEvent:
    """A RAD-69 or WADO-RS response: we send (source, at ``endpoint_url``), the client asked
    (destination, requestor: its token's name, else its address)."""
    client = Participant(client_user or client_host or "unknown", True, host=client_host)
    return AuditEvent(transaction, outcome, local_participant(endpoint_url, requestor=False), client,
                      audit_source_id, patients=patients, studies=studies, documents=documents)


def audit_source_id(settings: XdsiSettings) -> str:
    """AuditSourceID: our Imaging Document Source's OID when set, else this machine's name."""
    return settings.source_oid or f"pacsflow@{socket.gethostname()}"


# -- syslog (RFC 5424) ----------------------------------------------------------------------------


def _field(value: str | None, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` long; ``-`` when empty."""
    cleaned = _PRINTABLE.sub("_", value or "")[:limit]
    return cleaned or "-"


def syslog_message(msg: bytes, *, when: datetime, hostname: str, procid: str, app_name: str = APP_NAME,
                   msgid: str = MSGID, pri: int = PRI_AUDIT) -> bytes:
    """One RFC 5424 SYSLOG-MSG: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - `` and the
    message as MSG-UTF8 (BOM first); no structured data."""
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    stamp = when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (f"<{pri}>1 {stamp} {_field(hostname, 255)} {_field(app_name, 48)} {_field(procid, 128)} "
              f"{_field(msgid, 32)} - ")
    return header.encode("ascii") + BOM + msg


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 octet-counting framing for syslog over TCP: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(message), message)


def parse_audit_url(url: str) -> tuple[Transport, str, int]:
    """``syslog+udp://host:port`` / ``syslog+tcp://host:port`` as (transport, host, port)."""
    match = _AUDIT_URL.fullmatch(url)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise ValueError("xdsi.audit_url must be syslog+udp://host:port or syslog+tcp://host:port")
    return Transport(match.group(1)), match.group(2), int(match.group(3))


class SyslogSender:
    """Audit messages to one audit record repository. Thread-safe; :meth:`send` never raises."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        self.transport, self.host, self.port = parse_audit_url(url)
        self.timeout_s = timeout_s
        self.sent = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failing = False
        self._hostname = socket.gethostname()
        self._procid = str(os.getpid())

    def send(self, msg: bytes, *, when: datetime | None = None) -> bool:
        """Sends ``msg`` (an audit message) as one syslog message; False when it could not go."""
        message = syslog_message(msg, when=when or datetime.now(timezone.utc), hostname=self._hostname,
                                 procid=self._procid)
        with self._lock:
            try:
                if self.transport is Transport.UDP:
                    self._send_udp(message)
                else:
                    self._send_tcp(octet_counted(message))
            except OSError as exc:
                self._close()
                self._note_failure(type(exc).__name__)
                return False
            if self._failing:
                log.info("audit: the audit repository at %s:%d takes messages again (%d failed so far)",
                         self.host, self.port, self.failed)
            self._failing = False
            self.sent += 1
            return True

    def count_failure(self, reason: str) -> None:
        """Counts a message that did not go (``reason``: one line naming no value)."""
        with self._lock:
            self._note_failure(reason)

    def _note_failure(self, reason: str) -> None:
        self.failed += 1
        if not self._failing:
            log.warning("audit: cannot send to the audit repository at %s %s:%d (%s); check xdsi.audit_url; "
                        "further failures are only counted", self.transport.value, self.host, self.port, reason)
        self._failing = True

    def _send_udp(self, message: bytes) -> None:
        if self._sock is None:
            family, kind, proto, _name, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            self._sock = socket.socket(family, kind, proto)
            self._sock.settimeout(self.timeout_s)
            self._sock.connect(address)  # a connected UDP socket reports a refusing port on a later send
        self._sock.send(message)

    def _send_tcp(self, frame: bytes) -> None:
        if self._sock is not None and not _still_open(self._sock):
            self._close()  # the repository closed the idle connection: a send would vanish into it
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(frame)

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


def _still_open(sock: socket.socket) -> bool:
    """Whether the peer has not closed a connection we only write to (it sends nothing back)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


class AuditLog:
    """What a process holds to audit: builds each event's message and sends it, now
    (:meth:`record`, for a flow's own task) or from a worker thread (:meth:`record_later`, for a
    web response: the catalog lookups that name the event, and the sending, stay off its path).
    Never raises."""

    def __init__(self, sender: SyslogSender) -> None:
        self.sender = sender
        self._queue: queue.Queue[Callable[[], AuditEvent | None] | None] = queue.Queue(QUEUE_SIZE)
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: XdsiSettings) -> AuditLog | None:
        """The audit log of ``xdsi.audit_url``; None while it is unset."""
        return cls(SyslogSender(settings.audit_url)) if settings.audit_url else None

    def record(self, event: AuditEvent) -> bool:
        """Sends ``event``'s message now; False when it did not go (counted)."""
        try:
            msg = audit_message(event)
        except ValueError:  # lxml refuses control characters in a value
            self.sender.count_failure(f"an {event.transaction.value.code} event could not be written as XML")
            return False
        return self.sender.send(msg, when=event.when)

    def record_later(self, build: Callable[[], AuditEvent | None]) -> None:
        """Queues ``build``; the worker thread calls it and records the event it returns."""
        try:
            self._queue.put_nowait(build)
        except queue.Full:
            self.sender.count_failure("the audit queue is full")
            return
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="pacsflow-audit", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while (build := self._queue.get()) is not None:
            try:
                event = build()
                if event is not None:
                    self.record(event)
            except Exception as exc:  # noqa: BLE001 - the worker outlives one event it could not build
                self.sender.count_failure(f"an event could not be built: {type(exc).__name__}")
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits until every queued event was recorded (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Records what is queued (waiting up to ``timeout_s``), stops the worker, closes the connection."""
        self.flush(timeout_s)
        with self._worker_lock:
            if self._worker is not None and self._worker.is_alive():
                self._queue.put(None)
                self._worker.join(timeout_s)
            self._worker = None
        self.sender.close()
