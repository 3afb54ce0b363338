import datetime as dt

import pytest

from pacsflow.tasks.migrate.window import MigrationWindow, WindowError

MONDAY = dt.datetime(2026, 11, 30)


def at(day: dt.datetime, hhmm: str) -> dt.datetime:
    h, m = map(int, hhmm.split(":"))
    return day.replace(hour=h, minute=m)


def test_a_night_window_runs_over_midnight():
    w = MigrationWindow.parse("19:00-06:00")
    assert [w.is_open(at(MONDAY, t)) for t in ("18:59", "19:00", "23:59", "00:00", "05:59", "06:00", "12:00")] == [
        False, True, True, True, True, False, False]


def test_a_day_window_and_always():
    w = MigrationWindow.parse("08:30-12:00")
    assert [w.is_open(at(MONDAY, t)) for t in ("08:29", "08:30", "11:59", "12:00")] == [False, True, True, False]
    assert all(MigrationWindow.parse(text).is_open(at(MONDAY, "12:00")) for text in ("always", "00:00-24:00"))


def test_weekends_are_open_all_day_only_when_asked():
    saturday_noon = at(MONDAY + dt.timedelta(days=5), "12:00")
    assert not MigrationWindow.parse("19:00-06:00").is_open(saturday_noon)
    assert MigrationWindow.parse("19:00-06:00", weekends=True).is_open(saturday_noon)
    assert not MigrationWindow.parse("19:00-06:00", weekends=True).is_open(at(MONDAY, "12:00"))


def test_next_change_is_when_the_window_opens_or_closes():
    w = MigrationWindow.parse("19:00-06:00", weekends=True)
    assert w.next_change(at(MONDAY, "12:00")) == at(MONDAY, "19:00")
    assert w.next_change(at(MONDAY, "20:00")) == at(MONDAY + dt.timedelta(days=1), "06:00")
    friday_night = at(MONDAY + dt.timedelta(days=4), "20:00")
    assert w.next_change(friday_night) == at(MONDAY + dt.timedelta(days=7), "06:00")  # open through the weekend


@pytest.mark.parametrize("text", ["19:00", "7pm-6am", "19:00-19:00", "25:00-06:00", "19:60-06:00"])
def test_malformed_windows_name_the_option(text):
    with pytest.raises(WindowError, match="migrate window"):
        MigrationWindow.parse(text)
