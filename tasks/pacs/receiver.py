"""Our Storage SCP (the C-MOVE destination) and the staging writer shared with C-GET.

Received objects are written from their encoded bytes, as they came off the wire, to
``staging/<pseudonymous study UID>/`` through a temp file and a rename, so a crash never
leaves a half-written object that looks complete. Staging holds originals (PHI): it lives
under ``state_root`` with owner-only permissions, never in the lake.

The receiver listens on a port anyone can reach for the length of a run, so it trusts no one:
only the PACS (and AEs named in ``receiver.allowed_aes``) may associate, only objects of the
studies the run is retrieving are kept (and of those, once the PACS has listed a study's objects,
only the listed ones), and an object above ``receiver.max_object_mb`` is refused before a byte
of it is written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacsflow.tasks.core.errors import PacsConfigurationError
from pacsflow.tasks.core.files import ensure_private_dir, write_atomic
from pacsflow.tasks.pacs.client import NODELAY_HANDLER, abstract_syntaxes, quiet_pynetdicom
from pacsflow.tasks.pacs.storescp import NativeReceiver, storescp_available
from pacsflow.tasks.pacs.tls import receiver_context
from pacsflow.tasks.settings import ReceiverEngine, ReceiverSettings, Settings

log = logging.getLogger(__name__)

# (original study UID, original SOP Instance UID, staged file, calling AE title)
OnStaged = Callable[[str, str, Path, str], None]

_SUCCESS = 0x0000
_NOT_AUTHORISED = 0x0124  # an object of a study this run does not retrieve
_OUT_OF_RESOURCES = 0xA700  # cannot write, or larger than we accept
_CANNOT_UNDERSTAND = 0xC000
MB = 1024 * 1024
# Refusals another retrieve of the object cannot change (a failed write may succeed next time).
_FINAL_REFUSALS = frozenset({"too_large"})


class StagingWriter:
    """Writes C-STORE requests into per-study staging folders.

    ``uid_ref`` maps an original UID to its keyed pseudonym: a study's folder is named by it, so
    no original identifier appears in a path that Prefect or the logs could see. Only studies
    announced with ``expect`` are staged and, once a study's objects are listed with
    ``announce``, only those objects. Every refusal is counted in ``refused`` by reason
    (``too_large``, ``undecodable``, ``unexpected_study``, ``unlisted_object``) and in
    ``rejected``; the reason a listed object was refused is kept for the run's record.

    ``open_studies`` (the listener): every study is admitted, still not too large or undecodable
    objects, and nothing is kept per object, so memory does not grow with what arrives.
    ``on_staged(study_uid, sop_uid, path, calling_ae)`` is called once an object is in staging.
    """

    def __init__(self, staging_dir: Path, uid_ref: Callable[[str], str], max_object_mb: int = 2048, *,
                 open_studies: bool = False, on_staged: OnStaged | None = None,
                 quarantine: tuple[Path, Callable[[str, str], None]] | None = None) -> None:
        self.staging_dir = ensure_private_dir(staging_dir)
        self.ref = uid_ref
        self.max_object_bytes = max_object_mb * MB
        self.open_studies = open_studies
        self.on_staged = on_staged
        # (folder, record(file name, reason)): an undecodable object is kept there, not only
        # refused (the listener's case: nobody will send it again on request).
        self.quarantine = quarantine
        self._lock = threading.Lock()
        # Original UIDs below: held in memory, never written or logged.
        self._expected: set[str] = set()
        self._listed: dict[str, frozenset[str]] = {}  # study -> the SOP Instance UIDs the PACS listed
        self._unlisted: Counter[str] = Counter()  # study -> objects refused as not listed
        self._refusals: dict[str, str] = {}  # SOP Instance UID -> why we refused it
        self.refused: Counter[str] = Counter()
        # A native receiver's hook (study UID, its listed objects or None): takes in what it wrote.
        self.intake: Callable[[str, frozenset[str] | None], None] | None = None

    @property
    def rejected(self) -> int:
        return sum(self.refused.values())

    def expect(self, study_uids: Iterable[str]) -> None:
        """Accept objects of these studies (original StudyInstanceUIDs) from now on."""
        with self._lock:
            self._expected.update(study_uids)

    def announce(self, study_uid: str, sop_uids: Iterable[str]) -> None:
        """From now on accept only these objects of ``study_uid`` (what the PACS listed)."""
        with self._lock:
            self._listed[study_uid] = frozenset(sop_uids)
            self._unlisted.pop(study_uid, None)

    def forget(self, study_uid: str) -> None:
        """The study's retrieval has ended (for good or failed): what the writer kept about it goes,
        and from now on its objects are refused as of a study not being retrieved, so memory does
        not grow with the run's instances."""
        with self._lock:
            self._expected.discard(study_uid)
            listed = self._listed.pop(study_uid, frozenset())
            self._unlisted.pop(study_uid, None)
            for uid in listed:
                self._refusals.pop(uid, None)

    def study_dir(self, study_uid: str) -> Path:
        return self.staging_dir / self.ref(study_uid)

    def staged(self, study_uid: str, sop_uids: Iterable[str]) -> set[str]:
        """Which of ``sop_uids`` are on disk in the study's staging folder."""
        folder = self.study_dir(study_uid)
        return {uid for uid in sop_uids if (folder / staged_name(uid)).exists()}

    def settled(self, study_uid: str, sop_uids: Iterable[str]) -> set[str]:
        """Which of ``sop_uids`` need no further retrieve: on disk, or refused by our receiver."""
        wanted = set(sop_uids)
        with self._lock:
            ours = {uid for uid in wanted if self._refusals.get(uid) in _FINAL_REFUSALS}
        return ours | self.staged(study_uid, wanted - ours)

    def refused_for_good(self, sop_uids: Iterable[str]) -> dict[str, str]:
        """The objects among ``sop_uids`` our receiver refused for a reason a retrieve cannot change."""
        with self._lock:
            return {uid: r for uid in sop_uids if (r := self._refusals.get(uid)) in _FINAL_REFUSALS}

    def refusal(self, sop_uid: str) -> str | None:
        """Why we refused this object, if we did (e.g. ``too_large``)."""
        with self._lock:
            return self._refusals.get(sop_uid)

    def unlisted(self, study_uid: str) -> int:
        """Objects of the study refused because the PACS had not listed them."""
        with self._lock:
            return self._unlisted[study_uid]

    def handle_store(self, event: evt.Event) -> int:
        """A C-STORE received by pynetdicom: staged, or refused with the status the sender sees."""
        calling = calling_ae(event)
        if _encoded_size(event) > self.max_object_bytes:
            sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
            return self._refuse(repr(calling), "too_large", _OUT_OF_RESOURCES, sop_uid)
        try:
            ds = event.dataset
            study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - any decode failure is the sender's malformed object
            self._keep(event.request.DataSet.getvalue(), repr(calling))  # type: ignore[union-attr]
            return self._refuse(repr(calling), "undecodable", _CANNOT_UNDERSTAND)
        refusal = self._admit(study_uid, sop_uid)
        if refusal is not None:
            return self._refuse(repr(calling), refusal, _NOT_AUTHORISED)
        path = self.study_dir(study_uid) / staged_name(sop_uid)
        try:
            write_atomic(path, event.encoded_dataset(), private=True)
        except OSError as exc:
            log.error("cannot write a received object to staging: %s", type(exc).__name__)
            return self._refuse(repr(calling), "write_failed", _OUT_OF_RESOURCES, sop_uid)
        self._staged(study_uid, sop_uid, path, calling)
        return _SUCCESS

    def take_file(self, path: Path, peer: str = "storescp", calling: str = "") -> bool:
        """A file a native receiver wrote (``path``, complete): moved into staging by a rename, or
        refused for the same reasons as :meth:`handle_store` and deleted. The sender was told
        success already, so a refusal here is only counted and logged (``peer`` names the sender,
        ``calling`` is its AE title for :attr:`on_staged`)."""
        try:
            size = path.stat().st_size
            header = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            study_uid, sop_uid = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
        except FileNotFoundError:
            return False  # taken by another caller
        except Exception:  # noqa: BLE001 - any decode failure is the sender's malformed object
            self._keep(path, peer)
            return self._drop(path, peer, "undecodable")
        if size > self.max_object_bytes:
            return self._drop(path, peer, "too_large", sop_uid)
        refusal = self._admit(study_uid, sop_uid)
        if refusal is not None:
            return self._drop(path, peer, refusal)
        target = ensure_private_dir(self.study_dir(study_uid)) / staged_name(sop_uid)
        try:
            os.replace(path, target)
        except OSError as exc:
            log.error("cannot move a received object into staging: %s", type(exc).__name__)
            return self._drop(path, peer, "write_failed", sop_uid)
        self._staged(study_uid, sop_uid, target, calling)
        return True

    def _staged(self, study_uid: str, sop_uid: str, path: Path, calling: str) -> None:
        if self.on_staged is not None:
            self.on_staged(study_uid, sop_uid, path, calling)

    def settle(self, study_uid: str) -> None:
        """After a retrieve of ``study_uid`` ended: a native receiver's files of it go to staging
        (pynetdicom stages as it receives, so there is nothing to do)."""
        if self.intake is not None:
            with self._lock:
                listed = self._listed.get(study_uid)
            self.intake(study_uid, listed)

    def _admit(self, study_uid: str, sop_uid: str) -> str | None:
        """None when the object may be staged, else why not."""
        if self.open_studies:
            return None
        with self._lock:
            if study_uid not in self._expected:
                return "unexpected_study"
            listed = self._listed.get(study_uid)
            if listed is not None and sop_uid not in listed:
                self._unlisted[study_uid] += 1
                return "unlisted_object"
        return None

    def _keep(self, data: bytes | Path, peer: str) -> None:
        """With a quarantine: an undecodable object's bytes are kept there (owner-only) under a hash
        of its content, and recorded with the reason; a native receiver's file is moved there."""
        if self.quarantine is None:
            return
        folder, record = self.quarantine
        try:
            content = data.read_bytes() if isinstance(data, Path) else data
            name = hashlib.sha256(content).hexdigest()[:32] + ".dcm"
            write_atomic(folder / name, content, private=True)
            record(name, f"undecodable object from {peer}: no StudyInstanceUID/SOPInstanceUID could be read")
        except OSError as exc:
            log.error("cannot keep an undecodable object in quarantine: %s", type(exc).__name__)

    def _drop(self, path: Path, peer: str, reason: str, sop_uid: str = "") -> bool:
        path.unlink(missing_ok=True)
        self._refuse(peer, reason, _SUCCESS, sop_uid, where="at the staging boundary")
        return False

    def _refuse(self, peer: str, reason: str, status: int, sop_uid: str = "", where: str = "") -> int:
        with self._lock:
            self.refused[reason] += 1
            if sop_uid and not self.open_studies:  # open: no retrieve asks again, nothing kept per object
                self._refusals[sop_uid] = reason
        told = where or f"(0x{status:04X})"
        log.warning("refused a C-STORE from %s: %s %s", peer, reason.replace("_", " "), told)
        return status


