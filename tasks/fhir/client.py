"""The one network boundary to the FHIR server: an ``httpx.Client`` with auth, retries and typed errors.

* **Auth**: a bearer token or basic credentials from ``Settings.fhir`` (the flows fill them in from
  the Prefect Secret block named by ``fhir.credentials_block``: see ``Settings.with_secret_blocks``).
  Credentials are never logged or put in a message.
* **Statuses → errors** (:mod:`pacsflow.tasks.core.errors`): 429, 5xx and network errors are retried with
  exponential backoff and jitter, honouring ``Retry-After`` (capped), at most ``max_retries`` times,
  then raise :class:`FhirUnavailable` (transient). 409 (a concurrent writer won a race for the same
  conditional create) is retried the same way, then :class:`FhirConflict` (transient). 401, 403,
  404, 405, 406 and 415 on a request raise :class:`FhirConfigurationError`; every other 4xx raises
  :class:`FhirRejected` (permanent) with the OperationOutcome's diagnostics.
* **No PHI in logs**: request and response bodies are never logged; URLs are logged without their
  query; identifier values in the server's diagnostics are redacted (and with ``strict_redaction``,
  used for identified syncs, only the server's message codes are kept).

Retrying a transaction whose answer was lost is safe: it consists of conditional updates, so the
second attempt finds what the first created.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from pacsflow.tasks.core.errors import FhirConfigurationError, FhirConflict, FhirRejected, FhirUnavailable
from pacsflow.tasks.core.http import ClosingClient, backoff_delay, raise_for_tls, retry_after_s, session_options

log = logging.getLogger(__name__)


class _QueryRedactingFilter(logging.Filter):
    """httpx logs every request's full URL at INFO. A query string can carry identifier values
    (``Patient?identifier=…``, searches by GET), so the logged URL keeps its path and loses its query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) and a.query for a in record.args):
            record.args = tuple(
                f"{a.copy_with(query=None)}?<query redacted>" if isinstance(a, httpx.URL) and a.query else a
                for a in record.args
            )
        return True


_REDACT_QUERY = _QueryRedactingFilter()
logging.getLogger("httpx").addFilter(_REDACT_QUERY)

FHIR_JSON = "application/fhir+json"
_TRANSIENT = {429, 500, 502, 503, 504}
_CONFIGURATION = {401, 403, 404, 405, 406, 415}
_CHECK_CONFIGURATION = "check fhir.base_url and the credentials (fhir.token, fhir.username, fhir.credentials_block)"
_CHECK_REJECTED = "check the FHIR server's validation rules for this resource (fhir.base_url)"
_MAX_DIAGNOSTICS = 600


class _BearerAuth(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:  # never show the token
        return "_BearerAuth(***)"


def auth_from_settings(fhir: Any) -> httpx.Auth | None:
    """The auth configured in ``Settings.fhir``: token, then username/password."""
    if fhir.token is not None:
        return _BearerAuth(fhir.token.get_secret_value())
    if fhir.username:
        password = fhir.password.get_secret_value() if fhir.password is not None else ""
        return httpx.BasicAuth(fhir.username, password)
    if fhir.credentials_block:
        # Settings.with_secret_blocks (called by the flows) turns the block into token or username.
        raise FhirConfigurationError("fhir.credentials_block: the Secret block was not loaded; load settings "
                                     "with pacsflow.flows.secrets.load_run_settings()")
    return None


_IDENT_VALUE = re.compile(r"(identifier=[^|\s\"'&,]*\|)[^\s\"'&,]+")
_HAPI_CODE = re.compile(r"HAPI-\d{4}")


def redact(text: str, strict: bool = False) -> str:
    """Diagnostics fit for logs and ledgers: identifier values removed, length capped. ``strict`` keeps
    only HAPI's message codes (for identified syncs, whose values may be PHI)."""
    if strict:
        codes = sorted(set(_HAPI_CODE.findall(text)))
        return ", ".join(codes) if codes else "(diagnostics withheld)"
    text = _IDENT_VALUE.sub(r"\1<redacted>", text)
    return text if len(text) <= _MAX_DIAGNOSTICS else text[: _MAX_DIAGNOSTICS - 1] + "…"


def outcome_issues(doc: Any) -> list[dict[str, Any]]:
    """The issues of an OperationOutcome (or [] for anything else)."""
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        return [i for i in doc.get("issue", []) if isinstance(i, dict)]
    return []


def _diagnostics(resp: httpx.Response, strict: bool) -> str:
    try:
        doc = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code} without an OperationOutcome"
    issues = outcome_issues(doc)
    picked = [i for i in issues if i.get("severity") in ("error", "fatal")] or issues
    texts = [str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code") or "")
             for i in picked]
    text = "; ".join(t for t in texts if t) or f"HTTP {resp.status_code}"
    return redact(text, strict)


