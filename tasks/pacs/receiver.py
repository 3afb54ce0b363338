"""Our Storage SCP (the C-MOVE destination) and the staging writer shared with C-GET.

Received objects are written from their encoded bytes, as they came off the wire, to
``staging/<pseudonymous study UID>/`` through a temp file and a rename, so a crash never
leaves a half-written object that looks complete. Staging holds originals (PHI): it lives
under ``state_root`` with owner-only permissions, never in the lake.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacsflow.tasks.pacs.client import NODELAY_HANDLER, abstract_syntaxes, quiet_pynetdicom

from pacsflow.tasks.core.files import ensure_private_dir, write_atomic
log = logging.getLogger(__name__)

_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000


class StagingWriter:
    """Writes C-STORE requests into per-study staging folders.

    ``study_dir_name`` maps an original StudyInstanceUID to the folder name (a pseudonymous
    UID), so no original identifier appears in a path that Prefect or the logs could see.
    """

    def __init__(self, staging_dir: Path, study_dir_name) -> None:
        self.staging_dir = ensure_private_dir(staging_dir)
        self._name = study_dir_name
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.rejected = 0

    def study_dir(self, study_uid: str) -> Path:
        return self.staging_dir / self._name(study_uid)

    def handle_store(self, event: evt.Event) -> int:
        try:
            ds = event.dataset
            study_uid = str(ds.StudyInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - any decode failure is the sender's malformed object
            with self._lock:
                self.rejected += 1
            log.warning("rejected a C-STORE whose dataset could not be decoded")
            return _CANNOT_UNDERSTAND
        folder = self.study_dir(study_uid)
        name = hashlib.sha256(sop_uid.encode()).hexdigest()[:32] + ".dcm"
        try:
            write_atomic(folder / name, event.encoded_dataset(), private=True)
        except OSError as exc:
            log.error("cannot write a received object to staging: %s", type(exc).__name__)
            return _OUT_OF_RESOURCES
        with self._lock:
            key = folder.name
            self._counts[key] = self._counts.get(key, 0) + 1
        return _SUCCESS


def count_staged(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))


class StorageReceiver:
    """A pynetdicom Storage SCP running in the flow's process for the duration of a run."""

    def __init__(self, ae_title: str, host: str, port: int, writer: StagingWriter) -> None:
        quiet_pynetdicom()
        self.writer = writer
        self.address = (host, port)
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_associations = 16
        self._ae.network_timeout = 60
        self._ae.acse_timeout = 30
        self._ae.dimse_timeout = 60
        # Accept every storage SOP class in every transfer syntax we are offered: we store bytes as sent.
        for uid in abstract_syntaxes(AllStoragePresentationContexts):
            self._ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification)
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> "StorageReceiver":
        handlers: list[evt.EventHandlerType] = [NODELAY_HANDLER, (evt.EVT_C_STORE, self.writer.handle_store)]
        self._server = self._ae.start_server(self.address, block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "StorageReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _all_transfer_syntaxes() -> list[str]:
    from pydicom import uid

    names = [
        "ImplicitVRLittleEndian",
        "ExplicitVRLittleEndian",
        "DeflatedExplicitVRLittleEndian",
        "ExplicitVRBigEndian",
        "JPEGBaseline8Bit",
        "JPEGExtended12Bit",
        "JPEGLosslessSV1",
        "JPEGLossless",
        "JPEGLSLossless",
        "JPEGLSNearLossless",
        "JPEG2000Lossless",
        "JPEG2000",
        "RLELossless",
        "HTJ2KLossless",
        "HTJ2KLosslessRPCL",
        "HTJ2K",
    ]
    return [getattr(uid, n) for n in names if hasattr(uid, n)]


ALL_TRANSFER_SYNTAXES = _all_transfer_syntaxes()
