"""Study leases on both engines, one process (the two-process test is tests/integration/test_leases.py)."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from pacsflow.tasks.ingest.leases import Leases

UIDS = [f"1.2.3.{i:03d}" for i in range(10)]


@pytest.fixture(params=["sqlite", "postgresql"])
def leases(request, tmp_path):
    url = None if request.param == "sqlite" else request.getfixturevalue("postgresql_url")
    store = Leases.under(tmp_path, url)
    store.add("2026-11-01", UIDS[:6], day=dt.date(2026, 11, 1))
    store.add("2026-11-02", UIDS[6:], day=dt.date(2026, 11, 2))
    return store


def test_a_held_study_is_not_claimed_again(leases):
    first = leases.claim("w1", 4, lease_s=60)
    second = leases.claim("w2", 100, lease_s=60)
    assert first == UIDS[:4] and second == UIDS[4:]
    assert leases.claim("w3", 5, lease_s=60) == []
    assert leases.holders() == {**{u: "w1" for u in first}, **{u: "w2" for u in second}}


def test_an_expired_lease_makes_the_study_claimable(leases):
    held = leases.claim("w1", 3, lease_s=0.3)
    assert leases.claim("w2", 3, lease_s=60, shard="2026-11-01") == UIDS[3:6]
    time.sleep(0.5)
    assert leases.claim("w2", 10, lease_s=60, shard="2026-11-01") == held
    # w1 lost them: it can neither renew nor finish them
    assert leases.renew("w1", held, lease_s=60) == [] and leases.done("w1", held) == []
    assert leases.done("w2", held) == held


def test_renewal_keeps_the_lease_alive(leases):
    held = leases.claim("w1", 2, lease_s=0.4)
    for _ in range(3):
        time.sleep(0.2)
        assert leases.renew("w1", held, lease_s=0.4) == held
    assert leases.claim("w2", 2, lease_s=60) == UIDS[2:4]


def test_done_is_final_and_release_gives_back_at_once(leases):
    held = leases.claim("w1", 6, lease_s=60, shard="2026-11-01")
    assert leases.done("w1", held[:5]) == held[:5]
    assert leases.release("w1", held[5:]) == held[5:]
    assert leases.claim("w2", 10, lease_s=60, shard="2026-11-01") == held[5:]
    leases.add("2026-11-01", UIDS[:6])  # planned again: done stays done
    assert leases.claim("w3", 10, lease_s=60, shard="2026-11-01") == []
    progress = {p.shard: (p.day, p.studies, p.done, p.held, p.finished) for p in leases.shards()}
    assert progress == {"2026-11-01": (dt.date(2026, 11, 1), 6, 5, 1, False),
                        "2026-11-02": (dt.date(2026, 11, 2), 4, 0, 0, False)}
    leases.done("w2", held[5:])
    assert [p.finished for p in leases.shards()] == [True, False]
    leases.add("undated", ["9.9"])
    assert leases.shards()[-1].day is None


def test_reopen_brings_a_done_study_back_into_the_new_shard_and_leaves_open_ones_alone(leases):
    held = leases.claim("w1", 6, lease_s=60, shard="2026-11-01")
    leases.done("w1", held[:2])
    leases.add("2026-11-01.again", held[:3], day=dt.date(2026, 11, 1), reopen=True)
    assert leases.holders()[held[2]] == "w1"  # open and held: untouched, still in its shard
    assert leases.claim("w2", 10, lease_s=60, shard="2026-11-01.again") == held[:2]
    progress = {p.shard: (p.studies, p.done, p.held) for p in leases.shards()}
    assert progress["2026-11-01"] == (4, 0, 4) and progress["2026-11-01.again"] == (2, 0, 2)
    assert leases.open_studies([*held, "1.9.9"]) == set(held)


def test_flow_runs_are_recorded_per_shard_and_expired_claims_are_counted_then_forgotten(leases):
    leases.started("2026-11-01", "run-a")
    leases.started("2026-11-01", "run-b")
    leases.started("2026-11-02", "run-c")
    assert leases.runs() == {"2026-11-01": "run-b", "2026-11-02": "run-c"}
    held = leases.claim("w1", 6, lease_s=0.2, shard="2026-11-01")
    leases.release("w1", held[:1])  # given back: not an expired claim
    time.sleep(0.4)
    [p] = [p for p in leases.shards() if p.shard == "2026-11-01"]
    assert (p.held, p.expired) == (0, 5)
    assert leases.forget_expired("2026-11-01") == 5
    [p] = [p for p in leases.shards() if p.shard == "2026-11-01"]
    assert (p.held, p.expired) == (0, 0)
    assert leases.done("w1", held) == []  # no longer w1's
