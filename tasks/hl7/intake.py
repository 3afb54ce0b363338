"""What the MLLP server does with each message: check it, make it durable, acknowledge.

The ACK rule (README "HL7 ADT → FHIR Patient"):

* **AA** only once the message is committed to the inbox (SQLite, in the PHI zone); the drain loop
  then applies it to FHIR with retries. A FHIR server that is down delays the Patient, never the ACK.
* **AA** without a second write for a control id (MSH-10) the inbox already holds: the sender
  repeated a message whose ACK it did not get.
* **AE** (or **AR** for a message type, event, version or processing id we do not take) with an ERR
  segment naming the field, when the message cannot be parsed or mapped; nothing is stored.
* **AE** with ERR code 207 when the inbox could not store it (disk full, …): send it again.

Logs carry the control id, the message type and the field at fault; never a value of the message.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

from pacsflow.tasks.core.files import describe_os_error
from pacsflow.tasks.hl7.ack import ack
from pacsflow.tasks.hl7.inbox import Inbox
from pacsflow.tasks.hl7.message import APPLICATION_INTERNAL_ERROR, AdtMessage, Hl7Error, control_id_of, parse_adt

log = logging.getLogger("pacsflow.hl7")

Check = Callable[[AdtMessage], object]


class Intake:
    """``handle(raw) -> ack`` for :class:`~pacsflow.tasks.hl7.mllp.MllpServer`. ``check`` maps the
    message without writing (its :class:`Hl7Error` becomes the AE); ``accepted`` is called after a
    new message is committed (it wakes the drain loop)."""

    def __init__(self, inbox: Inbox, *, check: Check | None = None, accepted: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.inbox = inbox
        self.check = check
        self.accepted = accepted
        self.clock = clock

    def __call__(self, raw: bytes) -> bytes:
        try:
            msg = parse_adt(raw)
            at = msg.message_time  # a malformed EVN-2 is refused here, before anything is stored
            if self.check is not None:
                self.check(msg)
        except Hl7Error as exc:
            code = "AR" if exc.reject else "AE"
            log.warning("HL7 %s refused with %s: %s", control_id_of(raw) or "(no control id)", code, exc)
            return ack(raw, code, exc)
        what = f"{msg.control_id} {msg.message_type}^{msg.event}"
        try:
            new = self.inbox.accept(msg.control_id, raw, msg.patient_key, msg.event, self.clock(),
                                    merged_key=msg.merged_key, message_time=at)
        except (sqlite3.Error, OSError) as exc:
            reason = describe_os_error(exc) if isinstance(exc, OSError) else type(exc).__name__
            log.error("HL7 %s not stored (%s): AE, the sender must send it again", what, reason)
            return ack(raw, "AE", Hl7Error("message not stored; send it again", code=APPLICATION_INTERNAL_ERROR))
        if new:
            log.info("HL7 %s stored", what)
            if self.accepted is not None:
                self.accepted()
        else:
            log.info("HL7 %s is a repeat: acknowledged, not stored again", what)
        return ack(raw, "AA")
