"""The forwarder: sends what the outbox holds to each destination, and records every outcome.

Per destination, up to ``max_associations`` worker threads each claim a batch of due rows, send
them over one association (:class:`~pacsflow.tasks.pacs.sender.StoreSender`) and write back
delivered, queued again with backoff, or dead. A destination that cannot be reached fails the
whole batch transiently; a refused object fails alone. Logs name the destination, counts and
pseudonymous study refs; never original UIDs or file contents.

A destination with ``storage_commitment`` is then asked to commit what it stored (one N-ACTION
per batch, a fresh transaction UID): those rows wait in ``committing`` until its report comes
(:meth:`Forwarder.on_commitment_report`, from the report SCP or the N-ACTION's association) or
their deadline passes, which counts as a transient failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from pydicom.uid import generate_uid

from pacsflow.tasks.core.errors import error_text, is_transient
from pacsflow.tasks.pacs.commitment import CommitmentReport, describe_failure, failure_is_transient
from pacsflow.tasks.pacs.sender import SendResult, StoreSender, read_header
from pacsflow.tasks.route.outbox import Backoff, Delivery, DeliveryState, Outbox

log = logging.getLogger(__name__)

BATCH = 64  # objects per association
IDLE_WAIT_S = 1.0  # longest sleep of an idle worker: new rows are seen this quickly


class DestinationLike(Protocol):
    """What the forwarder needs of a destination (``pacsflow.tasks.route.rules.Destination``)."""

    @property
    def name(self) -> str: ...
    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def max_associations(self) -> int: ...
    @property
    def storage_commitment(self) -> bool: ...


@dataclass(frozen=True)
class BatchOutcome:
    destination: str
    delivered: int
    retried: int
    dead: int
    committing: int = 0  # stored, waiting for the destination's Storage Commitment report

    @property
    def sent(self) -> int:
        return self.delivered + self.retried + self.dead + self.committing


class Forwarder:
    def __init__(self, outbox: Outbox, destinations: Mapping[str, DestinationLike], calling_ae: str,
                 backoff: Backoff, timeout_s: float, batch: int = BATCH, commitment_timeout_s: float = 600.0) -> None:
        self.outbox = outbox
        self.destinations = dict(destinations)
        self.calling_ae = calling_ae
        self.backoff = backoff
        self.timeout_s = timeout_s
        self.batch = batch
        self.commitment_timeout_s = commitment_timeout_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        # (destination, delivered | retried | dead | committing) -> objects, since this process started: metrics.
        self.totals: Counter[tuple[str, str]] = Counter()
        self._totals_lock = threading.Lock()

    def sender(self, destination: DestinationLike) -> StoreSender:
        return StoreSender(self.calling_ae, destination.ae_title, destination.host, destination.port, self.timeout_s)

    # -- one batch ------------------------------------------------------------------------------
    def deliver_batch(self, name: str, now: float | None = None) -> BatchOutcome:
        """Claim up to ``batch`` due rows of destination ``name``, send them, record the outcomes
        (first, rows whose commitment report is overdue are queued again)."""
        self._expire_commitments(name, now)
        rows = self.outbox.claim(name, self.batch, now)
        if not rows:
            return BatchOutcome(name, 0, 0, 0)
        sender = self.sender(self.destinations[name])
        try:
            results = sender.send([r.file for r in rows])
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the rows, then logged
            outcome = self._record_failure(name, rows, exc, now)
        else:
            outcome = self._record(name, rows, results, now)
            stored = [r for r, res in zip(rows, results) if res.delivered]
            if stored and self.destinations[name].storage_commitment:
                outcome = self._request_commitment(name, sender, stored, outcome, now)
        self._count(outcome)
        return outcome

    def _count(self, outcome: BatchOutcome) -> None:
        name = outcome.destination
        with self._totals_lock:
            self.totals.update({(name, "delivered"): outcome.delivered, (name, "retried"): outcome.retried,
                                (name, "dead"): outcome.dead, (name, "committing"): outcome.committing})

    def _record_failure(self, name: str, rows: Sequence[Delivery], exc: Exception,
                        now: float | None) -> BatchOutcome:
        after = self.outbox.failed([r.id for r in rows], error_text(exc), permanent=not is_transient(exc),
                                   backoff=self.backoff, now=now)
        dead = sum(1 for r in after if r.state is DeliveryState.DEAD)
        log.warning("forward to %s: %d object(s) of %s not sent: %s; %d dead, %d queued again", name, len(rows),
                    _studies(rows), error_text(exc), dead, len(after) - dead)
        return BatchOutcome(name, 0, len(after) - dead, dead)

    def _record(self, name: str, rows: Sequence[Delivery], results: Sequence[SendResult],
                now: float | None) -> BatchOutcome:
        if not self.destinations[name].storage_commitment:
            self.outbox.delivered([r.id for r, res in zip(rows, results) if res.delivered], now)
        failures: dict[tuple[str, bool], list[Delivery]] = {}
        for row, res in zip(rows, results):
            if res.error is not None:
                failures.setdefault((error_text(res.error), res.permanent), []).append(row)
        retried = dead = 0
        for (text, permanent), failed in failures.items():
            after = self.outbox.failed([r.id for r in failed], text, permanent=permanent, backoff=self.backoff,
                                       now=now)
            n_dead = sum(1 for r in after if r.state is DeliveryState.DEAD)
            dead, retried = dead + n_dead, retried + len(after) - n_dead
            log.warning("forward to %s: %d object(s) of %s failed: %s; %d dead, %d queued again", name,
                        len(failed), _studies(failed), text, n_dead, len(after) - n_dead)
        outcome = BatchOutcome(name, len(rows) - retried - dead, retried, dead)
        log.info("forwarded to %s: %d of %d object(s) stored (%s)", name, outcome.delivered, len(rows),
                 _studies(rows))
        return outcome

    # -- Storage Commitment ---------------------------------------------------------------------
    def _request_commitment(self, name: str, sender: StoreSender, stored: Sequence[Delivery],
                            stored_outcome: BatchOutcome, now: float | None) -> BatchOutcome:
        """The stored rows wait in ``committing`` (before the request goes out: a report may come
        at once, on another thread) while the destination is asked to commit them."""
        headers = {r.id: read_header(r.file) for r in stored}
        transaction = generate_uid()
        deadline = (time.time() if now is None else now) + self.commitment_timeout_s
        self.outbox.committing({i: h.sop_instance for i, h in headers.items()}, transaction, deadline, now)
        try:
            sender.request_commitment(transaction, [(h.sop_class, h.sop_instance) for h in headers.values()],
                                      self.on_commitment_report)
        except Exception as exc:  # noqa: BLE001 - recorded on the rows like a failed C-STORE
            failed = self._record_failure(name, stored, exc, now)
            return BatchOutcome(name, 0, stored_outcome.retried + failed.retried, stored_outcome.dead + failed.dead)
        log.info("storage commitment asked of %s for %d object(s) (%s)", name, len(stored), _studies(stored))
        return BatchOutcome(name, 0, stored_outcome.retried, stored_outcome.dead, committing=len(stored))

    def on_commitment_report(self, report: CommitmentReport, now: float | None = None) -> None:
        """A destination's report: committed rows delivered; failed ones queued again with backoff
        (transient FailureReason) or dead (permanent). A report from another AE than the
        transaction's destination, or for rows no longer waiting, changes nothing."""
        waiting = self.outbox.awaiting(report.transaction_uid)  # one batch: one destination
        dest = self.destinations.get(waiting[0].destination) if waiting else None
        if dest is None or dest.ae_title != report.calling_ae:
            log.warning("storage commitment report from %s for no transaction of its waiting here: ignored",
                        report.calling_ae)
            return
        name = dest.name
        delivered = self.outbox.committed(report.transaction_uid, report.committed, now)
        by_reason: dict[int, list[int]] = {}
        for row in waiting:
            if row.sent_uid in report.failed:
                by_reason.setdefault(report.failed[row.sent_uid], []).append(row.id)
        retried = dead = 0
        for reason, ids in by_reason.items():
            text = (f"destination {dest.ae_title}@{dest.host}:{dest.port} did not commit the object: "
                    f"{describe_failure(reason)}")
            after = self.outbox.failed(ids, text, permanent=not failure_is_transient(reason), backoff=self.backoff,
                                       now=now)
            n_dead = sum(1 for r in after if r.state is DeliveryState.DEAD)
            dead, retried = dead + n_dead, retried + len(after) - n_dead
        self._count(BatchOutcome(name, delivered, retried, dead))
        log.info("storage commitment of %s: %d delivered, %d queued again, %d dead (%s)", name, delivered, retried,
                 dead, _studies(waiting))

    def _expire_commitments(self, name: str, now: float | None) -> None:
        dest = self.destinations[name]
        if not dest.storage_commitment:
            return
        error = (f"no storage commitment report from destination {dest.ae_title}@{dest.host}:{dest.port} within "
                 f"{self.commitment_timeout_s:g} s (listener.commitment_timeout_s); check that it registers our "
                 "AE title with listener.commitment_port as its port")
        after = self.outbox.expire_commitments(name, error, self.backoff, now)
        if after:
            n_dead = sum(1 for r in after if r.state is DeliveryState.DEAD)
            self._count(BatchOutcome(name, 0, len(after) - n_dead, n_dead))
            log.warning("forward to %s: %d object(s) of %s had no storage commitment report in time; %d dead, "
                        "%d queued again", name, len(after), _studies(after), n_dead, len(after) - n_dead)

    # -- synchronous pass -----------------------------------------------------------------------
    def deliver_due(self, now: float | None = None) -> int:
        """Send everything due (at ``now``) to every destination, batch after batch, in this thread;
        rows that fail are queued for later, not tried again in this pass. Returns the rows
        delivered (for tests and ``route retry --now``)."""
        delivered = 0
        for name in self.destinations:
            while True:
                outcome = self.deliver_batch(name, now)
                delivered += outcome.delivered
                if outcome.sent < self.batch:
                    break
        return delivered

    # -- background workers ---------------------------------------------------------------------
    def start(self) -> "Forwarder":
        """Start ``max_associations`` workers per destination (rows claimed while a previous
        process was sending are queued again first)."""
        recovered = self.outbox.recover()
        if recovered:
            log.info("outbox: %d object(s) claimed by a previous process queued again", recovered)
        self._stop.clear()
        for dest in self.destinations.values():
            for n in range(max(1, dest.max_associations)):
                t = threading.Thread(target=self._work, args=(dest.name,), name=f"forward-{dest.name}-{n}",
                                     daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def wake(self) -> None:
        """New rows were queued: idle workers look now rather than after their wait."""
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the workers after their current batch (each batch is bounded by the timeouts)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout_s)
        self._threads = []

    def _work(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                outcome = self.deliver_batch(name)
            except Exception as exc:  # noqa: BLE001 - an outbox error must not end the worker silently
                log.error("forward to %s: %s", name, error_text(exc))
                outcome = BatchOutcome(name, 0, 0, 0)
            if outcome.sent == self.batch:
                continue
            self._wait(name)

    def _wait(self, name: str) -> None:
        due = self.outbox.next_due(name)
        wait = IDLE_WAIT_S if due is None else min(IDLE_WAIT_S, max(0.0, due - time.time()))
        if wait > 0 and self._wake.wait(wait):
            self._wake.clear()


def _studies(rows: Sequence[Delivery]) -> str:
    """``3 stud(ies): ref1 (40), ref2 (3), …``: pseudonymous study refs with their object counts."""
    counts = Counter(r.study_ref for r in rows)
    shown = ", ".join(f"{ref} ({n})" for ref, n in counts.most_common(5))
    more = f", … {len(counts) - 5} more" if len(counts) > 5 else ""
    return f"{len(counts)} stud(ies): {shown}{more}"
