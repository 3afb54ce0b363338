"""The outbox's state machine: queued -> sending -> delivered | queued again (backoff) | dead -> queued | dropped."""

from __future__ import annotations

import os
import random
import sqlite3
import stat

import pytest

from pacsflow.tasks.route.outbox import (
    Backoff,
    DeliveryState,
    Outbox,
    OutboxVersionError,
    format_status,
)

T0 = 1_000_000.0
BACKOFF = Backoff(first_s=5, max_s=60, max_attempts=4)


@pytest.fixture
def outbox(tmp_path):
    return Outbox(tmp_path / "listener" / "outbox.sqlite")


def _prepared(tmp_path, name: str):
    path = tmp_path / "prepared" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"DICM")
    return path


def test_outbox_is_owner_only_and_enqueue_is_idempotent(outbox, tmp_path):
    assert stat.S_IMODE(os.stat(outbox.path).st_mode) == 0o600
    f = _prepared(tmp_path, "a.dcm")
    assert outbox.enqueue("main", "1.2.3", "study-ref", f, now=T0)
    [row] = outbox.claim("main", 10, now=T0)
    outbox.delivered([row.id], now=T0)
    # A crash and re-enqueue of the same object for the same destination changes nothing ...
    assert not outbox.enqueue("main", "1.2.3", "study-ref", _prepared(tmp_path, "other.dcm"), now=T0 + 5)
    [again] = outbox.rows("main")
    assert (again.state, again.file) == (DeliveryState.DELIVERED, f)
    assert outbox.claim("main", 10, now=T0 + 10) == []
    # ... while the same object for another destination is a row of its own.
    assert outbox.enqueue("second", "1.2.3", "study-ref", f, now=T0)
    assert outbox.depth() == {
        "main": {**dict.fromkeys(DeliveryState, 0), DeliveryState.DELIVERED: 1},
        "second": {**dict.fromkeys(DeliveryState, 0), DeliveryState.QUEUED: 1},
    }


def test_claim_takes_due_rows_of_one_destination_oldest_first_up_to_limit(outbox, tmp_path):
    for i in range(5):
        outbox.enqueue("main", f"1.{i}", "s", _prepared(tmp_path, f"{i}.dcm"), now=T0 + i)
    outbox.enqueue("second", "1.0", "s", _prepared(tmp_path, "0.dcm"), now=T0)
    first = outbox.claim("main", 3, now=T0 + 10)
    assert [d.sop_uid for d in first] == ["1.0", "1.1", "1.2"]
    assert all(d.state is DeliveryState.SENDING for d in first)
    assert [d.sop_uid for d in outbox.claim("main", 3, now=T0 + 10)] == ["1.3", "1.4"]
    assert outbox.claim("main", 3, now=T0 + 10) == []
    assert "1.0" not in repr(first[0])  # original UIDs stay out of reprs (logs)


def test_transient_failures_back_off_exponentially_capped_then_dead(outbox, tmp_path):
    outbox.enqueue("main", "1.1", "s", _prepared(tmp_path, "a.dcm"), now=T0)
    now, delays = T0, []
    for attempt in range(1, BACKOFF.max_attempts + 1):
        [row] = outbox.claim("main", 1, now=now)
        [after] = outbox.failed([row.id], "DestinationUnavailable: no answer\nsecond line", permanent=False,
                                backoff=BACKOFF, now=now, rng=random.Random(attempt))
        assert after.attempts == attempt and after.last_error == "DestinationUnavailable: no answer"
        if attempt < BACKOFF.max_attempts:
            assert after.state is DeliveryState.QUEUED
            assert outbox.claim("main", 1, now=after.next_at - 0.01) == []  # not due before its time
            delays.append(after.next_at - now)
            now = after.next_at
        else:
            assert after.state is DeliveryState.DEAD
    # 5 s doubling (upper quarter jitter): 3.75-5, 7.5-10, 15-20.
    assert [lo <= d <= hi for d, (lo, hi) in zip(delays, [(3.75, 5), (7.5, 10), (15, 20)])] == [True] * 3
    assert outbox.claim("main", 1, now=now + 10_000) == []  # dead rows are never claimed


def test_backoff_delay_grows_and_stays_under_the_cap():
    rng = random.Random(7)
    delays = [Backoff(2, 60, 100).delay(n, rng) for n in range(1, 40)]
    assert all(d <= 60 for d in delays) and min(delays[6:]) >= 45
    assert delays[0] <= 2 < delays[2]


def test_permanent_failure_is_dead_at_once(outbox, tmp_path):
    outbox.enqueue("main", "1.1", "s", _prepared(tmp_path, "a.dcm"), now=T0)
    [row] = outbox.claim("main", 1, now=T0)
    [after] = outbox.failed([row.id], "DestinationRejected: 0xC000", permanent=True, backoff=BACKOFF, now=T0)
    assert (after.state, after.attempts) == (DeliveryState.DEAD, 1)


