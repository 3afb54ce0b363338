"""The ITI-41 client (pacsflow.tasks.xdsi.client) against httpx's MockTransport: what it sends
(SOAP 1.2, WS-Addressing, MTOM with the KOS as its own part), how it reads RegistryResponses (plain
and MTOM, Success, Failure with an error list, SOAP Faults) and when it retries."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from lxml import etree

from pacsflow.tasks.core.errors import XdsConfigurationError, XdsRegistryError, XdsUnavailable
from pacsflow.tasks.settings import XdsiSettings
from pacsflow.tasks.xdsi import ebxml, mtom
from pacsflow.tasks.xdsi.client import ACTION, RS, XdsRepositoryClient, document_content_id, one_line
from tests.xdsi_samples import PSEUDONYM_OID, SOURCE_OID, Manifest

URL = "http://repository.test:8080/services/xds-iti41"
RESPONSE_ACTION = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"
STATUS = {"Success": "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success",
          "Failure": "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure",
          "PartialSuccess": "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"}
PATIENT = f"PSEUDO\\T\\7^^^&{PSEUDONYM_OID}&ISO"


def _submission() -> ebxml.Submission:
    xdsi = XdsiSettings(source_oid=SOURCE_OID, pseudonym_oid=PSEUDONYM_OID)
    return ebxml.build_request(Manifest(), xdsi, submitted=datetime(2026, 12, 1, tzinfo=timezone.utc))


def _registry_response(status: str, *errors: tuple[str, str, str]) -> etree._Element:
    response = etree.Element(f"{{{RS}}}RegistryResponse", status=STATUS[status])
    if errors:
        error_list = etree.SubElement(response, f"{{{RS}}}RegistryErrorList")
        for code, severity, context in errors:
            etree.SubElement(error_list, f"{{{RS}}}RegistryError", errorCode=code, codeContext=context,
                             severity=f"urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:{severity}")
    return response


def _soap(body: etree._Element, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=mtom.envelope(RESPONSE_ACTION, body, relates_to="urn:uuid:x"),
                          headers={"Content-Type": "application/soap+xml; charset=UTF-8"})


def _fault(reason: str, status: int = 500) -> httpx.Response:
    return httpx.Response(status, content=mtom.fault("Receiver", reason),
                          headers={"Content-Type": "application/soap+xml"})


class Peer:
    """Answers each request with the next of ``answers`` (a Response or an exception to raise)."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _client(peer: Peer, sleeps: list[float] | None = None, **options: Any) -> XdsRepositoryClient:
    record = sleeps if sleeps is not None else []
    settings = {"max_retries": 3, "backoff_s": 1.0, "max_delay_s": 5.0, **options}
    return XdsRepositoryClient(URL, transport=httpx.MockTransport(peer), sleep=record.append, **settings)


def _send(peer: Peer, sleeps: list[float] | None = None, **options: Any):
    submission = _submission()
    with _client(peer, sleeps, **options) as client:
        return client.provide_and_register(submission.request, Manifest().part10)


def _exclusive_c14n(element: etree._Element) -> bytes:
    return etree.tostring(element, method="c14n", exclusive=True)


# -- what goes out ------------------------------------------------------------------------------

def test_sends_an_mtom_package_with_the_kos_as_its_own_part():
    peer = Peer(_soap(_registry_response("Success")))
    submission = _submission()
    with _client(peer) as client:
        result = client.provide_and_register(submission.request, Manifest().part10)
    [sent] = peer.requests
    content_type = sent.headers["Content-Type"]
    assert content_type.startswith("multipart/related") and 'type="application/xop+xml"' in content_type
    assert f'action="{ACTION}"' in content_type
    package = mtom.unpackage(content_type, sent.content)
    assert package.header("Action") == ACTION and package.header("To") == URL
    assert package.header("MessageID") == result.message_id
    assert package.body.tag == f"{{{ebxml.XDSB}}}ProvideAndRegisterDocumentSetRequest"
    document = package.body.find(f"{{{ebxml.XDSB}}}Document")
    assert package.resolve(document) == Manifest().part10
    assert _exclusive_c14n(package.body) == _exclusive_c14n(submission.request)
    assert submission.request.getparent() is None  # the caller's element was not moved into the envelope
    assert b"DICM-kos" not in sent.content.split(b"\r\n\r\n", 2)[1].split(b"--MIMEBoundary")[0]  # not inline


