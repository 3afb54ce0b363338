"""``pacsflow migrate``: the migration workbench (``flows/migrate.py``; README "The migration workbench").

Each flow command runs its flow once in this process, tracked by the Prefect API of
``PREFECT_API_URL`` (a temporary server without one). ``pause``, ``resume`` and ``status`` only
touch the state database. Prefect loads only when a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pacsflow.tasks.settings import Settings

out = Console()
SourceOption = Annotated[Optional[str], typer.Option(help="the PACS: a name of the `sources` setting, or "
                                                     "`pacs` (the default)")]


def _in_prefect(call: Callable[[], Any]) -> Any:
    from pacsflow.flows.temporary_server import temporary_api

    with temporary_api():
        return call()


def print_inventory(result: dict[str, Any]) -> None:
    table = Table(title=f"inventory pass {result['pass']} of {result['source']} ({result['window']})")
    for column in ("year", "modality", "studies", "series", "instances"):
        table.add_column(column, justify="left" if column in ("year", "modality") else "right")
    for t in result["totals"]:
        table.add_row(t["year"], t["modality"], f"{t['studies']:,}", f"{t['series']:,}", f"{t['instances']:,}")
    out.print(table)
    out.print(f"estimate: {result['estimate']}")
    for key, what in (("added", "added since the previous pass"), ("changed", "changed after they were migrated")):
        out.print(f"{len(result[key])} studies {what}" + (": " + ", ".join(result[key]) if result[key] else ""))


def build_app(settings: Callable[[], Settings],
              day: Callable[[Optional[str], str], Optional[dt.date]]) -> typer.Typer:
    """``day(value, option)``: a YYYY-MM-DD or YYYYMMDD option as a date (the CLI root's parser)."""
    app = typer.Typer(help="Empty a legacy PACS into the lake: inventory, run in a window, reconcile.",
                      no_args_is_help=True)

    @app.command("inventory")
    def inventory(
        since: Annotated[Optional[str], typer.Option(help="first StudyDate (default: the previous pass's)")] = None,
        until: Annotated[Optional[str], typer.Option(help="last StudyDate (default: the previous pass's, or today)")]
        = None,
        source: SourceOption = None,
    ) -> None:
        """C-FIND the PACS's studies day by day and their series; print totals per year and modality,
        the volume and how long it takes, and the studies added or changed since."""
        first, last = day(since, "--since"), day(until, "--until")
        settings()
        from pacsflow.flows.migrate import migrate_inventory

        print_inventory(_in_prefect(lambda: migrate_inventory(first, last, source)))

    @app.command("run")
    def run(
        window: Annotated[str, typer.Option(help="local time HH:MM-HH:MM when the PACS may be used, or 'always'")],
        weekends: Annotated[bool, typer.Option("--weekends", help="Saturday and Sunday all day too")] = False,
        rate: Annotated[Optional[float], typer.Option(help="studies a minute at most, over all workers")] = None,
    ) -> None:
        """Start (or change) the migration: save its window and rate, not paused, and plan shards now if
        the window is open. The migrate-run deployment plans again on its schedule."""
        from pacsflow.tasks.migrate.control import MigrationConfig

        try:
            config = MigrationConfig(window, weekends, rate)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        run_settings = settings()
        from pacsflow.flows.migrate import migrate_run, migration_store

        migration_store(run_settings).save_config(config)
        out.print(f"migration: {config.describe()}")
        out.print(f"status: {_in_prefect(migrate_run)['status']}")

    def toggle(paused: bool) -> None:
        from pacsflow.flows.console import report_text
        from pacsflow.flows.migrate import migration_store

        try:
            config = migration_store(settings()).set_paused(paused)
        except LookupError as exc:
            report_text(str(exc))
            raise typer.Exit(1) from None
        out.print(f"migration: {config.describe()}")

    @app.command("pause")
    def pause() -> None:
        """Hold the migration: shards stop before their next retrieve, and no new ones start."""
        toggle(True)

    @app.command("resume")
    def resume() -> None:
        """Let the migration go on inside its window."""
        toggle(False)

    @app.command("status")
    def status() -> None:
        """The migration's window, rate and whether it may talk to the PACS now."""
        from pacsflow.flows.migrate import migration_store
        from pacsflow.tasks.migrate.control import decide

        config = migration_store(settings()).config()
        if config is None:
            out.print("no migration configured (pacsflow migrate run --window ...)")
            return
        out.print(f"migration: {config.describe()}; now: {decide(config, dt.datetime.now()).status}")

    @app.command("reconcile")
    def reconcile(
        sample: Annotated[Optional[float], typer.Option(min=0.0001, max=1.0, help="share of stored objects "
                                                        "whose SHA-256 is read again (default migrate.checksum_sample)")]
        = None,
        all_objects: Annotated[bool, typer.Option("--all", help="read every stored object again")] = False,
        source: SourceOption = None,
    ) -> None:
        """PACS vs retrieved vs cataloged per study and series, stored objects' SHA-256 re-checked; writes
        a CSV report and a progress chart. Exits 1 when something differs."""
        settings()
        from pacsflow.flows.migrate import migrate_reconcile

        result = _in_prefect(lambda: migrate_reconcile(1.0 if all_objects else sample, source))
        for k, v in result.items():
            out.print(f"{k}: {v}")
        if result["differences"] or result["checksum_findings"]:
            raise typer.Exit(1)

    return app
