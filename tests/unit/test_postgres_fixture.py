"""The PostgreSQL the state tests run against: a real server, password-only over loopback TCP."""

from __future__ import annotations

import os

import psycopg
import pytest



def test_the_role_logs_in_with_its_password_only(postgresql):
    with psycopg.connect(postgresql.url) as con:
        assert con.execute("SELECT current_user, current_database()").fetchone() == ("pacsflow", "pacsflow")
    wrong = postgresql.url.replace(postgresql.password, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()


def test_the_server_listens_on_loopback_only_and_never_as_root(postgresql):
    with psycopg.connect(postgresql.url) as con:
        assert con.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    assert (postgresql.socket_dir / f".s.PGSQL.{postgresql.port}").is_socket()
    owner = os.stat(f"/proc/{postgresql.process.pid}").st_uid
    assert owner != 0 and owner == os.stat(postgresql.data).st_uid


def test_each_test_gets_its_own_empty_database(postgresql, postgresql_url):
    with psycopg.connect(postgresql_url) as con:
        con.execute("CREATE TABLE t (x int)")
    other = postgresql.new_database()
    assert other != postgresql_url
    with psycopg.connect(other) as con:
        assert con.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
