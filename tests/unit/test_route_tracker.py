"""The listener's study tracker: stability, generations, duplicates and recovery after a crash,
on a real SQLite file and real staged files."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacsflow.tasks.route.tracker import StudyTracker

WINDOW = 60.0


def _tracker(tmp_path: Path) -> StudyTracker:
    return StudyTracker(tmp_path / "listener" / "tracker.sqlite")


def _arrive(tracker: StudyTracker, study: str, sop: str, at: float, ae: str = "MODALITY") -> bool:
    return tracker.arrived(study, sop, Path(f"/inbox/{study}/{sop}.dcm"), ae, at)


def test_a_study_is_stable_only_after_its_window_with_every_object(tmp_path):
    t = _tracker(tmp_path)
    _arrive(t, "1.1", "1.1.1", at=100, ae="CT1")
    _arrive(t, "1.1", "1.1.2", at=130, ae="CT2")
    _arrive(t, "1.2", "1.2.1", at=150)
    assert t.stable(now=185, window_s=WINDOW) == []  # the last object of 1.1 is 55 s old
    [study] = t.stable(now=190, window_s=WINDOW)
    assert (study.study_uid, study.generation, study.sop_uids) == ("1.1", 1, ["1.1.1", "1.1.2"])
    assert study.paths == [Path("/inbox/1.1/1.1.1.dcm"), Path("/inbox/1.1/1.1.2.dcm")]
    assert study.calling_aes == {"CT1", "CT2"}
    assert t.handled("1.1", study.generation) == 2
    assert [s.study_uid for s in t.stable(now=300, window_s=WINDOW)] == ["1.2"]
    t.handled("1.2", 1)
    assert t.stable(now=1000, window_s=WINDOW) == [] and t.pending() == 0


def test_a_study_not_handled_is_offered_again(tmp_path):
    t = _tracker(tmp_path)
    _arrive(t, "1.1", "1.1.1", at=0)
    first = [s.snapshot() for s in t.stable(now=100, window_s=WINDOW)]  # as read by the failed routing
    again = t.stable(now=101, window_s=WINDOW)  # routing failed: nothing marked handled
    assert [s.sop_uids for s in first] == [s.sop_uids for s in again] == [["1.1.1"]]
    assert again[0].generation > first[0].generation


def test_a_late_object_makes_a_new_generation_with_only_itself(tmp_path):
    t = _tracker(tmp_path)
    _arrive(t, "1.1", "1.1.1", at=0)
    _arrive(t, "1.1", "1.1.2", at=1)
    [first] = t.stable(now=100, window_s=WINDOW)
    t.handled("1.1", first.generation)
    _arrive(t, "1.1", "1.1.3", at=500)  # a late series
    assert t.stable(now=520, window_s=WINDOW) == []
    [second] = t.stable(now=600, window_s=WINDOW)
    assert second.sop_uids == ["1.1.3"] and second.generation == first.generation + 1


def test_an_object_arriving_while_its_study_is_routed_is_not_marked_handled(tmp_path):
    t = _tracker(tmp_path)
    _arrive(t, "1.1", "1.1.1", at=0)
    [routing] = t.stable(now=100, window_s=WINDOW)
    _arrive(t, "1.1", "1.1.2", at=101)  # arrives during on_stable
    assert t.handled("1.1", routing.generation) == 1
    [later] = t.stable(now=200, window_s=WINDOW)
    assert later.sop_uids == ["1.1.2"]


def test_an_object_sent_again_after_handling_is_a_duplicate(tmp_path):
    t = _tracker(tmp_path)
    assert _arrive(t, "1.1", "1.1.1", at=0)
    assert _arrive(t, "1.1", "1.1.1", at=5)  # sent twice before routing: one object
    [study] = t.stable(now=100, window_s=WINDOW)
    assert study.sop_uids == ["1.1.1"]
    t.handled("1.1", study.generation)
    assert not _arrive(t, "1.1", "1.1.1", at=200)
    assert t.duplicates() == 1 and t.stable(now=1000, window_s=WINDOW) == []


def test_the_state_survives_reopening(tmp_path):
    t = _tracker(tmp_path)
    _arrive(t, "1.1", "1.1.1", at=0)
    _arrive(t, "1.2", "1.2.1", at=0)
    [a, b] = t.stable(now=100, window_s=WINDOW)
    t.handled(a.study_uid, a.generation)
    t.close()
    reopened = _tracker(tmp_path)
    assert [s.study_uid for s in reopened.stable(now=100, window_s=WINDOW)] == [b.study_uid]


def _staged_object(folder: Path, study_uid: str, sop_uid: str) -> Path:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SOPInstanceUID = study_uid, sop_uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, sop_uid
    path = folder / "ref" / f"{sop_uid.replace('.', '')}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_recover_registers_unknown_files_and_drops_vanished_rows(tmp_path):
    inbox = tmp_path / "inbox"
    study = generate_uid()
    known = _staged_object(inbox, study, generate_uid())
    unknown_sop = generate_uid()
    unknown = _staged_object(inbox, study, unknown_sop)  # renamed in, then killed before the insert
    temp = known.parent / ".half.dcm.abc.part"
    temp.write_bytes(b"half")
    t = _tracker(tmp_path)
    t.arrived(study, "1.2.3.4", known, "CT1", 0)
    t.arrived(study, "9.9.9", inbox / "ref" / "gone.dcm", "CT1", 0)  # its file vanished
    found = t.recover(inbox, now=50)
    assert (found.registered, found.dropped, found.unreadable) == (1, 1, 0)
    assert not temp.exists()
    assert t.stable(now=100, window_s=WINDOW) == []  # the recovered file arrived "now"
    [stable] = t.stable(now=110, window_s=WINDOW)
    assert sorted(stable.sop_uids) == sorted(["1.2.3.4", unknown_sop])
    assert set(stable.paths) == {known, unknown}
    assert t.recover(inbox, now=200).registered == 0  # a second start finds nothing new


def test_a_large_study_is_read_in_pages_and_each_object_once(tmp_path, monkeypatch):
    from pacsflow.tasks.route import tracker

    monkeypatch.setattr(tracker, "PAGE", 7)
    t = _tracker(tmp_path)
    for i in range(50):
        _arrive(t, "1.1", f"1.1.{i}", at=0)
    [study] = t.stable(now=100, window_s=WINDOW)
    _arrive(t, "1.1", "1.1.late", at=100.5)  # arrives while the study is being routed: the next generation's
    pages = list(study.pages())

    assert len(study) == 50 and [len(p) for p in pages] == [7] * 7 + [1]
    assert sorted(sop for page in pages for sop, _, _ in page) == sorted(f"1.1.{i}" for i in range(50))
