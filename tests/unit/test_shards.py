import datetime as dt

import pytest

from pacsflow.tasks.ingest.shards import cut_shards, shard_watermark
from pacsflow.tasks.pacs.models import StudyInfo


def study(uid: str, date: str) -> StudyInfo:
    return StudyInfo(uid, date, 10, 1, ("CT",))


def test_one_shard_per_day_in_day_order_with_undated_last():
    plans = cut_shards([study("1.3", "20261130"), study("1.1", "20261129"), study("1.2", ""),
                        study("1.4", "20261129")], max_studies=10)
    assert [(p.key, p.study_uids) for p in plans] == [
        ("2026-11-29", ("1.1", "1.4")), ("2026-11-30", ("1.3",)), ("undated", ("1.2",))]


def test_a_busy_day_is_cut_into_even_parts_the_same_way_every_time():
    studies = [study(f"1.{n:03d}", "20261130") for n in range(25)]
    plans = cut_shards(studies, max_studies=10)
    assert [p.key for p in plans] == ["2026-11-30.1of3", "2026-11-30.2of3", "2026-11-30.3of3"]
    assert [len(p.study_uids) for p in plans] == [9, 9, 7]
    assert sorted(u for p in plans for u in p.study_uids) == sorted(s.study_uid for s in studies)
    assert cut_shards(list(reversed(studies)), max_studies=10) == plans


def test_a_study_reported_twice_is_in_one_shard_once():
    plans = cut_shards([study("1.1", "20261130"), study("1.1", "20261130")], max_studies=1)
    assert [(p.key, p.study_uids) for p in plans] == [("2026-11-30", ("1.1",))]


def test_shard_size_must_be_positive():
    with pytest.raises(ValueError, match="shard_max_studies"):
        cut_shards([study("1.1", "20261130")], max_studies=0)


def test_the_watermark_stops_at_the_first_day_with_an_unfinished_shard():
    end = dt.date(2026, 11, 30)
    assert shard_watermark(end, []) == end
    assert shard_watermark(end, [dt.date(2026, 11, 29), dt.date(2026, 11, 27)]) == dt.date(2026, 11, 27)
    assert shard_watermark(end, [None]) == end  # undated: retried by UID, holds nothing
