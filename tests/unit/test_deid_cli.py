"""``run_deidentify`` on a generated folder: identical reruns, quarantine, manifest, crosswalk."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import time
from pathlib import Path

import pydicom
import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.deid.choices import PixelPolicy
from pacsflow.tasks.deid.deidentifier import Deidentifier, Option
from pacsflow.tasks.deid.manifest import MANIFEST_NAME, build_manifest, manifest_markdown
from pacsflow.tasks.core.files import purge_older_than
from pacsflow.tasks.deid.folder import run_deidentify
from pacsflow.tasks.settings import SettingsError, load_settings

KEY = b"cli-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("cli")
    studies = sampledata.generate(root / "in", studies=4, end_date=dt.date(2026, 11, 1), seed=5,
                                  modalities=("CT", "US"), instances_per_series=(2, 3))
    (root / "in" / "notes.txt").write_text("not dicom")
    return root, studies


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_give_byte_identical_outputs(sample, tmp_path):
    root, _ = sample
    a = run_deidentify(root / "in", tmp_path / "a", [Option.RETAIN_MODIFIED_DATES], KEY)
    b = run_deidentify(root / "in", tmp_path / "b", [Option.RETAIN_MODIFIED_DATES], KEY)
    assert a.written > 0 and a.written == b.written
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    c = run_deidentify(root / "in", tmp_path / "c", [Option.RETAIN_MODIFIED_DATES], b"another-key-0123456789")
    assert _tree(tmp_path / "c").keys() != _tree(tmp_path / "a").keys()


def test_quarantine_manifest_and_no_phi(sample, tmp_path):
    root, studies = sample
    progress = []
    s = run_deidentify(root / "in", tmp_path / "out", ["Retain Long. Modified Dates"], KEY,
                       progress=lambda n, total: progress.append((n, total)), quarantine_dir=tmp_path / "q")
    assert progress[-1] == (s.files, s.files)
    reasons = {q.reason for q in s.quarantined}
    # the generated US says YES but carries no text OCR can find (the default ocr policy): not exported
    assert "burned-in annotation: BurnedInAnnotation is YES but OCR located no text" in reasons
    assert any(r.startswith("unreadable DICOM") for r in reasons)  # notes.txt
    assert s.written + len(s.quarantined) == s.files
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["table_edition"] == "2024b" and manifest["recipe_version"] == "pacsflow-deid-4"
    assert manifest["options"] == ["Retain Long. Modified Dates"] and manifest["pixel_policy"] == "ocr"
    assert manifest["actions"]["U"] > 0 and manifest["quarantined_count"] == len(s.quarantined)
    text = (tmp_path / "out" / MANIFEST_NAME).read_text() + manifest_markdown(manifest)
    for st in studies:
        assert st.patient_id not in text and st.study_uid not in text
    assert "notes.txt" not in text
    # the originals of quarantined objects are in the PHI zone, owner-only, with an index
    index = json.loads((tmp_path / "q" / "index.json").read_text())
    assert "notes.txt" in index.values()
    for q in s.quarantined:
        mode = stat.S_IMODE(os.stat(tmp_path / "q" / f"{q.id}.dcm").st_mode)
        assert mode == 0o600
    # nothing identifying in the outputs
    originals = {st.patient_id for st in studies} | {st.study_uid for st in studies}
    for p in (tmp_path / "out").rglob("*.dcm"):
        data = p.read_bytes()
        assert not any(o.encode() in data for o in originals)
        ds = pydicom.dcmread(p)
        assert ds.PatientIdentityRemoved == "YES" and ds.StudyInstanceUID.startswith("2.25.")


def test_crosswalk_is_owner_only_outside_out_dir_and_off_by_default(sample, tmp_path):
    root, studies = sample
    s = run_deidentify(root / "in", tmp_path / "out", [], KEY)
    assert s.crosswalk_path is None and not list(tmp_path.glob("*.csv"))
    cw = tmp_path / "phi" / "crosswalk.csv"
    s = run_deidentify(root / "in", tmp_path / "out2", [], KEY, crosswalk_path=cw)
    assert stat.S_IMODE(os.stat(cw).st_mode) == 0o600
    rows = cw.read_text().splitlines()
    assert rows[0] == "kind,pseudonym,original"
    deid = Deidentifier(KEY)
    written_patients = {st.patient_id for st in studies}
    assert any(f"patient,{deid.patient_ref(p)},{p}" in rows for p in written_patients)
    with pytest.raises(ValueError, match="outside OUT_DIR"):
        run_deidentify(root / "in", tmp_path / "out3", [], KEY, crosswalk_path=tmp_path / "out3" / "cw.csv")
    with pytest.raises(ValueError, match="outside OUT_DIR"):
        run_deidentify(root / "in", tmp_path / "out3", [], KEY, quarantine_dir=tmp_path / "out3" / "q")


def test_manifest_from_a_report():
    from pacsflow.tasks.deid.deidentifier import DeidReport
    from pacsflow.tasks.deid.manifest import QuarantinedObject

    r = DeidReport()
    r.count("X", 3)
    m = build_manifest(Deidentifier(KEY, pixel_policy="quarantine"), r, [QuarantinedObject("q-1", "bad")], 5)
    assert m["files"] == 6 and m["actions"] == {"X": 3} and m["quarantined"] == [{"id": "q-1", "reason": "bad"}]
    assert "| q-1 | bad |" in manifest_markdown(m)


def test_purge_older_than(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "a.dcm").write_bytes(b"x")
    new = tmp_path / "new"
    new.mkdir()
    (new / "b.dcm").write_bytes(b"x")
    past = time.time() - 10 * 86400
    os.utime(old / "a.dcm", (past, past))
    assert purge_older_than(tmp_path, 7) == 1
    assert not old.exists() and new.exists()
    assert purge_older_than(tmp_path / "missing", 7) == 0


def test_deid_settings_validate_options_and_policy():
    s = load_settings(deid={"options": ["Retain UIDs", "Clean Descriptors"], "pixel_policy": "mask",
                            "pixel_masks": [{"modality": "US", "regions": [[0, 0, 10, 10]]}]})
    assert s.deid.options == [Option.RETAIN_UIDS, Option.CLEAN_DESCRIPTORS]
    assert s.deid.pixel_policy is PixelPolicy.MASK
    d = Deidentifier.from_settings(b"k" * 20, s.deid)
    assert d.options == (Option.CLEAN_DESCRIPTORS, Option.RETAIN_UIDS)
    assert d.pixel_policy is PixelPolicy.MASK and d.audit
    assert s.deid.crosswalk_path is None
    with pytest.raises(SettingsError, match=r"deid\.options.*'Retain UIDs'"):  # the message lists the choices
        load_settings(deid={"options": ["Retain Everything"]})
    with pytest.raises(SettingsError, match=r"deid\.options.*full-dates"):
        load_settings(deid={"options": ["Retain Long. Full Dates", "Retain Long. Modified Dates"]})
    with pytest.raises(SettingsError, match=r"deid\.pixel_policy.*'ocr', 'quarantine', 'mask' or 'allow'"):
        load_settings(deid={"pixel_policy": "export"})
    with pytest.raises(SettingsError, match="deid.pixel_masks"):
        load_settings(deid={"pixel_masks": [{"regions": [[1, 2]]}]})


def test_update_crosswalk_merges_and_stays_owner_only(tmp_path):
    from pacsflow.tasks.deid.crosswalk import update_crosswalk

    cw = tmp_path / "phi" / "cw.csv"
    assert update_crosswalk(cw, [("study", "2.25.1", "1.2.3")]) == 1
    assert update_crosswalk(cw, [("study", "2.25.1", "1.2.3"), ("study", "2.25.2", "1.2.4")]) == 2
    assert stat.S_IMODE(os.stat(cw).st_mode) == 0o600
    assert cw.read_text().splitlines()[1:] == ["study,2.25.1,1.2.3", "study,2.25.2,1.2.4"]


# -- the command: `pacsflow deidentify` ------------------------------------------------------------

def _deidentify(*args: str):
    from typer.testing import CliRunner

    from pacsflow.flows.cli import app

    return CliRunner().invoke(app, ["deidentify", *map(str, args)])


def test_the_command_writes_what_run_deidentify_writes(sample, tmp_path, monkeypatch):
    root, _ = sample
    monkeypatch.delenv("PACSFLOW_DEID_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    result = _deidentify(root / "in", tmp_path / "cli", "--key-file", key_file, "-o", "Retain Long. Modified Dates",
                         "--quarantine-dir", tmp_path / "q")
    assert result.exit_code == 0, result.output
    direct = run_deidentify(root / "in", tmp_path / "direct", ["Retain Long. Modified Dates"], KEY)
    assert _tree(tmp_path / "cli") == _tree(tmp_path / "direct")
    assert f"written: {direct.written}" in result.output and KEY.decode() not in result.output
    assert (tmp_path / "q" / "index.json").exists()


def test_the_command_refuses_a_missing_or_short_key_with_status_2(sample, tmp_path, monkeypatch):
    root, _ = sample
    for name in ("PACSFLOW_DEID_KEY", "PACSFLOW_DEID_KEY_FILE", "PACSFLOW_DEID_KEY_BLOCK", "PACSFLOW_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    none = _deidentify(root / "in", tmp_path / "a")
    assert none.exit_code == 2 and "no de-identification key" in none.output
    short = tmp_path / "short"
    short.write_text("too-short")
    result = _deidentify(root / "in", tmp_path / "b", "--key-file", short)
    assert result.exit_code == 2 and "at least 16 characters" in result.output
    missing = _deidentify(root / "in", tmp_path / "c", "--key-file", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "--key-file: cannot read it" in missing.output
    inside = _deidentify(root / "in", tmp_path / "d", "--key-file", _write(tmp_path / "k", KEY),
                         "--crosswalk", tmp_path / "d" / "cw.csv")
    assert inside.exit_code == 2 and "outside OUT_DIR" in inside.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_command_keeps_the_crosswalk_in_postgresql_when_state_url_is_set(sample, tmp_path, monkeypatch,
                                                                            postgresql_url):
    from pacsflow.tasks.deid.crosswalk import CsvCrosswalk, DbCrosswalk

    root, _ = sample
    csv_path = tmp_path / "phi" / "cw.csv"
    monkeypatch.setenv("PACSFLOW_STATE__URL", postgresql_url)
    monkeypatch.setenv("PACSFLOW_DEID__CROSSWALK_PATH", str(csv_path))
    result = _deidentify(root / "in", tmp_path / "out", "--key-file", _write(tmp_path / "k", KEY))
    assert result.exit_code == 0, result.output
    assert not csv_path.exists()
    on_file = run_deidentify(root / "in", tmp_path / "direct", [], KEY, crosswalk_path=tmp_path / "direct.csv")
    assert on_file.crosswalk_path == str(tmp_path / "direct.csv")
    in_db = DbCrosswalk(postgresql_url).rows()
    assert in_db == CsvCrosswalk(tmp_path / "direct.csv").rows() and len(in_db) >= 2
