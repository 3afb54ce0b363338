"""The one network boundary to the XDS.b Document Repository: RAD-68 as ITI-41 (Provide and Register
Document Set-b), SOAP 1.2 with WS-Addressing, the KOS as an MTOM/XOP ``application/dicom`` part; and
to the Document Registry: ITI-18 FindDocuments (:class:`XdsRegistryClient`, plain SOAP 1.2, for
``pacsflow xdsi check``), with the same retries and errors.

* **Answers → errors** (:mod:`pacsflow.tasks.core.errors`): a RegistryResponse with status Success is
  a :class:`SubmissionResult` (warnings kept); Failure or PartialSuccess raises
  :class:`XdsRegistryError` with the first error code (``XDSUnknownPatientId``...) and its
  codeContext on one line, patient IDs removed; a SOAP Fault raises it too (code ``SOAPFault``).
  Network errors, 429, 502-504, a 500 that is not a SOAP Fault, and the registry's "busy / not
  available" codes are retried with backoff and jitter (``xdsi.max_retries``,
  ``retry_backoff_s``, ``retry_max_delay_s``), then raise :class:`XdsUnavailable`. A wrong URL
  (no SOAP answer, 4xx) or unusable TLS files raise :class:`XdsConfigurationError`.
* **Retries resend the same message**: its ids come from the KOS UID (:mod:`.ebxml`), so a
  registry that kept a first attempt whose answer was lost refuses the second as a duplicate
  uniqueId (XDSRegistryDuplicateUniqueIdInMessage) rather than registering the study twice.
* **No PHI in logs**: the KOS and the metadata are never logged; messages name the host only.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from lxml import etree

from pacsflow.tasks.core.errors import XdsConfigurationError, XdsRegistryError, XdsUnavailable
from pacsflow.tasks.core.http import ClosingClient, backoff_delay, raise_for_tls, retry_after_s, session_options
from pacsflow.tasks.xdsi import mtom, query
from pacsflow.tasks.xdsi.ebxml import MIME_DICOM, RIM, XDSB

log = logging.getLogger(__name__)

ACTION = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
QUERY_ACTION = "urn:ihe:iti:2007:RegistryStoredQuery"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
_PATIENT_ID_SCHEMES = ("urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446", "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427")
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Registry error codes that say "later", not "wrong" (ITI TF-3 Table 4.2.4.1-2).
_BUSY_CODES = frozenset({"XDSRegistryBusy", "XDSRepositoryBusy", "XDSRegistryNotAvailable",
                         "XDSRegistryOutOfResources", "XDSRepositoryOutOfResources"})
_HINTS = {"XDSUnknownPatientId": "xdsi.pseudonym_oid (the registry's patient ID domain)"}
_CX = re.compile(r"\S*\^\^\^\S*")  # anything shaped like a CX patient ID
_MAX_CONTEXT = 300


@dataclass(frozen=True)
class RegistryIssue:
    """One RegistryError of an answer: code, severity (Error or Warning), codeContext (one line,
    patient IDs removed)."""

    code: str
    severity: str
    context: str


@dataclass(frozen=True)
class SubmissionResult:
    """A submission the registry accepted."""

    status: str  # Success
    message_id: str  # our WS-Addressing MessageID
    attempts: int
    warnings: tuple[RegistryIssue, ...] = ()


@dataclass(frozen=True)
class _Retry:
    problem: str
    retry_after: float | None = None


def document_content_id(request: etree._Element) -> str:
    """The MIME content id the request's one ``xdsb:Document`` names with its ``xop:Include``."""
    hrefs = request.xpath("xdsb:Document/xop:Include/@href", namespaces={"xdsb": XDSB, "xop": mtom.XOP})
    if len(hrefs) != 1 or not str(hrefs[0]).startswith("cid:"):
        raise ValueError("the request must hold exactly one xdsb:Document with an xop:Include of a cid: part")
    return str(hrefs[0])[4:]


def _patient_ids(request: etree._Element) -> set[str]:
    """The request's patient IDs, as CX and as bare pseudonym, to keep out of messages."""
    found: set[str] = set()
    for scheme in _PATIENT_ID_SCHEMES:
        for value in request.xpath(f"//rim:ExternalIdentifier[@identificationScheme='{scheme}']/@value",
                                   namespaces={"rim": RIM}):
            found |= {str(value), str(value).split("^", 1)[0]}
    return {value for value in found if value}


