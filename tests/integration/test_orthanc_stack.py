"""The local stack for real: Orthanc 1.10.1 + DCMTK tools + generated studies.

Nothing is mocked. Every test gets its own Orthanc (tmp work dir, free ports). DCMTK output is
only inspected for status lines, so no (synthetic) patient data ends up in failure messages.
"""

from __future__ import annotations

import json
import socket
import subprocess
from datetime import date
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from pacsflow.deployments.local import orthanc as orthanc_mod
from pacsflow.deployments.local import sampledata
from pacsflow.deployments.local.orthanc import OrthancServer, status, stop_by_pidfile
from pacsflow.deployments.local.sampledata import StudySummary
from tests.helpers import dcmtk_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HOST = "127.0.0.1"
SCRIPTS = Path(orthanc_mod.__file__).resolve().parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[StudySummary]]:
    out = tmp_path_factory.mktemp("corpus")
    summaries = sampledata.generate(out, studies=6, series_per_study=(2, 3), instances_per_series=(3, 6),
                                    days=3, end_date=date(2025, 2, 1), seed=11)
    return out, summaries


@pytest.fixture
def loaded(orthanc: OrthancServer, corpus: tuple[Path, list[StudySummary]]) -> list[StudySummary]:
    out, summaries = corpus
    sent = sampledata.load(out, HOST, orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="SEEDER")
    assert sent == sum(s.n_instances for s in summaries)
    return summaries


def dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env=dcmtk_env(), capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def status_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """Only the lines that carry DIMSE/association status (never identifiers)."""
    keys = ("Final", "Failed", "Cancel", "Association", "Peer", "DIMSE status")
    return [ln for ln in (proc.stdout + proc.stderr).splitlines()
            if any(k in ln for k in keys) and "(" not in ln[:12]]


def findscu_study_uids(server: OrthancServer, out_dir: Path, calling_ae: str = "DCMTK",
                       verbose: bool = False) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = dcmtk("findscu", *(["-v"] if verbose else []), "-S", "-aet", calling_ae, "-aec", server.aet,
                 "-X", "-od", str(out_dir), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                 "-k", "NumberOfStudyRelatedInstances", HOST, str(server.dicom_port))
    answers = [dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]
    return [str(a.StudyInstanceUID) for a in answers], proc


