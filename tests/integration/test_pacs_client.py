"""Our PACS client against a real Orthanc, checked against DCMTK findscu on the same PACS."""

from __future__ import annotations

import datetime as dt
import re
import subprocess

import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.pacs.planning import Window, discover
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver, count_staged
from pacsflow.tasks.settings import load_settings
from tests.helpers import dcmtk_env, free_port

pytestmark = pytest.mark.integration
TODAY = dt.date.today()


def _settings(server, receiver_port=11113, **kw):
    return load_settings(
        pacs={"port": server.dicom_port, "http_url": server.rest_url},
        receiver={"port": receiver_port},
        deid_key="integration-key-0123456789",
        **kw,
    )


def _findscu_study_uids(server, date_range: str) -> set[str]:
    out = subprocess.run(
        ["findscu", "-S", "-aet", "DCMTK", "-aec", server.aet, "-k", "QueryRetrieveLevel=STUDY",
         "-k", "StudyInstanceUID", "-k", f"StudyDate={date_range}", "127.0.0.1", str(server.dicom_port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )
    assert out.returncode == 0, out.stderr[-500:]
    return set(re.findall(r"\(0020,000d\) UI \[([0-9.]+)", out.stdout + out.stderr))


def test_discovery_matches_findscu(orthanc, tmp_path):
    studies = sampledata.generate(tmp_path / "in", studies=9, days=6, end_date=TODAY, seed=41)
    sampledata.load([tmp_path / "in"], "127.0.0.1", orthanc.dicom_port)
    client = PacsClient(_settings(orthanc))
    window = Window(TODAY - dt.timedelta(days=10), TODAY)
    with client.query_session():
        found, warnings = discover(client.find_studies, window, None)
    ours = {s.study_uid for s in found}
    theirs = _findscu_study_uids(orthanc, f"{window.start:%Y%m%d}-{window.end:%Y%m%d}")
    assert ours == theirs == {s.study_uid for s in studies}
    counts = {s.study_uid: s.n_instances for s in found}
    assert counts == {s.study_uid: s.n_instances for s in studies}
    assert not warnings


def test_discovery_finds_everything_behind_orthancs_result_cap(orthanc_factory, tmp_path):
    server = orthanc_factory(limit_find_results=4)
    studies = sampledata.generate(tmp_path / "in", studies=13, days=1, end_date=TODAY, seed=43)
    sampledata.load([tmp_path / "in"], "127.0.0.1", server.dicom_port)
    client = PacsClient(_settings(server))
    plain = client.find_studies(f"{TODAY:%Y%m%d}")
    assert len(plain) == 4 and plain.capped  # what a naive query gets
    with client.query_session():
        found, warnings = discover(client.find_studies, Window(TODAY, TODAY), None)
    assert {s.study_uid for s in found} == {s.study_uid for s in studies}
    server.stop(graceful=False)


def test_series_level_count_matches_study_level(orthanc, tmp_path):
    [study] = sampledata.generate(tmp_path / "in", studies=1, days=1, end_date=TODAY, seed=45)
    sampledata.load([tmp_path / "in"], "127.0.0.1", orthanc.dicom_port)
    assert PacsClient(_settings(orthanc)).count_instances(study.study_uid) == study.n_instances


@pytest.mark.parametrize("method", ["c-move", "c-get"])
def test_retrieve_exact_counts(orthanc_factory, tmp_path, method):
    port = free_port()
    server = orthanc_factory(receiver_port=port)
    studies = sampledata.generate(tmp_path / "in", studies=2, days=1, end_date=TODAY, seed=47)
    sampledata.load([tmp_path / "in"], "127.0.0.1", server.dicom_port)
    settings = _settings(server, receiver_port=port, retrieve_method=method)
    client = PacsClient(settings)
    writer = StagingWriter(tmp_path / "staging", lambda uid: "s" + uid.rsplit(".", 1)[-1])
    writer.expect(s.study_uid for s in studies)
    for s in studies:
        if method == "c-move":
            with StorageReceiver.for_run(settings, writer):
                ops = client.move_study(s.study_uid, "PACSFLOW", "ref")
        else:
            ops = client.get_study(s.study_uid, writer.handle_store, "ref")
        assert ops.completed == s.n_instances
        assert count_staged(writer.study_dir(s.study_uid)) == s.n_instances
    server.stop(graceful=False)
