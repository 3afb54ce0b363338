"""Issue 17, test 2: two OS processes claim from 100 studies; none is claimed twice while its lease
lives; a claimant killed with SIGKILL gives its studies up when its lease runs out."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pacsflow.tasks.ingest.leases import Leases

ROOT = Path(__file__).resolve().parents[2]
STUDIES = [f"1.2.826.0.1.{i:03d}" for i in range(100)]
VICTIM_LEASE_S = 3.0


def claimant(worker: str, state_root: Path, url: str | None, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "LEASE_TEST_URL"}
    if url is not None:
        env["LEASE_TEST_URL"] = url
    return subprocess.Popen([sys.executable, "-m", "tests.integration.lease_claimant", worker, str(state_root), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def next_event(proc: subprocess.Popen[str]) -> dict:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"claimant exited with {proc.wait()}"
    return json.loads(line)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["postgresql", "sqlite"])
def test_two_claimants_and_a_killed_one(tmp_path, request, engine):
    url = request.getfixturevalue("postgresql_url") if engine == "postgresql" else None
    Leases.under(tmp_path, url).add("2026-11-01", STUDIES, day=dt.date(2026, 11, 1))

    victim = claimant("victim", tmp_path, url, "--batch", "10", "--lease", str(VICTIM_LEASE_S), "--hold")
    assert next_event(victim)["event"] == "ready"
    (tmp_path / "go").touch()
    grabbed = next_event(victim)
    assert len(grabbed["uids"]) == 10
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    (tmp_path / "go").unlink()

    workers = {w: claimant(w, tmp_path, url) for w in ("a", "b")}
    assert all(next_event(p)["event"] == "ready" for p in workers.values())
    (tmp_path / "go").touch()  # both start claiming together
    events = {w: [json.loads(line) for line in p.communicate(timeout=150)[0].splitlines()] for w, p in workers.items()}
    assert [p.returncode for p in workers.values()] == [0, 0]

    claimed = {w: [(u, e["after"]) for e in evs if e["event"] == "claimed" for u in e["uids"]]
               for w, evs in events.items()}
    done = Counter(u for evs in events.values() for e in evs if e["event"] == "done" for u in e["uids"])
    # every study finished exactly once, and each worker finished exactly what it claimed
    assert sorted(done) == STUDIES and set(done.values()) == {1}
    for w, evs in events.items():
        assert sorted(u for u, _ in claimed[w]) == sorted(u for e in evs if e["event"] == "done" for u in e["uids"])
    # the two live claimants never got the same study, and both worked
    a, b = ({u for u, _ in claimed[w]} for w in ("a", "b"))
    assert not a & b and len(a) >= 5 and len(b) >= 5
    # the killed claimant's studies went to the others only after its lease ran out
    taken_after = {u: t for w in claimed for u, t in claimed[w] if u in set(grabbed["uids"])}
    assert sorted(taken_after) == grabbed["uids"]
    assert min(taken_after.values()) >= grabbed["before"] + VICTIM_LEASE_S
    assert all(p.finished and p.done == 100 for p in Leases.under(tmp_path, url).shards())
