"""HL7 v2 ADT messages: bytes → decoded text → a checked :class:`AdtMessage` (pure; no sockets).

Parsing uses python-hl7 (``hl7``); its parse tree has an irregular depth (a field without
separators is a plain string), so :class:`Segment` holds every field as a regular
repetitions → components → subcomponents tuple, unescaped, which the mapping reads by position.

Character sets (MSH-18, HL7 table 0211): the header is read byte-transparently first, since the
delimiters and MSH-18 itself are ASCII; then the whole message is decoded with the declared codec.
An empty MSH-18 means ASCII; bytes that are not ASCII are then tried as UTF-8 (what most senders
mean), and otherwise refused naming MSH-18. A declared codec the bytes do not fit is refused too,
rather than guessed: a wrongly decoded name would be written to FHIR as if it were right.

Errors (:class:`Hl7Error`) name the field (``PID-3``) and an HL7 table 0357 code, never a value
from the message: they end up in ACKs, logs and ledgers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import hl7

from pacsflow.tasks.core.errors import PermanentError

#: The ADT events the pipeline maps (admit, register, update, person add/update, merge).
SUPPORTED_EVENTS = frozenset({"A01", "A04", "A08", "A28", "A31", "A40"})

#: MSH-18 (HL7 table 0211) → Python codec. The 8859 parts are single-byte and cheap to allow.
CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
}
#: Codec → MSH-18 value, for messages we write ourselves.
CHARSET_NAMES = {codec: name for name, codec in CHARSETS.items()}

# HL7 table 0357 codes used here.
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_PROCESSING_ID = 202
UNSUPPORTED_VERSION_ID = 203
APPLICATION_INTERNAL_ERROR = 207

_PROCESSING_IDS = frozenset({"P", "T", "D"})  # production, training, debugging (table 0103)


class Hl7Error(PermanentError):
    """A message we refuse: ``location`` (``PID-3``) and ``code`` (table 0357) go into the ERR segment.

    ``reject`` makes the ACK an AR (the message type, event, version or processing id is not
    acceptable: resending will not help), otherwise AE. The text carries no value from the message.
    """

    reason = "hl7"

    def __init__(self, text: str, *, location: str = "", code: int = APPLICATION_INTERNAL_ERROR,
                 reject: bool = False) -> None:
        super().__init__(f"{location}: {text}" if location else text)
        self.text = text
        self.location = location
        self.code = code
        self.reject = reject


#: One repetition of a field: its components, each a tuple of subcomponents.
Repetition = tuple[tuple[str, ...], ...]


def _children(node: Any) -> list[Any]:
    # python-hl7 leaves a part without separators as a plain string one level up.
    return [node] if isinstance(node, str) else list(node)


@dataclass(frozen=True)
class Segment:
    """One segment; ``fields[n]`` is field n (``fields[0]`` the name), as repetitions."""

    name: str
    fields: tuple[tuple[Repetition, ...], ...] = field(repr=False)  # message content (PHI)

    def repetitions(self, n: int) -> tuple[Repetition, ...]:
        """Field n's repetitions; empty when the field is absent."""
        return self.fields[n] if 0 <= n < len(self.fields) else ()

    def value(self, n: int, component: int = 1, rep: int = 1, sub: int = 1) -> str:
        """One leaf by HL7 position (1-based), ``""`` when absent. HL7's explicit null stays ``'""'``."""
        reps = self.repetitions(n)
        return part(reps[rep - 1], component, sub) if 0 < rep <= len(reps) else ""


def part(rep: Repetition, component: int = 1, sub: int = 1) -> str:
    """A component (subcomponent) of a repetition by 1-based position, ``""`` when absent."""
    if not 0 < component <= len(rep):
        return ""
    subs = rep[component - 1]
    return subs[sub - 1] if 0 < sub <= len(subs) else ""


def _segment(seg: Any, parsed: Any) -> Segment:
    def leaf(node: Any, n: int) -> str:
        text = str(node)
        # MSH-1/MSH-2 are the delimiters themselves, not escaped data.
        if seg[0][0] == "MSH" and n <= 2:
            return text
        return str(parsed.unescape(text)) if parsed.esc in text else text

    fields = [tuple(
        tuple(tuple(leaf(s, n) for s in _children(comp)) for comp in _children(rep))
        for rep in _children(fld)
    ) for n, fld in enumerate(seg)]
    return Segment(str(seg[0][0]), tuple(fields))