def staged_name(sop_uid: str) -> str:
    """An object's file name in staging: a hash of its SOP Instance UID (no identifier in paths)."""
    return hashlib.sha256(sop_uid.encode()).hexdigest()[:32] + ".dcm"


def _encoded_size(event: evt.Event) -> int:
    """The received dataset's encoded length: pynetdicom holds it in memory (a BytesIO)."""
    data = event.request.DataSet  # type: ignore[union-attr]
    if data is None:
        return 0
    with data.getbuffer() as view:
        return view.nbytes


_HEADER_TAGS = ["StudyInstanceUID", "SOPInstanceUID"]


def calling_ae(event: evt.Event) -> str:
    """The AE title at the other end (AE titles are not PHI)."""
    assoc = event.assoc
    peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    return str(peer.ae_title).strip()


def count_staged(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))


class StorageReceiver:
    """A pynetdicom Storage SCP running in the flow's process for the duration of a run.

    Associations are accepted from ``allowed_aes`` (calling AE titles) only, and only when they
    call us by ``ae_title``; refused calling AEs are logged and kept in ``refused_aes``. With an
    ``ssl_context`` (``receiver.tls``) it speaks TLS only, and the AE checks apply on top.
    """

    def __init__(self, ae_title: str, host: str, port: int, writer: StagingWriter, allowed_aes: Iterable[str],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        quiet_pynetdicom()
        self.writer = writer
        self.ssl_context = ssl_context
        self.address = (host, port)
        self.allowed_aes = sorted({ae.strip() for ae in allowed_aes if ae.strip()})
        if not self.allowed_aes:  # pynetdicom reads an empty list as "anyone"
            raise ValueError("the receiver needs at least one allowed calling AE (the PACS's)")
        self.refused_aes: list[str] = []
        self._ae = AE(ae_title=ae_title)
        self._ae.require_calling_aet = self.allowed_aes
        self._ae.require_called_aet = True
        self._ae.maximum_associations = 16
        self._ae.network_timeout = 60
        self._ae.acse_timeout = 30
        self._ae.dimse_timeout = 60
        # Accept every storage SOP class in every transfer syntax we are offered: we store bytes as sent.
        for uid in abstract_syntaxes(AllStoragePresentationContexts):
            self._ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification)
        self._server: ThreadedAssociationServer | None = None

    @classmethod
    def for_run(cls, settings: Settings, writer: StagingWriter) -> "StorageReceiver | NativeReceiver":
        """The receiver of ``settings.receiver`` (its ``engine``), open to the PACS and
        ``receiver.allowed_aes``."""
        r = settings.receiver
        allowed = [settings.pacs.called_ae, *r.allowed_aes]
        if chosen_engine(r) is ReceiverEngine.DCMTK:
            return NativeReceiver(r.ae_title, r.host, r.port, writer, allowed, settings.state_root / "incoming")
        return cls(r.ae_title, r.host, r.port, writer, allowed, receiver_context(r))

    @classmethod
    def for_listener(cls, settings: Settings, writer: StagingWriter) -> "StorageReceiver | NativeReceiver":
        """The receiver of ``pacsflow listen`` (``settings.listener``): open to ``listener.allowed_aes``
        only; the native engine writes under ``listener_dir/incoming``."""
        li = settings.listener
        if not li.allowed_aes:
            raise PacsConfigurationError("listener.allowed_aes is empty: name the calling AE titles that may send "
                                         "to the listener")
        engine = resolve_engine(li.engine, tls=False, setting="listener.engine")
        if engine is ReceiverEngine.DCMTK:
            return NativeReceiver(li.ae_title, li.host, li.port, writer, li.allowed_aes,
                                  settings.listener_dir / "incoming", keep_received=True)
        return cls(li.ae_title, li.host, li.port, writer, li.allowed_aes)

    def start(self) -> "StorageReceiver":
        handlers: list[evt.EventHandlerType] = [
            NODELAY_HANDLER,
            (evt.EVT_C_STORE, self.writer.handle_store),
            (evt.EVT_REJECTED, self._rejected),
        ]
        self._server = self._ae.start_server(
            self.address, block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        return self

    def _rejected(self, event: evt.Event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        self.refused_aes.append(calling)
        why = "not an allowed calling AE" if calling not in self.allowed_aes else "called AE or association limit"
        log.warning("receiver refused an association from calling AE %r (%s)", calling, why)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def drain(self, timeout_s: float) -> bool:
        """Every object received is staged or refused already (the native engine's counterpart waits)."""
        return True

    def __enter__(self) -> "StorageReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def chosen_engine(receiver: ReceiverSettings) -> ReceiverEngine:
    """``receiver.engine``, with ``auto`` resolved: DCMTK when storescp is installed and TLS is off."""
    return resolve_engine(receiver.engine, tls=receiver.tls.enabled, setting="receiver.engine")


def resolve_engine(engine: ReceiverEngine, *, tls: bool, setting: str) -> ReceiverEngine:
    """``engine`` (the value of ``setting``), with ``auto`` resolved: DCMTK when storescp is
    installed and ``tls`` is off; ``dcmtk`` without storescp is a configuration error."""
    if engine is not ReceiverEngine.AUTO:
        if engine is ReceiverEngine.DCMTK and not storescp_available():
            raise PacsConfigurationError(f"{setting} is dcmtk, but DCMTK's storescp is not on PATH: install "
                                         f"dcmtk or set {setting} to pynetdicom")
        return engine
    if storescp_available() and not tls:
        return ReceiverEngine.DCMTK
    return ReceiverEngine.PYNETDICOM


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
