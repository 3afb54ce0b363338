"""Issue 12 item 1 (the receiving side): ``Listener`` receives what DCMTK's ``storescu`` pushes,
with each receive engine, tracks each study and offers it once it is stable.

Real parts: DCMTK ``storescu``/``echoscu`` as senders, the real receiver (``listener.engine``),
the tracker's SQLite file and the staged files in the listener's PHI zone.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.core.errors import PacsConfigurationError
from pacsflow.tasks.ingest.ledger import Ledger
from pacsflow.tasks.pacs.receiver import staged_name
from pacsflow.tasks.route.listener import Listener
from pacsflow.tasks.route.tracker import StableStudy
from pacsflow.tasks.settings import load_settings
from tests.helpers import dcmtk_env, free_port

SENDER_AE = "MODALITY"
LISTENER_AE = "PACSFLOW"
WINDOW_S = 1.0


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Bed:
    """A listener's settings and PHI zone, its senders, and what ``on_stable`` was offered."""

    def __init__(self, root: Path, engine: str) -> None:
        self.root, self.engine = root, engine
        self.settings = load_settings(
            listener={"ae_title": LISTENER_AE, "port": free_port(), "allowed_aes": [SENDER_AE], "engine": engine,
                      "stable_after_s": WINDOW_S, "max_object_mb": 1},
            state_root=root / "state", deid_key="listener-test-key-0123456789",
        )
        self.offered: list[StableStudy] = []
        self._changed = threading.Condition()

    def listener(self, *, fail: bool = False, poll_s: float = 0.2) -> Listener:
        def on_stable(study: StableStudy) -> None:
            study = study.snapshot()  # read now: the tracker moves on (and closes at stop)
            assert len(study) == len(study.paths)
            for path in study.paths:
                assert path.exists()  # what is offered is on disk
            with self._changed:
                self.offered.append(study)
                self._changed.notify_all()
            if fail:
                raise RuntimeError("routing is down")

        return Listener(self.settings, on_stable, poll_s=poll_s)

    def studies(self, n: int, seed: int = 3, modalities: tuple[str, ...] = ("CT", "MR", "MG")) -> list:
        return sampledata.generate(self.root / f"in{seed}", studies=n, days=1, seed=seed, modalities=modalities,
                                   series_per_study=(1, 2), instances_per_series=(2, 3))

    def send(self, tool: str, calling_ae: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [tool, "-aet", calling_ae, "-aec", LISTENER_AE, "127.0.0.1", str(self.settings.listener.port),
               *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=120)

    def wait_offered(self, n: int, timeout_s: float = 30.0) -> list[StableStudy]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.offered) < n and time.monotonic() < deadline:
                self._changed.wait(0.1)
            return list(self.offered)

    def settle(self) -> list[StableStudy]:
        """What was offered once several more windows passed (nothing further may come)."""
        time.sleep(4 * WINDOW_S)
        return self.wait_offered(0)

    def inbox_files(self) -> list[Path]:
        inbox = self.settings.listener_dir / "inbox"
        return sorted(p for p in inbox.rglob("*") if p.is_file()) if inbox.exists() else []


def files_of(study) -> list[Path]:
    return sorted(Path(study.path).rglob("*.dcm"))


@pytest.fixture(params=["dcmtk", "pynetdicom"])
def bed(tmp_path, request):
    missing = [n for n in ("echoscu", "storescu", "storescp") if shutil.which(n) is None]
    if missing:
        pytest.skip(f"DCMTK tools missing: {missing}")
    return Bed(tmp_path, request.param)


def test_each_study_is_offered_once_with_all_its_objects(bed, caplog):
    caplog.set_level(logging.INFO, logger="pacsflow")
    studies = bed.studies(3)
    sent = [f for s in studies for f in files_of(s)]
    with bed.listener() as listener:
        result = bed.send("storescu", SENDER_AE, *sent)
        assert result.returncode == 0, result.stderr[-500:]
        bed.wait_offered(len(studies))
        offered = bed.settle()
    counters = listener.counters  # the last totals, once stopped
    assert sorted(s.study_uid for s in offered) == sorted(s.study_uid for s in studies)  # once each
    for study in studies:
        [got] = [o for o in offered if o.study_uid == study.study_uid]
        assert sorted(got.sop_uids) == sorted(_sop_uid(f) for f in files_of(study))
        assert got.calling_aes == {SENDER_AE}
        ref = listener.study_ref(study.study_uid)  # the folder is the study's keyed pseudonym
        assert {p.parent.name for p in got.paths} == {ref} != {study.study_uid}
        assert sorted(p.name for p in got.paths) == sorted(staged_name(u) for u in got.sop_uids)
        assert sorted(_sop_uid(p) for p in got.paths) == sorted(got.sop_uids)
    assert (counters.received, counters.stable, counters.handed, counters.pending) == (len(sent), 3, 3, 0)
    assert len(bed.inbox_files()) == len(sent)
    assert "handled (generation 1" in caplog.text
    assert not any(s.study_uid in caplog.text or s.patient_id in caplog.text for s in studies)


def test_a_stranger_is_refused_at_association_and_leaves_nothing(bed):
    [study] = bed.studies(1)
    with bed.listener() as listener:
        assert bed.send("echoscu", SENDER_AE).returncode == 0
        echo = bed.send("echoscu", "STRANGER")
        store = bed.send("storescu", "INTRUDER", *files_of(study))
        offered = bed.settle()
        counters = listener.counters
    assert echo.returncode != 0 and store.returncode != 0
    assert offered == [] and bed.inbox_files() == []
    assert counters.refused == {"calling_ae": 2} and counters.received == 0


