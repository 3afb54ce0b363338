"""The forwarder: sends what the outbox holds to each destination, and records every outcome.

Per destination, up to ``max_associations`` worker threads each claim a batch of due rows, send
them over one association (:class:`~pacsflow.tasks.pacs.sender.StoreSender`) and write back
delivered, queued again with backoff, or dead. A destination that cannot be reached fails the
whole batch transiently; a refused object fails alone. Logs name the destination, counts and
pseudonymous study refs; never original UIDs or file contents.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from pacsflow.tasks.core.errors import error_text, is_transient
from pacsflow.tasks.pacs.sender import SendResult, StoreSender
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


@dataclass(frozen=True)
class BatchOutcome:
    destination: str
    delivered: int
    retried: int
    dead: int

    @property
    def sent(self) -> int:
        return self.delivered + self.retried + self.dead


class Forwarder:
    def __init__(self, outbox: Outbox, destinations: Mapping[str, DestinationLike], calling_ae: str,
                 backoff: Backoff, timeout_s: float, batch: int = BATCH) -> None:
        self.outbox = outbox
        self.destinations = dict(destinations)
        self.calling_ae = calling_ae
        self.backoff = backoff
        self.timeout_s = timeout_s
        self.batch = batch
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        # (destination, delivered | retried | dead) -> objects, since this process started: metrics.
        self.totals: Counter[tuple[str, str]] = Counter()
        self._totals_lock = threading.Lock()

    def sender(self, destination: DestinationLike) -> StoreSender:
        return StoreSender(self.calling_ae, destination.ae_title, destination.host, destination.port, self.timeout_s)

    # -- one batch ------------------------------------------------------------------------------
    def deliver_batch(self, name: str, now: float | None = None) -> BatchOutcome:
        """Claim up to ``batch`` due rows of destination ``name``, send them, record the outcomes."""
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
        with self._totals_lock:
            self.totals.update({(name, "delivered"): outcome.delivered, (name, "retried"): outcome.retried,
                                (name, "dead"): outcome.dead})
        return outcome

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
        log.info("forwarded to %s: %d of %d object(s) delivered (%s)", name, outcome.delivered, len(rows),
                 _studies(rows))
        return outcome

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