@dataclass(frozen=True)
class AdtMessage:
    """A checked ADT message. ``text``, ``patient_key`` (first PID-3 ``value^authority``) and the
    segments are PHI: kept out of ``repr`` so a traceback or a log line cannot show them."""

    text: str = field(repr=False)
    control_id: str
    message_type: str
    event: str
    charset: str
    sent_at: dt.datetime | None
    patient_key: str = field(repr=False)
    version: str = ""
    segments: tuple[Segment, ...] = field(default=(), repr=False, compare=False)

    def segment(self, name: str) -> Segment | None:
        """The first segment of that name, or None."""
        return next((s for s in self.segments if s.name == name), None)

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    @property
    def last_updated(self) -> dt.datetime | None:
        """When the event was recorded (EVN-2), else when the message was sent (MSH-7)."""
        evn = self.segment("EVN")
        recorded = parse_timestamp(evn.value(2), "EVN-2") if evn is not None else None
        return recorded or self.sent_at

    @property
    def message_time(self) -> float | None:
        """:attr:`last_updated` as epoch seconds, what orders a patient's messages (no offset: UTC)."""
        stamp = self.last_updated
        if stamp is None:
            return None
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).timestamp()

    @property
    def merged_key(self) -> str | None:
        """A40: the merged (non-surviving) patient's ``value^authority`` from MRG-1, for ordering."""
        mrg = self.segment("MRG")
        return _cx_key(mrg.repetitions(1)) if mrg is not None else None


# -- bytes → text ---------------------------------------------------------------------------------
def _msh_fields(raw: bytes, codec: str = "latin-1") -> list[str] | None:
    """The MSH fields of any bytes, or None without MSH. Latin-1 by default: every byte is a
    character, and the delimiters and MSH-18 are ASCII in every character set we accept.

    ``fields[n-1]`` is MSH-n (MSH-1 is the separator itself)."""
    head = raw.lstrip(b"\x0b\r\n ")
    if not head.startswith(b"MSH") or len(head) < 4:
        return None
    line = head.split(b"\r", 1)[0].split(b"\n", 1)[0].decode(codec, errors="replace")
    sep = line[3]
    return [sep] + line[4:].split(sep)


def _msh(fields: list[str] | None, n: int) -> str:
    return fields[n - 1] if fields is not None and 0 < n <= len(fields) else ""


def charset_of(raw: bytes) -> str:
    """MSH-18's first repetition (the message's single-byte or Unicode set), ``""`` when empty."""
    fields = _msh_fields(raw)
    enc = _msh(fields, 2)
    rep_sep = enc[1] if len(enc) > 1 else "~"
    return _msh(fields, 18).split(rep_sep, 1)[0].strip()


def decode(raw: bytes) -> tuple[str, str]:
    """The message as text and the codec used, honouring MSH-18 (see the module docstring)."""
    declared = charset_of(raw)
    if declared and declared.upper() not in CHARSETS:
        raise Hl7Error("character set not supported (HL7 table 0211: ASCII, 8859/n, UNICODE UTF-8)",
                       location="MSH-18", code=TABLE_VALUE_NOT_FOUND)
    candidates = [CHARSETS[declared.upper()]] if declared else ["ascii", "utf-8"]
    for codec in candidates:
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError:
            continue
    text = ("bytes do not match the declared character set" if declared
            else "no character set declared and the bytes are neither ASCII nor UTF-8")
    raise Hl7Error(text, location="MSH-18", code=DATA_TYPE_ERROR)


def control_id_of(raw: bytes) -> str | None:
    """MSH-10 of any bytes, best effort (to acknowledge a message we cannot parse); None if absent."""
    value = _msh(_msh_fields(raw), 10).strip()
    return value or None


def header_of(raw: bytes) -> dict[str, str]:
    """What an ACK may copy from any bytes' MSH (no PHI lives there): best effort, never raises."""
    charset = charset_of(raw)
    # Decoded as declared, so a non-ASCII application name is copied intact into the ACK.
    fields = _msh_fields(raw, CHARSETS.get(charset.upper(), "latin-1"))
    enc = _msh(fields, 2)
    comp = enc[0] if enc else "^"
    return {
        "sending_application": _msh(fields, 3), "sending_facility": _msh(fields, 4),
        "receiving_application": _msh(fields, 5), "receiving_facility": _msh(fields, 6),
        "event": _msh(fields, 9).split(comp)[1].strip() if comp in _msh(fields, 9) else "",
        "control_id": _msh(fields, 10).strip(), "processing_id": _msh(fields, 11).strip(),
        "version": _msh(fields, 12).split(comp)[0].strip(), "charset": charset,
    }


