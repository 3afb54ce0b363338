"""The state database layer on both engines: the same SQL, one writer at a time, secrets masked."""

from __future__ import annotations

import threading
import time

import pytest

from pacsflow.tasks.core.statedb import StateDb, StateUnavailable, check_url, mask_url
from tests.helpers import free_port

DDL = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    note  TEXT NOT NULL   -- 100% portable, no placeholder here
);
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path):
    """None (SQLite under tmp_path) or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgresql_url")


def test_same_sql_on_both_engines(tmp_path, state_url):
    db = StateDb(tmp_path / "s.sqlite", state_url, "demo", DDL)
    with db.tx() as tx:
        tx.executemany("INSERT INTO events(note) VALUES (?)", [("a",), ("b",)])
        tx.execute("INSERT INTO counters(name, value) VALUES (?, ?)", ("n", 1))
        tx.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                   "ON CONFLICT(name) DO UPDATE SET value = counters.value + excluded.value", ("n", 41))
    again = StateDb(tmp_path / "s.sqlite", state_url, "demo", DDL)  # a second opening keeps the rows
    with again.tx() as tx:
        assert tx.execute("SELECT id, note FROM events ORDER BY id").fetchall() == [(1, "a"), (2, "b")]
        assert tx.execute("SELECT value FROM counters WHERE name = ?", ("n",)).fetchone() == (42,)
        assert tx.execute("SELECT note FROM events WHERE note LIKE 'a%'").fetchall() == [("a",)]
        assert abs(tx.execute(f"SELECT {db.now}").fetchone()[0] - time.time()) < 5


def test_a_failed_block_leaves_nothing(tmp_path, state_url):
    db = StateDb(tmp_path / "s.sqlite", state_url, "demo", DDL)
    with pytest.raises(RuntimeError):
        with db.tx() as tx:
            tx.execute("INSERT INTO events(note) VALUES (?)", ("lost",))
            raise RuntimeError("crash in the middle")
    with db.tx() as tx:
        assert tx.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_read_modify_write_needs_no_retry(tmp_path, state_url):
    """Four threads, each its own connections, increment by reading then writing: no update is lost."""
    db = StateDb(tmp_path / "s.sqlite", state_url, "demo", DDL)
    with db.tx() as tx:
        tx.execute("INSERT INTO counters(name, value) VALUES ('n', 0)")

    def bump() -> None:
        for _ in range(25):
            with db.tx() as tx:
                value = tx.execute("SELECT value FROM counters WHERE name = 'n'").fetchone()[0]
                time.sleep(0.001)
                tx.execute("UPDATE counters SET value = ? WHERE name = 'n'", (value + 1,))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.tx() as tx:
        assert tx.execute("SELECT value FROM counters").fetchone() == (100,)


def test_each_store_has_its_own_schema(tmp_path, postgresql_url):
    one = StateDb(tmp_path / "one.sqlite", postgresql_url, "one", DDL)
    two = StateDb(tmp_path / "two.sqlite", postgresql_url, "two", DDL)
    with one.tx() as tx:
        tx.execute("INSERT INTO events(note) VALUES ('in one')")
    with two.tx() as tx:
        assert tx.execute("SELECT count(*) FROM events").fetchone() == (0,)
    with one.tx() as tx:
        assert tx.execute("SELECT count(*) FROM one.events").fetchone() == (1,)
    assert not (tmp_path / "one.sqlite").exists()


def test_an_unreachable_database_is_transient_and_its_password_never_shown(tmp_path, postgresql):
    down = f"postgresql://pacsflow:s3cret-pw@127.0.0.1:{free_port()}/pacsflow"
    with pytest.raises(StateUnavailable) as caught:
        StateDb(tmp_path / "s.sqlite", down, "demo", DDL)
    assert "s3cret-pw" not in str(caught.value) and "pacsflow:***@127.0.0.1" in str(caught.value)
    wrong = postgresql.url.replace(postgresql.password, "wr%40ng-pw")
    with pytest.raises(StateUnavailable, match="password authentication failed") as caught:
        StateDb(tmp_path / "s.sqlite", wrong, "demo", DDL)
    assert "wr%40ng" not in str(caught.value) and "wr@ng" not in str(caught.value)
    assert "***" in repr(StateDb(tmp_path / "s.sqlite", postgresql.url, "demo", DDL))


def test_urls_are_checked_and_masked():
    assert mask_url("postgresql://u:p%40ss@db:5432/x?password=q&sslmode=require") == (
        "postgresql://u:***@db:5432/x?password=***&sslmode=require")
    assert mask_url("postgresql://u@db/x") == "postgresql://u@db/x"
    check_url("postgres://db/x")
    with pytest.raises(ValueError) as caught:
        check_url("mysql://u:hidden@db/x")
    assert "hidden" not in str(caught.value)


def test_the_setting_defaults_to_sqlite_and_never_prints_the_password():
    from pacsflow.tasks.settings import SettingsError, load_settings

    assert load_settings().state.url is None
    settings = load_settings(state={"url": "postgresql://pacsflow:s3cret@db.example:5432/pacsflow"})
    assert "s3cret" not in settings.model_dump_json() and "s3cret" not in repr(settings)
    assert "pacsflow:***@db.example" in settings.model_dump_json()
    with pytest.raises(SettingsError, match="state.url") as caught:
        load_settings(state={"url": "mysql://pacsflow:s3cret@db.example/pacsflow"})
    assert "s3cret" not in str(caught.value)