def test_document_content_id_is_read_from_the_request():
    submission = _submission()
    assert document_content_id(submission.request) == submission.content_id
    with pytest.raises(ValueError, match="exactly one xdsb:Document"):
        document_content_id(etree.Element(f"{{{ebxml.XDSB}}}ProvideAndRegisterDocumentSetRequest"))


# -- answers ------------------------------------------------------------------------------------

def test_success():
    result = _send(Peer(_soap(_registry_response("Success"))))
    assert (result.status, result.attempts, result.warnings) == ("Success", 1, ())
    assert result.message_id.startswith("urn:uuid:")


def test_success_answered_as_mtom():
    envelope = mtom.envelope(RESPONSE_ACTION, _registry_response("Success"), relates_to="urn:uuid:x")
    content_type, chunks = mtom.package(envelope, [], action=RESPONSE_ACTION)
    result = _send(Peer(httpx.Response(200, content=b"".join(chunks), headers={"Content-Type": content_type})))
    assert result.status == "Success"


def test_success_keeps_the_warnings():
    result = _send(Peer(_soap(_registry_response("Success", ("XDSExtraMetadataNotSaved", "Warning", "slot x")))))
    assert [(w.code, w.severity, w.context) for w in result.warnings] == [
        ("XDSExtraMetadataNotSaved", "Warning", "slot x")]


def test_failure_carries_the_first_error_code_on_one_line_without_the_patient():
    peer = Peer(_soap(_registry_response(
        "Failure", ("XDSExtraMetadataNotSaved", "Warning", "ignored"),
        ("XDSUnknownPatientId", "Error", f"Unknown patient\n  {PATIENT} (PSEUDO\\T\\7)"),
        ("XDSRegistryMetadataError", "Error", "second"))))
    with pytest.raises(XdsRegistryError) as caught:
        _send(peer)
    error = caught.value
    assert error.code == "XDSUnknownPatientId"
    assert error.context == "Unknown patient <patient> (<patient>)"
    assert "\n" not in str(error) and "PSEUDO" not in str(error) and PSEUDONYM_OID not in str(error)
    assert "xdsi.pseudonym_oid" in str(error)
    assert len(peer.requests) == 1  # a registry error is not retried


def test_partial_success_is_an_error():
    with pytest.raises(XdsRegistryError, match="PartialSuccess, XDSMissingDocument.*xdsi.repository_url") as caught:
        _send(Peer(_soap(_registry_response("PartialSuccess", ("XDSMissingDocument", "Error", "doc")))))
    assert caught.value.code == "XDSMissingDocument"


def test_failure_without_an_error_list():
    with pytest.raises(XdsRegistryError, match="Failure, no error code") as caught:
        _send(Peer(_soap(_registry_response("Failure"))))
    assert caught.value.code == ""


def test_a_soap_fault_is_permanent_with_its_reason():
    peer = Peer(_fault(f"Validation failed:\n formatCode missing for {PATIENT}"))
    with pytest.raises(XdsRegistryError, match="SOAP Fault") as caught:
        _send(peer)
    assert caught.value.code == "SOAPFault"
    assert caught.value.context == "Validation failed: formatCode missing for <patient>"
    assert len(peer.requests) == 1


def test_an_answer_that_is_not_a_registry_response_names_the_url_setting():
    with pytest.raises(XdsConfigurationError, match="not a RegistryResponse.*xdsi.repository_url"):
        _send(Peer(_soap(etree.Element("{urn:x}Other"))))