# -- text → AdtMessage -------------------------------------------------------------------------------
def _segments(text: str) -> tuple[Segment, ...]:
    try:
        parsed = hl7.parse(text)
    except Exception as exc:  # noqa: BLE001 - python-hl7 raises several types; none carries PHI for us
        raise Hl7Error(f"not an HL7 v2 message ({type(exc).__name__})", location="MSH",
                       code=SEGMENT_SEQUENCE_ERROR) from None
    return tuple(_segment(seg, parsed) for seg in parsed)


def _cx_key(reps: tuple[Repetition, ...]) -> str | None:
    """``value^authority`` of the first CX repetition with a value (authority: HD namespace, else universal id)."""
    for rep in reps:
        value = part(rep, 1).strip()
        if value and value != '""':
            authority = (part(rep, 4, 1) or part(rep, 4, 2)).strip()
            return f"{value}^{authority}"
    return None


def parse_timestamp(value: str, location: str) -> dt.datetime | None:
    """An HL7 DTM (``YYYY[MM[DD[HH[MM[SS[.S…]]]]]][+/-ZZZZ]``); None when empty."""
    if not value.strip():
        return None
    try:
        stamp: dt.datetime | None = hl7.parse_datetime(value.strip())
    except (ValueError, TypeError):
        raise Hl7Error("not an HL7 timestamp", location=location, code=DATA_TYPE_ERROR) from None
    return stamp


def _normalized(text: str) -> str:
    # Senders and files often end segments with \n or \r\n; HL7 says \r.
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    return "\r".join(line for line in lines if line.strip())


def _check_header(msh: Segment, events: frozenset[str], evn: Segment | None) -> tuple[str, str]:
    """MSH-9/10/11/12 acceptable? Returns (message type, event)."""
    if not msh.value(10).strip():
        raise Hl7Error("message control id missing", location="MSH-10", code=REQUIRED_FIELD_MISSING)
    kind = msh.value(9, 1).strip()
    if kind != "ADT":
        raise Hl7Error("only ADT messages are accepted", location="MSH-9", code=UNSUPPORTED_MESSAGE_TYPE,
                       reject=True)
    event = msh.value(9, 2).strip() or (evn.value(1).strip() if evn is not None else "")
    if event not in events:
        raise Hl7Error("event not supported", location="MSH-9", code=UNSUPPORTED_EVENT_CODE, reject=True)
    if msh.value(11, 1).strip() not in _PROCESSING_IDS:
        raise Hl7Error("processing id not supported", location="MSH-11", code=UNSUPPORTED_PROCESSING_ID,
                       reject=True)
    if not msh.value(12, 1).strip().startswith("2."):
        raise Hl7Error("only HL7 version 2.x is accepted", location="MSH-12", code=UNSUPPORTED_VERSION_ID,
                       reject=True)
    return kind, event


def parse_adt(raw: bytes, events: frozenset[str] = SUPPORTED_EVENTS) -> AdtMessage:
    """Decode and check one ADT message; raises :class:`Hl7Error` naming the field at fault."""
    if _msh_fields(raw) is None:
        raise Hl7Error("the message does not begin with an MSH segment", location="MSH",
                       code=SEGMENT_SEQUENCE_ERROR)
    text, codec = decode(raw)
    text = _normalized(text)
    segments = _segments(text)
    msh = segments[0]
    evn = next((s for s in segments if s.name == "EVN"), None)
    kind, event = _check_header(msh, events, evn)
    pid = next((s for s in segments if s.name == "PID"), None)
    if pid is None:
        raise Hl7Error("PID segment missing", location="PID", code=SEGMENT_SEQUENCE_ERROR)
    key = _cx_key(pid.repetitions(3))
    if key is None:
        raise Hl7Error("patient identifier list empty", location="PID-3", code=REQUIRED_FIELD_MISSING)
    if event == "A40":
        mrg = next((s for s in segments if s.name == "MRG"), None)
        if mrg is None:
            raise Hl7Error("A40 without MRG segment", location="MRG", code=SEGMENT_SEQUENCE_ERROR)
        if _cx_key(mrg.repetitions(1)) is None:
            raise Hl7Error("prior patient identifier list empty", location="MRG-1", code=REQUIRED_FIELD_MISSING)
    return AdtMessage(
        text=text, control_id=msh.value(10).strip(), message_type=kind, event=event, charset=codec,
        sent_at=parse_timestamp(msh.value(7), "MSH-7"), patient_key=key,
        version=msh.value(12, 1).strip(), segments=segments,
    )
