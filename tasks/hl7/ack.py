"""HL7 v2 acknowledgments (original mode: AA / AE / AR), built from whatever the original's MSH holds.

An ACK copies only header fields (applications, facilities, control id, processing id, version,
character set): never PID or any other segment, so it carries no PHI. It is built from the raw
bytes, not from a parsed message, so a message we cannot parse still gets an AE naming the field.
The result is the bare message; MLLP framing belongs to the server. The ACK uses the default
delimiters (``|^~\\&``); header values are copied as sent, which is exact for the usual senders that
use those delimiters too.

The ERR segment follows v2.5+ (ERR-2 location as ERL, ERR-3 code from table 0357, ERR-4 severity);
for senders on an older version ERR-1 (ELD) carries the same location and code, since ERR-2..4 did
not exist before 2.5.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid

from pacsflow.tasks.core.clock import utc_now
from pacsflow.tasks.hl7.message import CHARSETS, Hl7Error, header_of

ACK_CODES = frozenset({"AA", "AE", "AR"})
_DEFAULT_VERSION = "2.5.1"
_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})(?:-(\d+)(?:\.(\d+))?)?$")
# The default delimiters are what we write; anything of ours that contains them is escaped.
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\"))


def escape(text: str) -> str:
    """Text made safe for one HL7 field with the default delimiters."""
    for char, seq in _ESCAPES:
        text = text.replace(char, seq)
    return text.replace("\r", " ").replace("\n", " ")


def _timestamp(now: dt.datetime) -> str:
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    return now.strftime("%Y%m%d%H%M%S%z")


def _erl(location: str) -> list[str]:
    """``PID-3.4`` → ERL components [segment, sequence, field, repetition, component]."""
    m = _LOCATION.match(location.strip())
    if m is None:
        return []
    seg, fld, comp = m.groups()
    return [seg, "1", fld or "", "1" if fld else "", comp or ""]


def _err_segment(error: Hl7Error, version: str) -> str:
    erl = _erl(error.location)
    code, text = str(error.code), escape(error.text)
    err3 = f"{code}^{text}^HL70357"
    if _older_than_25(version):
        eld = "^".join(erl[:3] + [f"{code}&{text}&HL70357"]) if erl else f"^^^{code}&{text}&HL70357"
        return f"ERR|{eld}"
    return "|".join(["ERR", "", "^".join(erl).rstrip("^"), err3, "E"])


def _older_than_25(version: str) -> bool:
    m = re.match(r"^2\.(\d+)", version)
    return m is not None and int(m.group(1)) < 5


def _codec(charset: str) -> str:
    # An unknown MSH-18 was the error itself: answer in ASCII, which every receiver reads.
    return CHARSETS.get(charset.upper(), "ascii")


def ack(raw: bytes, code: str, error: Hl7Error | None = None, *, now: dt.datetime | None = None,
        application: str = "PACSFLOW", facility: str = "PACSFLOW") -> bytes:
    """The ACK of ``raw`` with MSA-1 ``code`` (AA, AE, AR), and an ERR segment for ``error``.

    Sender and receiver are swapped from the original; our own side falls back to ``application`` /
    ``facility`` when the original did not name its receiver.
    """
    if code not in ACK_CODES:
        raise ValueError(f"ACK code must be one of {sorted(ACK_CODES)}")
    head = header_of(raw)
    version = head["version"] or _DEFAULT_VERSION
    codec = _codec(head["charset"])
    msh = [
        "MSH", "^~\\&",
        head["receiving_application"] or escape(application), head["receiving_facility"] or escape(facility),
        head["sending_application"], head["sending_facility"],
        _timestamp(now or utc_now()), "",
        f"ACK^{head['event']}^ACK" if head["event"] else "ACK",
        uuid.uuid4().hex[:20].upper(),
        head["processing_id"] or "P", version,
    ]
    if head["charset"] and head["charset"].upper() in CHARSETS:
        msh += [""] * 5 + [head["charset"]]  # MSH-13..17 empty, MSH-18
    segments = [
        "|".join(msh),  # MSH-1 is the "|" that joins "MSH" to MSH-2
        f"MSA|{code}|{head['control_id']}",
    ]
    if error is not None and code != "AA":
        segments.append(_err_segment(error, version))
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")
