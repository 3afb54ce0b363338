"""HL7 v2 ACKs: read back with python-hl7, header swapped, ERR naming the field, no PHI."""

from __future__ import annotations

import datetime as dt

import hl7
import pytest

from pacsflow.tasks.hl7.ack import ack
from pacsflow.tasks.hl7.message import Hl7Error, parse_adt
from tests import hl7_samples as s

NOW = dt.datetime(2026, 12, 1, 8, 30, 5, tzinfo=dt.timezone.utc)


def _parsed(raw: bytes, codec: str = "ascii") -> hl7.Message:
    assert raw.endswith(b"\r") and b"\n" not in raw
    return hl7.parse(raw.decode(codec))


def test_aa_round_trip():
    reply = _parsed(ack(s.A01, "AA", now=NOW))
    msh, msa = reply.segment("MSH"), reply.segment("MSA")
    # Sender and receiver swapped from the original.
    assert [str(msh[n]) for n in (3, 4, 5, 6)] == ["PACSFLOW", "RAD", "HIS", "HOSP"]
    assert str(msh[7]) == "20261201083005+0000"
    assert str(msh[9]) == "ACK^A01^ACK"
    assert str(msh[10]) and str(msh[10]) != "MSG00001"
    assert (str(msh[11]), str(msh[12])) == ("P", "2.5.1")
    assert (str(msa[1]), str(msa[2])) == ("AA", "MSG00001")
    assert "ERR" not in str(reply)


def test_each_ack_has_its_own_control_id():
    first, second = (_parsed(ack(s.A01, "AA")).segment("MSH")[10] for _ in range(2))
    assert str(first) != str(second)


def test_ae_carries_err_with_location_code_and_severity():
    error = Hl7Error("patient identifier list empty", location="PID-3", code=101)
    reply = _parsed(ack(s.A01, "AE", error, now=NOW))
    err = reply.segment("ERR")
    assert str(reply.segment("MSA")[1]) == "AE"
    assert str(err[2]) == "PID^1^3^1"
    assert str(err[3]) == "101^patient identifier list empty^HL70357"
    assert str(err[4]) == "E"


def test_ar_for_a_rejected_message_type():
    raw = s.adt("A01", kind="ORM")
    with pytest.raises(Hl7Error) as caught:
        parse_adt(raw)
    assert caught.value.reject
    reply = _parsed(ack(raw, "AR", caught.value))
    assert str(reply.segment("MSA")[1]) == "AR"
    assert str(reply.segment("ERR")[3]).startswith("200^")


def test_older_versions_get_err1():
    raw = s.adt("A01", version="2.3")
    reply = _parsed(ack(raw, "AE", Hl7Error("bad", location="PID-8", code=103)))
    assert str(reply.segment("MSH")[12]) == "2.3"
    assert str(reply.segment("ERR")[1]) == "PID^1^8^103&bad&HL70357"


def test_error_text_with_delimiters_is_escaped():
    reply = _parsed(ack(s.A01, "AE", Hl7Error("a|b^c", location="MSH-9", code=207)))
    assert reply.unescape(str(reply.segment("ERR")[3][0][1])) == "a|b^c"


def test_ack_never_contains_pid_values():
    for raw in (s.A01, s.LATIN1, s.UTF8, s.A40):
        reply = ack(raw, "AE", Hl7Error("x", location="PID-5", code=102))
        for value in (b"4711", b"4712", b"Beispiel", b"Anna", b"19750314", b"Hauptstr", b"0815", b"M\xfcller"):
            assert value not in reply
        assert b"PID|" not in reply and b"MRG|" not in reply


def test_ack_is_encoded_in_the_original_charset():
    raw = s.LATIN1.replace(b"|HIS|", "|HÏS|".encode("latin-1"))
    reply = ack(raw, "AA")
    assert "|HÏS|".encode("latin-1") in reply
    msh = _parsed(reply, "latin-1").segment("MSH")
    assert str(msh[18]) == "8859/1" and str(msh[5]) == "HÏS"
    utf = ack(s.UTF8.replace(b"|HIS|", "|HÏS|".encode("utf-8")), "AA")
    assert "|HÏS|".encode("utf-8") in utf and str(_parsed(utf, "utf-8").segment("MSH")[18]) == "UNICODE UTF-8"


def test_ack_of_unparseable_bytes():
    reply = _parsed(ack(b"garbage without a header", "AE", Hl7Error("no MSH", location="MSH", code=100)))
    msa = reply.segment("MSA")
    assert (str(msa[1]), str(msa[2])) == ("AE", "")
    assert str(reply.segment("MSH")[9]) == "ACK"
    assert str(reply.segment("ERR")[2]) == "MSH^1"


def test_ack_of_a_message_with_an_unknown_charset_answers_in_ascii():
    raw = s.message("A01", "PID|1||1^^^HOSP||X", charset="KLINGON").encode("ascii")
    reply = _parsed(ack(raw, "AE", Hl7Error("charset", location="MSH-18", code=103)))
    assert str(reply.segment("MSA")[2]) == "MSG00001"
    assert len(reply.segment("MSH")) <= 13  # no MSH-18 copied: we did not answer in that set


def test_a_wrong_code_is_a_programming_error():
    with pytest.raises(ValueError):
        ack(s.A01, "OK")
