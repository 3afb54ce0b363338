"""HL7 v2 ADT parsing: character sets (MSH-18), header checks, errors that name the field."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.tasks.hl7.message import SUPPORTED_EVENTS, Hl7Error, control_id_of, decode, parse_adt
from tests import hl7_samples as s


@pytest.mark.parametrize("raw,event", [(s.A01, "A01"), (s.A04, "A04"), (s.A08_SPARSE, "A08"), (s.A28, "A28"),
                                       (s.A31, "A31"), (s.A40, "A40")])
def test_every_supported_event_parses(raw, event):
    msg = parse_adt(raw)
    assert (msg.message_type, msg.event) == ("ADT", event)
    assert msg.patient_key == "4711^HOSP"
    assert msg.sent_at == dt.datetime(2026, 11, 30, 9, 15, tzinfo=dt.timezone.utc)
    assert msg.text.startswith("MSH|") and "\n" not in msg.text
    assert event in SUPPORTED_EVENTS


def test_fields_are_read_by_position_and_unescaped():
    raw = s.adt("A08", "PID|1||4711^^^HOSP^MR||O\\S\\Brien^Ann\\T\\Co")
    pid = parse_adt(raw).segment("PID")
    assert pid is not None
    assert pid.value(5, 1) == "O^Brien" and pid.value(5, 2) == "Ann&Co"
    assert pid.value(3, 4) == "HOSP" and pid.value(3, 5) == "MR"
    assert pid.value(99) == "" and pid.repetitions(99) == ()


def test_latin1_name_arrives_intact():
    msg = parse_adt(s.LATIN1)
    assert msg.charset == "latin-1"
    assert msg.segment("PID").value(5, 1) == "Müller"
    assert msg.segment("PID").value(5, 2) == "Zoë"


def test_utf8_name_arrives_intact():
    msg = parse_adt(s.UTF8)
    assert msg.charset == "utf-8"
    assert msg.segment("PID").value(5, 1) == "Łukasiewicz"
    assert msg.segment("PID").value(5, 2) == "Jürgen Ångström"


def test_no_charset_means_ascii_then_utf8():
    plain = s.adt("A01")
    assert decode(plain)[1] == "ascii"
    undeclared_utf8 = s.message("A01", "PID|1||1^^^HOSP||Zoë").encode("utf-8")
    assert decode(undeclared_utf8) == (undeclared_utf8.decode("utf-8"), "utf-8")


def test_undeclared_latin1_is_refused_naming_msh18():
    raw = s.message("A01", "PID|1||1^^^HOSP||Müller").encode("latin-1")
    with pytest.raises(Hl7Error) as err:
        decode(raw)
    assert err.value.location == "MSH-18" and err.value.code == 102
    assert "Müller" not in str(err.value)


def test_bytes_that_do_not_fit_the_declared_set_are_refused():
    raw = s.message("A01", "PID|1||1^^^HOSP||Müller", charset="UNICODE UTF-8").encode("latin-1")
    with pytest.raises(Hl7Error) as err:
        parse_adt(raw)
    assert (err.value.location, err.value.code) == ("MSH-18", 102)


def test_unknown_charset_is_table_value_not_found():
    raw = s.message("A01", "PID|1||1^^^HOSP||X", charset="KLINGON").encode("ascii")
    with pytest.raises(Hl7Error) as err:
        parse_adt(raw)
    assert (err.value.location, err.value.code, err.value.reject) == ("MSH-18", 103, False)


@pytest.mark.parametrize("raw,location,code,reject", [
    (b"PID|1||4711^^^HOSP^MR||Beispiel^Anna\r", "MSH", 100, False),
    (s.adt("A01", kind="ORM"), "MSH-9", 200, True),
    (s.message("A01", s.PID_FULL).replace("ADT^A01^ADT_A01", "").encode(), "MSH-9", 200, True),
    (s.adt("A03"), "MSH-9", 201, True),
    (s.adt("A01", version="3.0"), "MSH-12", 203, True),
    (s.adt("A01", control=""), "MSH-10", 101, False),
    (s.adt("A01", "PID|1||^^^HOSP^MR||Beispiel^Anna"), "PID-3", 101, False),
    (s.adt("A01", "PV1|1|I"), "PID", 100, False),
    (s.adt("A40", "PID|1||4711^^^HOSP^MR"), "MRG", 100, False),
    (s.adt("A01", sent="yesterday"), "MSH-7", 102, False),
])
def test_malformed_messages_name_the_field(raw, location, code, reject):
    with pytest.raises(Hl7Error) as err:
        parse_adt(raw)
    assert (err.value.location, err.value.code, err.value.reject) == (location, code, reject)
    assert "Beispiel" not in str(err.value) and "4711" not in str(err.value)


def test_events_can_be_narrowed():
    with pytest.raises(Hl7Error):
        parse_adt(s.A08_SPARSE, events=frozenset({"A01"}))


def test_line_feeds_between_segments_are_accepted():
    msg = parse_adt(s.A01.replace(b"\r", b"\r\n"))
    assert msg.segment("PV1") is not None and "\n" not in msg.text


def test_control_id_of_any_bytes():
    assert control_id_of(s.A01) == "MSG00001"
    assert control_id_of(b"MSH|^~\\&|A|B|C|D|2026||XYZ|  ID-9  |P") == "ID-9"
    assert control_id_of(b"\x0bMSH|^~\\&|||||||ADT^A01|K1|P|2.5\r") == "K1"
    assert control_id_of(b"not hl7 at all") is None
    assert control_id_of(b"MSH|^~\\&|short") is None


def test_merged_key_of_a40():
    assert parse_adt(s.A40).merged_key == "0815^HOSP"
    assert parse_adt(s.A01).merged_key is None


def test_reprs_hold_no_part_of_the_message():
    """A traceback or a log line that shows a parsed message, its mapping or its inbox row must not
    show the name, the identifier or any other value of the message."""
    from pacsflow.tasks.hl7.inbox import InboxMessage, InboxState
    from pacsflow.tasks.hl7.mapping import MappingConfig, Mode, merge_plan, patient_change

    msg = parse_adt(s.A01)
    config = MappingConfig(Mode.IDENTIFIED, s.SYSTEMS)
    research = MappingConfig(Mode.RESEARCH, s.SYSTEMS, research_authority="HOSP", key=b"secret-key-0123456789")
    row = InboxMessage(1, msg.control_id, s.A01, msg.patient_key, msg.event, 0.0, InboxState.PENDING, 0, 0.0, None)
    shown = " ".join(repr(x) for x in (msg, msg.segments, patient_change(msg, config), research,
                                       merge_plan(parse_adt(s.A40), config), row))
    for value in ("Beispiel", "Anna", "4711", "19750314", "Hauptstr", "1234567", "anna@example.org", "0815",
                  "secret-key"):
        assert value not in shown, value
    assert "MSG00001" in shown and "A01" in shown  # what logs may name stays visible
