"""The fake PACS answers our client as a PACS would: what other tests build on."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.core.errors import PacsStatusError, is_transient
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver, count_staged
from pacsflow.tasks.settings import load_settings
from tests.helpers import free_port
from tests.net.fake_pacs import FakePacs, held_files

DAY = dt.date(2026, 3, 10)


@pytest.fixture
def pacs(tmp_path):
    studies = sampledata.generate(tmp_path / "in", studies=3, days=3, end_date=DAY, seed=4, modalities=("CT", "MR"))
    with FakePacs() as pacs:
        pacs.add_files(held_files(tmp_path / "in"))
        yield pacs, studies


def _client(pacs: FakePacs) -> PacsClient:
    return PacsClient(load_settings(pacs={"port": pacs.port, "called_ae": pacs.ae_title, "timeout_s": 10}))


def test_study_find_matches_dates_and_counts_instances(pacs):
    pacs, studies = pacs
    client = _client(pacs)
    everything = client.find_studies(f"{DAY - dt.timedelta(days=5):%Y%m%d}-{DAY:%Y%m%d}")
    assert {(s.study_uid, s.n_instances, s.n_series) for s in everything} == {
        (s.study_uid, s.n_instances, s.n_series) for s in studies
    }
    [last] = [s for s in studies if s.study_date == DAY]
    assert [s.study_uid for s in client.find_studies(f"{DAY:%Y%m%d}")] == [last.study_uid]
    assert [s.study_uid for s in client.find_study(studies[0].study_uid)] == [studies[0].study_uid]
    assert client.find_study("1.2.3.4") == []


def test_move_stores_the_study_at_the_destination_and_get_returns_it(pacs, tmp_path):
    pacs, studies = pacs
    study = studies[0]
    port = free_port()
    pacs.add_destination("RECEIVER", port)
    writer = StagingWriter(tmp_path / "staging", lambda uid: "moved")
    writer.expect([study.study_uid])
    with StorageReceiver("RECEIVER", "127.0.0.1", port, writer, [pacs.ae_title]):
        ops = _client(pacs).move_study(study.study_uid, "RECEIVER", "2.25.1")
    assert ops.completed == study.n_instances == count_staged(tmp_path / "staging" / "moved")

    got = StagingWriter(tmp_path / "got", lambda uid: "got")
    got.expect([study.study_uid])
    ops = _client(pacs).get_study(study.study_uid, got.handle_store, "2.25.1")
    assert ops.completed == study.n_instances == count_staged(tmp_path / "got" / "got")
    assert pacs.retrieve_count(study.study_uid) == 2


def test_a_failing_study_answers_a_transient_failure_until_repaired(pacs, tmp_path):
    pacs, studies = pacs
    study = studies[1]
    pacs.fail_study(study.study_uid)
    got = StagingWriter(tmp_path / "got", lambda uid: "got")
    got.expect([study.study_uid])
    with pytest.raises(PacsStatusError) as exc:
        _client(pacs).get_study(study.study_uid, got.handle_store, "2.25.2")
    assert "0xC000" in str(exc.value) and is_transient(exc.value)
    assert count_staged(tmp_path / "got" / "got") == 0
    pacs.repair_study(study.study_uid)
    assert _client(pacs).get_study(study.study_uid, got.handle_store, "2.25.2").completed == study.n_instances
