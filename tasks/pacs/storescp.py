"""DCMTK ``storescp`` as our Storage SCP: the native receive engine (``receiver.engine``).

pynetdicom spends about 4 ms of CPU per received object in the flow's process; ``storescp``, in
C++, a small fraction of that, in processes of its own. The receiver keeps the listening socket:
it accepts a connection on ``receiver.host:port``, reads the A-ASSOCIATE-RQ's fixed header
without consuming it (PS3.8 9.3.2: called and calling AE titles at fixed offsets) and rejects an
association not addressed to us or from a calling AE that is not allowed, exactly as the
pynetdicom engine does. An admitted connection is handed to ``storescp --inetd`` (one process
per association), which writes each object, bit for bit as received, into a folder of its own.

Files reach staging through :meth:`StagingWriter.take_file`, by a rename, so staging only ever
holds complete, admitted objects:
- when a C-MOVE ends (:meth:`collect`), the study's listed objects: ``storescp`` names a file by
  its SOP Instance UID and answers each C-STORE only once the file is written, so a listed file
  is complete by the time the PACS reports the move's end;
- when an association's process ends, everything it wrote (objects not listed, other studies).
What ``storescp`` cannot refuse on the wire (objects above ``max_object_mb``, of studies not
being retrieved, not listed) is refused there: the sender was told success, the object is
deleted, counted and logged. ``storescp``'s own messages are logged with UIDs masked.

With ``keep_received`` (the listener, where no retrieve asks again for what is lost) what
``storescp`` acknowledged is never thrown away: the folders of a killed process's associations
(their ``storescp`` outlives it and finishes) are taken in at start, and at stop the complete
files of associations we had to end are taken in too; a file cut short is dropped.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pydicom import dcmread
from pydicom.dataelem import RawDataElement

from pacsflow.tasks.core.files import ensure_private_dir, remove_tree, write_private_file

log = logging.getLogger(__name__)

STORESCP = "storescp"
ASSOCIATE_RQ = 0x01
_HEAD = 42  # PDU type, reserved, length (4), version (2), reserved (2), called AE (16), calling AE (16)
_REJECT_CALLING_AE, _REJECT_CALLED_AE = 3, 7  # A-ASSOCIATE-RJ reasons, source: service user (PS3.8 9.3.4)
_UID = re.compile(rb"\d+(?:\.\d+){3,}")
ADMIT_TIMEOUT_S = 10.0  # a peer that connects must send its A-ASSOCIATE-RQ within this
REAP_EVERY_S = 0.05


def storescp_available() -> bool:
    return shutil.which(STORESCP) is not None


def association_aes(head: bytes) -> tuple[str, str] | None:
    """(called AE, calling AE) of an A-ASSOCIATE-RQ's first bytes; None for anything else."""
    if len(head) < _HEAD or head[0] != ASSOCIATE_RQ:
        return None
    called, calling = head[10:26], head[26:42]
    return called.decode("ascii", "replace").strip(), calling.decode("ascii", "replace").strip()


