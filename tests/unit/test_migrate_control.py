"""The migration's go/wait decision, its saved settings and inventory passes (SQLite and PostgreSQL)."""

import datetime as dt
import hashlib

import pytest

from pacsflow.flows.migrate import months
from pacsflow.tasks.migrate.control import (
    MigrationConfig, MigrationPaused, MigrationWindowClosed, decide, window_hours_a_day)
from pacsflow.tasks.migrate.inventory import InventoryStudy, SeriesCount, added_since, series_counts
from pacsflow.tasks.migrate.reconcile import (
    MISMATCH, MISSING, OK, ReconcileRow, StoredObject, check_objects, checksums_csv, progress_by_year, progress_chart)
from pacsflow.tasks.migrate.store import MigrationStore
from pacsflow.tasks.pacs.planning import Window

MONDAY_NOON = dt.datetime(2026, 11, 30, 12, 0)


def test_closed_window_says_when_it_opens_and_pause_wins_over_an_open_window():
    night = MigrationConfig("19:00-06:00")
    assert decide(night, MONDAY_NOON).status == "window closed until 19:00"
    assert decide(night, MONDAY_NOON.replace(hour=20)).go
    assert decide(MigrationConfig("19:00-06:00", weekends=True), MONDAY_NOON + dt.timedelta(days=5)).go
    saturday_noon = MONDAY_NOON + dt.timedelta(days=5)
    assert decide(MigrationConfig("08:00-09:00"), saturday_noon).status == "window closed until 08:00 on Sun 2026-12-06"
    paused = MigrationConfig("always", paused=True)
    assert decide(paused, MONDAY_NOON).status == "paused"
    with pytest.raises(MigrationPaused):
        decide(paused, MONDAY_NOON).raise_if_held()
    with pytest.raises(MigrationWindowClosed, match="window closed until 19:00"):
        decide(night, MONDAY_NOON).raise_if_held()
    decide(night, MONDAY_NOON.replace(hour=2)).raise_if_held()  # open: no error


def test_bad_windows_and_rates_are_refused_and_hours_a_day_follow_the_window():
    for window, rate in (("19:00", None), ("25:00-06:00", None), ("always", 0.0), ("always", -3.0)):
        with pytest.raises(ValueError):
            MigrationConfig(window, rate_per_min=rate)
    assert window_hours_a_day(None) == 24
    assert window_hours_a_day(MigrationConfig("19:00-06:00")) == pytest.approx(11)
    assert window_hours_a_day(MigrationConfig("19:00-06:00", weekends=True)) == pytest.approx((5 * 11 + 2 * 24) / 7,
                                                                                             abs=0.2)
    config = MigrationConfig("19:00-06:00", True, 12.5)
    assert MigrationConfig.from_json(config.to_json()) == config


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> MigrationStore:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgresql_url")
    return MigrationStore.under(tmp_path, url)


def test_the_store_keeps_passes_and_the_operators_settings(store):
    assert store.config() is None and store.latest() is None
    with pytest.raises(LookupError):
        store.set_paused(True)
    a = InventoryStudy("1.1", "20261130", (SeriesCount("CT", 10, "1.1.1"), SeriesCount("SR", 1, "1.1.2")))
    b = InventoryStudy("1.2", "20261129", ())
    first = store.record_pass(dt.date(2026, 11, 1), dt.date(2026, 11, 30), [a, b])
    assert (first.id, first.studies) == (store.latest().id, 2)
    assert sorted(store.studies(first.id), key=lambda s: s.study_uid) == [a, b]
    c = InventoryStudy("1.3", "20261130", (SeriesCount("MR", 4, "1.3.1"),))
    second = store.record_pass(dt.date(2026, 11, 1), dt.date(2026, 11, 30), [a, c])
    assert [p.id for p in store.passes()] == [first.id, second.id]
    assert added_since({s.study_uid for s in store.studies(first.id)}, store.studies(second.id)) == [c]

    store.save_config(MigrationConfig("19:00-06:00", rate_per_min=30))
    assert store.set_paused(True) == MigrationConfig("19:00-06:00", rate_per_min=30, paused=True)
    assert store.config().paused and not store.set_paused(False).paused


def test_series_counts_and_checksum_findings():
    a = InventoryStudy("1.1", "20261130", (SeriesCount("CT", 10, "1.1.1"), SeriesCount("SR", 1, "1.1.2")))
    assert series_counts([a]) == {"1.1": {"1.1.1": 10, "1.1.2": 1}}
    good, bad = hashlib.sha256(b"x").hexdigest(), hashlib.sha256(b"y").hexdigest()
    stored = {"/a": b"x", "/b": b"x"}
    objects = [StoredObject("S", "I1", "/a", good), StoredObject("S", "I2", "/b", bad),
               StoredObject("S", "I3", "/c", good)]
    findings = check_objects(objects, lambda p: hashlib.sha256(stored[p]).hexdigest() if p in stored else None)
    assert [(f.instance, f.status) for f in findings] == [("I2", MISMATCH), ("I3", MISSING)]
    assert checksums_csv(findings).splitlines() == ["study,instance,status", "S,I2,checksum mismatch", "S,I3,missing"]


def test_progress_counts_studies_that_add_up_per_year():
    rows = [ReconcileRow("P1", "", 3, 3, 3, 0, OK), ReconcileRow("P1", "X", 3, None, 3, 0, OK),
            ReconcileRow("P2", "", 3, None, 0, 0, "not cataloged"), ReconcileRow("P3", "", 1, 1, 1, 0, OK)]
    progress = progress_by_year({"P1": "2019", "P2": "2019", "P3": "2020"}, rows)
    assert [(p.year, p.on_pacs, p.migrated) for p in progress] == [("2019", 2, 1), ("2020", 1, 1)]
    chart = progress_chart(progress)
    assert list(chart.labels) == ["2019", "2020"] and [list(s.values) for s in chart.series] == [[2, 1], [1, 1]]


def test_an_inventory_asks_month_by_month():
    cut = months(Window(dt.date(2025, 12, 30), dt.date(2026, 3, 2)))
    assert [(w.start.isoformat(), w.end.isoformat()) for w in cut] == [
        ("2025-12-30", "2025-12-31"), ("2026-01-01", "2026-01-31"), ("2026-02-01", "2026-02-28"),
        ("2026-03-01", "2026-03-02")]
    assert len(months(Window(dt.date(2009, 1, 1), dt.date(2026, 11, 30)))) == 18 * 12 - 1
