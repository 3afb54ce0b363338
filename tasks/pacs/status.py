"""DIMSE statuses → success, or a typed error that decides whether the step is retried.

Categories come from pynetdicom's status tables (PS3.4 and PS3.7); we only decide which failures
are permanent: those whose cause is in configuration, where a retry cannot help.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.status import (
    GENERAL_STATUS,
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STATUS_CANCEL,
    STATUS_PENDING,
    STATUS_SUCCESS,
    STATUS_WARNING,
    code_to_category,
)

from pacsflow.tasks.core.errors import PacsConfigurationError, PacsStatusError

# Failures whose cause is on our side or in configuration: retrying will not fix them.
PERMANENT_FAILURES = frozenset({
    0xA801,  # move destination unknown
    0xA900,  # identifier does not match SOP class
    0x0122,  # SOP class not supported
    0x0124,  # refused: not authorized
    0xAA00,  # none of the frames requested were found
})
_DESCRIPTIONS = {**GENERAL_STATUS, **QR_FIND_SERVICE_CLASS_STATUS, **QR_MOVE_SERVICE_CLASS_STATUS,
                 **QR_GET_SERVICE_CLASS_STATUS}


def status_code(status: Dataset | None) -> int | None:
    """The Status of a DIMSE response; None when there was no response (connection lost, timeout)."""
    if status is None or "Status" not in status:
        return None
    return int(status.Status)


def is_pending(code: int) -> bool:
    return code_to_category(code) == STATUS_PENDING


def is_success(code: int) -> bool:
    return code_to_category(code) == STATUS_SUCCESS


def describe(code: int) -> str:
    """``0xA801 (Move destination unknown)``: the code and the standard's words for it."""
    text = _DESCRIPTIONS.get(code, (code_to_category(code), ""))[1]
    return f"0x{code:04X} ({text.lower()})" if text else f"0x{code:04X}"


def raise_for_status(code: int, operation: str, study_ref: str) -> None:
    """Raise the typed error for a final status that is not Success."""
    category = code_to_category(code)
    where = f"{operation} for study {study_ref}"
    if category == STATUS_SUCCESS:
        return
    if code in PERMANENT_FAILURES:
        raise PacsConfigurationError(f"{where}: status {describe(code)}")
    if category == STATUS_CANCEL:
        raise PacsStatusError(f"{where}: cancelled ({describe(code)})")
    if category == STATUS_WARNING:
        raise PacsStatusError(f"{where}: warning {describe(code)}, some sub-operations failed")
    raise PacsStatusError(f"{where}: failure status {describe(code)}")