def _dead(outbox, tmp_path, destination: str, sop: str, name: str):
    outbox.enqueue(destination, sop, "s", _prepared(tmp_path, name), now=T0)
    rows = outbox.claim(destination, 100, now=T0)
    outbox.failed([r.id for r in rows], "x", permanent=True, backoff=BACKOFF, now=T0)


def test_retry_queues_dead_rows_with_attempts_reset(outbox, tmp_path):
    _dead(outbox, tmp_path, "main", "1.1", "a.dcm")
    _dead(outbox, tmp_path, "second", "1.2", "b.dcm")
    assert outbox.retry("main", now=T0 + 1) == 1
    [row] = outbox.claim("main", 10, now=T0 + 1)
    assert (row.sop_uid, row.attempts, row.last_error) == ("1.1", 0, None)
    assert outbox.depth()["second"][DeliveryState.DEAD] == 1
    [dead] = outbox.rows(state=DeliveryState.DEAD)
    assert outbox.retry(ids=[dead.id + 1000]) == 0
    assert outbox.retry(ids=[dead.id]) == 1
    assert outbox.retry() == 0  # nothing dead left


def test_drop_deletes_the_prepared_file_unless_another_row_needs_it(outbox, tmp_path):
    _dead(outbox, tmp_path, "main", "1.1", "a.dcm")
    shared = _prepared(tmp_path, "shared.dcm")
    outbox.enqueue("main", "1.2", "s", shared, now=T0)
    outbox.enqueue("second", "1.2", "s", shared, now=T0)
    rows = outbox.claim("main", 10, now=T0)
    outbox.failed([r.id for r in rows], "x", permanent=True, backoff=BACKOFF, now=T0)
    assert outbox.drop("main") == 2
    assert not (tmp_path / "prepared" / "a.dcm").exists()
    assert shared.exists()  # still queued for "second"
    assert outbox.depth()["main"][DeliveryState.DROPPED] == 2
    assert outbox.retry("main") == 0  # dropped is final


def test_recover_requeues_claims_of_a_crashed_process_without_counting_an_attempt(tmp_path):
    path = tmp_path / "outbox.sqlite"
    before = Outbox(path)
    for i in range(3):
        before.enqueue("main", f"1.{i}", "s", _prepared(tmp_path, f"{i}.dcm"), now=T0)
    claimed = before.claim("main", 2, now=T0)
    before.delivered([claimed[0].id], now=T0)
    after = Outbox(path)  # the process died with claimed[1] in flight
    assert after.recover(lease_s=300, now=T0 + 10) == 0  # a young claim may still be in flight
    assert after.recover(now=T0 + 10) == 1
    again = after.claim("main", 10, now=T0 + 10)
    assert sorted(d.sop_uid for d in again) == ["1.1", "1.2"] and {d.attempts for d in again} == {0}
    assert after.depth()["main"][DeliveryState.DELIVERED] == 1


def test_purge_delivered_removes_old_rows_and_their_files(outbox, tmp_path):
    f = _prepared(tmp_path, "a.dcm")
    outbox.enqueue("main", "1.1", "s", f, now=T0)
    outbox.delivered([r.id for r in outbox.claim("main", 1, now=T0)], now=T0)
    assert outbox.purge_delivered(3600, now=T0 + 60) == 0 and f.exists()
    assert outbox.purge_delivered(3600, now=T0 + 7200) == 1
    assert not f.exists() and outbox.depth() == {}
    # Purged means forgotten: the same object may be queued again later (a new study version).
    assert outbox.enqueue("main", "1.1", "s", f, now=T0 + 7300)


def test_next_due_and_status_text(outbox, tmp_path):
    assert outbox.next_due("main") is None
    outbox.enqueue("main", "1.1", "study-x", _prepared(tmp_path, "a.dcm"), now=T0 + 3)
    assert outbox.next_due("main") == T0 + 3
    _dead(outbox, tmp_path, "second", "1.2", "b.dcm")
    text = format_status(outbox.depth(), outbox.rows(state=DeliveryState.DEAD))
    lines = text.splitlines()
    assert lines[0].split() == ["destination", "queued", "sending", "committing", "delivered", "dead", "dropped"]
    assert lines[1].split() == ["main", "1", "0", "0", "0", "0", "0"]
    assert lines[2].split() == ["second", "0", "0", "0", "0", "1", "0"]
    assert "study s after 1 attempt(s): x" in text and "1.2" not in text


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "outbox.sqlite"
    Outbox(path)
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA user_version = 9")
    with pytest.raises(OutboxVersionError, match="schema version 9"):
        Outbox(path)


def test_enqueue_many_queues_a_batch_in_one_transaction_and_skips_what_is_there(outbox, tmp_path):
    f = _prepared(tmp_path, "a.dcm")
    outbox.enqueue("main", "1.2.0", "2.25.1", f)
    batch = [("main", f"1.2.{i}", "2.25.1", f) for i in range(5)] + [("ai", "1.2.0", "2.25.1", f)]

    assert outbox.enqueue_many(batch) == {"main": 4, "ai": 1}
    assert outbox.enqueue_many(batch) == {}  # queued again after a crash: nothing twice
    assert len(outbox.rows()) == 6