def one_line(text: str, patient_ids: Iterable[str] = ()) -> str:
    """``text`` on one line, capped, with CX-shaped values and the given patient IDs removed."""
    text = " ".join(text.split())
    for value in sorted(patient_ids, key=len, reverse=True):
        text = text.replace(value, "<patient>")
    text = _CX.sub("<patient>", text)
    return text if len(text) <= _MAX_CONTEXT else text[: _MAX_CONTEXT - 1] + "…"


def _issues(response: etree._Element, patient_ids: set[str]) -> list[RegistryIssue]:
    issues = []
    for error in response.iterfind(f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError"):
        severity = (error.get("severity") or "Error").rsplit(":", 1)[-1]
        issues.append(RegistryIssue(code=error.get("errorCode") or "", severity=severity,
                                    context=one_line(error.get("codeContext") or error.text or "", patient_ids)))
    return issues


class _SoapClient(ClosingClient):
    """The HTTP, retry and answer-reading plumbing of one XDS.b SOAP transaction (subclasses name it)."""

    transaction = ""  # ITI-41, ITI-18
    setting = ""  # the setting holding the URL, named in errors
    answer_tag = f"{{{RS}}}RegistryResponse"

    def __init__(self, url: str, *, verify: Any = True, timeout_s: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 2.0, max_delay_s: float = 120.0,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_delay_s = max_delay_s
        self._sleep = sleep
        self._where = f"{self.transaction} to {urlsplit(url).netloc or url}"
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), transport=transport, verify=verify,
                                  follow_redirects=False)
        #: Requests sent (attempts, including retries), for reports.
        self.requests = 0

    @classmethod
    def _from_settings(cls, xdsi: Any, url: str | None, **kwargs: Any) -> Any:
        if not url:
            raise XdsConfigurationError(f"{cls.setting} is not set")
        return cls(url, **{**session_options(xdsi, "xdsi", XdsConfigurationError), **kwargs})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where})"

    def _exchange(self, content_type: str, body: bytes, patients: set[str], what: str
                  ) -> tuple[etree._Element, list[RegistryIssue], int]:
        """POSTs ``body`` until an answer of status Success (the answer, its warnings, the attempts),
        retrying what may pass; raises the rest. ``what`` is what the registry should check on an error."""
        for attempt in range(self.max_retries + 1):
            self.requests += 1
            outcome = self._attempt(content_type, body, patients, what)
            if isinstance(outcome, tuple):
                return outcome[0], outcome[1], attempt + 1
            if attempt >= self.max_retries:
                raise XdsUnavailable(f"{self._where}: {outcome.problem}, after {attempt + 1} attempts; "
                                     f"check {self.setting} and that the {self._peer} is up")
            delay = backoff_delay(attempt, self.backoff_s, self.max_delay_s, outcome.retry_after)
            log.warning("%s: %s; retry %d/%d in %.1f s", self._where, outcome.problem, attempt + 1,
                        self.max_retries, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    @property
    def _peer(self) -> str:
        return self.setting.removeprefix("xdsi.").removesuffix("_url")

    def _attempt(self, content_type: str, body: bytes, patients: set[str],
                 what: str) -> tuple[etree._Element, list[RegistryIssue]] | _Retry:
        """One POST: the answer and its warnings on Success, a _Retry for what may pass; raises the rest."""
        try:
            resp = self._http.post(self.url, content=body, headers={"Content-Type": content_type})
        except httpx.TransportError as exc:
            raise_for_tls(exc, self._where, "xdsi", XdsConfigurationError)
            return _Retry(f"{type(exc).__name__} (no answer)")
        status = resp.status_code
        if status in _RETRY_STATUSES:
            return _Retry(f"HTTP {status}", retry_after_s(resp.headers.get("Retry-After")))
        try:
            package = mtom.unpackage(resp.headers.get("Content-Type", ""), resp.content)
            answer = package.body
        except mtom.MtomError:
            if status >= 500:
                return _Retry(f"HTTP {status} without a SOAP answer")
            raise XdsConfigurationError(f"{self._where}: HTTP {status} is not a SOAP answer; "
                                        f"check {self.setting}") from None
        return self._read(package, answer, status, patients, what)

    def _read(self, package: mtom.Package, answer: etree._Element, status: int, patients: set[str],
              what: str) -> tuple[etree._Element, list[RegistryIssue]] | _Retry:
        reason = package.fault_reason()
        if reason is not None:
            context = one_line(reason, patients)
            raise XdsRegistryError(f"{self._where}: SOAP Fault (HTTP {status}): {context}; check "
                                   f"{self.setting} and {what}", code="SOAPFault", context=context)
        if answer.tag != self.answer_tag:
            name = etree.QName(self.answer_tag).localname
            raise XdsConfigurationError(f"{self._where}: the answer is not {'an' if name[0] in 'AEIOU' else 'a'} "
                                        f"{name} (HTTP {status}); check {self.setting}")
        verdict = (answer.get("status") or "").rsplit(":", 1)[-1]
        issues = _issues(answer, patients)
        if verdict == "Success":
            return answer, issues
        errors = [i for i in issues if i.severity != "Warning"] or issues
        first = errors[0] if errors else RegistryIssue("", "Error", "no RegistryError given")
        if first.code in _BUSY_CODES:
            return _Retry(f"{verdict}: {first.code}")
        check = _HINTS.get(first.code, f"{self.setting} and {what}")
        raise XdsRegistryError(f"{self._where}: {verdict or 'no status'}, {first.code or 'no error code'} "
                               f"({first.context}); check {check}", code=first.code, context=first.context)


class XdsRepositoryClient(_SoapClient):
    """A small synchronous ITI-41 client. Use as a context manager, or call close()."""

    transaction = "ITI-41"
    setting = "xdsi.repository_url"

    @classmethod
    def from_settings(cls, xdsi: Any, **kwargs: Any) -> XdsRepositoryClient:
        """A client for ``Settings.xdsi`` (raises XdsConfigurationError if repository_url is unset)."""
        return cls._from_settings(xdsi, xdsi.repository_url, **kwargs)

    def provide_and_register(self, request: etree._Element, kos: bytes) -> SubmissionResult:
        """Sends ``request`` (an ``xdsb:ProvideAndRegisterDocumentSetRequest``, e.g.
        :func:`.ebxml.build_request`'s) with ``kos`` as the part its ``xop:Include`` names."""
        part = mtom.Attachment(document_content_id(request), MIME_DICOM, data=kos)
        message_id = mtom.new_message_id()
        soap = mtom.envelope(ACTION, copy.deepcopy(request), to=self.url, message_id=message_id)
        content_type, chunks = mtom.package(soap, [part], action=ACTION)
        body = b"".join(chunks)  # a manifest is small; whole bytes resend as they are and get a Content-Length
        _answer, warnings, attempts = self._exchange(content_type, body, _patient_ids(request),
                                                     "the submission's metadata")
        return SubmissionResult("Success", message_id, attempts, tuple(warnings))


class XdsRegistryClient(_SoapClient):
    """A small synchronous ITI-18 (Registry Stored Query) client, plain SOAP 1.2 (no MTOM)."""

    transaction = "ITI-18"
    setting = "xdsi.registry_url"
    answer_tag = f"{{{query.QUERY}}}AdhocQueryResponse"

    @classmethod
    def from_settings(cls, xdsi: Any, **kwargs: Any) -> XdsRegistryClient:
        """A client for ``Settings.xdsi`` (raises XdsConfigurationError if registry_url is unset)."""
        return cls._from_settings(xdsi, xdsi.registry_url, **kwargs)

    def find_documents(self, patient_cx: str) -> list[query.RegistryEntry]:
        """The patient's Approved and Deprecated DocumentEntries (:func:`.query.find_documents`)."""
        soap = mtom.envelope(QUERY_ACTION, query.find_documents(patient_cx), to=self.url)
        content_type = f'application/soap+xml; charset=UTF-8; action="{QUERY_ACTION}"'
        patients = {patient_cx, patient_cx.split("^", 1)[0]}
        answer, _warnings, _attempts = self._exchange(content_type, soap, patients, "the query")
        return query.document_entries(answer)
