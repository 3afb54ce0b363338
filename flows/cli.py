"""The ``pacsflow`` command line: what people run by hand.

Every command reads the same settings as the flows (``PACSFLOW_*`` env vars, or a YAML file
named by ``PACSFLOW_CONFIG``); ``pacsflow settings`` shows them with secrets hidden.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table

app = typer.Typer(
    name="pacsflow",
    help="Nightly PACS → de-identified Parquet lake → FHIR, orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold PHI or the key
)
stack_app = typer.Typer(help="The local Orthanc PACS and HAPI FHIR server used by the demo and the tests.",
                        no_args_is_help=True)
run_app = typer.Typer(help="Run a flow once, in this process.", no_args_is_help=True)
catalog_app = typer.Typer(help="Query and maintain the Parquet catalog.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(run_app, name="run")
app.add_typer(catalog_app, name="catalog")

console = Console(stderr=True)
out = Console()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_KEY = Path("var/state/deid.key")
FHIR_RUN_DIR = Path("var/fhir-server")
FHIR_PORT = 8090

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


def _settings():
    from pacsflow.tasks.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _orthanc_config(settings, work_dir: Path):
    from pacsflow.deployments.local.orthanc import OrthancConfig, default_modalities

    modalities = default_modalities()
    modalities["PACSFLOW"] = (settings.receiver.ae_title, settings.receiver.host, settings.receiver.port)
    http_port = int(settings.pacs.http_url.rsplit(":", 1)[-1].split("/")[0])
    return OrthancConfig(
        work_dir=work_dir,
        dicom_port=settings.pacs.port,
        http_port=http_port,
        aet=settings.pacs.called_ae,
        modalities=modalities,
        limit_find_results=settings.pacs.result_cap or 0,
    )


def _fhir_up(port: int) -> str | None:
    """Build (first time) and start the local HAPI FHIR server; its base URL, or None without Java."""
    from pacsflow.deployments import fhir_server

    url = fhir_server.base_url(port)
    if fhir_server.read_pid(FHIR_RUN_DIR) and fhir_server.is_ready(url):
        console.print(f"HAPI FHIR already running: {url}")
        return url
    if not fhir_server.java_available():
        console.print("[yellow]Java 17+ not found: the local HAPI FHIR server is not started, FHIR sync is skipped.[/yellow]")
        return None
    try:
        with console.status("building the HAPI FHIR server (first time: 1-2 minutes)…"):
            fhir_server.build()
        with console.status("starting HAPI FHIR (15-40 s)…"):
            handle = fhir_server.start(port, FHIR_RUN_DIR, data_dir=FHIR_RUN_DIR / "data")
    except fhir_server.FhirServerError as exc:
        console.print(f"[yellow]HAPI FHIR did not start; FHIR sync is skipped: {exc}[/yellow]")
        return None
    console.print(f"HAPI FHIR up: {handle.base_url} (pid {handle.pid})")
    return handle.base_url


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


def _print_table(table) -> None:
    t = Table(show_header=True, header_style="bold")
    for name in table.column_names:
        t.add_column(name)
    for row in table.to_pylist():
        t.add_row(*["" if v is None else str(v) for v in row.values()])
    out.print(t)


def _ensure_demo_key(settings) -> None:
    if settings.deid_key or settings.deid_key_file or settings.deid_key_block:
        return
    DEMO_KEY.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not DEMO_KEY.exists():
        fd = os.open(DEMO_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
        console.print(f"created a random de-identification key in {DEMO_KEY} (demo only)")
    os.environ["PACSFLOW_DEID_KEY_FILE"] = str(DEMO_KEY)


# -- stack ------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up(
    work_dir: Annotated[Path, typer.Option(help="Orthanc config, storage, PID and log")] = Path("var/orthanc"),
    fhir: Annotated[bool, typer.Option(help="also start the local HAPI FHIR server (needs Java 17+)")] = True,
    fhir_port: Annotated[int, typer.Option(help="HAPI FHIR port on 127.0.0.1")] = FHIR_PORT,
) -> None:
    """Start the local Orthanc (and HAPI FHIR when Java is present) on 127.0.0.1 and wait until they answer."""
    from pacsflow.deployments.local.orthanc import OrthancServer, status

    settings = _settings()
    if status(work_dir).get("running"):
        console.print(f"Orthanc already running ({work_dir})")
    else:
        with console.status("starting Orthanc…"):
            server = OrthancServer(_orthanc_config(settings, work_dir)).start()
        console.print(f"Orthanc up: DICOM {server.aet}@127.0.0.1:{server.dicom_port}, HTTP {server.rest_url} "
                      f"(pid {server.pid})")
    if fhir:
        _fhir_up(fhir_port)


@stack_app.command("down")
def stack_down(work_dir: Annotated[Path, typer.Option()] = Path("var/orthanc")) -> None:
    """Stop the local Orthanc and HAPI FHIR by their PID files."""
    from pacsflow.deployments.local.orthanc import stop_by_pidfile

    stopped = stop_by_pidfile(work_dir)
    console.print("Orthanc stopped" if stopped else "Orthanc was not running")
    from pacsflow.deployments import fhir_server

    console.print("HAPI FHIR stopped" if fhir_server.stop(FHIR_RUN_DIR) else "HAPI FHIR was not running")


@stack_app.command("status")
def stack_status(work_dir: Annotated[Path, typer.Option()] = Path("var/orthanc")) -> None:
    """Show whether the local Orthanc and HAPI FHIR run, with ports and counts."""
    from pacsflow.deployments.local.orthanc import status

    from pacsflow.deployments import fhir_server

    info = status(work_dir)
    for k, v in info.items():
        out.print(f"{k}: {v}")
    pid = fhir_server.read_pid(FHIR_RUN_DIR)
    url = fhir_server.base_url(FHIR_PORT)
    out.print(f"fhir: {'running, ' + url if pid and fhir_server.is_ready(url) else 'not running'}")
    if not info.get("running"):
        raise typer.Exit(1)


@stack_app.command("seed")
def stack_seed(
    studies: Annotated[int, typer.Option(min=1, help="number of studies to generate")] = 12,
    days: Annotated[int, typer.Option(min=1, help="spread over this many days ending today")] = 10,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same studies)")] = 0,
    out_dir: Annotated[Path, typer.Option(help="where generated files go")] = Path("var/sample"),
) -> None:
    """Generate realistic synthetic studies and push them into the local Orthanc with storescu."""
    from pacsflow.deployments.local import sampledata

    settings = _settings()
    with console.status(f"generating {studies} studies…"):
        summaries = sampledata.generate(out_dir, studies=studies, days=days, seed=seed)
    n = sum(s.n_instances for s in summaries)
    with console.status(f"sending {n} instances to Orthanc with storescu…"):
        sent = sampledata.load([out_dir], settings.pacs.host, settings.pacs.port, called_ae=settings.pacs.called_ae)
    console.print(f"seeded {len(summaries)} studies, {sent} instances")


# -- run --------------------------------------------------------------------------------
def _parse_day(value: Optional[str], name: str) -> Optional[dt.date]:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value) if "-" in value else dt.datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise typer.BadParameter(f"{name}: expected YYYY-MM-DD or YYYYMMDD") from None


def _print_result(result: dict) -> None:
    for k, v in result.items():
        out.print(f"{k}: {v}")


@run_app.command("nightly")
def run_nightly_cmd(
    since: Annotated[Optional[str], typer.Option(help="window start (default: watermark minus overlap)")] = None,
    until: Annotated[Optional[str], typer.Option(help="window end (default: today)")] = None,
) -> None:
    """Run the nightly ingest once, now, with Prefect tracking the run."""
    from pacsflow.flows.nightly import nightly_ingest

    _settings()
    result = nightly_ingest(since=_parse_day(since, "--since"), until=_parse_day(until, "--until"))
    _print_result(result)
    if result.get("failed"):
        raise typer.Exit(1)


@run_app.command("compact")
def run_compact() -> None:
    """Rewrite every catalog partition into one sorted file and delete unreferenced files."""
    from pacsflow.flows.compact import compact_catalog

    result = compact_catalog()
    _print_result(result)


@run_app.command("fhir-resync")
def run_fhir_resync(
    only_failed: Annotated[bool, typer.Option(help="only the studies whose last FHIR sync failed")] = False,
    force: Annotated[bool, typer.Option(help="send unchanged studies too (e.g. after the server was rebuilt)")]
    = False,
) -> None:
    """Send the catalog's studies to the FHIR server (ImagingStudy + Patient) once, now.

    Exits 1 when studies failed, the run stopped early, or reconciliation found differences."""
    from pacsflow.flows.fhir_resync import fhir_resync

    settings = _settings()
    if not settings.fhir.base_url:
        console.print("[red]fhir.base_url is not set: set PACSFLOW_FHIR__BASE_URL (or fhir.base_url in "
                      "the PACSFLOW_CONFIG file)[/red]")
        raise typer.Exit(2)
    result = fhir_resync(only_failed=only_failed, force=force)
    _print_result(result)
    if result.get("failed") or result.get("aborted") or result.get("differences"):
        raise typer.Exit(1)


# -- catalog ----------------------------------------------------------------------------
@catalog_app.command("query")
def catalog_query(
    sql: Annotated[str, typer.Argument(help="SQL over the views studies, series, instances")],
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="bound parameter ($1, $2, …)")] = None,
) -> None:
    """Run SQL over the catalog with DuckDB and print the result."""
    import duckdb

    from pacsflow.catalog.views import query

    settings = _settings()
    try:
        table = query(settings.catalog_root, sql, list(param) if param else None)
    except duckdb.Error as exc:
        console.print(f"[red]query failed:[/red] {exc}")
        raise typer.Exit(2) from None
    _print_table(table)


@catalog_app.command("views")
def catalog_views(
    db_path: Annotated[Path, typer.Argument(help="DuckDB database file to write")] = Path("var/lake/catalog.duckdb"),
) -> None:
    """Write a DuckDB database file with live views over the catalog, for the duckdb CLI or BI tools."""
    from pacsflow.catalog.views import write_views_database

    settings = _settings()
    path = write_views_database(settings.catalog_root, db_path)
    console.print(f"wrote {path}: open it with `duckdb -readonly {path}`")


@catalog_app.command("stats")
def catalog_stats() -> None:
    """Snapshot version, files and rows per table."""
    from pacsflow.catalog.store import CatalogStore

    settings = _settings()
    for k, v in CatalogStore(settings.catalog_root).stats().items():
        out.print(f"{k}: {v}")


# -- demo -------------------------------------------------------------------------------
@app.command()
def demo(
    studies: Annotated[int, typer.Option(min=1, help="studies to generate if Orthanc is empty")] = 12,
) -> None:
    """Local Orthanc + sample studies → one nightly run → a DuckDB query over the catalog.

    Starts the local Orthanc if needed, seeds it when empty, runs the nightly ingest once
    through Prefect, and prints studies, series and instances per modality."""
    from pacsflow.deployments.local.orthanc import OrthancServer, status

    settings = _settings()
    _ensure_demo_key(settings)
    work_dir = Path("var/orthanc")
    if not status(work_dir).get("running"):
        with console.status("starting Orthanc…"):
            OrthancServer(_orthanc_config(settings, work_dir)).start()
    console.print("Orthanc is up on 127.0.0.1")
    fhir_url = settings.fhir.base_url or _fhir_up(FHIR_PORT)
    if fhir_url:
        os.environ["PACSFLOW_FHIR__BASE_URL"] = fhir_url
    if not status(work_dir).get("studies"):
        stack_seed(studies=studies, days=10, seed=0, out_dir=Path("var/sample"))
    console.rule("nightly ingest")
    from pacsflow.flows.nightly import nightly_ingest

    result = nightly_ingest()
    console.rule("result")
    _print_result(result)
    console.rule("catalog (DuckDB)")
    out.print(DEMO_QUERY.strip())
    catalog_query(DEMO_QUERY, None)
    if fhir_url:
        _print_fhir_counts(fhir_url)
    console.print(
        f"catalog: {settings.catalog_root}  lake: {settings.storage_root}  "
        "(query it: pacsflow catalog query \"SELECT * FROM studies\"; stop the servers: pacsflow stack down)"
    )


@app.command("deidentify")
def deidentify_cmd(
    in_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="folder of DICOM files (recursive)")],
    out_dir: Annotated[Path, typer.Argument(help="de-identified files and deid-manifest.json")],
    option: Annotated[
        Optional[list[str]], typer.Option("--option", "-o", help="Table E.1-1 option (repeat); default: settings")
    ] = None,
    key_file: Annotated[Optional[Path], typer.Option(help="file holding the key; default: the settings' key")] = None,
    quarantine_dir: Annotated[
        Optional[Path], typer.Option(help="where objects that must not leave go (PHI; outside OUT_DIR)")
    ] = None,
    crosswalk: Annotated[
        Optional[Path], typer.Option(help="pseudonym <-> original CSV (PHI, 0600, outside OUT_DIR)")
    ] = None,
    pixel_policy: Annotated[Optional[str], typer.Option(help="quarantine | mask | allow; default: settings")] = None,
) -> None:
    """De-identify a folder with the configured profile, quarantine what must not leave, print a summary.

    The same key gives byte-identical outputs on every run."""
    from pacsflow.tasks.deid.folder import run_deidentify
    from pacsflow.tasks.core.errors import DeidentificationError
    from pacsflow.tasks.settings import SettingsError

    from pacsflow.flows.secrets import load_secret_block

    settings = _settings()
    try:
        if key_file is None:
            settings = settings.with_secret_blocks(load_secret_block)
        key = key_file.read_text(encoding="utf-8").strip().encode() if key_file else settings.resolve_deid_key()
    except OSError as exc:
        console.print(f"[red]--key-file: cannot read it ({type(exc).__name__})[/red]")
        raise typer.Exit(2) from None
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if len(key) < 16:
        console.print("[red]the key must be at least 16 characters[/red]")
        raise typer.Exit(2)
    try:
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console) as bar:
            task = bar.add_task("de-identifying", total=None)
            summary = run_deidentify(
                in_dir, out_dir, option or settings.deid.options, key,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                pixel_policy=pixel_policy or settings.deid.pixel_policy,
                pixel_masks=settings.deid.pixel_masks, audit=settings.deid.audit,
                quarantine_dir=quarantine_dir, crosswalk_path=crosswalk or settings.deid.crosswalk_path,
            )
    except (ValueError, DeidentificationError) as exc:  # our messages carry no PHI
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    for line in summary.lines():
        out.print(line)


@app.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets hidden)."""
    settings = _settings()
    out.print_json(settings.model_dump_json(exclude={"deid_key"}))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    app(args=argv, prog_name="pacsflow")

if __name__ == "__main__":
    main(sys.argv[1:])
