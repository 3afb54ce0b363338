"""The ``pacsflow`` command line: what people run by hand.

This root holds the commands that start flows (``run``, ``demo``) and ``settings``; the others
live beside what they drive and are mounted here: ``catalog`` (``catalog/cli.py``), ``stack``
(``deployments/local/cli.py``), ``deidentify`` (``tasks/deid/cli.py``) and ``xdsi``
(``tasks/xdsi/cli.py``). Every command reads the
same settings as the flows (``PACSFLOW_*`` env vars, or a YAML file named by ``PACSFLOW_CONFIG``);
``pacsflow settings`` shows them with secrets hidden. Heavy modules (Prefect, the flows, DuckDB,
the local stack) are imported when a command needs them, so ``--help`` answers at once.

A failing command prints one line and exits 2 (configuration) or 1 (run time); ``pacsflow --debug``
shows tracebacks instead (:mod:`pacsflow.flows.console`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from pacsflow.catalog import cli as catalog_cli
from pacsflow.deployments.local import cli as stack_cli
from pacsflow.flows import alerts_cli
from pacsflow.flows import console as errors_console
from pacsflow.flows import hl7 as hl7_cli
from pacsflow.flows import migrate_cli
from pacsflow.tasks import settings_cli
from pacsflow.tasks.deid import cli as deid_cli
from pacsflow.tasks.route import cli as route_cli
from pacsflow.tasks.web import cli as token_cli
from pacsflow.tasks.xdsi import cli as xdsi_cli

if TYPE_CHECKING:
    from pacsflow.tasks.settings import Settings

console = Console(stderr=True)
out = Console()

DEMO_KEY = Path("var/state/deid.key")

DEMO_QUERY = """
SELECT s.modality,
       count(DISTINCT s.study_uid)      AS studies,
       count(DISTINCT s.series_uid)     AS series,
       sum(s.number_of_instances)       AS instances,
       min(s.study_date)                AS first_study_date,
       max(s.study_date)                AS last_study_date
