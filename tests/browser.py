"""Headless Chromium for the tests that look at a page as people do, and a sample run history.

``python -m tests.browser OUT.png`` renders the report of the sample history (what the README shows).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pacsflow.tasks.ingest.bookkeeping import RunSummary
from pacsflow.tasks.ingest.history import ModalityCount, RunHistory, RunRecord
from pacsflow.tasks.ingest.report import render_report, write_report

CHROMIUM = os.environ.get("PACSFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach its vendor's hosts.
FLAGS = ("--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1")


def chromium(*args: str, timeout: float = 90) -> str:
    """Run Chromium once on a fresh profile; returns its stdout."""
    if not shutil.which(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} not found: `deployments/bootstrap.sh test` installs Debian's chromium")
    with tempfile.TemporaryDirectory(prefix="pacsflow-chromium-") as profile:
        sandbox = ("--no-sandbox",) if os.geteuid() == 0 else ()  # Chromium refuses root with its sandbox
        done = subprocess.run([CHROMIUM, *FLAGS, *sandbox, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(page: Path) -> str:
    return chromium("--dump-dom", page.resolve().as_uri())


def screenshot(page: Path, png: Path, width: int = 1380, height: int = 2000) -> Path:
    chromium(f"--screenshot={png}", f"--window-size={width},{height}", page.resolve().as_uri())
    return png


def sample_history(path: Path, nights: int = 14, seed: int = 9) -> list[RunRecord]:
    """``nights`` plausible nights in a history file (one with every study failed: a PACS refusal)."""
    rng = random.Random(seed)
    history = RunHistory(path)
    start = dt.datetime(2026, 11, 1, 1, 30, tzinfo=dt.timezone.utc)
    for i in range(nights):
        s = RunSummary(f"run-{i:02d}", f"{(start + dt.timedelta(days=i - 2)).date()}..{(start + dt.timedelta(days=i)).date()}")
        s.found = s.queued = rng.randint(80, 130)
        s.failed = s.found if i == nights - 5 else rng.choice([0, 0, 1, 2, 4])
        s.cataloged = s.found - s.failed
        s.quarantined_objects = 0 if s.cataloged == 0 else rng.choice([0, 1, 3, 6])
        s.instances = s.cataloged * rng.randint(180, 260)
        s.seconds = round(60 + s.instances / rng.uniform(30, 45), 1)
        shares = {"CT": 0.45, "MR": 0.3, "CR": 0.15, "US": 0.06, "MG": 0.04}
        by_modality = [ModalityCount(m, max(1, round(s.cataloged * f)), max(1, round(s.cataloged * f * 4)),
                                     round(s.instances * f)) for m, f in shares.items()] if s.cataloged else []
        history.record(s, by_modality, finished_at=start + dt.timedelta(days=i, seconds=s.seconds))
    return history.last(nights)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        runs = sample_history(Path(tmp) / "history.sqlite")
        page = write_report(Path(tmp) / "report.html", render_report(runs, title="pacsflow run report (nightly)",
                                                                     generated_at=runs[-1].finished_at))
        screenshot(page, out, height=1560)
    print(out)
