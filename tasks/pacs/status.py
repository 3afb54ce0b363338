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

MOVE_DESTINATION_UNKNOWN = 0xA801
# Failures whose cause is on our side or in configuration: retrying will not fix them. Each with
# what to check, since the standard's words name the symptom, not the setting.
_PERMANENT_CHECKS = {
    MOVE_DESTINATION_UNKNOWN: "",  # see move_destination_hint: it names our receiver
    0xA900: "the PACS does not take our Study Root query; check pacs.called_ae names a query/retrieve SCP",
    0x0122: "the PACS does not support this service; check retrieve_method (c-move or c-get) and pacs.called_ae",
    0x0124: "the PACS does not authorize us; check calling_ae and the PACS's list of modalities",
    0xAA00: "the PACS found none of the frames asked for; check the study at the PACS",
}
PERMANENT_FAILURES = frozenset(_PERMANENT_CHECKS)


class MoveDestinationUnknown(PacsConfigurationError):
    """The PACS will not C-MOVE to our receiver: it does not know its AE title (0xA801), or sends
    nothing there while the same object comes by C-GET."""

    reason = "move-destination-unknown"


def move_destination_hint(destination: str) -> str:
    """What to check when the PACS will not send to ``destination`` (``AE at host:port``)."""
    return (f"the PACS may not know our move destination {destination or '(receiver.ae_title)'}; "
            "check receiver.ae_title and the PACS's modality list")
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


def raise_for_status(code: int, operation: str, study_ref: str, destination: str = "") -> None:
    """Raise the typed error for a final status that is not Success. ``destination``: the C-MOVE
    destination (``AE at host:port``), named when the PACS does not know it."""
    category = code_to_category(code)
    where = f"{operation} for study {study_ref}"
    if category == STATUS_SUCCESS:
        return
    if code == MOVE_DESTINATION_UNKNOWN:
        raise MoveDestinationUnknown(f"{where}: status {describe(code)}; {move_destination_hint(destination)}")
    if code in PERMANENT_FAILURES:
        raise PacsConfigurationError(f"{where}: status {describe(code)}; {_PERMANENT_CHECKS[code]}")
    if category == STATUS_CANCEL:
        raise PacsStatusError(f"{where}: cancelled ({describe(code)})")
    if category == STATUS_WARNING:
        raise PacsStatusError(f"{where}: warning {describe(code)}, some sub-operations failed")
    raise PacsStatusError(f"{where}: failure status {describe(code)}")
