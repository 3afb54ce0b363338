"""``pacsflow stack``: the local Orthanc PACS and HAPI FHIR server, and sample studies for them.

The public functions are also what ``pacsflow demo`` drives. Orthanc, the FHIR server and the
sample generator are imported when a command runs, so the other commands never load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

import typer
from rich.console import Console

if TYPE_CHECKING:
    from pacsflow.deployments.local.orthanc import OrthancConfig
    from pacsflow.tasks.settings import Settings

console = Console(stderr=True)
out = Console()

ORTHANC_DIR = Path("var/orthanc")
FHIR_RUN_DIR = Path("var/fhir-server")
FHIR_PORT = 8090
SAMPLE_DIR = Path("var/sample")


def orthanc_config(settings: Settings, work_dir: Path) -> OrthancConfig:
    """Orthanc answering on the PACS address of ``settings``, with our receiver as a C-MOVE destination."""
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


def orthanc_status(work_dir: Path) -> dict:
    """Whether the Orthanc of ``work_dir`` runs, its ports and (when it answers) its counts."""
    from pacsflow.deployments.local.orthanc import status

    return status(work_dir)


def ensure_orthanc(settings: Settings, work_dir: Path) -> None:
    """Start the local Orthanc unless it already runs from ``work_dir``; wait until it answers."""
    from pacsflow.deployments.local.orthanc import OrthancServer

    if orthanc_status(work_dir).get("running"):
        console.print(f"Orthanc already running ({work_dir})")
        return
    with console.status("starting Orthanc…"):
        server = OrthancServer(orthanc_config(settings, work_dir)).start()
    console.print(f"Orthanc up: DICOM {server.aet}@127.0.0.1:{server.dicom_port}, HTTP {server.rest_url} "
                  f"(pid {server.pid})")


def running_fhir_url(run_dir: Path = FHIR_RUN_DIR) -> str | None:
    """The base URL of the local HAPI FHIR server started from ``run_dir`` when it answers, else None.

    Read from the URL file its start script leaves in ``run_dir`` once the server is ready, so the
    answer holds for whatever port ``stack up --fhir-port`` chose."""
    from pacsflow.deployments import fhir_server

    if not fhir_server.read_pid(run_dir):
        return None
    try:
        url = (run_dir / fhir_server.URL_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        return None  # still starting, or a start that failed
    return url if url and fhir_server.is_ready(url) else None


def ensure_fhir(port: int = FHIR_PORT) -> str | None:
    """Build (first time) and start the local HAPI FHIR server; its base URL, or None when it cannot run."""
    from pacsflow.deployments import fhir_server

    running = running_fhir_url()
    if running:
        moved = "" if running == fhir_server.base_url(port) else f" (not port {port}: `stack down` first to move it)"
        console.print(f"HAPI FHIR already running: {running}{moved}")
        return running
    if not fhir_server.java_available():
        console.print("[yellow]Java 17+ not found: the local HAPI FHIR server is not started, "
                      "FHIR sync is skipped.[/yellow]")
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


def seed_studies(settings: Settings, studies: int = 12, days: int = 10, seed: int = 0,
                 out_dir: Path = SAMPLE_DIR) -> None:
    """Generate ``studies`` synthetic studies into ``out_dir`` and send them to the PACS of ``settings``."""
    from pacsflow.deployments.local import sampledata

    with console.status(f"generating {studies} studies…"):
        summaries = sampledata.generate(out_dir, studies=studies, days=days, seed=seed)
    n = sum(s.n_instances for s in summaries)
    with console.status(f"sending {n} instances to Orthanc with storescu…"):
        sent = sampledata.load([out_dir], settings.pacs.host, settings.pacs.port, called_ae=settings.pacs.called_ae)
    console.print(f"seeded {len(summaries)} studies, {sent} instances")


def _print_status(work_dir: Path) -> bool:
    """Print the state of both servers; True when Orthanc runs."""
    info = orthanc_status(work_dir)
    for k, v in info.items():
        out.print(f"{k}: {v}")
    url = running_fhir_url()
    out.print(f"fhir: {'running, ' + url if url else 'not running'}")
    return bool(info.get("running"))


def _stop(work_dir: Path) -> None:
    from pacsflow.deployments import fhir_server
    from pacsflow.deployments.local.orthanc import stop_by_pidfile

    console.print("Orthanc stopped" if stop_by_pidfile(work_dir) else "Orthanc was not running")
    console.print("HAPI FHIR stopped" if fhir_server.stop(FHIR_RUN_DIR) else "HAPI FHIR was not running")


def build_app(settings: Callable[[], Settings]) -> typer.Typer:
    """The ``stack`` commands; ``settings()`` gives the PACS address they start and seed."""
    app = typer.Typer(help="The local Orthanc PACS and HAPI FHIR server used by the demo and the tests.",
                      no_args_is_help=True)

    @app.command("up")
    def stack_up(
        work_dir: Annotated[Path, typer.Option(help="Orthanc config, storage, PID and log")] = ORTHANC_DIR,
        fhir: Annotated[bool, typer.Option(help="also start the local HAPI FHIR server (needs Java 17+)")] = True,
        fhir_port: Annotated[int, typer.Option(help="HAPI FHIR port on 127.0.0.1")] = FHIR_PORT,
    ) -> None:
        """Start the local Orthanc (and HAPI FHIR when Java is present) on 127.0.0.1 and wait until they answer."""
        ensure_orthanc(settings(), work_dir)
        if fhir:
            ensure_fhir(fhir_port)

    @app.command("down")
    def stack_down(work_dir: Annotated[Path, typer.Option()] = ORTHANC_DIR) -> None:
        """Stop the local Orthanc and HAPI FHIR by their PID files."""
        _stop(work_dir)

    @app.command("status")
    def stack_status(work_dir: Annotated[Path, typer.Option()] = ORTHANC_DIR) -> None:
        """Show whether the local Orthanc and HAPI FHIR run, with ports and counts."""
        if not _print_status(work_dir):
            raise typer.Exit(1)

    @app.command("seed")
    def stack_seed(
        studies: Annotated[int, typer.Option(min=1, help="number of studies to generate")] = 12,
        days: Annotated[int, typer.Option(min=1, help="spread over this many days ending today")] = 10,
        seed: Annotated[int, typer.Option(help="random seed (same seed, same studies)")] = 0,
        out_dir: Annotated[Path, typer.Option(help="where generated files go")] = SAMPLE_DIR,
    ) -> None:
        """Generate realistic synthetic studies and push them into the local Orthanc with storescu."""
        seed_studies(settings(), studies=studies, days=days, seed=seed, out_dir=out_dir)

    return app