def test_a_4xx_without_soap_names_the_url_setting():
    peer = Peer(httpx.Response(404, text="<html>not found</html>", headers={"Content-Type": "text/html"}))
    with pytest.raises(XdsConfigurationError, match="HTTP 404.*xdsi.repository_url"):
        _send(peer)
    assert len(peer.requests) == 1


# -- retries ------------------------------------------------------------------------------------

def test_5xx_and_429_are_retried_with_backoff_then_succeed():
    sleeps: list[float] = []
    peer = Peer(httpx.Response(503), httpx.Response(429, headers={"Retry-After": "3"}),
                httpx.Response(500, text="<html>oops</html>"), _soap(_registry_response("Success")))
    result = _send(peer, sleeps)
    assert result.attempts == 4 and len(peer.requests) == 4
    assert 0.5 <= sleeps[0] <= 1.5 and sleeps[1] == 3.0 and 2.0 <= sleeps[2] <= 5.0
    assert len({r.content for r in peer.requests}) == 1  # the same message each time


def test_network_errors_are_retried_then_raise_unavailable():
    sleeps: list[float] = []
    peer = Peer(httpx.ConnectError("connection refused"))
    with pytest.raises(XdsUnavailable, match=r"ConnectError.*after 4 attempts.*xdsi.repository_url"):
        _send(peer, sleeps)
    assert len(peer.requests) == 4 and len(sleeps) == 3
    assert all(delay <= 5.0 for delay in sleeps)


def test_delays_are_capped():
    sleeps: list[float] = []
    with pytest.raises(XdsUnavailable):
        _send(Peer(httpx.Response(502)), sleeps, max_retries=6, backoff_s=2.0, max_delay_s=7.0)
    assert len(sleeps) == 6 and max(sleeps) == 7.0


def test_a_busy_registry_is_retried():
    peer = Peer(_soap(_registry_response("Failure", ("XDSRegistryNotAvailable", "Error", "down"))),
                _soap(_registry_response("Success")))
    assert _send(peer).attempts == 2


def test_no_retries_when_none_are_configured():
    peer = Peer(httpx.ReadTimeout("slow"))
    with pytest.raises(XdsUnavailable, match="ReadTimeout.*after 1 attempts"):
        _send(peer, max_retries=0)


# -- settings -----------------------------------------------------------------------------------

def test_from_settings_needs_the_repository_url():
    with pytest.raises(XdsConfigurationError, match="xdsi.repository_url is not set"):
        XdsRepositoryClient.from_settings(XdsiSettings())


def test_from_settings_takes_the_retry_and_timeout_settings():
    xdsi = XdsiSettings(repository_url=URL, source_oid=SOURCE_OID, pseudonym_oid=PSEUDONYM_OID, max_retries=2,
                        retry_backoff_s=0.5, retry_max_delay_s=9.0, timeout_s=12.0)
    with XdsRepositoryClient.from_settings(xdsi) as client:
        assert (client.url, client.max_retries, client.backoff_s, client.max_delay_s) == (URL, 2, 0.5, 9.0)
        assert client._http.timeout.read == 12.0


def test_an_unreadable_ca_bundle_names_the_setting(tmp_path):
    xdsi = XdsiSettings(repository_url=URL.replace("http:", "https:"), source_oid=SOURCE_OID,
                        pseudonym_oid=PSEUDONYM_OID, ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(XdsConfigurationError, match="xdsi.ca_bundle: cannot load"):
        XdsRepositoryClient.from_settings(xdsi)


def test_one_line():
    assert one_line("a\n  b\tc", ["P1"]) == "a b c"
    assert one_line("id P1 and X^^^&1.2&ISO", ["P1"]) == "id <patient> and <patient>"
    assert len(one_line("x" * 1000)) == 300
