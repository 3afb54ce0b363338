"""``pacsflow hl7 listen | replay | status``: the HL7 ADT → FHIR Patient facade.

``listen`` runs the MLLP server (:mod:`pacsflow.tasks.hl7.mllp`), whose handler is the intake (parse,
map, commit to the inbox, then AA: :mod:`pacsflow.tasks.hl7.intake`), and a drain thread that
applies the inbox to FHIR (:mod:`pacsflow.tasks.hl7.apply`), waking when a message arrives or a
retry is due, and purging the inbox past ``hl7.inbox_retention_days`` every hour. Like ``pacsflow
listen`` it is a long-running service, not a Prefect flow: each message is a few milliseconds of work.

Stopping (SIGTERM, Ctrl-C): the server stops accepting, the messages being received are committed
and answered, the drain finishes the message it is applying; the command exits 0.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
import time
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.hl7.ack import ack
from pacsflow.tasks.hl7.apply import Hl7Mapper, apply_message, drain, mapping_config
from pacsflow.tasks.hl7.inbox import Inbox, InboxState, ReplaySelection, format_status
from pacsflow.tasks.hl7.intake import Intake
from pacsflow.tasks.hl7.message import Hl7Error
from pacsflow.tasks.hl7.mllp import MllpServer, MllpThread, server_tls_context
from pacsflow.tasks.settings import Settings

log = logging.getLogger("pacsflow.hl7")
out = Console()

PURGE_EVERY_S = 3600.0
SWITCH_INTERVAL_S = 0.0005
IDLE_WAIT_S = 30.0


def _refuse(head: bytes, reason: str) -> bytes:
    return ack(head, "AR", Hl7Error(reason, location="MSH", code=207, reject=True))


class Hl7Service:
    """The MLLP server and the drain loop of one ``pacsflow hl7 listen`` process."""

    def __init__(self, settings: Settings, client: Callable[[], FhirClient] | None = None) -> None:
        self.settings = settings
        self.inbox = Inbox.for_settings(settings)
        self.mapper = Hl7Mapper(mapping_config(settings))
        self.client = client or (lambda: FhirClient.from_settings(settings.fhir))
        self.wake = threading.Event()
        self.stopping = threading.Event()
        hl7 = settings.hl7
        intake = Intake(self.inbox, check=self.mapper.check, accepted=self.wake.set)
        self.mllp = MllpThread(MllpServer(
            intake, host=hl7.host, port=hl7.port, allowed_peers=hl7.allowed_peers,
            max_message_bytes=hl7.max_message_kb * 1024, ssl_context=server_tls_context(hl7.tls_cert, hl7.tls_key),
            refuse=_refuse))
        self.drainer = threading.Thread(target=self.drain_loop, name="hl7-drain", daemon=True)

    def start(self) -> int:
        """Listen and drain; returns the MLLP port."""
        # The MLLP thread waits for the GIL whenever the drain thread runs Python; at the default
        # 5 ms switch interval each ACK paid several such waits.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        port = self.mllp.start()
        self.drainer.start()
        return port

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting (answering what is being received), then let the drain finish its message."""
        self.mllp.stop(timeout)
        self.stopping.set()
        self.wake.set()
        self.drainer.join(timeout)

    def drain_loop(self) -> None:
        purged_at = 0.0
        with self.client() as client:
            while not self.stopping.is_set():
                if time.monotonic() - purged_at > PURGE_EVERY_S:
                    purged = self.inbox.purge(self.settings.hl7.inbox_retention_days)
                    if purged:
                        log.info("HL7 inbox: %d message(s) past the retention deleted", purged)
                    purged_at = time.monotonic()
                self.wake.clear()
                handed = drain(self.inbox, lambda msg: apply_message(client, msg.raw, self.mapper, older=msg.older))
                if handed:
                    continue
                due = self.inbox.next_due()
                wait = IDLE_WAIT_S if due is None else min(IDLE_WAIT_S, max(0.0, due - time.time()))
                self.wake.wait(wait)


def serve(settings: Settings, ready: Callable[[int], None] | None = None) -> None:
    """Run until KeyboardInterrupt (the CLI turns SIGTERM into one), then stop cleanly."""
    service = Hl7Service(settings)
    port = service.start()
    log.info("HL7 facade: MLLP on %s:%d, inbox %s, mode %s", settings.hl7.host, port, service.inbox.path,
             settings.hl7.mode.value)
    if ready is not None:
        ready(port)
    try:
        while service.drainer.is_alive():
            service.drainer.join(1.0)
        raise RuntimeError("the HL7 drain loop stopped")
    finally:
        service.stop()


def _since(value: Optional[str]) -> float | None:
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter("--since: expected an ISO date or date-time, e.g. 2026-11-30T08:00") from None
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()


def build_app(settings: Callable[..., Any], on_listen: Callable[[Settings], None]) -> typer.Typer:
    """``pacsflow hl7 …``; ``on_listen`` runs the service (the root CLI owns signals and errors)."""
    app = typer.Typer(name="hl7", help="HL7v2 ADT over MLLP → FHIR Patient resources.", no_args_is_help=True)

    @app.command("listen")
    def listen() -> None:
        """Run the MLLP server and apply its inbox to FHIR until stopped (Ctrl-C or SIGTERM)."""
        on_listen(settings())

    @app.command("replay")
    def replay(
        since: Annotated[Optional[str], typer.Option(help="messages received since (ISO date or date-time)")] = None,
        control_id: Annotated[Optional[list[str]], typer.Option("--control-id", help="this message (MSH-10); "
                                                                 "repeatable")] = None,
    ) -> None:
        """Queue stored messages again (by default: those failed for good); `hl7 listen` applies them."""
        selection = ReplaySelection(tuple(control_id or ()), _since(since))
        count = Inbox.for_settings(settings()).replay(selection)
        out.print(f"queued again: {count}")

    @app.command("status")
    def status() -> None:
        """Messages per state, the oldest pending one's age, and those failed for good."""
        inbox = Inbox.for_settings(settings())
        out.print(format_status(inbox.counts(), inbox.messages(InboxState.FAILED, limit=50), inbox.oldest_pending()),
                  markup=False, highlight=False)

    return app