def associate_reject(reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU: rejected permanent, by the service user, for ``reason``."""
    return bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0x01, reason])


def masked(text: bytes) -> str:
    """A storescp message with every UID masked (file names carry SOP Instance UIDs)."""
    return _UID.sub(b"<uid>", text).decode("utf-8", "replace").strip()


@dataclass
class Association:
    """One admitted association: its ``storescp`` process and the folder it writes to."""

    number: int
    calling: str
    process: subprocess.Popen
    folder: Path
    ended_by_us: bool = False  # terminated at stop(): a file may be half-written

    @property
    def log_path(self) -> Path:
        return self.folder.with_suffix(".log")

    @property
    def pid_path(self) -> Path:
        return self.folder.with_suffix(".pid")


class NativeReceiver:
    """``storescp`` per association behind our own listening socket (see the module's text).

    The same interface as the pynetdicom engine: ``start``/``stop`` (or a ``with`` block) and
    ``refused_aes``. ``incoming`` is in the PHI zone (owner-only); it is emptied as files are taken.
    """

    def __init__(self, ae_title: str, host: str, port: int, writer, allowed_aes: Iterable[str], incoming: Path,
                 *, settle_wait_s: float = 10.0, max_pdu: int = 131072, keep_received: bool = False) -> None:
        self.ae_title, self.address, self.writer = ae_title, (host, port), writer
        self.allowed_aes = sorted({ae.strip() for ae in allowed_aes if ae.strip()})
        if not self.allowed_aes:
            raise ValueError("the receiver needs at least one allowed calling AE (the PACS's)")
        self.incoming = incoming
        self.settle_wait_s, self.max_pdu, self.keep_received = settle_wait_s, max_pdu, keep_received
        self.refused_aes: list[str] = []
        self._associations: list[Association] = []
        self._lock = threading.Lock()  # the association list and the taking of files
        self._changed = threading.Condition(self._lock)
        self._numbers = iter(range(1, 1 << 62))
        self._socket: socket.socket | None = None
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifetime ----------------------------------------------------------------------------
    def start(self) -> "NativeReceiver":
        if self.keep_received:
            self._take_leftovers()
        remove_tree(self.incoming)  # a killed run's leftovers: never answered for, never staged
        ensure_private_dir(self.incoming)
        sock = socket.create_server(self.address, reuse_port=False, backlog=64)
        self._socket = sock
        self._stopped.clear()
        self.writer.intake = self.collect
        for target, name in ((self._accept_loop, "storescp-accept"), (self._reap_loop, "storescp-reap")):
            thread = threading.Thread(target=target, daemon=True, name=name)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening; let running associations end (up to ``settle_wait_s``), end the rest,
        and take in what they wrote."""
        if self._socket is None:
            return
        try:  # wakes the accept() of the other thread: close() alone leaves the port bound until it returns
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        self._socket = None
        self.drain(self.settle_wait_s)
        with self._lock:
            left = list(self._associations)
        for assoc in left:
            assoc.ended_by_us = True
            assoc.process.terminate()
        self.drain(5.0)
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self.writer.intake = None
        remove_tree(self.incoming)

    def __enter__(self) -> "NativeReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- taking files in -------------------------------------------------------------------
    def collect(self, study_uid: str, listed: frozenset[str] | None) -> None:
        """A retrieve of ``study_uid`` ended: its listed objects go to staging now; then wait (up
        to ``settle_wait_s``) for the associations that delivered them to end, so that what else
        they wrote (objects the PACS did not list) is counted under the study. Without a list,
        wait for every association open now."""
        with self._lock:
            running = list(self._associations)
            if listed is None:
                waiting = running
            else:
                waiting = [a for a in running if self._take_listed(a, listed)]
        self._wait_for(waiting, self.settle_wait_s)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every association has ended and its files are taken in; whether they all did."""
        with self._lock:
            running = list(self._associations)
        return self._wait_for(running, timeout_s)

    def _take_leftovers(self) -> None:
        """The associations of a killed process: wait for their storescp (it outlives its parent),
        then take in their complete files, which the sender was told are stored."""
        folders = sorted(p for p in self.incoming.glob("a*") if p.is_dir()) if self.incoming.is_dir() else []
        for folder in folders:
            pid, _, calling = _read_text(folder.with_suffix(".pid")).partition(" ")
            if pid.isdigit() and not _wait_gone(int(pid), self.settle_wait_s):
                os.kill(int(pid), signal.SIGTERM)
            taken = self._take_complete(_entries(folder), calling, f"{calling!r} (an earlier process's association)")
            log.warning("receiver took in %d object(s) an earlier process received from %r", taken, calling)

    def _take_complete(self, files: list[os.DirEntry], calling: str, peer: str) -> int:
        """Take in the complete ones of ``files``; drop those cut short. How many were taken."""
        taken = 0
        for entry in files:
            if complete_object(Path(entry.path)):
                taken += self.writer.take_file(Path(entry.path), peer, calling)
            else:
                log.warning("receiver dropped an object cut short by a stopped storescp (%s)", peer)
                Path(entry.path).unlink(missing_ok=True)
        return taken

    def _take_listed(self, assoc: Association, listed: frozenset[str]) -> bool:
        """Take the association's files of ``listed`` objects; whether it had any."""
        took = False
        for entry in _entries(assoc.folder):
            if _sop_uid(entry.name) in listed:
                self.writer.take_file(Path(entry.path), _peer(assoc), assoc.calling)
                took = True
        return took

    def _wait_for(self, associations: list[Association], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while any(a in self._associations for a in associations):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # -- threads -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        sock = self._socket
        while sock is not None and not self._stopped.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._admit, args=(conn,), daemon=True, name="storescp-admit").start()

    def _admit(self, conn: socket.socket) -> None:
        with conn:
            aes = _peek_association(conn)
            if aes is None:
                log.warning("receiver closed a connection that sent no A-ASSOCIATE-RQ")
                return
            called, calling = aes
            reason = _REJECT_CALLED_AE if called != self.ae_title else None
            if calling not in self.allowed_aes:
                reason = _REJECT_CALLING_AE
            if reason is not None:
                self._reject(conn, calling, reason)
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(conn, calling)

    def _reject(self, conn: socket.socket, calling: str, reason: int) -> None:
        with self._lock:
            self.refused_aes.append(calling)
        why = "not an allowed calling AE" if reason == _REJECT_CALLING_AE else "called AE is not ours"
        log.warning("receiver refused an association from calling AE %r (%s)", calling, why)
        try:
            conn.sendall(associate_reject(reason))
        except OSError:
            pass

    def _spawn(self, conn: socket.socket, calling: str) -> None:
        with self._lock:
            number = next(self._numbers)
        folder = ensure_private_dir(self.incoming / f"a{number:08d}")
        with open(folder.with_suffix(".log"), "wb") as errors:
            process = subprocess.Popen(
                [STORESCP, "--inetd", "+B", "-od", str(folder), "-aet", self.ae_title, "-pdu", str(self.max_pdu),
                 "-dhl", "-ta", "30", "-ts", "60"],
                stdin=conn.fileno(), stdout=conn.fileno(), stderr=errors, close_fds=True, umask=0o077,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        if self.keep_received:  # a restart after a crash finds the process that wrote the folder
            write_private_file(folder.with_suffix(".pid"), f"{process.pid} {calling}")
        with self._changed:
            self._associations.append(Association(number, calling, process, folder))
            self._changed.notify_all()

    def _reap_loop(self) -> None:
        while not self._stopped.wait(REAP_EVERY_S):
            with self._lock:
                ended = [a for a in self._associations if a.process.poll() is not None]
            for assoc in ended:
                self._settle(assoc)

    def _settle(self, assoc: Association) -> None:
        """An association's process ended: every file it wrote is taken in (or refused)."""
        with self._lock:
            files = _entries(assoc.folder)
            if assoc.ended_by_us and files and self.keep_received:
                self._take_complete(files, assoc.calling, _peer(assoc))
            elif assoc.ended_by_us and files:
                log.warning("receiver stopped association %d of %r mid-transfer: %d file(s) discarded",
                            assoc.number, assoc.calling, len(files))
            else:
                for entry in files:
                    self.writer.take_file(Path(entry.path), _peer(assoc), assoc.calling)
        messages = assoc.log_path.read_bytes() if assoc.log_path.exists() else b""
        for line in messages.splitlines():
            if line.strip():
                log.warning("storescp (association %d): %s", assoc.number, masked(line))
        if assoc.process.returncode not in (0, None):
            log.warning("storescp (association %d) ended with exit code %s", assoc.number, assoc.process.returncode)
        remove_tree(assoc.folder)
        assoc.log_path.unlink(missing_ok=True)
        assoc.pid_path.unlink(missing_ok=True)
        with self._changed:
            self._associations.remove(assoc)
            self._changed.notify_all()


def _peek_association(conn: socket.socket) -> tuple[str, str] | None:
    """The AE titles of the A-ASSOCIATE-RQ waiting on ``conn``, left unread for storescp."""
    deadline = time.monotonic() + ADMIT_TIMEOUT_S
    head = b""
    while len(head) < _HEAD and time.monotonic() < deadline:
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            head = conn.recv(_HEAD, socket.MSG_PEEK)
        except OSError:
            return None
        if not head:  # closed
            return None
        if len(head) < _HEAD:
            time.sleep(0.005)
    conn.settimeout(None)
    return association_aes(head)


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_file()]
    except FileNotFoundError:
        return []


def _sop_uid(file_name: str) -> str:
    """storescp's default file name is ``<modality>.<SOP Instance UID>``."""
    return file_name.partition(".")[2]


def _peer(assoc: Association) -> str:
    return f"{assoc.calling!r} (storescp association {assoc.number})"


def complete_object(path: Path) -> bool:
    """Whether a file storescp wrote holds a whole object: a process killed mid-write leaves its
    last element shorter than the length it declares (pydicom reads such a file without a word)."""
    try:
        ds = dcmread(path)
        if not ds:
            return False
        last = ds.get_item(max(ds.keys()))
    except Exception:  # noqa: BLE001 - unreadable: the staging boundary refuses it as undecodable
        return True
    if isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF and last.value is not None:
        return len(last.value) == last.length
    return True


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` (if it is a storescp) has ended; whether it did."""
    deadline = time.monotonic() + timeout_s
    while _is_storescp(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(REAP_EVERY_S)
    return True


def _is_storescp(pid: int) -> bool:
    try:
        return STORESCP in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
