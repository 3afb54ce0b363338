"""ATNA (tasks/xdsi/audit.py): the DICOM audit message is valid against the audit schema's structure,
carries the IHE codes of each transaction and names nothing but its pseudonymous inputs; syslog
messages reach a real loopback listener over UDP and TCP, one per send, with an RFC 5424 header
and RFC 6587 framing; a repository that is down never fails the caller."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import socket
from datetime import datetime, timezone

import pytest
from lxml import etree

from pacsflow.tasks.settings import XdsiSettings
from pacsflow.tasks.xdsi import audit
from tests.helpers import free_port
from tests.net.syslog_listener import SyslogListener, parse

PSEUDONYM = "PSN7F3A9C21"
PSEUDONYM_OID = "2.25.148916393427916262813366327018432151561"
STUDY = "2.25.301234567890123456789012345678901234"
SUBMISSION_SET = "2.25.99887766554433221100998877665544"
KOS_UID = "2.25.11122233344455566677788899900011"
REPOSITORY = "2.25.29632452958154128155236009934453312330"
SOURCE_OID = "2.25.240815122125463532138815542375011357226"
CT_IMAGE, KOS = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.59"
WHEN = datetime(2026, 12, 1, 14, 30, 5, 123000, tzinfo=timezone.utc)

# The DICOM audit message schema (PS3.15 A.5.1) in RELAX NG's XML syntax, for the elements we
# write. One deliberate difference: ParticipantObjectName/Query is optional here, as in IHE's
# audit tables (the published DICOM schema asks for one of them).
SCHEMA = """\
<grammar xmlns="http://relaxng.org/ns/structure/1.0" datatypeLibrary="http://www.w3.org/2001/XMLSchema-datatypes">
  <start>
    <element name="AuditMessage">
      <element name="EventIdentification">
        <element name="EventID"><ref name="coded"/></element>
        <zeroOrMore><element name="EventTypeCode"><ref name="coded"/></element></zeroOrMore>
        <optional><attribute name="EventActionCode">
          <choice><value>C</value><value>R</value><value>U</value><value>D</value><value>E</value></choice>
        </attribute></optional>
        <attribute name="EventDateTime"><data type="dateTime"/></attribute>
        <attribute name="EventOutcomeIndicator">
          <choice><value>0</value><value>4</value><value>8</value><value>12</value></choice>
        </attribute>
        <optional><element name="EventOutcomeDescription"><text/></element></optional>
      </element>
      <oneOrMore>
        <element name="ActiveParticipant">
          <zeroOrMore><element name="RoleIDCode"><ref name="coded"/></element></zeroOrMore>
          <attribute name="UserID"/>
          <optional><attribute name="AlternativeUserID"/></optional>
          <optional><attribute name="UserName"/></optional>
          <attribute name="UserIsRequestor"><data type="boolean"/></attribute>
          <optional><attribute name="NetworkAccessPointID"><data type="token"/></attribute></optional>
          <optional><attribute name="NetworkAccessPointTypeCode">
            <choice><value>1</value><value>2</value><value>3</value><value>4</value><value>5</value></choice>
          </attribute></optional>
        </element>
      </oneOrMore>
      <element name="AuditSourceIdentification">
        <optional><attribute name="AuditEnterpriseSiteID"><data type="token"/></attribute></optional>
        <attribute name="AuditSourceID"><data type="token"/></attribute>
        <zeroOrMore><element name="AuditSourceTypeCode">
          <attribute name="csd-code"><data type="token"/></attribute>
          <optional><attribute name="codeSystemName"><data type="token"/></attribute>
            <optional><attribute name="displayName"><data type="token"/></attribute></optional>
            <attribute name="originalText"><data type="token"/></attribute></optional>
        </element></zeroOrMore>
      </element>
      <zeroOrMore>
        <element name="ParticipantObjectIdentification">
          <element name="ParticipantObjectIDTypeCode"><ref name="coded"/></element>
          <optional><choice>
            <element name="ParticipantObjectName"><data type="token"/></element>
            <element name="ParticipantObjectQuery"><data type="base64Binary"/></element>
          </choice></optional>
          <zeroOrMore><element name="ParticipantObjectDetail">
            <attribute name="type"><data type="token"/></attribute>
            <attribute name="value"><data type="base64Binary"/></attribute>
          </element></zeroOrMore>
          <zeroOrMore><element name="ParticipantObjectDescription">
            <zeroOrMore><element name="SOPClass">
              <zeroOrMore><element name="Instance">
                <attribute name="UID"><data type="token"/></attribute></element></zeroOrMore>
              <optional><attribute name="UID"><data type="token"/></attribute></optional>
              <attribute name="NumberOfInstances"><data type="integer"/></attribute>
            </element></zeroOrMore>
            <optional><element name="Anonymized"><data type="boolean"/></element></optional>
          </element></zeroOrMore>
          <attribute name="ParticipantObjectID"><data type="token"/></attribute>
          <optional><attribute name="ParticipantObjectTypeCode">
            <choice><value>1</value><value>2</value><value>3</value><value>4</value></choice>
          </attribute></optional>
          <optional><attribute name="ParticipantObjectTypeCodeRole"><data type="integer">
            <param name="minInclusive">1</param><param name="maxInclusive">26</param></data></attribute></optional>
        </element>
      </zeroOrMore>
    </element>
  </start>
  <define name="coded">
    <attribute name="csd-code"><data type="token"/></attribute>
    <attribute name="codeSystemName"><data type="token"/></attribute>
    <optional><attribute name="displayName"><data type="token"/></attribute></optional>
    <attribute name="originalText"><data type="token"/></attribute>
  </define>