class FhirClient(ClosingClient):
    """A small synchronous FHIR R4 client (JSON only). Use as a context manager, or call close()."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_delay_s: float = 60.0,
        strict_redaction: bool = False,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_delay_s = max_delay_s
        self.strict_redaction = strict_redaction
        self._sleep = sleep
        self._origin = urlsplit(self.base_url)[:2]
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            auth=auth,
            timeout=httpx.Timeout(timeout_s),
            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON},
            transport=transport,
            follow_redirects=False,
            verify=verify,
        )
        #: Requests sent (attempts, including retries), for benchmarks and reports.
        self.requests = 0

    @classmethod
    def from_settings(cls, fhir: Any, **kwargs: Any) -> FhirClient:
        """A client for ``Settings.fhir`` (raises FhirConfigurationError if base_url is unset)."""
        if not fhir.base_url:
            raise FhirConfigurationError("fhir.base_url is not set")
        options = {**session_options(fhir, "fhir", FhirConfigurationError), "auth": auth_from_settings(fhir),
                   "strict_redaction": fhir.identified_sync}
        return cls(fhir.base_url, **{**options, **kwargs})

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r})"

    # -- transport ---------------------------------------------------------------------------
    def _delay(self, attempt: int, retry_after: float | None) -> float:
        return backoff_delay(attempt, self.backoff_s, self.max_delay_s, retry_after)

    def _request(self, method: str, url: str, *, ok: Sequence[int] = (), **kwargs: Any) -> httpx.Response:
        """Send with retries. Returns 2xx/3xx responses and those with a status in ``ok``."""
        path = urlsplit(url).path or "/"
        what = f"{method} {path}"
        for attempt in range(self.max_retries + 1):
            self.requests += 1
            started = time.monotonic()
            retry_after: float | None = None
            try:
                resp = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                raise_for_tls(exc, f"FHIR {what}", "fhir", FhirConfigurationError)
                problem, conflict = f"{type(exc).__name__} (no answer from {self._origin[1]})", False
            else:
                elapsed = time.monotonic() - started
                log.debug("FHIR %s -> %d in %.3f s", what, resp.status_code, elapsed)
                status = resp.status_code
                if status < 400 or status in ok:
                    return resp
                if status in _TRANSIENT or status >= 500:
                    problem, conflict = f"HTTP {status}", False
                    retry_after = retry_after_s(resp.headers.get("Retry-After"))
                elif status == 409:
                    problem, conflict = f"HTTP 409: {_diagnostics(resp, self.strict_redaction)}", True
                else:
                    diag = _diagnostics(resp, self.strict_redaction)
                    kind = FhirConfigurationError if status in _CONFIGURATION else FhirRejected
                    check = _CHECK_CONFIGURATION if status in _CONFIGURATION else _CHECK_REJECTED
                    raise kind(f"FHIR {what} rejected (HTTP {status}): {diag}; {check}", status=status,
                               diagnostics=diag)
            if attempt >= self.max_retries:
                kind2 = FhirConflict if conflict else FhirUnavailable
                raise kind2(f"FHIR {what}: {problem}, after {attempt + 1} attempts")
            delay = self._delay(attempt, retry_after)
            log.warning("FHIR %s: %s; retry %d/%d in %.1f s", what, problem, attempt + 1, self.max_retries, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _json(resp: httpx.Response, what: str) -> dict[str, Any]:
        try:
            doc = resp.json()
        except ValueError:
            raise FhirUnavailable(f"FHIR {what}: the answer is not JSON (HTTP {resp.status_code})") from None
        if not isinstance(doc, dict):
            raise FhirUnavailable(f"FHIR {what}: unexpected answer")
        return doc

    # -- interactions -----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The CapabilityStatement (a cheap health check)."""
        return self._json(self._request("GET", "metadata"), "GET /metadata")

    def transaction(self, bundle: dict[str, Any], *, minimal: bool = True) -> dict[str, Any]:
        """POST a ``transaction`` Bundle; returns the ``transaction-response`` Bundle.

        All or nothing: a 4xx means the server committed none of the entries.
        """
        headers = {"Prefer": "return=minimal"} if minimal else {}
        doc = self._json(self._request("POST", "", json=bundle, headers=headers), "POST / (transaction)")
        if doc.get("resourceType") != "Bundle" or doc.get("type") != "transaction-response":
            raise FhirUnavailable("FHIR transaction: the answer is not a transaction-response Bundle")
        if len(doc.get("entry", [])) != len(bundle.get("entry", [])):
            raise FhirUnavailable("FHIR transaction: the answer has a different number of entries")
        return doc

    def put(self, url: str, resource: dict[str, Any], *, minimal: bool = True,
            if_match: str | None = None) -> httpx.Response:
        """PUT one resource (``Type/id`` or a conditional ``Type?identifier=…``).

        A conditional URL carries the identifier value in its query (httpx's request log drops the
        query). The sync itself uses transactions (identifiers only in the body); this is for tools
        and benchmarks. With ``if_match`` (a version id), a 409 or 412 is returned, not retried:
        someone else wrote the resource since it was read, and only reading it again helps.
        """
        headers = {"Prefer": "return=minimal"} if minimal else {}
        if if_match is None:
            return self._request("PUT", url, json=resource, headers=headers)
        headers["If-Match"] = f'W/"{if_match}"'
        return self._request("PUT", url, json=resource, headers=headers, ok=(409, 412))

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """GET ``path`` (relative to the base); None for 404/410."""
        resp = self._request("GET", path, params=params, ok=(404, 410))
        if resp.status_code in (404, 410):
            return None
        return self._json(resp, f"GET /{path}")

    def _same_origin(self, url: str) -> bool:
        return urlsplit(url)[:2] == self._origin

    def search(self, resource_type: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``Type/_search`` (form body: nothing in URLs or access logs) and follow ``next`` pages.

        Yields the resources of every ``match`` entry.
        """
        resp = self._request("POST", f"{resource_type}/_search", data=params,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        pages = 0
        while True:
            doc = self._json(resp, f"POST /{resource_type}/_search")
            for entry in doc.get("entry", []):
                if entry.get("search", {}).get("mode", "match") == "match" and "resource" in entry:
                    yield entry["resource"]
            nxt = next((link.get("url") for link in doc.get("link", []) if link.get("relation") == "next"), None)
            pages += 1
            if not nxt or pages > 10_000:
                return
            if not self._same_origin(nxt):  # never send our credentials elsewhere
                raise FhirUnavailable("FHIR search: the next page is on another server; not followed")
            resp = self._request("GET", nxt)

    def search_by_identifier(
        self, resource_type: str, tokens: Sequence[str], *, elements: Sequence[str] | None = None, chunk: int = 50
    ) -> list[dict[str, Any]]:
        """Resources whose identifier matches any of ``tokens`` (``system|value``), ``chunk`` per search."""
        found: list[dict[str, Any]] = []
        for i in range(0, len(tokens), chunk):
            part = tokens[i : i + chunk]
            params: dict[str, Any] = {"identifier": ",".join(_escape_token(t) for t in part),
                                      "_count": str(max(len(part) * 2, 10))}
            if elements:
                params["_elements"] = ",".join(elements)
            found.extend(self.search(resource_type, params))
        return found

    def history(self, resource_type: str, resource_id: str) -> list[dict[str, Any]]:
        """The versions of one resource, newest first."""
        doc = self.get(f"{resource_type}/{resource_id}/_history")
        return [e["resource"] for e in (doc or {}).get("entry", []) if "resource" in e]

    def validate(self, resource: dict[str, Any]) -> list[dict[str, Any]]:
        """``$validate`` one resource; returns the OperationOutcome's issues (HAPI answers 200 even with
        errors; look at each issue's severity)."""
        rtype = resource.get("resourceType")
        resp = self._request("POST", f"{rtype}/$validate", json=resource, ok=(400, 412, 422))
        return outcome_issues(self._json(resp, f"POST /{rtype}/$validate"))


def _escape_token(token: str) -> str:
    """Escape ``,`` and ``$`` inside a token search value (``|`` separates system and value)."""
    system, sep, value = token.partition("|")
    esc = lambda s: s.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$")  # noqa: E731
    return f"{esc(system)}{sep}{esc(value)}" if sep else esc(token)


def errors_in(issues: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issues of severity error or fatal."""
    return [i for i in issues if i.get("severity") in ("error", "fatal")]
