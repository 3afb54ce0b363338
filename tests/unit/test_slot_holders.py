"""Which holders of a global limit are dead, and which slots nobody holds (pacsflow.flows.concurrency)."""

from __future__ import annotations

import datetime as dt

from pacsflow.flows.concurrency import Holder, holders_text, stale_holders, unaccounted_slots

NOW = dt.datetime(2026, 11, 30, 1, 30, tzinfo=dt.timezone.utc)


def _holder(state: str, silent_s: float | None, slots: int = 2, run: str = "r") -> Holder:
    renewed = NOW - dt.timedelta(seconds=silent_s) if silent_s is not None else None
    return Holder(run, "host-a", 4242, slots, state, 30.0, renewed)


def test_a_holder_silent_longer_than_its_lease_is_stale():
    holders = {"fresh": _holder("held", 29), "dead": _holder("held", 31), "never": _holder("waiting", None)}
    assert set(stale_holders(holders, NOW)) == {"dead", "never"}


def test_slots_beyond_what_live_holders_may_hold_are_unaccounted():
    live = {"a": _holder("held", 1, slots=2), "b": _holder("acquiring", 1, slots=1), "c": _holder("waiting", 1)}
    assert unaccounted_slots(3, live) == 0  # a waiting run holds nothing, an acquiring one may
    assert unaccounted_slots(5, live) == 2
    assert unaccounted_slots(2, {}) == 2  # e.g. left by a run killed before holders were recorded
    assert unaccounted_slots(1, live) == 0


def test_a_record_round_trips_and_junk_is_no_holder():
    h = _holder("held", 5, run="20261130T013000Z-a1b2c3")
    assert Holder.parse(h.value(), h.renewed) == h
    assert Holder.parse('{"run_id": "x"}', NOW) is None and Holder.parse("20261130", NOW) is None
    assert holders_text({"x": h}, NOW) == "run 20261130T013000Z-a1b2c3 (pid 4242 on host-a, 2 slots, held, renewed 5s ago)"
    assert holders_text({}, NOW) == "no live holder"
