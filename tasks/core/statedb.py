"""The state database of one store (a ledger, the study leases): a SQLite file under ``state_root``
(one machine, the default) or a schema of a PostgreSQL database that several machines share.

A store writes its SQL once, in what both engines understand: ``?`` placeholders (no ``?`` or ``%``
inside string literals), ``INSERT ... ON CONFLICT DO UPDATE``, and ``INTEGER PRIMARY KEY
AUTOINCREMENT`` in its schema (an identity column on PostgreSQL). :meth:`StateDb.tx` gives one write
transaction that no other writer of the same store interleaves with: ``BEGIN IMMEDIATE`` on SQLite,
a transaction-scoped advisory lock per store on PostgreSQL, so a read-modify-write needs no retry
loop on either. ``serialized=False`` leaves PostgreSQL to row locks (``FOR UPDATE SKIP LOCKED``).

Only this module imports psycopg. A connection URL may carry a password: messages show it masked.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from pacsflow.tasks.core.errors import TransientError
from pacsflow.tasks.core.sqlite import open_sqlite, sqlite_tx

if TYPE_CHECKING:
    import psycopg

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
_SCHEMES = ("postgresql", "postgres")
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_AUTOINCREMENT = re.compile(r"INTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT", re.IGNORECASE)
# Epoch seconds by the database's clock (leases compare times written by different machines); one
# value per statement (per transaction on PostgreSQL), so a comparison with it can use an index.
_NOW = {SQLITE: "((julianday('now') - 2440587.5) * 86400.0)",
        POSTGRESQL: "extract(epoch FROM now())::double precision"}


class StateUnavailable(TransientError):
    """The state database refused a connection or a statement for a reason that may pass (down, restarting)."""

    reason = "state-unavailable"


class Rows(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """What a store uses inside a transaction: sqlite3's connection API, on either engine."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Rows: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...


#: Values per ``IN (...)`` list: far below SQLite's and PostgreSQL's limits on bound parameters.
IN_LIST_SIZE = 500


def in_lists(values: Iterable[str], size: int = IN_LIST_SIZE) -> Iterator[tuple[str, list[str]]]:
    """``values`` in parts for ``... IN ({placeholders})``: each part's ``?, ?, ...`` and its values."""
    items = list(values)
    for i in range(0, len(items), size):
        part = items[i : i + size]
        yield ", ".join("?" * len(part)), part


def check_url(url: str) -> None:
    """A ``postgresql://`` URL, or ValueError (whose message never repeats the URL)."""
    if urlsplit(url).scheme not in _SCHEMES:
        raise ValueError("must be a postgresql:// URL (unset: SQLite files under state_root)")


def mask_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets_of(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += re.findall(r"(?:^|&)password=([^&]*)", parts.query)
    return [s for raw in found if raw for s in {raw, unquote(raw)}]


class StateDb:
    """One store's tables: ``sqlite_path`` when ``url`` is None, else the schema ``schema`` at ``url``."""

    def __init__(self, sqlite_path: Path, url: str | None, schema: str, ddl: str) -> None:
        if not _IDENTIFIER.fullmatch(schema):
            raise ValueError(f"not a schema name: {schema!r}")
        self.path = Path(sqlite_path)
        self.url = url
        self.schema = schema
        self.engine = SQLITE if url is None else POSTGRESQL
        if url is None:
            open_sqlite(self.path, ddl)
            return
        check_url(url)
        self._lock_key = int.from_bytes(hashlib.sha256(f"pacsflow:{schema}".encode()).digest()[:8], "big",
                                        signed=True)
        with self.tx() as tx:  # the store's lock: two processes creating the tables at once would collide
            # CREATE SCHEMA needs CREATE on the database even when the schema exists: a role given
            # only its own schema (the crosswalk's) must not have to ask for it
            if tx.execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", [schema]).fetchone() is None:
                tx.execute(f"CREATE SCHEMA {schema}")
            for statement in _AUTOINCREMENT.sub("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", ddl).split(";"):
                if statement.strip():
                    tx.execute(statement)

    def __repr__(self) -> str:
        where = self.path if self.url is None else f"{mask_url(self.url)} schema {self.schema}"
        return f"StateDb({where})"

    @property
    def now(self) -> str:
        """An SQL expression: seconds since the epoch by the database's clock (a float)."""
        return _NOW[self.engine]

    @property
    def skip_locked(self) -> str:
        """The clause that makes a SELECT lock the rows it returns and pass over rows other
        transactions hold (SQLite has one writer at a time, so it needs none)."""
        return " FOR UPDATE SKIP LOCKED" if self.engine == POSTGRESQL else ""

    @contextmanager
    def tx(self, *, serialized: bool = True) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        if self.url is None:
            with sqlite_tx(self.path) as con:
                yield con
            return
        with self._pg_connection() as con:
            try:
                with con.transaction():
                    if serialized:
                        con.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                    yield _PgTx(con)
            except _pg_errors() as exc:
                raise self._unavailable(exc) from None

    @contextmanager
    def _pg_connection(self) -> Iterator[psycopg.Connection[Any]]:
        import psycopg

        assert self.url is not None
        try:
            con = psycopg.connect(self.url, options=f"-c search_path={self.schema}", connect_timeout=30,
                                  autocommit=True)
        except psycopg.Error as exc:
            raise self._unavailable(exc) from None
        try:
            yield con
        finally:
            con.close()

    def _unavailable(self, exc: BaseException) -> StateUnavailable:
        assert self.url is not None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for secret in _secrets_of(self.url):
            text = text.replace(secret, "***")
        return StateUnavailable(f"state database {mask_url(self.url)}: {type(exc).__name__}: {text}")


def _pg_errors() -> tuple[type[BaseException], ...]:
    """The psycopg errors that may pass by themselves; a wrong statement (ProgrammingError) is a bug, raised as is."""
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError)


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    """A psycopg connection behind sqlite3's ``execute``/``executemany``."""

    def __init__(self, con: psycopg.Connection[Any]) -> None:
        self._con = con

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Rows:
        if not params:  # no parameters: psycopg reads no placeholders, so % stays as written
            return self._con.execute(sql)
        return self._con.execute(_pg_sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any:
        rows = [tuple(r) for r in rows]
        if not rows:
            return None
        with self._con.cursor() as cur:
            cur.executemany(_pg_sql(sql), rows)
        return None

