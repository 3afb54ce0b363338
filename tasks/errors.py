"""Typed errors: they decide whether Prefect retries a task.

Messages carry UIDs and counts at most: never names, IDs or other header values.
"""

from __future__ import annotations


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


class DeidentificationError(PermanentError):
    reason = "deid"


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PermanentError):
        return False
    # Socket-level failures from libraries that do not use our types.
    return isinstance(exc, (ConnectionError, TimeoutError))