</grammar>
"""
RELAXNG = etree.RelaxNG(etree.fromstring(SCHEMA))


def _submission() -> audit.AuditEvent:
    event = audit.submission_event(
        outcome=audit.Outcome.SUCCESS, repository_url="http://10.1.2.3:8095/services/xds-iti41",
        audit_source_id=SOURCE_OID, patient=audit.patient_cx(PSEUDONYM, PSEUDONYM_OID),
        submission_set=SUBMISSION_SET, documents=(audit.Document(KOS_UID, REPOSITORY),),
        studies=(audit.Study(STUDY, ((CT_IMAGE, 12), (KOS, 1))),))
    return dataclasses.replace(event, when=WHEN)


def _retrieve(transaction: audit.Transaction, outcome: audit.Outcome = audit.Outcome.SUCCESS) -> audit.AuditEvent:
    return dataclasses.replace(audit.retrieve_event(
        transaction, outcome=outcome, endpoint_url="http://pacsflow.example:8042/xdsi/rad69",
        audit_source_id=SOURCE_OID, client_host="127.0.0.1", client_user="consumer-token",
        patients=(audit.patient_cx(PSEUDONYM, PSEUDONYM_OID),),
        studies=(audit.Study(STUDY, ((CT_IMAGE, 3),)),)), when=WHEN)


def _root(event: audit.AuditEvent) -> etree._Element:
    data = audit.audit_message(event)
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = etree.fromstring(data)
    RELAXNG.assertValid(root)
    return root


def _coded(element: etree._Element) -> tuple[str | None, str | None, str | None]:
    return element.get("csd-code"), element.get("codeSystemName"), element.get("originalText")


def _values(root: etree._Element) -> set[str]:
    """Every attribute value and text in the message."""
    found = set()
    for element in root.iter():
        found.update(element.attrib.values())
        if element.text and element.text.strip():
            found.add(element.text.strip())
    return found


def test_a_submission_is_an_iti41_export_with_its_source_and_repository() -> None:
    root = _root(_submission())
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") == "R" and ident.get("EventOutcomeIndicator") == "0"
    assert ident.get("EventDateTime") == "2026-12-01T14:30:05.123+00:00"
    assert _coded(ident.find("EventID")) == ("110106", "DCM", "Export")
    assert _coded(ident.find("EventTypeCode")) == ("ITI-41", "IHE Transactions", "Provide and Register Document Set-b")

    source, destination = root.findall("ActiveParticipant")
    assert _coded(source.find("RoleIDCode")) == ("110153", "DCM", "Source Role ID")
    assert source.get("UserIsRequestor") == "true"
    assert source.get("UserID") == audit.WSA_ANONYMOUS
    assert source.get("AlternativeUserID") == str(os.getpid())
    assert source.get("NetworkAccessPointID") == socket.gethostname()
    assert _coded(destination.find("RoleIDCode")) == ("110152", "DCM", "Destination Role ID")
    assert destination.get("UserIsRequestor") == "false"
    assert destination.get("UserID") == "http://10.1.2.3:8095/services/xds-iti41"
    assert (destination.get("NetworkAccessPointID"), destination.get("NetworkAccessPointTypeCode")) == ("10.1.2.3", "2")
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == SOURCE_OID

    patient, study, submission_set, document = root.findall("ParticipantObjectIdentification")
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
    assert patient.get("ParticipantObjectID") == f"{PSEUDONYM}^^^&{PSEUDONYM_OID}&ISO"
    assert _coded(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert patient.findtext("ParticipantObjectName") == PSEUDONYM
    assert study.get("ParticipantObjectID") == STUDY
    assert _coded(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    assert [(c.get("UID"), c.get("NumberOfInstances")) for c in study.iter("SOPClass")] == \
        [(CT_IMAGE, "12"), (KOS, "1")]
    assert submission_set.get("ParticipantObjectID") == SUBMISSION_SET
    assert (submission_set.get("ParticipantObjectTypeCode"), submission_set.get("ParticipantObjectTypeCodeRole")) == \
        ("2", "20")
    set_type = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
    assert _coded(submission_set.find("ParticipantObjectIDTypeCode")) == \
        (set_type, "IHE XDS Metadata", "submission set classificationNode")
    assert document.get("ParticipantObjectID") == KOS_UID
    detail = document.find("ParticipantObjectDetail")
    assert detail.get("type") == "Repository Unique Id"
    assert base64.b64decode(detail.get("value")).decode() == REPOSITORY


@pytest.mark.parametrize(("transaction", "code"), [
    (audit.Transaction.RETRIEVE_IMAGING_DOCUMENT_SET, ("RAD-69", "IHE Transactions", "Retrieve Imaging Document Set")),
    (audit.Transaction.WADO_RS_RETRIEVE, ("RAD-107", "IHE Transactions", "WADO-RS Retrieve")),
])
def test_a_retrieve_response_names_us_as_source_and_the_asking_client_as_requestor(transaction, code) -> None:
    root = _root(_retrieve(transaction, audit.Outcome.MINOR_FAILURE))
    ident = root.find("EventIdentification")
    assert _coded(ident.find("EventTypeCode")) == code
    assert _coded(ident.find("EventID")) == ("110106", "DCM", "Export")
    assert ident.get("EventOutcomeIndicator") == "4"
    source, destination = root.findall("ActiveParticipant")
    assert (source.get("UserID"), source.get("UserIsRequestor")) == ("http://pacsflow.example:8042/xdsi/rad69", "false")
    assert (destination.get("UserID"), destination.get("UserIsRequestor")) == ("consumer-token", "true")
    assert destination.get("NetworkAccessPointTypeCode") == "2"
    assert [p.get("ParticipantObjectID") for p in root.findall("ParticipantObjectIdentification")] == \
        [f"{PSEUDONYM}^^^&{PSEUDONYM_OID}&ISO", STUDY]


def test_a_message_names_nothing_but_its_inputs() -> None:
    """Every value in the message is an input, a code of the standard, or a fixed structural value."""
    codes = {v for c in (audit.EXPORT, audit.SOURCE_ROLE, audit.DESTINATION_ROLE, audit.PATIENT_NUMBER,
                         audit.STUDY_INSTANCE_UID, audit.REPORT_NUMBER, audit.SUBMISSION_SET,
                         *(t.value for t in audit.Transaction)) for v in (c.code, c.scheme, c.meaning)}
    structure = {"R", "0", "1", "2", "3", "4", "12", "20", "true", "false", "Repository Unique Id",
                 "2026-12-01T14:30:05.123+00:00"}
    inputs = {PSEUDONYM, f"{PSEUDONYM}^^^&{PSEUDONYM_OID}&ISO", STUDY, SUBMISSION_SET, KOS_UID, SOURCE_OID,
              CT_IMAGE, KOS, base64.b64encode(REPOSITORY.encode()).decode(), audit.WSA_ANONYMOUS,
              "http://10.1.2.3:8095/services/xds-iti41", "10.1.2.3", socket.gethostname(), str(os.getpid()),
              "http://pacsflow.example:8042/xdsi/rad69", "127.0.0.1", "consumer-token"}
    assert _values(_root(_submission())) <= codes | structure | inputs
    assert _values(_root(_retrieve(audit.Transaction.WADO_RS_RETRIEVE))) <= codes | structure | inputs


def test_the_cx_and_the_access_point_type() -> None:
    assert audit.patient_cx("P1", "1.2.3") == "P1^^^&1.2.3&ISO"
    assert audit.patient_cx("P1", None) == "P1"
    assert audit.access_point_type("::1") == "2" and audit.access_point_type("repo.example.org") == "1"


def test_the_syslog_header_is_rfc5424_with_the_ihe_msgid_and_a_bom() -> None:
    message = audit.syslog_message(b"<AuditMessage/>", when=WHEN, hostname="host a\u00e9", procid="42")
    assert message == (b"<85>1 2026-12-01T14:30:05.123Z host_a_ pacsflow 42 IHE+RFC-3881 - \xef\xbb\xbf"
                       b"<AuditMessage/>")
    assert audit.octet_counted(b"abc") == b"3 abc"


@pytest.mark.parametrize("url", ["syslog://h:1", "syslog+udp://h", "syslog+tcp://h:0", "http://h:514",
                                 "syslog+udp://h:70000"])
def test_an_audit_url_of_another_form_is_refused(url) -> None:
    with pytest.raises(ValueError, match="xdsi.audit_url"):
        audit.parse_audit_url(url)


def _check_received(message: bytes, event: audit.AuditEvent) -> None:
    header, msg = parse(message)
    assert (header.pri, header.version, header.app_name, header.msgid) == (85, 1, "pacsflow", "IHE+RFC-3881")
    assert (header.procid, header.hostname, header.structured_data) == (str(os.getpid()), socket.gethostname(), "-")
    assert header.timestamp == "2026-12-01T14:30:05.123Z"
    assert msg.startswith(audit.BOM)
    assert msg[len(audit.BOM):] == audit.audit_message(event)
    RELAXNG.assertValid(etree.fromstring(msg[len(audit.BOM):]))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_each_send_arrives_once_at_a_real_listener(transport) -> None:
    events = [_submission(), _retrieve(audit.Transaction.RETRIEVE_IMAGING_DOCUMENT_SET),
              _retrieve(audit.Transaction.WADO_RS_RETRIEVE)]
    with SyslogListener(transport) as listener:
        log = audit.AuditLog.from_settings(XdsiSettings(audit_url=listener.url))
        assert log is not None
        try:
            assert all(log.record(e) for e in events)
        finally:
            log.close()
        received = listener.wait_for(len(events))
        assert listener.frame_errors == []
    assert len(received) == len(events)
    for message, event in zip(received, events):
        _check_received(message, event)
    assert (log.sender.sent, log.sender.failed) == (3, 0)


def test_no_audit_log_without_an_audit_url() -> None:
    assert audit.AuditLog.from_settings(XdsiSettings()) is None


def test_a_repository_that_is_down_is_counted_and_logged_once_then_sending_resumes(caplog) -> None:
    port = free_port()
    log = audit.AuditLog(audit.SyslogSender(f"syslog+tcp://127.0.0.1:{port}", timeout_s=1))
    with caplog.at_level(logging.INFO, logger="pacsflow.tasks.xdsi.audit"):
        assert log.record(_submission()) is False
        assert log.record(_submission()) is False
        failures = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(failures) == 1
        assert "xdsi.audit_url" in failures[0].getMessage() and "ConnectionRefusedError" in failures[0].getMessage()
        with SyslogListener("tcp", port) as listener:
            assert log.record(_submission()) is True
            assert len(listener.wait_for(1)) == 1
        # the listener closed its end: the next send sees that, reconnects, and fails on the refusal
        assert log.record(_submission()) is False
    log.close()
    assert (log.sender.sent, log.sender.failed) == (1, 3)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert not any(PSEUDONYM in r.getMessage() or STUDY in r.getMessage() for r in caplog.records)


def test_a_message_too_large_for_udp_fails_without_raising() -> None:
    studies = tuple(audit.Study(f"2.25.{n}") for n in range(1000))
    with SyslogListener("udp") as listener:
        log = audit.AuditLog(audit.SyslogSender(listener.url))
        event = dataclasses.replace(_submission(), studies=studies)
        assert len(audit.audit_message(event)) > 65535
        assert log.record(event) is False
        assert log.record(_submission()) is True
        log.close()
        assert len(listener.wait_for(1)) == 1
    assert (log.sender.sent, log.sender.failed) == (1, 1)


def test_a_value_xml_cannot_hold_is_counted_not_raised() -> None:
    with SyslogListener("udp") as listener:
        log = audit.AuditLog(audit.SyslogSender(listener.url))
        bad = dataclasses.replace(_submission(), destination=audit.Participant("token\x00name", True))
        assert log.record(bad) is False
        log.close()
    assert log.sender.failed == 1


def test_record_later_sends_from_the_worker_and_survives_an_event_that_cannot_be_built(caplog) -> None:
    def broken() -> audit.AuditEvent:
        raise KeyError("no such study")

    with SyslogListener("tcp") as listener:
        log = audit.AuditLog(audit.SyslogSender(listener.url))
        with caplog.at_level(logging.WARNING, logger="pacsflow.tasks.xdsi.audit"):
            log.record_later(broken)
            log.record_later(_submission)
            log.record_later(lambda: None)  # nothing to audit
            log.record_later(_submission)
            assert log.flush()
        log.close()
        assert len(listener.wait_for(2)) == 2
    assert (log.sender.sent, log.sender.failed) == (2, 1)
    [warning] = caplog.records
    assert "KeyError" in warning.getMessage() and "no such study" not in warning.getMessage()
