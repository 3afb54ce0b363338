import datetime as dt

import pytest

from pacsflow.tasks.migrate.inventory import (
    InventoryStudy, SeriesCount, Total, by_day, changed_since_migrated, estimate, totals)


def study(uid, date, *series):
    return InventoryStudy(uid, date, tuple(SeriesCount(m, n) for m, n in series))


STUDIES = [
    study("1.1", "20190105", ("CT", 100), ("CT", 50)),
    study("1.2", "20190620", ("CT", 10), ("SR", 1)),
    study("1.3", "20201231", ("MG", 4)),
    study("1.4", "", ("US", 7)),
    study("1.5", "20201231"),  # the PACS reported no series
]


def test_totals_per_year_and_modality():
    assert totals(STUDIES) == [
        Total("(none)", "US", 1, 1, 7),
        Total("2019", "CT", 2, 3, 160),
        Total("2019", "SR", 1, 1, 1),
        Total("2020", "(none)", 1, 0, 0),
        Total("2020", "MG", 1, 1, 4),
    ]


def test_estimate_uses_measured_sizes_over_defaults_and_the_window():
    rows = [Total("2019", "CT", 2, 3, 3600), Total("2019", "XX", 1, 1, 3600)]
    got = estimate(rows, instances_per_s=2.0, window_hours_a_day=10, bytes_per_instance={"CT": 500_000})
    assert got.instances == 7200
    assert got.bytes == 3600 * 500_000 + 3600 * 1_000_000  # XX: the fallback size
    assert got.hours == pytest.approx(1.0)
    assert got.days == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rate"):
        estimate(rows, instances_per_s=0, window_hours_a_day=10)


def test_a_later_pass_lists_studies_changed_after_migration():
    later = [study("1.1", "20190105", ("CT", 100), ("CT", 51)), study("1.2", "20190620", ("CT", 10), ("SR", 1)),
             study("1.9", "20190620", ("CT", 3))]
    changed = changed_since_migrated(later, {"1.1": 150, "1.2": 11})
    assert [s.study_uid for s in changed] == ["1.1"]


def test_counts_per_day():
    assert by_day(STUDIES)[dt.date(2020, 12, 31)] == (2, 4)
    assert by_day(STUDIES)[None] == (1, 7)