FROM series s
GROUP BY s.modality
ORDER BY s.modality
"""


def _settings(*, key: bool = False) -> Settings:
    """The settings every command uses; invalid ones end the command with exit status 2. With
    ``key``, the de-identification key must be readable too (before a run starts, not in it)."""
    from pacsflow.tasks.settings import SettingsError, load_settings

    try:
        settings = load_settings()
        if key and not settings.deid_key_block:  # a Secret block is read in the run, through Prefect
            settings.resolve_deid_key()
        return settings
    except SettingsError as exc:
        errors_console.fail(exc)


def _secret_block(name: str) -> Any:
    from pacsflow.flows.secrets import load_secret_block  # Prefect loads only when a block is named

    return load_secret_block(name)


app = typer.Typer(
    name="pacsflow",
    help="Nightly PACS → de-identified Parquet lake → FHIR, orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # one line per error; --debug turns tracebacks on
    pretty_exceptions_show_locals=False,  # locals may hold PHI or the key
)
run_app = typer.Typer(help="Run a flow once, in this process.", no_args_is_help=True)
app.add_typer(deid_cli.build_app(_settings, _secret_block))  # no name: `pacsflow deidentify`
app.add_typer(settings_cli.build_app())  # no name: `pacsflow init`
app.add_typer(stack_cli.build_app(_settings), name="stack")
app.add_typer(run_app, name="run")
app.add_typer(catalog_cli.build_app(lambda: (lambda s: s.catalog.reader(s.catalog_root))(_settings())), name="catalog")
app.add_typer(alerts_cli.build_app(), name="alerts")
app.add_typer(route_cli.app)  # `pacsflow route test|dry-run|status|retry|drop`
app.add_typer(token_cli.build_app(_settings), name="token")
app.add_typer(xdsi_cli.build_app(_settings), name="xdsi")  # `pacsflow xdsi status|check|consent`


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors (never locals)")] = False,
) -> None:
    """Nightly PACS → de-identified Parquet lake → FHIR, orchestrated by Prefect."""
    app.pretty_exceptions_enable = debug
    errors_console.show_tracebacks(debug)


def _print_result(result: dict) -> None:
    for k, v in result.items():
        out.print(f"{k}: {v}")


# -- run --------------------------------------------------------------------------------
def _parse_day(value: Optional[str], name: str) -> Optional[dt.date]:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value) if "-" in value else dt.datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise typer.BadParameter(f"{name}: expected YYYY-MM-DD or YYYYMMDD") from None


app.add_typer(migrate_cli.build_app(_settings, _parse_day), name="migrate")  # inventory|run|pause|resume|status|reconcile

@run_app.command("nightly")
def run_nightly_cmd(
    since: Annotated[Optional[str], typer.Option(help="window start (default: watermark minus overlap)")] = None,
    until: Annotated[Optional[str], typer.Option(help="window end (default: today)")] = None,
) -> None:
    """Run the nightly ingest once, now, with Prefect tracking the run."""
    window = {"since": _parse_day(since, "--since"), "until": _parse_day(until, "--until")}
    _settings(key=True)
    from pacsflow.flows.nightly import nightly_ingest, run_result
    from pacsflow.flows.temporary_server import temporary_api

    with temporary_api():
        result = run_result(nightly_ingest(**window, return_state=True))
    _print_result(result)
    raise typer.Exit(nightly_exit_code(result))


@run_app.command("plan")
def run_plan_cmd(
    since: Annotated[Optional[str], typer.Option(help="window start (default: watermark minus overlap)")] = None,
    until: Annotated[Optional[str], typer.Option(help="window end (default: today)")] = None,
    source: Annotated[Optional[str], typer.Option(help="plan this PACS only: a name of the `sources` setting, "
                                                  "or `pacs` (default: every PACS)")] = None,
) -> None:
    """Plan once, now: cut the window into shards and start an ingest-shard run per shard on the
    work pool of the Prefect server in PREFECT_API_URL (its workers do the work)."""
    first, last = _parse_day(since, "--since"), _parse_day(until, "--until")
    _settings(key=True)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise typer.BadParameter("set PREFECT_API_URL to the Prefect server whose workers run the shards",
                                 param_hint="PREFECT_API_URL")
    from pacsflow.flows.plan import plan

    _print_result(plan(since=first, until=last, source=source))


def nightly_exit_code(result: dict[str, Any]) -> int:
    """1 when a study failed or its FHIR or XDS-I.b copy did (the night is not done), else 0: scripts
    and schedulers that only see the exit status must not take a FHIR outage for success."""
    return 1 if result.get("failed") or result.get("fhir_failed") or result.get("xdsi_failed") else 0


@run_app.command("compact")
def run_compact() -> None:
    """Rewrite every catalog partition into one sorted file and delete unreferenced files."""
    from pacsflow.flows.compact import compact_catalog
    from pacsflow.flows.temporary_server import temporary_api

    with temporary_api():
        _print_result(compact_catalog())


@run_app.command("fhir-resync")
def run_fhir_resync(
    only_failed: Annotated[bool, typer.Option(help="only the studies whose last FHIR sync failed")] = False,
    force: Annotated[bool, typer.Option(help="send unchanged studies too (e.g. after the server was rebuilt)")]
    = False,
) -> None:
    """Send the catalog's studies to the FHIR server (ImagingStudy + Patient) once, now.

    Exits 1 when studies failed, the run stopped early, or reconciliation found differences."""
    settings = _settings()
    if not settings.fhir.base_url:
        console.print("[red]fhir.base_url is not set: set PACSFLOW_FHIR__BASE_URL (or fhir.base_url in "
                      "the PACSFLOW_CONFIG file)[/red]")
        raise typer.Exit(2)
    fhir_answers(settings)
    from pacsflow.flows.fhir_resync import fhir_resync
    from pacsflow.flows.temporary_server import temporary_api

    with temporary_api():
        result = fhir_resync(only_failed=only_failed, force=force)
    _print_result(result)
    if result.get("failed") or result.get("aborted") or result.get("differences"):
        stopped = f"; stopped by {result['aborted']}" if result.get("aborted") else ""
        errors_console.report_text(f"FHIR resync: {result.get('failed') or 0} studies failed, "
                                   f"{result.get('differences') or 0} differences{stopped}")
        raise typer.Exit(1)


@run_app.command("xdsi-publish")
def run_xdsi_publish(
    only_failed: Annotated[bool, typer.Option(help="only the studies whose last attempt failed, those a registry "
                                              "refused included (sent again although unchanged)")] = False,
) -> None:
    """Publish a KOS manifest per new or changed catalog study to the XDS.b repository (RAD-68) once, now.

    For a research affinity domain only: the patient ID is the pseudonym under xdsi.pseudonym_oid.
    Exits 1 when a study failed or the run stopped early (`pacsflow xdsi status --failed` lists why)."""
    from pacsflow.tasks.core.errors import XdsConfigurationError
    from pacsflow.tasks.xdsi.publish import check_publishable

    settings = _settings()
    try:
        check_publishable(settings.xdsi)
    except XdsConfigurationError as exc:
        errors_console.fail(exc)
    from pacsflow.flows.nightly import run_result
    from pacsflow.flows.temporary_server import temporary_api
    from pacsflow.flows.xdsi_publish import xdsi_publish

    with temporary_api():
        result = run_result(xdsi_publish(only_failed=only_failed, return_state=True))
    _print_result(result)
    if result.get("failed") or result.get("aborted"):
        stopped = f"; stopped by {result['aborted']}" if result.get("aborted") else ""
        errors_console.report_text(f"XDS-I.b publish: {result.get('failed') or 0} studies failed{stopped}")
        raise typer.Exit(1)


def fhir_answers(settings: Settings) -> None:
    """Before a run starts: the FHIR server answers at all (any HTTP answer will do; what it
    refuses, the run reports study by study). No answer, or a TLS failure, ends the command."""
    from pacsflow.tasks.core.errors import FhirRejected, PacsflowError
    from pacsflow.tasks.fhir.client import FhirClient

    try:
        with FhirClient.from_settings(settings.fhir, max_retries=min(settings.fhir.max_retries, 1)) as client:
            client.metadata()
    except FhirRejected as exc:
        if exc.status == 0:  # no HTTP answer: TLS trust or client certificate
            errors_console.fail(exc)
    except PacsflowError as exc:  # FhirUnavailable: no answer, or 5xx after the retries
        errors_console.fail(exc)


# -- listen -----------------------------------------------------------------------------
@app.command("listen")
def listen_cmd() -> None:
    """Run the DICOM listener and router until stopped (Ctrl-C or SIGTERM).

    Accepts C-STOREs from listener.allowed_aes on listener.host:port, routes each stable study by
    listener.rules_file (forward, annotate, ingest), delivers through a durable outbox and hands
    studies to the ingest-study flow with a Prefect event. `pacsflow route status` shows the outbox.
    """
    import threading

    from pacsflow.tasks.route.rules import RulesError

    settings = _settings(key=True)
    from pacsflow.flows.listen import serve

    signal.signal(signal.SIGTERM, _interrupt)  # a service stopped on purpose exits 0
    try:
        serve(settings, threading.Event())
    except RulesError as exc:
        errors_console.fail(exc)
    except KeyboardInterrupt:
        pass


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _hl7_listen(settings: Settings) -> None:
    """`pacsflow hl7 listen`: SIGTERM stops it cleanly with exit status 0, like `pacsflow listen`."""
    from pacsflow.tasks.core.errors import PacsflowError
    from pacsflow.tasks.settings import SettingsError

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        hl7_cli.serve(settings)
    except (PacsflowError, SettingsError) as exc:  # TLS files, FHIR settings, the key (research mode)
        errors_console.fail(exc)
    except KeyboardInterrupt:
        pass


app.add_typer(hl7_cli.build_app(_settings, _hl7_listen), name="hl7")  # `pacsflow hl7 listen|replay|status`


@app.command("serve")
def serve_cmd() -> None:
    """Serve DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over the lake, the study API and the dashboard.

    Binds serve.host:serve.port (HTTPS with serve.tls_cert); every request needs a bearer token
    made with `pacsflow token add`. Runs until Ctrl-C or SIGTERM.
    """
    settings = _settings()
    from pacsflow.flows.serve import serve

    try:
        serve(settings)
    except KeyboardInterrupt:
        pass


# -- demo -------------------------------------------------------------------------------
def demo_settings(settings: Settings, fhir_url: str | None, key_path: Path = DEMO_KEY) -> Settings:
    """``settings`` for the demo's run: a random key in ``key_path`` (made once, owner-only) unless
    a key is configured, and ``fhir_url`` as the FHIR server unless one is configured."""
    update: dict[str, Any] = {}
    if not (settings.deid_key or settings.deid_key_file or settings.deid_key_block):
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not key_path.exists():
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
            console.print(f"created a random de-identification key in {key_path} (demo only)")
        update["deid_key_file"] = key_path
    if fhir_url and not settings.fhir.base_url:
        update["fhir"] = settings.fhir.model_copy(update={"base_url": fhir_url})
    return settings.model_copy(update=update)


def _print_fhir_counts(base_url: str) -> None:
    from pacsflow.tasks.core.errors import PacsflowError, error_text
    from pacsflow.tasks.fhir.client import FhirClient

    console.rule("FHIR")
    with FhirClient(base_url, max_retries=1) as client:
        for resource in ("ImagingStudy", "Patient"):
            try:
                total = (client.get(resource, {"_summary": "count"}) or {}).get("total")
            except PacsflowError as exc:
                total = error_text(exc)
            out.print(f"{resource} resources on {base_url}: {total}")


@app.command()
def demo(
    studies: Annotated[int, typer.Option(min=1, help="studies to generate if Orthanc is empty")] = 12,
) -> None:
    """Local Orthanc + sample studies → one nightly run → a DuckDB query over the catalog.

    Starts the local Orthanc if needed, seeds it when empty, runs the nightly ingest once
    through Prefect, and prints studies, series and instances per modality."""
    settings = _settings()
    stack_cli.ensure_orthanc(settings, stack_cli.ORTHANC_DIR)
    run = demo_settings(settings, settings.fhir.base_url or stack_cli.ensure_fhir(stack_cli.FHIR_PORT))
    if not stack_cli.orthanc_status(stack_cli.ORTHANC_DIR).get("studies"):
        stack_cli.seed_studies(settings, studies=studies)
    console.rule("nightly ingest")
    from pacsflow.flows.nightly import nightly_ingest, run_result
    from pacsflow.flows.secrets import run_settings
    from pacsflow.flows.temporary_server import temporary_api

    with run_settings(run), temporary_api():  # a server that ends with this process, even on SIGKILL
        result = run_result(nightly_ingest(return_state=True))
    console.rule("result")
    _print_result(result)
    console.rule("catalog (DuckDB)")
    out.print(DEMO_QUERY.strip())
    catalog_cli.print_query(run.catalog_root, DEMO_QUERY)
    if run.fhir.base_url:
        _print_fhir_counts(run.fhir.base_url)
    console.print(
        f"catalog: {run.catalog_root}  lake: {run.storage_root}  "
        "(query it: pacsflow catalog query \"SELECT * FROM studies\"; stop the servers: pacsflow stack down)"
    )


@app.command("report")
def report(
    runs: Annotated[int, typer.Option("--nights", min=1, help="runs in the trend (the newest last)")] = 30,
    flow: Annotated[str, typer.Option(help="whose runs: nightly or sweep")] = "nightly",
) -> None:
    """Write the run report (an HTML page beside the catalog, under _reports/) from the run history
    and print its path."""
    settings = _settings()
    from pacsflow.flows.run_report import report_from_history

    page = report_from_history(settings, runs, flow)
    if page is None:
        errors_console.report_text(f"no run history in state_root {settings.state_root}: every run records one")
        raise typer.Exit(1)
    typer.echo(page)


@app.command("settings")
def show_settings(
    reference: Annotated[bool, typer.Option("--reference", help="print the table of every setting (README)")]
    = False,
) -> None:
    """Print the effective settings (secrets hidden)."""
    if reference:
        from pacsflow.tasks.settings_reference import reference_table

        typer.echo(reference_table(), nl=False)
        return
    out.print_json(_settings().model_dump_json(exclude={"deid_key"}))


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # An exception, not the default death: `finally` blocks and atexit run, so the run gives its
    # slots back and stops its workers and its temporary server. Inside a flow run Prefect turns
    # SIGTERM into its own exception first and sends it again once the run is marked crashed.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    errors_console.configure_console_logging(logging.INFO)
    for noisy in ("httpx", "httpcore", "pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Prefect's own defaults for a run from the command line (the user's environment wins).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    try:
        app(args=argv, prog_name="pacsflow")
    except Exception as exc:
        if errors_console.debugging():
            sys.excepthook(type(exc), exc, exc.__traceback__)  # typer's: the traceback, never locals
        else:
            errors_console.report(exc)
        sys.exit(errors_console.exit_status(exc))


if __name__ == "__main__":
    main(sys.argv[1:])
