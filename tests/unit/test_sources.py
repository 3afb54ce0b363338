"""More than one PACS per deployment (``settings.sources``): which PACS a study came from, and the
migration's inventory passes kept apart per PACS, on both engines."""

from __future__ import annotations

import datetime as dt

import pytest

from pacsflow.flows.migrate import of_source
from pacsflow.flows.plan import planned_sources
from pacsflow.tasks.ingest.leases import Leases
from pacsflow.tasks.ingest.ledger import LedgerEntry
from pacsflow.tasks.migrate.inventory import InventoryStudy, SeriesCount
from pacsflow.tasks.migrate.store import MigrationStore
from pacsflow.tasks.settings import SettingsError, load_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request) -> str | None:
    return None if request.param == "sqlite" else request.getfixturevalue("postgresql_url")


def entry(uid: str) -> LedgerEntry:
    return LedgerEntry(uid, f"p{uid}", "20261101", 3, "cataloged", None, False, 1)


def test_a_study_s_pacs_is_the_one_its_shard_names_and_the_first_without_a_shard(tmp_path, state_url):
    leases = Leases.under(tmp_path / "state", state_url)
    leases.add("2026-11-01", ["1.1"], dt.date(2026, 11, 1))
    leases.add("b/2026-11-01.1of2", ["2.1", "2.2"], dt.date(2026, 11, 1))
    leases.add("old-2/undated", ["3.1"])
    assert leases.shards_of(["1.1", "2.2", "3.1", "9.9"]) == {
        "1.1": "2026-11-01", "2.2": "b/2026-11-01.1of2", "3.1": "old-2/undated"}

    entries = {uid: entry(uid) for uid in ("1.1", "2.1", "2.2", "3.1", "9.9")}  # 9.9: a nightly run's
    settings = load_settings(state_root=tmp_path / "state", state={"url": state_url},
                             sources={"b": {"port": 4343}, "old-2": {"port": 4344}})
    assert sorted(of_source(settings, None, entries)) == ["1.1", "9.9"]
    assert sorted(of_source(settings, "b", entries)) == ["2.1", "2.2"]
    assert sorted(of_source(settings, "old-2", entries)) == ["3.1"]


def test_with_one_pacs_every_study_is_its_own_and_no_leases_table_is_made(tmp_path):
    settings = load_settings(state_root=tmp_path / "state")
    assert of_source(settings, None, {"1.1": entry("1.1")}) == {"1.1": entry("1.1")}
    assert not (tmp_path / "state").exists()


def test_each_pacs_keeps_its_own_inventory_passes(tmp_path, state_url):
    first, b = MigrationStore.under(tmp_path, state_url), MigrationStore.under(tmp_path, state_url, "old-2")
    day = dt.date(2026, 11, 1)
    first.record_pass(day, day, [InventoryStudy("1.1", "20261101", (SeriesCount("CT", 3, "1.1.1"),))])
    assert b.latest() is None
    done = b.record_pass(day, day, [InventoryStudy("2.1", "20261101", (SeriesCount("MR", 2, "2.1.1"),))])
    assert [s.study_uid for s in b.studies(done.id)] == ["2.1"]
    assert [s.study_uid for s in first.studies(first.latest().id)] == ["1.1"]


def test_a_plan_covers_every_pacs_the_first_one_first_or_the_one_named():
    settings = load_settings(sources={"old-2": {"port": 4344}, "b": {"port": 4343}})
    assert planned_sources(settings, None) == [None, "b", "old-2"]
    assert (planned_sources(settings, "pacs"), planned_sources(settings, "b")) == ([None], ["b"])
    assert planned_sources(load_settings(), None) == [None]  # one PACS: as before
    with pytest.raises(SettingsError, match="no PACS named 'c'"):
        planned_sources(settings, "c")
