"""A claimant process for the lease test: ``python -m tests.integration.lease_claimant WORKER STATE_ROOT``.

The state URL comes in ``LEASE_TEST_URL`` (unset: SQLite under STATE_ROOT). Prints one JSON line per
event on stdout: ``ready``; then, after the file ``go`` appears in STATE_ROOT, ``claimed`` (the UIDs,
and the time just before and after the claim) and ``done`` (the UIDs ``done`` accepted). With
``--hold`` it claims once and then sleeps until it is killed; otherwise it works until every study
is done.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pacsflow.tasks.ingest.leases import Leases


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("worker")
    parser.add_argument("state_root", type=Path)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--work-s", type=float, default=0.01, help="pretended work per study")
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    leases = Leases.under(args.state_root, os.environ.get("LEASE_TEST_URL"))
    say("ready")
    while not (args.state_root / "go").exists():
        time.sleep(0.01)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        before = time.time()
        uids = leases.claim(args.worker, args.batch, args.lease)
        say("claimed", uids=uids, before=before, after=time.time())
        if args.hold:
            time.sleep(3600)
        if not uids:
            if all(p.finished for p in leases.shards()):
                return
            time.sleep(0.1)
            continue
        time.sleep(args.work_s * len(uids))
        say("done", uids=leases.done(args.worker, uids))


if __name__ == "__main__":
    main()
