"""The HL7 inbox: durable accept, duplicates, per-patient order, retries, replay, retention."""

from __future__ import annotations

import random
import sqlite3
import stat

import pytest

from pacsflow.tasks.hl7.inbox import Inbox, InboxState, InboxVersionError, ReplaySelection, format_status
from pacsflow.tasks.route.outbox import Backoff

T0 = 1_800_000_000.0


@pytest.fixture
def inbox(tmp_path):
    return Inbox(tmp_path / "hl7" / "inbox.sqlite", Backoff(10.0, 100.0, 3))


def _accept(inbox, control_id, patient="P1", event="A08", at=T0):
    return inbox.accept(control_id, f"MSH|^~\\&|{control_id}".encode(), patient, event, at)


def test_an_accepted_message_is_committed_in_an_owner_only_file(tmp_path, inbox):
    assert _accept(inbox, "C1", event="A01")
    # Another connection (another process after a crash) sees it: the commit happened before accept returned.
    with sqlite3.connect(inbox.path) as con:
        assert con.execute("SELECT control_id, event, state, raw FROM messages").fetchall() == [
            ("C1", "A01", "pending", b"MSH|^~\\&|C1")]
    assert stat.S_IMODE(inbox.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(inbox.path.parent.stat().st_mode) == 0o700


def test_a_repeated_control_id_is_not_written_twice(inbox):
    assert _accept(inbox, "C1")
    inbox.mark_applied("C1")
    assert not inbox.accept("C1", b"other content", "P2", "A01", T0 + 5)
    [only] = inbox.messages()
    assert (only.raw, only.state, only.event) == (b"MSH|^~\\&|C1", InboxState.APPLIED, "A08")


def test_a_patients_next_message_waits_for_the_one_before(inbox):
    for cid, patient in [("C1", "P1"), ("C2", "P1"), ("C3", "P2"), ("C4", "P1")]:
        _accept(inbox, cid, patient)
    assert [m.control_id for m in inbox.next_batch(now=T0)] == ["C1", "C3"]
    inbox.mark_applied("C1", now=T0)
    assert [m.control_id for m in inbox.next_batch(now=T0)] == ["C2", "C3"]
    assert [m.control_id for m in inbox.next_batch(limit=1, now=T0)] == ["C2"]


def test_a_transient_failure_holds_the_patient_back_until_it_is_due(inbox):
    _accept(inbox, "C1", "P1")
    _accept(inbox, "C2", "P1")
    _accept(inbox, "C3", "P2")
    row = inbox.mark_failed("C1", "FhirUnavailable: no answer\nsecond line", transient=True, now=T0,
                            rng=random.Random(1))
    assert row is not None and row.state is InboxState.PENDING and row.attempts == 1
    assert row.reason == "FhirUnavailable: no answer"
    assert T0 + 7.5 <= row.next_attempt <= T0 + 10
    assert [m.control_id for m in inbox.next_batch(now=T0 + 1)] == ["C3"]  # C2 does not overtake C1
    assert inbox.next_due() == T0  # C3
    inbox.mark_applied("C3")
    assert inbox.next_due() == row.next_attempt  # C2, due since T0, waits for C1
    assert [m.control_id for m in inbox.next_batch(now=T0 + 10)] == ["C1"]


def test_retries_spent_or_a_permanent_error_fail_for_good_and_free_the_patient(inbox):
    _accept(inbox, "C1", "P1")
    _accept(inbox, "C2", "P1")
    for attempt in range(3):
        row = inbox.mark_failed("C1", "FhirUnavailable", transient=True, now=T0 + attempt * 1000)
    assert row is not None and row.state is InboxState.FAILED and row.attempts == 3
    assert [m.control_id for m in inbox.next_batch(now=T0 + 5000)] == ["C2"]
    row = inbox.mark_failed("C2", "Hl7Error: PID-3 missing", transient=False, now=T0)
    assert row is not None and row.state is InboxState.FAILED and row.attempts == 1
    assert inbox.next_batch(now=T0 + 10_000) == []
    assert inbox.mark_failed("nope", "x", transient=True) is None


def test_replay_queues_failed_messages_again_in_arrival_order(inbox):
    for cid in ("C1", "C2", "C3"):
        _accept(inbox, cid, "P1", at=T0 + int(cid[1]))
    inbox.mark_failed("C1", "permanent", transient=False, now=T0)
    inbox.mark_applied("C2", now=T0)
    inbox.mark_failed("C3", "permanent", transient=False, now=T0)
    assert inbox.replay(now=T0 + 50) == 2  # no selection: the failed ones
    assert [(m.control_id, m.attempts, m.reason) for m in inbox.next_batch(now=T0 + 50)] == [("C1", 0, None)]
    inbox.mark_applied("C1")
    inbox.mark_applied("C3")
    assert inbox.replay(ReplaySelection(control_ids=("C2",)), now=T0 + 60) == 1
    assert inbox.replay(ReplaySelection(since=T0 + 3), now=T0 + 60) == 1  # C3 only
    assert [m.control_id for m in inbox.messages(InboxState.PENDING)] == ["C2", "C3"]
    assert inbox.replay(ReplaySelection(control_ids=("C1", "C3"), since=T0 + 2)) == 1


def test_purge_keeps_pending_messages_and_those_inside_the_retention(inbox):
    _accept(inbox, "old-applied", "P1", at=T0)
    _accept(inbox, "old-failed", "P2", at=T0)
    _accept(inbox, "old-pending", "P3", at=T0)
    _accept(inbox, "new-applied", "P4", at=T0 + 9 * 86400)
    inbox.mark_applied("old-applied")
    inbox.mark_failed("old-failed", "x", transient=False)
    inbox.mark_applied("new-applied")
    assert inbox.purge(7, now=T0 + 10 * 86400) == 2
    assert sorted(m.control_id for m in inbox.messages()) == ["new-applied", "old-pending"]
    assert _accept(inbox, "old-applied")  # purged: new again


def test_status_counts_and_failures_without_content(inbox):
    _accept(inbox, "C1", "Doe^Jane")
    _accept(inbox, "C2", "P2", event="A40")
    inbox.mark_failed("C2", "swapped repeat of an A40", transient=False, now=T0)
    assert inbox.counts() == {InboxState.PENDING: 1, InboxState.APPLIED: 0, InboxState.FAILED: 1}
    text = format_status(inbox.counts(), inbox.messages(InboxState.FAILED), inbox.oldest_pending(), now=T0 + 30)
    assert "C2 A40 after 1 attempt(s): swapped repeat of an A40" in text
    assert "received 30 s ago" in text and " pending: 1" in text
    assert "Doe" not in text and "Doe" not in repr(inbox.messages())


def test_a_newer_schema_is_refused(tmp_path, inbox):
    with sqlite3.connect(inbox.path) as con:
        con.execute("PRAGMA user_version = 9")
    with pytest.raises(InboxVersionError, match="version 9"):
        Inbox(inbox.path)


def test_an_a40_waits_for_both_patients_and_both_wait_for_it(inbox):
    _accept(inbox, "C1", "M")                     # the merged patient's own message, before the A40
    inbox.accept("C2", b"A40", "S", "A40", T0, merged_key="M")
    _accept(inbox, "C3", "M")                     # after the A40: the merged patient again
    _accept(inbox, "C4", "S")                     # after the A40: the survivor
    _accept(inbox, "C5", "X")
    assert [m.control_id for m in inbox.next_batch(now=T0)] == ["C1", "C5"]
    inbox.mark_applied("C1", now=T0)
    assert [m.control_id for m in inbox.next_batch(now=T0)] == ["C2", "C5"]
    inbox.mark_failed("C2", "FhirUnavailable", transient=True, now=T0, rng=random.Random(1))
    assert [m.control_id for m in inbox.next_batch(now=T0)] == ["C5"]  # both of the A40's patients wait
    inbox.mark_applied("C2", now=T0)
    assert [m.control_id for m in inbox.next_batch(now=T0)] == ["C3", "C4", "C5"]


def test_a_message_older_than_one_applied_is_marked_older(inbox):
    inbox.accept("A08", b"x", "P1", "A08", T0, message_time=T0 + 3600)
    inbox.accept("A01", b"x", "P1", "A01", T0, message_time=T0)
    inbox.accept("A31", b"x", "P1", "A31", T0, message_time=T0 + 7200)
    inbox.accept("NT", b"x", "P1", "A31", T0)  # no time: never older
    [first] = inbox.next_batch(now=T0)
    assert (first.control_id, first.older, first.newest_applied) == ("A08", False, None)
    inbox.mark_applied("A08", now=T0)
    [late] = inbox.next_batch(now=T0)
    assert (late.control_id, late.older, late.newest_applied) == ("A01", True, T0 + 3600)
    inbox.mark_applied("A01", now=T0)  # an older one applied does not move the newest time back
    [newer] = inbox.next_batch(now=T0)
    assert (newer.control_id, newer.older, newer.newest_applied) == ("A31", False, T0 + 3600)
    inbox.mark_applied("A31", now=T0)
    [untimed] = inbox.next_batch(now=T0)
    assert (untimed.control_id, untimed.older, untimed.newest_applied) == ("NT", False, T0 + 7200)
    assert inbox.get("A01").older  # replayed, it would still only fill gaps


def test_the_newest_applied_time_is_purged_with_the_patients_last_message(inbox):
    inbox.accept("C1", b"x", "P1", "A08", T0, message_time=T0)
    inbox.mark_applied("C1", now=T0)
    assert inbox.purge(1, now=T0 + 2 * 86400) == 1
    inbox.accept("C2", b"x", "P1", "A01", T0 + 2 * 86400, message_time=T0 - 60)
    assert not inbox.get("C2").older


def test_a_version_1_inbox_is_upgraded_in_place(tmp_path):
    path = tmp_path / "inbox.sqlite"
    with sqlite3.connect(path) as con:
        con.executescript("""CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, control_id TEXT NOT NULL
            UNIQUE, raw BLOB NOT NULL, patient_key TEXT NOT NULL, event TEXT NOT NULL, received_at REAL NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, reason TEXT,
            updated_at REAL NOT NULL);
            INSERT INTO messages(control_id, raw, patient_key, event, received_at, state, next_attempt, updated_at)
            VALUES ('OLD', x'41', 'P1', 'A01', 1, 'pending', 1, 1);
            PRAGMA user_version = 1;""")
    inbox = Inbox(path)
    [old] = inbox.next_batch(now=T0)
    assert (old.control_id, old.merged_key, old.message_time, old.older) == ("OLD", None, None, False)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2