def test_a_malformed_object_is_refused_counted_and_quarantined_with_a_reason(bed, tmp_path):
    [study] = bed.studies(1)
    broken = pydicom.dcmread(files_of(study)[0])
    del broken.StudyInstanceUID  # no study to file it under
    path = tmp_path / "broken.dcm"
    broken.save_as(path, enforce_file_format=True)
    with bed.listener() as listener:
        sent = bed.send("storescu", SENDER_AE, path)
        offered = bed.settle()
        counters = listener.counters
    # pynetdicom refuses it on the wire (0xC000); storescp stores it, the staging boundary refuses it
    assert (sent.returncode == 0) == (bed.engine == "dcmtk")
    assert offered == [] and bed.inbox_files() == []
    assert counters.refused == {"undecodable": 1} and counters.received == 0
    [kept] = list((bed.settings.quarantine_dir / "listener").iterdir())
    assert pydicom.dcmread(kept, force=True).SOPInstanceUID == broken.SOPInstanceUID  # its bytes, kept
    [entry] = Ledger(bed.settings.ledger_path).quarantine_entries()
    assert entry["object_ref"] == kept.name and entry["reason"].startswith(f"undecodable object from '{SENDER_AE}'")


def test_a_late_object_makes_a_second_generation_with_only_itself(bed):
    [study] = bed.studies(1)
    *early, late = files_of(study)
    with bed.listener():
        assert bed.send("storescu", SENDER_AE, *early).returncode == 0
        [first] = bed.wait_offered(1)
        time.sleep(WINDOW_S)  # the study was handled; a late object comes after a pause
        assert bed.send("storescu", SENDER_AE, late).returncode == 0
        offered = bed.wait_offered(2)
        offered = bed.settle()
    assert len(offered) == 2
    second = offered[1]
    assert sorted(first.sop_uids) == sorted(_sop_uid(f) for f in early)
    assert second.sop_uids == [_sop_uid(late)] and second.generation > first.generation


def test_a_study_sent_again_after_handling_is_not_offered_again(bed):
    [study] = bed.studies(1)
    with bed.listener() as listener:
        assert bed.send("storescu", SENDER_AE, *files_of(study)).returncode == 0
        bed.wait_offered(1)
        assert bed.send("storescu", SENDER_AE, *files_of(study)).returncode == 0
        offered = bed.settle()
        counters = listener.counters
    assert len(offered) == 1 and counters.duplicates == len(files_of(study))


def test_a_failing_hand_off_leaves_the_study_to_a_later_pass(bed):
    [study] = bed.studies(1)
    with bed.listener(fail=True) as listener:
        assert bed.send("storescu", SENDER_AE, *files_of(study)).returncode == 0
        bed.wait_offered(1)
        offered = bed.settle()  # the retry waits out its backoff (longer than this)
        counters = listener.counters
    assert len(offered) == 1 and (counters.failed, counters.handed) == (1, 0)
    assert counters.pending == len(files_of(study))


def test_a_restart_offers_what_was_not_handled_exactly_once(bed):
    first, second = bed.studies(2)
    crashed = bed.listener(poll_s=3600)  # receives, but dies before any study is stable
    with crashed:
        assert bed.send("storescu", SENDER_AE, *files_of(first)).returncode == 0
    assert bed.offered == []
    # killed between a file's rename and its row: a staged file the tracker does not know
    orphan = files_of(second)[0]
    folder = bed.settings.listener_dir / "inbox" / crashed.study_ref(second.study_uid)
    folder.mkdir(mode=0o700)
    shutil.copy(orphan, folder / staged_name(_sop_uid(orphan)))
    with bed.listener() as restarted:
        bed.wait_offered(2)
        offered = bed.settle()
        counters = restarted.counters
    assert sorted(o.study_uid for o in offered) == sorted([first.study_uid, second.study_uid])
    [again] = [o for o in offered if o.study_uid == first.study_uid]
    assert sorted(again.sop_uids) == sorted(_sop_uid(f) for f in files_of(first))
    [found] = [o for o in offered if o.study_uid == second.study_uid]
    assert found.sop_uids == [_sop_uid(orphan)] and found.calling_aes == frozenset()
    assert counters.pending == 0
    with bed.listener():  # a third start: everything was handled
        assert bed.settle() == offered


def test_what_storescp_received_for_a_killed_listener_is_taken_in(tmp_path):
    """The native engine: a killed listener's storescp finishes its association and exits; the
    next start takes in its complete files (the sender was told they are stored), not a cut one."""
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK storescp missing")
    bed = Bed(tmp_path, "dcmtk")
    [study] = bed.studies(1)
    whole, cut = files_of(study)[:2]
    left = bed.settings.listener_dir / "incoming" / "a00000007"
    left.mkdir(parents=True)
    shutil.copy(whole, left / f"CT.{_sop_uid(whole)}")
    (left / f"CT.{_sop_uid(cut)}").write_bytes(cut.read_bytes()[:-100])
    left.with_suffix(".pid").write_text(f"{2 ** 22 + 1} {SENDER_AE}")  # above Linux's pid_max: long gone
    with bed.listener() as listener:
        [offered] = bed.wait_offered(1)
        counters = listener.counters
    assert offered.sop_uids == [_sop_uid(whole)] and offered.calling_aes == {SENDER_AE}
    assert counters.received == 1 and len(bed.inbox_files()) == 1
    assert not (bed.settings.listener_dir / "incoming" / "a00000007").exists()


def test_a_listener_open_to_nobody_does_not_start(tmp_path):
    settings = load_settings(listener={"port": free_port()}, state_root=tmp_path / "state",
                             deid_key="listener-test-key-0123456789")
    with pytest.raises(PacsConfigurationError, match="listener.allowed_aes"):
        Listener(settings, lambda study: None)
    assert not (settings.listener_dir / "tracker.sqlite").exists()
