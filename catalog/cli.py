"""``pacsflow catalog``: SQL over the Parquet catalog, a DuckDB file of views, snapshot stats.

The catalog knows nothing of settings: the root command line tells it where the catalog is.
DuckDB and the store are imported when a command runs, so ``pacsflow --help`` stays fast.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import enum
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    import pyarrow as pa

console = Console(stderr=True)
out = Console()


class OutputFormat(str, enum.Enum):
    """How ``catalog query`` prints rows: a table for people, CSV or JSON for programs."""

    TABLE = "table"
    CSV = "csv"
    JSON = "json"


def rich_table(table: "pa.Table") -> Table:
    """An Arrow table as a rich table (NULL shown empty); long values wrap, never cut."""
    shown = Table(show_header=True, header_style="bold")
    for name in table.column_names:
        shown.add_column(name, overflow="fold")
    for row in table.to_pylist():
        shown.add_row(*["" if v is None else str(v) for v in row.values()])
    return shown


def _plain(value: Any) -> Any:
    """A value as JSON has it: dates and times in ISO 8601, decimals and bytes as text."""
    if isinstance(value, (_dt.date, _dt.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(table: "pa.Table", stream: Any) -> None:
    """One JSON array of objects, one per row, every value whole."""
    json.dump([_plain(row) for row in table.to_pylist()], stream, ensure_ascii=False, indent=1)
    stream.write("\n")


def write_csv(table: "pa.Table", stream: Any) -> None:
    """A header line and one line per row; NULL is an empty field, lists and structs are JSON text."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow([_csv_cell(v) for v in row.values()])


def _csv_cell(value: Any) -> str:
    plain = _plain(value)
    if plain is None:
        return ""
    if isinstance(plain, (list, dict)):
        return json.dumps(plain, ensure_ascii=False)
    return str(plain)


def print_query(
    catalog_root: Any, sql: str, params: list[str] | None = None, fmt: OutputFormat = OutputFormat.TABLE
) -> None:
    """Run ``sql`` (one SELECT) over the views ``studies``, ``series``, ``instances``; print the rows
    as ``fmt`` on standard output.

    SQL that would do more than read the catalog ends the command with exit status 2 and a
    one-line reason; SQL that DuckDB rejects, with exit status 2 and DuckDB's message."""
    import duckdb

    from pacsflow.catalog.views import QueryRefused, query

    try:
        table = query(catalog_root, sql, params)
    except QueryRefused as exc:
        _fail("query refused", exc)
    except duckdb.Error as exc:
        _fail("query failed", exc)
    if fmt is OutputFormat.CSV:
        write_csv(table, sys.stdout)
    elif fmt is OutputFormat.JSON:
        write_json(table, sys.stdout)
    else:
        out.print(rich_table(table))


def _fail(what: str, exc: Exception) -> NoReturn:
    # escaped: DuckDB messages quote the SQL, whose brackets rich would take for markup
    console.print(f"[red]{what}:[/red] {escape(str(exc).strip())}", soft_wrap=True)
    raise typer.Exit(2)


def build_app(catalog_root: Callable[[], Any]) -> typer.Typer:
    """The ``catalog`` commands; ``catalog_root()`` is asked for the catalog when one runs: its folder
    (the snapshot store) or an opened store (:func:`pacsflow.catalog.backends.open_store`)."""
    app = typer.Typer(help="Query and maintain the Parquet catalog.", no_args_is_help=True)

    @app.command("query")
    def catalog_query(
        sql: Annotated[str, typer.Argument(help="one SELECT over the views studies, series, instances")],
        param: Annotated[
            Optional[list[str]], typer.Option("--param", "-p", help="bound parameter ($1, $2, …)")
        ] = None,
        fmt: Annotated[
            OutputFormat,
            typer.Option("--format", "-f", help="table (for people), csv or json (every value whole)"),
        ] = OutputFormat.TABLE,
    ) -> None:
        """Run one SELECT over the catalog with DuckDB and print the result.

        Read-only: DuckDB may read the current snapshot's Parquet files and nothing else; COPY,
        ATTACH, INSTALL/LOAD, SET, writes and file functions on other paths are refused (exit 2)."""
        print_query(catalog_root(), sql, list(param) if param else None, fmt)

    @app.command("views")
    def catalog_views(
        db_path: Annotated[Path, typer.Argument(help="DuckDB database file to write")]
        = Path("var/lake/catalog.duckdb"),
    ) -> None:
        """Write a DuckDB database file with live views over the catalog, for the duckdb CLI or BI tools.

        For trusted analysts, not a sandbox: whoever opens the file keeps their own DuckDB's full
        access (COPY, ATTACH, reading any file they can). The views name only paths inside the
        catalog. For read-only SQL use `pacsflow catalog query`."""
        from pacsflow.catalog.views import write_views_database

        path = write_views_database(catalog_root(), db_path)
        console.print(f"wrote {path}: open it with `duckdb -readonly {path}`")

    @app.command("stats")
    def catalog_stats() -> None:
        """Snapshot version, files and rows per table."""
        from pacsflow.catalog.backends import CatalogBackend
        from pacsflow.catalog.store import CatalogStore

        catalog = catalog_root()
        store = catalog if isinstance(catalog, CatalogBackend) else CatalogStore(catalog)
        for k, v in store.stats().items():
            out.print(f"{k}: {v}")

    return app
