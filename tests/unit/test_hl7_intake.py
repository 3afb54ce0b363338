"""The ACK rule: AA only once stored, AA without a second write for a repeat, AE/AR with ERR otherwise."""

from __future__ import annotations

import logging

from pacsflow.tasks.hl7.inbox import Inbox, InboxState
from pacsflow.tasks.hl7.intake import Intake
from pacsflow.tasks.hl7.message import Hl7Error

A08 = ("MSH|^~\\&|ADT|HOSP|PACSFLOW|RAD|20260101120000||ADT^A08^ADT_A01|{cid}|P|2.5.1\r"
       "EVN|A08|20260101120000\rPID|1||4711^^^HOSP^MR||Doe^Jane||19800102|F\r")


def _msa(answer: bytes) -> list[str]:
    return next(seg for seg in answer.decode().split("\r") if seg.startswith("MSA")).split("|")


def _err(answer: bytes) -> str:
    return next((seg for seg in answer.decode().split("\r") if seg.startswith("ERR")), "")


def test_aa_after_the_commit_and_a_repeat_is_not_stored_twice(tmp_path, caplog):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    woken = []
    intake = Intake(inbox, accepted=lambda: woken.append(1), clock=lambda: 100.0)
    raw = A08.format(cid="C1").encode()
    with caplog.at_level(logging.INFO, logger="pacsflow.hl7"):
        assert _msa(intake(raw)) == ["MSA", "AA", "C1"]
        assert _msa(intake(raw)) == ["MSA", "AA", "C1"]
    [stored] = inbox.messages()
    assert (stored.control_id, stored.raw, stored.patient_key, stored.event, stored.received_at) == (
        "C1", raw, "4711^HOSP", "A08", 100.0)
    assert woken == [1]
    assert "C1 ADT^A08 stored" in caplog.text and "repeat" in caplog.text
    assert "Doe" not in caplog.text and "4711" not in caplog.text


def test_a_parse_error_is_an_ae_naming_the_field_and_nothing_is_stored(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    raw = A08.format(cid="C2").replace("PID|1||4711^^^HOSP^MR|", "PID|1|||").encode()
    answer = Intake(inbox)(raw)
    assert _msa(answer) == ["MSA", "AE", "C2"]
    assert "PID^1^3" in _err(answer) and "101" in _err(answer)
    assert inbox.messages() == []


def test_an_unsupported_event_is_an_ar(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    answer = Intake(inbox)(A08.format(cid="C3").replace("ADT^A08", "ADT^A03").encode())
    assert _msa(answer)[1] == "AR" and "MSH^1^9" in _err(answer)
    assert inbox.messages() == []


def test_a_mapping_error_is_an_ae_naming_the_field(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")

    def check(msg):
        raise Hl7Error("assigning authority not configured", location="PID-3.4", code=103)

    answer = Intake(inbox, check=check)(A08.format(cid="C4").encode())
    assert _msa(answer)[1] == "AE" and "PID^1^3^1^4" in _err(answer) and "103" in _err(answer)
    assert inbox.messages() == []


def test_no_aa_when_the_inbox_cannot_store(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    inbox.path.write_bytes(b"not a database" * 100)  # a broken file: the commit fails
    answer = Intake(inbox)(A08.format(cid="C5").encode())
    assert _msa(answer)[1] == "AE" and "207" in _err(answer)


def test_the_inbox_row_keeps_the_message_time_and_an_a40s_merged_patient(tmp_path):
    import datetime as dt

    inbox = Inbox(tmp_path / "inbox.sqlite")
    intake = Intake(inbox)
    a40 = A08.replace("ADT^A08^ADT_A01", "ADT^A40^ADT_A39").replace("EVN|A08|20260101120000",
                                                                    "EVN|A40|20260101113000+0100")
    assert _msa(intake((a40 + "MRG|0815^^^HOSP^MR\r").format(cid="C1").encode()))[1] == "AA"
    assert _msa(intake(A08.format(cid="C2").encode()))[1] == "AA"
    merge, update = inbox.messages()
    assert (merge.merged_key, update.merged_key) == ("0815^HOSP", None)
    assert merge.message_time == dt.datetime(2026, 1, 1, 10, 30, tzinfo=dt.timezone.utc).timestamp()  # EVN-2
    assert update.message_time == dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc).timestamp()  # no offset
    bad = A08.replace("EVN|A08|20260101120000", "EVN|A08|notatime").format(cid="C3").encode()
    assert _msa(intake(bad))[1] == "AE" and "EVN^1^2" in _err(intake(bad)) and inbox.get("C3") is None
