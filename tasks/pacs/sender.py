"""The C-STORE sender: prepared files to one destination, over one association per call.

Each file goes as its own bytes (pynetdicom streams the dataset after the file meta), so what
the destination stores is what we prepared. Presentation contexts come from the files' headers:
their SOP class with their own transfer syntax, plus the other VR Little Endian syntax for files
in Explicit or Implicit VR Little Endian; such a file whose own syntax the destination refused
goes in the one it accepted (same values, other encoding); any other file is refused for good.

For a destination with Storage Commitment, :meth:`StoreSender.request_commitment` then asks it
(N-ACTION, over an association of its own) to commit what was stored; see :mod:`.commitment`.

Outcomes: a destination we cannot associate with raises :class:`DestinationUnavailable`
(transient, naming ``AE@host:port`` and what to check); everything after that is one
:class:`SendResult` per file. Messages carry the destination, statuses and counts, never UIDs
from the files.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread, read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from pacsflow.tasks.core.errors import BadDicom, PacsflowError, PermanentError, TransientError, is_transient
from pacsflow.tasks.pacs.client import NODELAY_HANDLER, ReservedResponses, held, quiet_pynetdicom, timed_ae
from pacsflow.tasks.pacs.commitment import (
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentReport,
    ReportCallback,
    commitment_request,
    report_handler,
)
from pacsflow.tasks.pacs.status import describe, status_code

SAME_ASSOCIATION_REPORT_S = 10.0  # longest wait for a report on the N-ACTION's association
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8: odd ids 1-255)
_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class DestinationUnavailable(TransientError):
    """No association (refused connection, rejection, abort, no answer), or it ended mid-batch."""

    reason = "destination-unavailable"


class DestinationBusy(TransientError):
    """A C-STORE failed with "out of resources" (0xA7xx) or was cancelled: worth another try later."""

    reason = "destination-busy"


class DestinationRefused(PermanentError):
    """The destination refused the object itself (0xA9xx, 0xCxxx, other failures), or accepted no
    presentation context it could go in: sending it again will not help."""

    reason = "destination-refused"


@dataclass(frozen=True)
class SendResult:
    """What became of one file: ``status`` is the C-STORE status (None when it was not sent or
    not answered); ``error`` is None when it counts as delivered (success or a warning)."""

    file: Path
    status: int | None
    error: PacsflowError | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None

    @property
    def permanent(self) -> bool:
        return self.error is not None and not is_transient(self.error)


@dataclass(frozen=True)
class FileHeader:
    """The file meta of a prepared file: what presentation context it needs."""

    sop_class: str
    transfer_syntax: str
    sop_instance: str = ""  # what a Storage Commitment request references

    @property
    def convertible(self) -> bool:
        """Explicit or Implicit VR Little Endian: may go in the other one, re-encoded."""
        return UID(self.transfer_syntax) in _LITTLE_ENDIAN


def read_header(path: Path) -> FileHeader:
    """The file meta only. Raises BadDicom when ``path`` is no Part 10 file with the meta a C-STORE needs."""
    try:
        meta = read_file_meta_info(path)
        return FileHeader(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID),
                          str(meta.get("MediaStorageSOPInstanceUID", "")))
    except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
        raise BadDicom(f"prepared file is no DICOM file with file meta ({type(exc).__name__})") from None


def presentation_contexts(headers: Sequence[FileHeader]) -> list[PresentationContext]:
    """One context per SOP class and transfer syntax among ``headers``, each with that syntax alone
    (so a peer cannot prefer another one over it), plus one in the other VR Little Endian syntax
    for a file in one of them: the fallback if its own is refused."""
    pairs: dict[tuple[str, str], None] = {}
    for h in headers:
        pairs[(h.sop_class, h.transfer_syntax)] = None
        if h.convertible:
            pairs.update(((h.sop_class, str(ts)), None) for ts in _LITTLE_ENDIAN if ts != h.transfer_syntax)
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} SOP class and transfer syntax pairs in one batch; at most {MAX_CONTEXTS}")
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


class StoreResponses(ReservedResponses):
    """C-STORE responses go only to the C-STORE waiting for them, never to pynetdicom's idle loop
    (which would drop one: the object stored, its sender timed out, and sent again)."""

    reserved = C_STORE


class StoreSender:
    """C-STORE to one destination (``destination_ae`` at ``host:port``), calling as ``calling_ae``."""

    def __init__(self, calling_ae: str, destination_ae: str, host: str, port: int, timeout_s: float) -> None:
        self.calling_ae = calling_ae
        self.destination_ae = destination_ae
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        quiet_pynetdicom()
        # Files go as their own bytes, streamed after the file meta, never decoded and re-encoded.
        _config.STORE_SEND_CHUNKED_DATASET = True

    @property
    def destination(self) -> str:
        return f"{self.destination_ae}@{self.host}:{self.port}"

    def _check(self) -> str:
        return (f"check the destination's ae_title, host and port in the routing rules, and that it accepts "
                f"our calling AE '{self.calling_ae}' (listener.ae_title)")

    def send(self, files: Sequence[Path]) -> list[SendResult]:
        """C-STORE every file over one association; one result per file, in order. Raises
        DestinationUnavailable when no association comes about."""
        files = [Path(f) for f in files]
        results: dict[int, SendResult] = {}
        headers: dict[int, FileHeader] = {}
        for i, path in enumerate(files):
            try:
                headers[i] = read_header(path)
            except BadDicom as exc:
                results[i] = SendResult(path, None, exc)
        if headers:
            with self._association(presentation_contexts(list(headers.values()))) as assoc:
                for n, (i, header) in enumerate(headers.items()):
                    results[i] = self._store(assoc, files[i], header, n % 65535 + 1)
        return [results[i] for i in range(len(files))]

    def request_commitment(self, transaction_uid: str, references: Iterable[tuple[str, str]],
                           on_report: ReportCallback | None = None) -> None:
        """Ask the destination (N-ACTION) to commit the stored copies ``references`` (SOP class,
        SOP instance) under ``transaction_uid``. When the destination accepts that we act as SCP
        on this association, a report it sends here within ``SAME_ASSOCIATION_REPORT_S`` goes to
        ``on_report``; otherwise it comes on an association of its own (:mod:`.commitment`).
        Raises DestinationUnavailable, DestinationBusy (0x0110, 0x0213, 0xA7xx) or
        DestinationRefused (no Storage Commitment context, other failures)."""
        reported = threading.Event()

        def take(report: CommitmentReport) -> None:
            if on_report is not None:
                on_report(report)
            reported.set()

        handlers = [(evt.EVT_N_EVENT_REPORT, report_handler(take))]
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        with self._association([build_context(STORAGE_COMMITMENT_PUSH)], handlers, [role]) as assoc:
            accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH]
            if not accepted:
                raise DestinationRefused(f"destination {self.destination} does not accept Storage Commitment "
                                         "(SOP class 1.2.840.10008.1.20.1): set storage_commitment: false for it "
                                         "in the routing rules")
            status, _reply = assoc.send_n_action(commitment_request(transaction_uid, references), REQUEST_COMMITMENT,
                                                 STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
            self._commitment_status(status_code(status))
            if accepted[0].as_scp:
                reported.wait(min(self.timeout_s, SAME_ASSOCIATION_REPORT_S))

    def _commitment_status(self, code: int | None) -> None:
        if code is None:
            raise DestinationUnavailable(f"no answer to the storage commitment request from destination "
                                         f"{self.destination} within {self.timeout_s:g} s (listener.timeout_s)")
        if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
            return
        what = f"destination {self.destination} answered the storage commitment request with {describe(code)}"
        if code in (0x0110, 0x0213) or 0xA700 <= code <= 0xA7FF:
            raise DestinationBusy(f"{what} (asked again later)")
        raise DestinationRefused(f"{what} (not asked again)")

    @contextmanager
    def _association(self, contexts: list[PresentationContext], handlers: Sequence[evt.EventHandlerType] = (),
                     ext_neg: Sequence[SCP_SCU_RoleSelectionNegotiation] = ()) -> Iterator[Association]:
        ae = timed_ae(self.calling_ae, self.timeout_s)
        try:
            assoc = ae.associate(self.host, self.port, contexts=contexts, ae_title=self.destination_ae,
                                 ext_neg=list(ext_neg) or None,
                                 evt_handlers=[NODELAY_HANDLER, *handlers])
        except (OSError, RuntimeError) as exc:
            raise DestinationUnavailable(f"cannot reach destination {self.destination}: {type(exc).__name__}; "
                                         f"{self._check()}") from None
        if not assoc.is_established:
            how = "rejected the association" if assoc.is_rejected else "gave no association (refused or aborted)"
            raise DestinationUnavailable(f"destination {self.destination} {how}; {self._check()}")
        StoreResponses.installed_on(assoc)
        with held(assoc):
            yield assoc

    def _store(self, assoc: Association, path: Path, header: FileHeader, msg_id: int) -> SendResult:
        if not assoc.is_established:
            return SendResult(path, None, DestinationUnavailable(
                f"the association with destination {self.destination} ended before this object was sent"))
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == header.sop_class and cx.transfer_syntax}
        if header.transfer_syntax in accepted:
            dataset: Path | Dataset = path
        elif header.convertible and accepted & set(_LITTLE_ENDIAN):
            dataset = dcmread(path)  # pynetdicom re-encodes it: VR LE explicit <-> implicit
        else:
            return SendResult(path, None, DestinationRefused(
                f"destination {self.destination} accepts no presentation context for SOP class "
                f"{header.sop_class} in transfer syntax {header.transfer_syntax}"))
        try:
            status = assoc.send_c_store(dataset, msg_id=msg_id)
        except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
            return SendResult(path, None, BadDicom(f"prepared file could not be sent ({type(exc).__name__})"))
        return self._outcome(path, status_code(status))

    def _outcome(self, path: Path, code: int | None) -> SendResult:
        if code is None:
            return SendResult(path, None, DestinationUnavailable(
                f"no answer to C-STORE from destination {self.destination} within {self.timeout_s:g} s "
                "(listener.timeout_s), or the association broke"))
        category = code_to_category(code)
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            return SendResult(path, code)
        what = f"destination {self.destination} answered C-STORE with {describe(code)}"
        if 0xA700 <= code <= 0xA7FF or code == 0xFE00:
            return SendResult(path, code, DestinationBusy(f"{what} (out of resources: retried later)"))
        return SendResult(path, code, DestinationRefused(f"{what} (the object is refused: not retried)"))
