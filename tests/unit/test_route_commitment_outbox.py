"""The outbox's Storage Commitment states: sending -> committing -> delivered | queued again | dead,
and the migration of a version 1 outbox."""

from __future__ import annotations

import sqlite3

import pytest

from pacsflow.tasks.route.outbox import SCHEMA_VERSION, Backoff, DeliveryState, Outbox

T0 = 1_000_000.0
BACKOFF = Backoff(first_s=5, max_s=60, max_attempts=3)


@pytest.fixture
def outbox(tmp_path):
    return Outbox(tmp_path / "outbox.sqlite")


def _committing(outbox: Outbox, tmp_path, n: int, transaction: str = "2.25.1", deadline: float = T0 + 600):
    """``n`` rows of "arch" stored and waiting on ``transaction``; their sent copies are ``9.<i>``."""
    for i in range(n):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(b"DICM")
        outbox.enqueue("arch", f"1.{i}", "study-a", path, now=T0)
    rows = outbox.claim("arch", 100, now=T0)
    assert outbox.committing({r.id: f"9.{r.sop_uid[2:]}" for r in rows}, transaction, deadline, now=T0) == n
    return rows


def test_committing_rows_wait_for_their_transaction_and_are_not_claimed(outbox, tmp_path):
    _committing(outbox, tmp_path, 3)
    waiting = outbox.awaiting("2.25.1")
    assert [(r.state, r.transaction_uid, r.sent_uid, r.commit_by) for r in waiting] == [
        (DeliveryState.COMMITTING, "2.25.1", f"9.{i}", T0 + 600) for i in range(3)]
    assert outbox.claim("arch", 100, now=T0 + 10_000) == []
    assert outbox.awaiting("2.25.999") == []
    assert outbox.depth()["arch"][DeliveryState.COMMITTING] == 3


def test_a_report_makes_committed_copies_delivered_and_failed_ones_retried_or_dead(outbox, tmp_path):
    rows = _committing(outbox, tmp_path, 4)
    assert outbox.committed("2.25.1", ["9.0", "9.1", "9.7"], now=T0 + 1) == 2  # 9.7: not in this transaction
    assert outbox.committed("2.25.2", ["9.2"], now=T0 + 1) == 0  # another transaction's report
    by_sent = {r.sent_uid: r.id for r in outbox.awaiting("2.25.1")}
    assert set(by_sent) == {"9.2", "9.3"}
    retried = outbox.failed([by_sent["9.2"]], "processing failure", permanent=False, backoff=BACKOFF, now=T0 + 1)
    dead = outbox.failed([by_sent["9.3"]], "no such object", permanent=True, backoff=BACKOFF, now=T0 + 1)
    assert [(r.state, r.attempts) for r in retried] == [(DeliveryState.QUEUED, 1)]
    assert [(r.state, r.attempts) for r in dead] == [(DeliveryState.DEAD, 1)]
    states = {r.sop_uid: r.state for r in outbox.rows("arch")}
    assert states == {rows[0].sop_uid: DeliveryState.DELIVERED, rows[1].sop_uid: DeliveryState.DELIVERED,
                      "1.2": DeliveryState.QUEUED, "1.3": DeliveryState.DEAD}
    # A late second report of the same transaction changes nothing any more.
    assert outbox.committed("2.25.1", ["9.2", "9.3"], now=T0 + 2) == 0
    # The re-queued row is sent again and waits on a new transaction.
    [again] = outbox.claim("arch", 10, now=T0 + 100)
    assert outbox.committing({again.id: "9.2"}, "2.25.3", T0 + 700, now=T0 + 100) == 1
    assert outbox.committed("2.25.1", ["9.2"], now=T0 + 101) == 0
    assert outbox.committed("2.25.3", ["9.2"], now=T0 + 101) == 1


def test_no_report_by_the_deadline_queues_again_then_dead_after_max_attempts(outbox, tmp_path):
    _committing(outbox, tmp_path, 2, deadline=T0 + 600)
    assert outbox.expire_commitments("arch", "no report", BACKOFF, now=T0 + 599) == []
    assert outbox.expire_commitments("other", "no report", BACKOFF, now=T0 + 601) == []
    expired = outbox.expire_commitments("arch", "no report", BACKOFF, now=T0 + 601)
    assert {(r.state, r.attempts, r.last_error) for r in expired} == {(DeliveryState.QUEUED, 1, "no report")}
    assert all(T0 + 601 + 3.75 <= r.next_at <= T0 + 606 for r in expired)
    t = T0 + 601
    for attempt in (2, 3):
        t += 1000
        rows = outbox.claim("arch", 10, now=t)
        outbox.committing({r.id: "9.x" + str(r.id) for r in rows}, f"2.25.{attempt}", t + 600, now=t)
        after = outbox.expire_commitments("arch", "no report", BACKOFF, now=t + 600)
    assert {(r.state, r.attempts) for r in after} == {(DeliveryState.DEAD, 3)}


def test_committing_rows_survive_a_restart_and_keep_their_prepared_file(tmp_path):
    path = tmp_path / "outbox.sqlite"
    first = Outbox(path)
    rows = _committing(first, tmp_path, 1)
    again = Outbox(path)
    assert again.recover(now=T0 + 5) == 0  # a row waiting on its report was sent: not queued again
    assert [r.id for r in again.awaiting("2.25.1")] == [rows[0].id]
    # Purging a delivered row that shares its prepared file does not take the file a committing row may resend.
    again.enqueue("main", rows[0].sop_uid, "study-a", rows[0].file, now=T0)
    again.delivered([r.id for r in again.claim("main", 1, now=T0)], now=T0)
    assert again.purge_delivered(0, now=T0 + 10) == 1 and rows[0].file.exists()


def test_a_version_1_outbox_is_migrated_with_its_rows(tmp_path):
    path = tmp_path / "outbox.sqlite"
    with sqlite3.connect(path) as con:  # the schema as version 1 created it
        con.execute("""CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, destination TEXT NOT NULL,
                       sop_uid TEXT NOT NULL, study_ref TEXT NOT NULL, file TEXT NOT NULL, state TEXT NOT NULL,
                       attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, claimed_at REAL,
                       last_error TEXT, created_at TEXT NOT NULL, updated_at REAL NOT NULL,
                       UNIQUE (destination, sop_uid))""")
        con.execute("""INSERT INTO deliveries(destination, sop_uid, study_ref, file, state, next_at, created_at,
                       updated_at) VALUES ('arch', '1.0', 's', ?, 'queued', ?, 'then', ?)""",
                    (str(tmp_path / "0.dcm"), T0, T0))
        con.execute("PRAGMA user_version = 1")
    outbox = Outbox(path)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    [row] = outbox.claim("arch", 10, now=T0)
    assert (row.sop_uid, row.transaction_uid, row.sent_uid) == ("1.0", None, None)
    assert outbox.committing({row.id: "9.0"}, "2.25.1", T0 + 600, now=T0) == 1
    assert outbox.committed("2.25.1", ["9.0"], now=T0 + 1) == 1
    assert Outbox(path).depth()["arch"][DeliveryState.DELIVERED] == 1  # opening again: no second migration
