"""The crosswalk on both homes: the CSV file (one machine) and its own PostgreSQL schema and role
(many writers at once; no other store's role can read it)."""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from pacsflow.tasks.deid.crosswalk import (
    SCHEMA_NAME,
    CsvCrosswalk,
    DbCrosswalk,
    crosswalk_role_sql,
    crosswalk_url,
    open_crosswalk,
)
from pacsflow.tasks.settings import load_settings
from tests.postgres import ADMIN

ROOT = Path(__file__).resolve().parents[2]


def phi_role(postgresql, url: str) -> str:
    """Runs crosswalk_role_sql as the administrator in the database of ``url`` (a role of its own
    per test: roles belong to the whole server); the PHI role's URL."""
    database = urlsplit(url).path.lstrip("/")
    role, password = f"phi_{database}_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    with psycopg.connect(host=str(postgresql.socket_dir), port=postgresql.port, user=ADMIN, dbname=database,
                         autocommit=True) as con:
        for statement in crosswalk_role_sql(database, role).split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute(f"ALTER ROLE {role} PASSWORD '{password}'")
    return f"postgresql://{role}:{password}@127.0.0.1:{postgresql.port}/{database}"


@pytest.fixture(params=["csv", "postgresql"])
def crosswalk(request, tmp_path):
    if request.param == "csv":
        return CsvCrosswalk(tmp_path / "phi" / "crosswalk.csv")
    url = request.getfixturevalue("postgresql_url")
    return DbCrosswalk(phi_role(request.getfixturevalue("postgresql"), url))


def test_rows_merge_once_on_both_homes(crosswalk):
    assert crosswalk.add([("study", "2.25.1", "1.2.3"), ("patient", "P1", "MRN-1")]) == 2
    assert crosswalk.add([("study", "2.25.1", "1.2.3"), ("study", "2.25.2", "1.2.4")]) == 3
    assert crosswalk.add([]) == 3
    assert crosswalk.rows() == [("patient", "P1", "MRN-1"), ("study", "2.25.1", "1.2.3"), ("study", "2.25.2", "1.2.4")]
    assert "***" in crosswalk.where or crosswalk.where.endswith("crosswalk.csv")


def test_the_crosswalk_follows_the_settings(tmp_path, postgresql_url):
    csv_path = tmp_path / "phi" / "cw.csv"
    assert open_crosswalk(load_settings(state_root=tmp_path / "s")) is None
    on_disk = open_crosswalk(load_settings(state_root=tmp_path / "s", deid={"crosswalk_path": csv_path}))
    assert isinstance(on_disk, CsvCrosswalk) and on_disk.path == csv_path
    # state.url alone keeps no crosswalk; with crosswalk_path it goes to PostgreSQL, not to the file
    assert crosswalk_url(load_settings(state_root=tmp_path / "s", state={"url": postgresql_url})) is None
    shared = load_settings(state_root=tmp_path / "s", state={"url": postgresql_url}, deid={"crosswalk_path": csv_path})
    assert crosswalk_url(shared) == postgresql_url
    in_db = open_crosswalk(shared)
    assert isinstance(in_db, DbCrosswalk)
    in_db.add([("study", "2.25.9", "1.2.9")])
    assert not csv_path.exists()
    own = load_settings(state_root=tmp_path / "s", state={"url": postgresql_url, "crosswalk_url": postgresql_url + "?a=1"})
    assert crosswalk_url(own) == postgresql_url + "?a=1"
    assert "crosswalk_url" in own.model_dump_json() and urlsplit(postgresql_url).password not in own.model_dump_json()


def test_the_other_stores_role_cannot_read_the_crosswalk(postgresql, postgresql_url):
    DbCrosswalk(phi_role(postgresql, postgresql_url)).add([("patient", "P1", "MRN-1")])
    with psycopg.connect(postgresql_url, autocommit=True) as con:  # the role of state.url (owns the database)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"permission denied for schema {SCHEMA_NAME}"):
            con.execute(f"SELECT * FROM {SCHEMA_NAME}.crosswalk")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"permission denied for schema {SCHEMA_NAME}"):
        DbCrosswalk(postgresql_url).add([("patient", "P2", "MRN-2")])


_WRITER = textwrap.dedent("""
    import sys
    from pacsflow.tasks.deid.crosswalk import DbCrosswalk
    cw, me = DbCrosswalk(sys.argv[1]), int(sys.argv[2])
    for batch in range(40):
        # half the rows are the other writer's too (one patient seen by two machines)
        rows = [("study", f"2.25.{batch}.{i}", f"1.2.{batch}.{i}") for i in range(10)]
        rows += [("patient", f"P{me}.{batch}.{i}", f"MRN-{me}-{batch}-{i}") for i in range(10)]
        cw.add(rows)
    print("done")
""")


@pytest.mark.timeout(120)
def test_two_processes_writing_at_once_lose_nothing(postgresql, postgresql_url):
    url = phi_role(postgresql, postgresql_url)
    DbCrosswalk(url)  # the table exists before the race on the rows starts
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, url, str(me)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for me in (1, 2)]
    outcomes = [p.communicate(timeout=100) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outcomes]
    rows = DbCrosswalk(url).rows()
    assert len(rows) == len(set(rows)) == 40 * 10 + 2 * 40 * 10
    assert {r for r in rows if r[0] == "patient" and r[1].startswith("P2.39.")} == {
        ("patient", f"P2.39.{i}", f"MRN-2-39-{i}") for i in range(10)}


def test_the_readme_shows_the_role_sql_as_the_helper_writes_it():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```postgresql\n", 1)[1].split("```", 1)[0]
    assert block.startswith(crosswalk_role_sql("pacsflow"))
    with pytest.raises(ValueError, match="identifier"):
        crosswalk_role_sql("pacsflow; DROP TABLE x")
