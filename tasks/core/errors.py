"""The error taxonomy: typed errors decide whether Prefect retries a task.

Messages carry UIDs and counts at most: never names, IDs or other header values. The catalog has
errors of its own (:mod:`pacsflow.catalog.errors`); :func:`is_transient` classifies them too, so the
dependency points one way (tasks know the catalog, the catalog knows nothing of tasks).
"""

from __future__ import annotations

from typing import Any

from pacsflow.catalog.errors import CatalogBusy, CatalogError, CatalogWriteError


# One small class per kind of failure, so the shapes below repeat on purpose: the type is what
# the retry decision and the except clauses match on, and ``reason`` is what ledgers record.


class PacsflowError(Exception):
    """Base of our errors."""

    reason: str = "error"


class TransientError(PacsflowError):
    """Worth retrying with backoff: network faults, busy peers, short counts, warnings."""

    reason = "transient"


class PermanentError(PacsflowError):
    """Retrying will not help until someone fixes something: quarantine and report."""

    reason = "permanent"


class PacsUnavailable(TransientError):
    reason = "pacs-unavailable"


class IncompleteRetrieve(TransientError):
    reason = "incomplete-retrieve"


class PacsStatusError(TransientError):
    """The PACS answered a Warning or Failure status that may go away on retry."""

    reason = "pacs-status"


class PacsConfigurationError(PermanentError):
    """E.g. move destination unknown, association rejected permanently, SOP class unsupported."""

    reason = "pacs-configuration"


class BadDicom(PermanentError):
    """An object we cannot parse or must not export."""

    reason = "bad-dicom"


class LakeWriteError(TransientError):
    """The lake refused a write (full disk, lost mount, no permission): the study is retried later."""

    reason = "lake-write"


class InsufficientSpace(TransientError):
    """A zone has less free space than ``min_free_mb`` at the start of a run: the run does not begin."""

    reason = "insufficient-space"


class DeidentificationError(PermanentError):
    reason = "deid"


def is_transient(exc: BaseException) -> bool:
    # A catalog the disk refused (full, lost mount) is like a full lake: the next run retries.
    if isinstance(exc, (TransientError, CatalogBusy, CatalogWriteError)):
        return True
    if isinstance(exc, (PermanentError, CatalogError)):
        return False
    # Socket-level failures from libraries that do not use our types.
    return isinstance(exc, (ConnectionError, TimeoutError))


def error_text(exc: BaseException) -> str:
    """A one-line, PHI-free description: our errors carry pseudonymous UIDs and counts only;
    anything else is named by its type alone."""
    if isinstance(exc, (PacsflowError, CatalogError, CatalogBusy)):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry only the errors that may go away (network faults,
    busy peers, short counts). Plain code: it only reads the failed state's exception."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, Prefect records the failure
        return is_transient(exc)
    return False


# -- FHIR sync (pacsflow.tasks.fhir) -------------------------
# Messages carry study UIDs, HTTP statuses and the server's OperationOutcome diagnostics with
# identifier values redacted; never request bodies or credentials.


class FhirUnavailable(TransientError):
    """The FHIR server did not answer, or answered 429 / 5xx, after our bounded retries."""

    reason = "fhir-unavailable"


class FhirConflict(TransientError):
    """409 after our retries: another writer created or updated the same resource at the same time."""

    reason = "fhir-conflict"


class FhirRejected(PermanentError):
    """The server rejected the request (4xx) with an OperationOutcome; retried only after a fix.

    ``status`` is the HTTP status, ``diagnostics`` the OperationOutcome's error texts (redacted).
    """

    reason = "fhir-rejected"

    def __init__(self, message: str, status: int = 0, diagnostics: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.diagnostics = diagnostics


class FhirConfigurationError(FhirRejected):
    """401/403/404/405/415 for a whole request: wrong base URL or credentials; no study is to blame."""

    reason = "fhir-configuration"


class FhirMappingError(PermanentError):
    """A study's catalog rows do not make a valid FHIR resource (fhir.resources validation failed)."""

    reason = "fhir-mapping"


# -- XDS-I.b publishing (pacsflow.tasks.xdsi) ------------------------
# Messages carry the XDS error code, the setting or peer to check, and entry/KOS UIDs at most; the
# registry's codeContext is cut to one line and never quotes patient IDs.


class XdsUnavailable(TransientError):
    """The repository did not answer, or answered 429 / 5xx, after our bounded retries."""

    reason = "xds-unavailable"


class XdsRegistryError(PermanentError):
    """The registry answered Failure or PartialSuccess (or a SOAP Fault): not retried until fixed.

    ``code`` is the first errorCode (e.g. XDSUnknownPatientId; ``SOAPFault`` for a fault),
    ``context`` its codeContext, one line, without patient IDs.
    """

    reason = "xds-registry"

    def __init__(self, message: str, code: str = "", context: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.context = context


class XdsConfigurationError(PermanentError):
    """Publishing is misconfigured (an ``xdsi.*`` setting unset or unusable, TLS files, 4xx on the URL)."""

    reason = "xds-configuration"