def movescu_study(server: OrthancServer, study_uid: str, dest: str = "DCMTK") -> subprocess.CompletedProcess[str]:
    return dcmtk("movescu", "-S", "-aet", "DCMTK", "-aec", server.aet, "-aem", dest,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", HOST, str(server.dicom_port))


def getscu_study(server: OrthancServer, study_uid: str, out_dir: Path,
                 calling_ae: str = "PACSFLOW") -> subprocess.CompletedProcess[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", "-S", "-aet", calling_ae, "-aec", server.aet, "-od", str(out_dir),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", HOST, str(server.dicom_port))


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# -- tests ----------------------------------------------------------------------------------------


def test_load_and_rest_counts(orthanc: OrthancServer, loaded: list[StudySummary]) -> None:
    assert orthanc.is_running()
    assert orthanc.study_count() == len(loaded) == len(orthanc.studies())
    assert orthanc.instance_count() == sum(s.n_instances for s in loaded)
    for s in loaded:
        oid = orthanc.find_study(s.study_uid)
        assert oid is not None
        assert len(orthanc.study_instances(s.study_uid)) == s.n_instances
    assert orthanc.find_study("1.2.3.4.5.6.7.8.9") is None
    # DICOMweb plugin answers QIDO-RS
    qido = orthanc.client.get("/dicom-web/studies")
    assert qido.status_code == 200 and len(qido.json()) == len(loaded)
    assert orthanc.delete_all() >= 1
    assert orthanc.study_count() == 0


def test_findscu_finds_every_study(orthanc: OrthancServer, loaded: list[StudySummary], tmp_path: Path) -> None:
    uids, proc = findscu_study_uids(orthanc, tmp_path / "find")
    assert proc.returncode == 0, status_lines(proc)
    assert sorted(uids) == sorted(s.study_uid for s in loaded)
    counts = {str(a.StudyInstanceUID): int(a.NumberOfStudyRelatedInstances)
              for a in map(dcmread, sorted((tmp_path / "find").glob("rsp*.dcm")))}
    assert counts == {s.study_uid: s.n_instances for s in loaded}


def test_only_registered_aes_may_query_or_store(orthanc: OrthancServer, loaded: list[StudySummary],
                                               corpus: tuple[Path, list[StudySummary]], tmp_path: Path) -> None:
    uids, proc = findscu_study_uids(orthanc, tmp_path / "find", calling_ae="STRANGER")
    assert uids == []
    assert any("Peer aborted" in ln for ln in status_lines(proc))
    out, summaries = corpus
    with pytest.raises(sampledata.LoadError):
        sampledata.load(summaries[0].path, HOST, orthanc.dicom_port, calling_ae="STRANGER")
    wrong_called = dcmtk("findscu", "-S", "-aet", "DCMTK", "-aec", "NOT_ORTHANC", "-k", "QueryRetrieveLevel=STUDY",
                         HOST, str(orthanc.dicom_port))
    assert any("Called AE Title Not Recognized" in ln for ln in wrong_called.stderr.splitlines())


def test_movescu_retrieves_exact_study(orthanc: OrthancServer, loaded: list[StudySummary], dcmtk_storescp) -> None:
    study = max(loaded, key=lambda s: s.n_instances)
    proc = movescu_study(orthanc, study.study_uid)
    assert proc.returncode == 0, status_lines(proc)
    received = dcmtk_storescp.files()
    assert len(received) == study.n_instances
    assert sop_uids(received) == {p.stem for p in study.path.rglob("*.dcm")}


def test_break_study_makes_retrieve_fail_and_repair_fixes_it(
    orthanc: OrthancServer, loaded: list[StudySummary], dcmtk_storescp, tmp_path: Path
) -> None:
    study, other = loaded[0], loaded[1]
    moved = orthanc.break_study(study.study_uid)
    assert moved == study.n_instances
    assert sum(p.is_file() for p in (orthanc.cfg.work_dir / "broken").rglob("*")) == moved  # kept, not deleted

    # C-MOVE: Orthanc answers Failed 0xC000 "UnableToProcess"; movescu exits non-zero.
    proc = movescu_study(orthanc, study.study_uid)
    assert proc.returncode != 0
    assert any("UnableToProcess" in ln for ln in status_lines(proc))
    assert dcmtk_storescp.files() == []

    # C-GET fails the same way (getscu 3.6.7 still exits 0: look at the status).
    got = getscu_study(orthanc, study.study_uid, tmp_path / "get-broken")
    assert any("UnableToProcess" in ln for ln in status_lines(got))
    assert list((tmp_path / "get-broken").iterdir()) == []

    # The study is still indexed and findable; other studies still move.
    uids, _ = findscu_study_uids(orthanc, tmp_path / "find")
    assert study.study_uid in uids
    assert movescu_study(orthanc, other.study_uid).returncode == 0
    assert len(dcmtk_storescp.files()) == other.n_instances
    dcmtk_storescp.clear()

    assert orthanc.repair_study(study.study_uid) == moved
    proc = movescu_study(orthanc, study.study_uid)
    assert proc.returncode == 0, status_lines(proc)
    assert len(dcmtk_storescp.files()) == study.n_instances

    got = getscu_study(orthanc, study.study_uid, tmp_path / "get-repaired")
    assert not any("Failed" in ln for ln in status_lines(got))
    assert sop_uids(sorted((tmp_path / "get-repaired").iterdir())) == {p.stem for p in study.path.rglob("*.dcm")}


def test_limit_find_results_caps_answers_with_cancel_status(orthanc_factory, corpus, tmp_path: Path) -> None:
    server = orthanc_factory(limit_find_results=3)
    try:
        out, summaries = corpus
        sampledata.load(out, HOST, server.dicom_port)
        uids, proc = findscu_study_uids(server, tmp_path / "find", verbose=True)
        assert len(uids) == 3 < len(summaries)
        finals = [ln for ln in proc.stderr.splitlines() if "Final Find Response" in ln]
        assert finals and "Cancel" in finals[-1]  # 0xFE00 MatchingTerminatedDueToCancelRequest
    finally:
        server.stop(graceful=False)


def test_receiver_port_is_registered(orthanc_factory) -> None:
    port = free_port()
    server = orthanc_factory(receiver_port=port)
    try:
        assert server.cfg.modalities["PACSFLOW"] == ("PACSFLOW", "127.0.0.1", port)
        mods = server.client.get("/modalities", params={"expand": ""}).json()
        assert mods["PACSFLOW"]["Port"] == port and mods["PACSFLOW"]["AET"] == "PACSFLOW"
        assert mods["PACSFLOW"]["AllowGet"] and mods["PACSFLOW"]["AllowMove"]
        config = json.loads(server.cfg.config_path.read_text())
        assert config["RemoteAccessAllowed"] is False and config["MaximumStorageCacheSize"] == 0
        assert config["DicomAlwaysAllowStore"] is False and config["DicomCheckModalityHost"] is True
    finally:
        server.stop(graceful=False)


def test_stop_really_stops(orthanc_factory) -> None:
    server = orthanc_factory()
    pid = server.pid
    assert pid is not None and server.is_running()
    assert status(server.cfg.work_dir)["healthy"] is True
    assert server.stop() is True  # graceful: SIGTERM, Orthanc exits on its own
    assert not server.is_running()
    assert not Path(f"/proc/{pid}").exists()
    assert not server.cfg.pid_path.exists()
    for port in (server.cfg.http_port, server.cfg.dicom_port):
        with pytest.raises(OSError):
            socket.create_connection((HOST, port), timeout=1).close()
    assert status(server.cfg.work_dir)["running"] is False
    assert server.stop() is False  # idempotent


def test_shell_scripts_start_status_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "stack"
    http, dicom = free_port(), free_port()
    args = ["--work-dir", str(work), "--dicom-port", str(dicom), "--http-port", str(http)]
    try:
        start = subprocess.run([str(SCRIPTS / "start-orthanc.sh"), *args], cwd="/", capture_output=True, text=True,
                               timeout=60)
        assert start.returncode == 0, start.stderr[-2000:]
        assert orthanc_mod.main(["status", "--work-dir", str(work)]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["running"] and st["healthy"] and st["http_port"] == http and st["dicom_port"] == dicom
        assert httpx.get(f"http://127.0.0.1:{http}/system", trust_env=False).status_code == 200
        stop = subprocess.run([str(SCRIPTS / "stop-orthanc.sh"), "--work-dir", str(work)], cwd="/",
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr[-2000:]
        assert orthanc_mod.main(["status", "--work-dir", str(work)]) == 3
        assert json.loads(capsys.readouterr().out)["running"] is False
    finally:
        stop_by_pidfile(work, graceful=False)
