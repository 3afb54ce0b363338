"""``pacsflow listen``: the long-running listener and router.

Objects pushed to the listener's Storage SCP are staged in its PHI zone and tracked per study
(:class:`~pacsflow.tasks.route.listener.Listener`). When a study is stable, the routing rules
decide per object (:class:`~pacsflow.tasks.route.router.Router`): each destination's copy goes to
the durable outbox, which the forwarder delivers with retries and dead-lettering; a study a rule
ingests is hard-linked into the hand-off folder and announced with the Prefect event
``pacsflow.study.stable``, whose deployment trigger runs the ``ingest-study`` flow. Prometheus
metrics are served when ``listener.metrics_port`` is set. Destinations with ``storage_commitment``
send their reports to a Storage Commitment SCP on ``listener.commitment_port``.

This module only wires the parts together and owns their lifetimes; the service stops on
SIGTERM or SIGINT after draining its receiver.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from typing import Iterator

from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL
from prometheus_client import CollectorRegistry, start_http_server

from pacsflow.flows.events import announce_waiting, emit_study_routed, emit_study_stable
from pacsflow.tasks.core.errors import PacsConfigurationError
from pacsflow.tasks.core.files import purge_older_than
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.handoff import handoff_dir
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.pacs.commitment import CommitmentReportSCP
from pacsflow.tasks.pacs.receiver import staged_name
from pacsflow.tasks.route.forwarder import Forwarder
from pacsflow.tasks.route.listener import QUARANTINE_FOLDER, Listener
from pacsflow.tasks.route.metrics import ListenerMetrics
from pacsflow.tasks.route.outbox import Backoff, Outbox
from pacsflow.tasks.route.router import Arrival, Router, deidentified_copies, link_for_ingest
from pacsflow.tasks.route.rules import RoutingRules
from pacsflow.tasks.route.tracker import StableStudy
from pacsflow.tasks.settings import Settings

log = logging.getLogger("pacsflow.listen")

TIDY_EVERY_S = 3600.0


class ListenService:
    """The listener, the router and the forwarder of one ``pacsflow listen`` process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        rules_file = settings.listener.rules_file
        self.rules = RoutingRules.load(rules_file) if rules_file else RoutingRules()
        self.events = bool(PREFECT_API_URL.value())  # routed studies show in the UI's event feed
        if any(rule.ingest for rule in self.rules.rules) and not self.events:
            # Without a server the event would start a temporary one that no deployment listens to.
            raise PacsConfigurationError("listener.rules_file ingests studies, but PREFECT_API_URL is not set: point "
                                         "it at the Prefect server that runs the ingest-study deployment")
        deid = Deidentifier.from_settings(settings.resolve_deid_key(), settings.deid)
        self.study_ref = deid.study_ref
        self.outbox = Outbox.for_settings(settings)
        self.ledger = Ledger(settings.ledger_path, settings.state.url)
        self.router = Router(self.rules, self.outbox, settings.listener_dir / "outbox", deidentified_copies(deid))
        self.forwarder = Forwarder(self.outbox, self.rules.destinations, settings.listener.ae_title,
                                   Backoff.from_settings(settings.listener), settings.listener.timeout_s,
                                   commitment_timeout_s=settings.listener.commitment_timeout_s)
        self.commitment_aes = commitment_aes(self.rules, settings)
        self.listener = Listener(settings, self.on_stable)
        self.metrics_port: int | None = None
        self.commitment_port: int | None = None

    def on_stable(self, study: StableStudy) -> None:
        """Route a stable study; hand it to the lake when a rule says so. Runs on the listener's
        loop thread: it queues, it does not deliver."""
        ref = self.study_ref(study.study_uid)
        routed = self.router.route(ref, Arrival.of_study(study))
        for destination, sop_uid, reason in routed.refused:
            self.ledger.quarantine(ref, staged_name(sop_uid), f"route to {destination}: {reason}", QUARANTINE_FOLDER)
        if routed.queued:
            self.forwarder.wake()
        if routed.ingest and routed.routed:
            originals = (arrival.path for arrival in Arrival.of_study(study))
            linked = link_for_ingest(originals, handoff_dir(self.settings, ref, study.generation))
            emit_study_stable(ref, study.generation, linked, sorted(routed.modalities))
        if self.events:
            emit_study_routed(ref, study.generation, len(study), routed.queued, routed.ingest)
        log.info("study %s (generation %d): %d objects; queued %s; %s", ref, study.generation, len(study),
                 dict(routed.queued) or "nothing", "handed to the lake" if routed.ingest else "not ingested")

    @contextmanager
    def running(self) -> Iterator["ListenService"]:
        with ExitStack() as stack:
            self._serve_commitment(stack)  # before the forwarder asks for a commitment report
            self._serve_metrics(stack)
            self.forwarder.start()
            stack.callback(self.forwarder.stop)
            if self.events:
                announce_waiting(self.settings)
            self.listener.start()
            stack.callback(self.listener.stop)
            yield self

    def tidy(self) -> None:
        """Retention of the listener's PHI zone: received originals and delivered copies older than
        ``deid.staging_retention_days`` go."""
        days = self.settings.deid.staging_retention_days
        purge_older_than(self.listener.inbox, days)
        self.outbox.purge_delivered(days * 86400.0)

    def _serve_metrics(self, stack: ExitStack) -> None:
        port = self.settings.listener.metrics_port
        if port is None:
            return
        registry = CollectorRegistry()
        registry.register(ListenerMetrics(lambda: self.listener.counters, self._forwarded, self.outbox.depth))
        server, _thread = start_http_server(port, addr=self.settings.listener.host, registry=registry)
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        self.metrics_port = server.server_port
        log.info("listener metrics on http://%s:%d/metrics", self.settings.listener.host, self.metrics_port)

    def _serve_commitment(self, stack: ExitStack) -> None:
        li = self.settings.listener
        if li.commitment_port is None or not self.commitment_aes:
            return
        scp = CommitmentReportSCP(li.ae_title, li.host, li.commitment_port, self.commitment_aes,
                                  self.forwarder.on_commitment_report)
        stack.enter_context(scp)
        self.commitment_port = scp.port
        log.info("storage commitment reports taken on %s:%d from %s", li.host, scp.port,
                 ", ".join(self.commitment_aes))

    def _forwarded(self) -> Counter[tuple[str, str]]:
        return self.forwarder.totals.copy()


