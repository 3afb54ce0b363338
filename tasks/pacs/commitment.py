"""Storage Commitment Push Model (PS3.4 Annex J): the request we send and the reports we take.

After a batch is stored, :meth:`~pacsflow.tasks.pacs.sender.StoreSender.request_commitment`
asks the destination with N-ACTION to commit the copies it stored (``commitment_request`` builds
the action information). The destination answers later with N-EVENT-REPORT: on the same
association when it accepted that we act as SCP there, or, as Orthanc does, on a new association
it opens to the AE it has registered for us. :class:`CommitmentReportSCP` takes those: a
pynetdicom server on its own port (``listener.commitment_port``), because the listener's Storage
SCP may be DCMTK ``storescp``, which cannot take N-EVENT-REPORT. It accepts the destinations' AE
titles only and hands each report, parsed into a :class:`CommitmentReport`, to a callback.

Reports carry SOP Instance UIDs (originals for destinations that get originals): they are never
logged; logs name the calling AE and counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from pacsflow.tasks.core.errors import error_text
from pacsflow.tasks.pacs.client import NODELAY_HANDLER, quiet_pynetdicom

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # SOP class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance
REQUEST_COMMITMENT = 1  # N-ACTION action type
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT event types
PROCESSING_FAILURE = 0x0110

# FailureReason (PS3.4 J.3.3.1.1): worth asking again later, or not.
TRANSIENT_REASONS = {PROCESSING_FAILURE: "processing failure", 0x0213: "resource limitation"}
PERMANENT_REASONS = {
    0x0112: "no such object instance",
    0x0122: "referenced SOP class not supported",
    0x0119: "class/instance conflict",
    0x0131: "duplicate transaction UID",
}


def failure_is_transient(reason: int) -> bool:
    """A FailureReason we may retry: the listed transient ones, and any reason the standard does
    not list (bounded by ``listener.max_attempts`` like every transient failure)."""
    return reason not in PERMANENT_REASONS


def describe_failure(reason: int) -> str:
    name = TRANSIENT_REASONS.get(reason) or PERMANENT_REASONS.get(reason) or "unknown reason"
    return f"0x{reason:04X} ({name})"


def commitment_request(transaction_uid: str, references: Iterable[tuple[str, str]]) -> Dataset:
    """The N-ACTION information: ``transaction_uid`` and the stored copies' (SOP class, SOP instance)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = DicomSequence([_reference(c, i) for c, i in references])
    return ds


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


@dataclass(frozen=True)
class CommitmentReport:
    """One N-EVENT-REPORT: which sent copies (SOP Instance UIDs) the destination committed, and
    which it did not with their FailureReason. UIDs are kept out of reprs."""

    calling_ae: str
    transaction_uid: str
    committed: tuple[str, ...] = field(repr=False)
    failed: dict[str, int] = field(repr=False)

    @classmethod
    def parse(cls, calling_ae: str, event_type: int, info: Dataset) -> "CommitmentReport":
        """Raises ValueError on an event type or information a report cannot have."""
        if event_type not in (ALL_COMMITTED, SOME_FAILED) or not info.get("TransactionUID"):
            raise ValueError(f"not a storage commitment report (event type {event_type})")
        committed = tuple(str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", []))
        failed = {str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", PROCESSING_FAILURE))
                  for item in info.get("FailedSOPSequence", [])}
        return cls(calling_ae, str(info.TransactionUID), committed, failed)

    def summary(self) -> str:
        """Counts only: what logs may show."""
        reasons = ", ".join(f"{n} × {describe_failure(r)}" for r, n in sorted(_count(self.failed.values()).items()))
        return f"{len(self.committed)} committed, {len(self.failed)} failed" + (f" ({reasons})" if reasons else "")


def _count(values: Iterable[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


ReportCallback = Callable[[CommitmentReport], None]


def report_handler(on_report: ReportCallback) -> Callable[[evt.Event], tuple[int, None]]:
    """An EVT_N_EVENT_REPORT handler: parse, hand to ``on_report``, answer success; a report that
    cannot be parsed or recorded is answered with processing failure (0x0110), so the
    destination may send it again."""

    def handle(event: evt.Event) -> tuple[int, None]:
        peer = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
        calling = str(peer.ae_title).strip()
        try:
            report = CommitmentReport.parse(calling, int(getattr(event.request, "EventTypeID", 0) or 0), event.event_information)
            on_report(report)
        except Exception as exc:  # noqa: BLE001 - the peer gets a failure status; we log why
            log.error("storage commitment report from %s not taken: %s", calling, error_text(exc))
            return PROCESSING_FAILURE, None
        log.info("storage commitment report from %s: %s", calling, report.summary())
        return 0x0000, None

    return handle


class CommitmentReportSCP:
    """Takes Storage Commitment reports (N-EVENT-REPORT) that destinations send on associations
    they open to us, called ``ae_title`` at ``host:port``, from ``allowed_aes`` only."""

    def __init__(self, ae_title: str, host: str, port: int, allowed_aes: Sequence[str],
                 on_report: ReportCallback) -> None:
        quiet_pynetdicom()
        self.allowed_aes = sorted({ae.strip() for ae in allowed_aes if ae.strip()})
        if not self.allowed_aes:  # pynetdicom reads an empty list as "anyone"
            raise ValueError("the commitment report SCP needs at least one destination AE title")
        self.address = (host, port)
        self.on_report = on_report
        self._ae = AE(ae_title=ae_title)
        self._ae.require_calling_aet = self.allowed_aes
        self._ae.require_called_aet = True
        self._ae.maximum_associations = 8
        self._ae.network_timeout = self._ae.acse_timeout = self._ae.dimse_timeout = 60
        # The destination opens the association and is the SCP of the SOP class there (role selection).
        self._ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        self._ae.add_supported_context("1.2.840.10008.1.1")  # C-ECHO, for an operator checking the port
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The bound port (``port`` 0 asks for any free one)."""
        return int(self._server.server_address[1]) if self._server is not None else self.address[1]

    def start(self) -> "CommitmentReportSCP":
        self._server = self._ae.start_server(self.address, block=False, evt_handlers=[
            NODELAY_HANDLER, (evt.EVT_N_EVENT_REPORT, report_handler(self.on_report))])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "CommitmentReportSCP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
