import datetime as dt

import pytest

from pacsflow.tasks.ingest.leases import ShardProgress
from pacsflow.tasks.ingest.ledger import LedgerEntry
from pacsflow.tasks.ingest.shards import (
    RunSeen,
    cut_shards,
    settled_claims,
    shard_key,
    shard_watermark,
    shards_to_start,
    source_of,
    source_watermarks,
    watermark_name,
)
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


def test_a_named_source_s_shards_carry_its_name_and_the_default_pacs_keeps_bare_keys():
    studies = [study(f"1.{n}", "20261130") for n in range(3)] + [study("1.9", "")]
    assert [p.key for p in cut_shards(studies, max_studies=2, source="b")] == [
        "b/2026-11-30.1of2", "b/2026-11-30.2of2", "b/undated"]
    assert [p.key for p in cut_shards(studies, max_studies=2)] == ["2026-11-30.1of2", "2026-11-30.2of2", "undated"]
    assert shard_key(dt.date(2026, 11, 1), 2, 3, "old-2") == "old-2/2026-11-01.2of3"


@pytest.mark.parametrize("key, source", [("2026-11-01", None), ("2026-11-01.2of3", None), ("undated", None),
                                         ("b/2026-11-01.2of3", "b"), ("old-2/undated", "old-2")])
def test_the_source_of_a_shard_is_read_from_its_key(key, source):
    assert source_of(key) == source


def test_each_source_keeps_its_own_watermark_row_and_moves_it_past_its_own_shards_only():
    assert (watermark_name(None), watermark_name("b")) == ("watermark", "watermark:b")
    end = dt.date(2026, 11, 30)
    unfinished = [ShardProgress("b/2026-11-27", dt.date(2026, 11, 27), 4, 0, 0),
                  ShardProgress("2026-11-29", dt.date(2026, 11, 29), 4, 1, 0),
                  ShardProgress("b/undated", None, 4, 0, 0)]
    assert source_watermarks({None: end, "b": end, "c": dt.date(2026, 11, 20)}, unfinished) == {
        None: dt.date(2026, 11, 29), "b": dt.date(2026, 11, 27), "c": dt.date(2026, 11, 20)}


def progress(shard: str, studies: int = 4, done: int = 0, held: int = 0, expired: int = 0) -> ShardProgress:
    return ShardProgress(shard, dt.date(2026, 11, 30), studies, done, held, expired)


def test_which_shards_get_a_run_and_why():
    shards = [progress("new"), progress("finished", done=4), progress("gone"), progress("crashed"),
              progress("failed-but-held", held=1), progress("running", held=2), progress("stale", expired=3),
              progress("running-long-never-claimed"), progress("just-started"), progress("waiting-for-a-worker"),
              progress("completed-with-work-left", done=2)]
    runs = {"finished": RunSeen("COMPLETED", 5), "gone": None, "crashed": RunSeen("CRASHED", 1),
            "failed-but-held": RunSeen("FAILED", 1), "running": RunSeen("RUNNING", 100),
            "stale": RunSeen("RUNNING", 5), "running-long-never-claimed": RunSeen("PENDING", 61),
            "just-started": RunSeen("RUNNING", 3), "waiting-for-a-worker": RunSeen("LATE", 500),
            "completed-with-work-left": RunSeen("COMPLETED", 5)}
    starts = shards_to_start(shards, runs, lease_s=60)
    assert [(s.shard, s.why) for s in starts] == [
        ("new", "new"), ("gone", "gone"), ("crashed", "crashed"), ("stale", "stale"),
        ("running-long-never-claimed", "stale"), ("completed-with-work-left", "completed")]


def test_a_shard_run_settles_its_claims_from_the_ledger():
    def entry(uid: str, status: str, permanent: bool = False) -> LedgerEntry:
        return LedgerEntry(uid, "p" + uid, "20261130", 3, status, None, permanent, 1)

    ledger = {"1.1": entry("1.1", "cataloged"), "1.2": entry("1.2", "failed"),
              "1.3": entry("1.3", "failed", permanent=True), "1.5": entry("1.5", "cataloged")}
    claimed = ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6"]
    # 1.5 was not planned (cataloged with the PACS's count), 1.6 neither (gone from the PACS);
    # 1.4 was planned and never reached the ledger (interrupted)
    done, back = settled_claims(claimed, ["1.1", "1.2", "1.3", "1.4"], ledger)
    assert done == ["1.1", "1.3", "1.5", "1.6"] and back == ["1.2", "1.4"]