def commitment_aes(rules: RoutingRules, settings: Settings) -> list[str]:
    """The AE titles of the destinations that commit: the only callers the report SCP accepts.
    Raises PacsConfigurationError when some destination wants Storage Commitment and
    ``listener.commitment_port`` is unset (its reports would have nowhere to go)."""
    wanting = {name: d.ae_title for name, d in rules.destinations.items() if d.storage_commitment}
    if wanting and settings.listener.commitment_port is None:
        raise PacsConfigurationError(
            f"destination(s) {', '.join(sorted(wanting))} in listener.rules_file have storage_commitment: true, but "
            "listener.commitment_port is unset: set the port their reports come to (and register it at them)")
    return sorted(set(wanting.values()))


def serve(settings: Settings, stop: threading.Event) -> None:
    """Run the listener until ``stop`` is set (the CLI sets it on SIGTERM and SIGINT)."""
    service = ListenService(settings)
    listener = settings.listener
    try:
        with service.running():
            log.info("listening as %s on %s:%d (allowed: %s); %d routing rules, %d destinations", listener.ae_title,
                     listener.host, listener.port, ", ".join(listener.allowed_aes), len(service.rules.rules),
                     len(service.rules.destinations))
            next_tidy = 0.0
            while not stop.wait(1.0):
                if time.monotonic() >= next_tidy:
                    service.tidy()
                    next_tidy = time.monotonic() + TIDY_EVERY_S
    finally:
        EventsWorker.drain_all(timeout=10)  # the last studies' events go out before the process ends
    log.info("listener stopped")
