"""``pacsflow listen``'s receiving side: a Storage SCP open to the allowed AEs, staging every
object into the listener's PHI zone, a durable tracker of what each study received, and a loop
that hands each stable study (nothing of it arrived for ``listener.stable_after_s``) to the
caller's ``on_stable``.

A study counts as handled only when ``on_stable`` returned: a failure (or a crash) leaves it to
the next pass, so delivery is at least once, never silently lost. Logs name studies by their
keyed pseudonym only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pacsflow.tasks.core.errors import PacsflowError
from pacsflow.tasks.core.files import ensure_private_dir
from pacsflow.tasks.deid.deidentifier import pseudonymize_uid
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver
from pacsflow.tasks.route.tracker import StableStudy, StudyTracker
from pacsflow.tasks.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 1.0
# Undecodable objects the listener received: kept in quarantine_dir/listener/, recorded in the
# ledger's quarantine table under this name (no study pseudonym can be made for them).
QUARANTINE_FOLDER = "listener"
FIRST_BACKOFF_S = 5.0
MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class ListenerCounters:
    """Totals since the listener started (``duplicates``: since the tracker was created)."""

    received: int = 0  # objects staged
    refused: Counter[str] = field(default_factory=Counter)  # by reason; "calling_ae": associations refused
    stable: int = 0  # stable studies (generations) offered to on_stable
    handed: int = 0  # of those, handled (on_stable returned)
    failed: int = 0  # on_stable raised
    duplicates: int = 0  # objects sent again after their study was handled (ignored)
    pending: int = 0  # objects received, not yet handled


class Listener:
    """The receiver, its staging writer (``listener_dir/inbox``) and the study tracker
    (``listener_dir/tracker.sqlite``). ``clock`` is wall time: arrivals are kept across restarts."""

    def __init__(self, settings: Settings, on_stable: Callable[[StableStudy], None], *,
                 clock: Callable[[], float] = time.time, poll_s: float = POLL_S) -> None:
        self.settings, self.on_stable, self.clock, self.poll_s = settings, on_stable, clock, poll_s
        self.window_s = settings.listener.stable_after_s
        key = settings.resolve_deid_key()
        self.study_ref: Callable[[str], str] = lambda uid: pseudonymize_uid(key, uid)
        folder = ensure_private_dir(settings.listener_dir)
        self.inbox = folder / "inbox"
        ledger = Ledger(settings.ledger_path, settings.state.url)
        self.writer = StagingWriter(self.inbox, self.study_ref, settings.listener.max_object_mb,
                                    open_studies=True, on_staged=self._staged,
                                    quarantine=(settings.quarantine_dir / QUARANTINE_FOLDER,
                                                lambda name, reason: ledger.quarantine(QUARANTINE_FOLDER, name, reason,
                                                                                       QUARANTINE_FOLDER)))
        self.receiver = StorageReceiver.for_listener(settings, self.writer)  # settings errors before the database
        self.tracker = StudyTracker(folder / "tracker.sqlite")
        self._received = self._stable = self._handed = self._failed = 0
        self._received_lock = threading.Lock()  # receiver threads stage objects side by side
        self._backoff: dict[str, tuple[float, float]] = {}  # study UID -> (retry at, delay): failing studies only
        self._stopping = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._final: ListenerCounters | None = None  # once stopped (the tracker is closed)

    def start(self) -> "Listener":
        """Take in what a crash left on disk, listen, and start the stability loop."""
        found = self.tracker.recover(self.inbox, self.clock())
        if found.registered or found.dropped or found.unreadable:
            log.warning("listener recovered after a restart: %d object(s) registered, %d vanished row(s) dropped, "
                        "%d unreadable file(s) left", found.registered, found.dropped, found.unreadable)
        self.receiver.start()
        self._stopping.clear()
        self._loop_thread = threading.Thread(target=self._loop, daemon=True, name="listener-stable")
        self._loop_thread.start()
        log.info("listener %r listening on %s:%d", self.settings.listener.ae_title, self.settings.listener.host,
                 self.settings.listener.port)
        return self

    def stop(self) -> None:
        """Stop listening, take in what running associations deliver, end the loop, close the tracker."""
        self.receiver.stop()
        self._stopping.set()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=60)
            self._loop_thread = None
        self._final = self.counters
        self.tracker.close()

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def counters(self) -> ListenerCounters:
        if self._final is not None:
            return self._final
        refused = Counter(self.writer.refused)
        refused["calling_ae"] = len(self.receiver.refused_aes)
        return ListenerCounters(self._received, +refused, self._stable, self._handed, self._failed,
                                self.tracker.duplicates(), self.tracker.pending())

    def poll(self) -> int:
        """One pass: every stable study not waiting out a backoff goes to ``on_stable``; how many were handled."""
        now = self.clock()
        handled = 0
        for study in self.tracker.stable(now, self.window_s):
            retry_at, _ = self._backoff.get(study.study_uid, (0.0, 0.0))
            if retry_at <= now:
                handled += self._offer(study, now)
        return handled

    def _offer(self, study: StableStudy, now: float) -> bool:
        ref = self.study_ref(study.study_uid)
        self._stable += 1
        try:
            self.on_stable(study)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the study to a later pass
            self._failed += 1
            delay = min(self._backoff.get(study.study_uid, (0.0, FIRST_BACKOFF_S / 2))[1] * 2, MAX_BACKOFF_S)
            self._backoff[study.study_uid] = (now + delay, delay)
            log.error("listener: study %s (generation %d, %d objects) not handled, retry in %.0f s: %s",
                      ref, study.generation, len(study), delay, _describe(exc))
            return False
        self._backoff.pop(study.study_uid, None)
        self.tracker.handled(study.study_uid, study.generation)
        self._handed += 1
        log.info("listener: study %s handled (generation %d, %d objects)", ref, study.generation, len(study))
        return True

    def _loop(self) -> None:
        while not self._stopping.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the loop outlives a bad pass (a locked or full disk)
                log.error("listener: stability pass failed: %s", _describe(exc))

    def _staged(self, study_uid: str, sop_uid: str, path: Path, calling_ae: str) -> None:
        """An object is in the inbox: into the tracker. If that fails, the file stays and the next
        start's ``recover`` registers it."""
        try:
            self.tracker.arrived(study_uid, sop_uid, path, calling_ae, self.clock())
        except Exception as exc:  # noqa: BLE001 - must not kill the receiver's thread
            log.error("listener: cannot record an object of study %s: %s", self.study_ref(study_uid), _describe(exc))
            return
        with self._received_lock:
            self._received += 1


def _describe(exc: BaseException) -> str:
    """Our typed errors carry no PHI; another library's message might, so only its type is shown."""
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, PacsflowError) else type(exc).__name__
