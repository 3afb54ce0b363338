"""PostgreSQL for the tests: Debian's server in a temp folder, on a free loopback port.

``postgresql`` (session) starts one server for the test session (``initdb``, then ``postgres`` with
its unix socket in the temp folder and TCP on 127.0.0.1 only) and stops it by its PID at the end. Its
``url`` is the database ``pacsflow`` of the role ``pacsflow``, which logs in with a password over TCP.
``postgresql_url`` (per test) is a fresh empty database on that server, so tests never see each
other's rows. Both skip, saying why, only when the server's programs are not installed.

tests/conftest.py defines them for every tier.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import free_port

ROLE = "pacsflow"
ADMIN = "pgadmin"  # the superuser initdb creates; reachable only through the socket in the temp folder


def server_bin() -> Path | None:
    """The folder of ``initdb``/``postgres``: on PATH, else the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@dataclass
class PostgresServer:
    bin: Path
    folder: Path
    port: int
    password: str
    uid: int | None  # the unprivileged user the server runs as when the tests run as root
    gid: int | None
    process: subprocess.Popen[bytes] | None = None
    databases: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "sock"

    @property
    def url(self) -> str:
        return self.url_of(ROLE)

    def url_of(self, database: str) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def as_server_user(self) -> dict[str, Any]:
        if self.uid is None:
            return {"cwd": self.folder}
        return {"cwd": self.folder, "user": self.uid, "group": self.gid, "extra_groups": []}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], **self.as_server_user(), capture_output=True,
                              text=True, timeout=120)

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=ADMIN, dbname="postgres",
                             autocommit=True) as con:
            con.execute(sql)

    def new_database(self) -> str:
        """A fresh database owned by the role: its URL."""
        name = f"t{next(self.databases)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url_of(name)

    def start(self) -> None:
        """The postmaster as our own child (``pg_ctl start`` would hand it to PID 1, which in some
        containers never reaps it); ready once the admin can connect through the socket."""
        for attempt in range(5):
            self.port = free_port()
            log = open(self.folder / "server.log", "ab")
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.socket_dir),
                 "-c", "listen_addresses=127.0.0.1",
                 # a test server: losing it on a power cut costs nothing, waiting for the disk does
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                **self.as_server_user(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            if self.wait_ready():
                return
            self.stop()
            if attempt == 4:
                tail = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"PostgreSQL did not start:\n{tail}")

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
            try:
                psycopg.connect(host=str(self.socket_dir), port=self.port, user=ADMIN, dbname="postgres",
                                connect_timeout=5).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by the server's PID; SIGKILL if it is still there after 30 s."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _server_user() -> tuple[int | None, int | None]:
    """initdb refuses root: as root, the server runs as ``postgres`` (Debian's package creates it) or nobody."""
    if os.geteuid() != 0:
        return None, None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and neither the postgres nor the nobody user exists")


def start_postgres() -> PostgresServer:
    """initdb into a new temp folder, start the server, create the role and its database."""
    bin_dir = server_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server programs (initdb, postgres) are not installed: apt-get install postgresql")
    uid, gid = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="pacsflow-pg-"))  # under /tmp: pytest's tmp dirs are root-only
    (folder / "sock").mkdir()
    if uid is not None:
        for path in (folder, folder / "sock"):
            os.chown(path, uid, gid if gid is not None else -1)
    server = PostgresServer(bin_dir, folder, 0, secrets.token_urlsafe(16), uid, gid)
    done = server.run("initdb", "-D", str(server.data), "-U", ADMIN, "--auth-local=trust",
                      "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync")
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {done.stderr.strip()}")
    try:
        server.start()
        server.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{server.password}'")
        server.admin(f"CREATE DATABASE {ROLE} OWNER {ROLE}")
    except BaseException:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql: PostgresServer) -> str:
    """A fresh, empty database of the session's server (its URL carries the role's password)."""
    return postgresql.new_database()
