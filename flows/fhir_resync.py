"""The ``fhir-resync`` flow: replay the catalog to the FHIR server (no DICOM is touched).

Parameters are booleans only (no PHI). Settings (``fhir.*``) are read at run time. The run publishes
the markdown artifact ``fhir-resync-summary``: counts, failed studies with reasons, reconciliation
differences (study UIDs are the catalog's de-identified ones).

Also here: :func:`publish_report` (the nightly flow's FHIR step uses it too) and
:func:`local_fhir_up` / :func:`local_fhir_down` for ``pacsflow stack up|down``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.fhir_sync import SyncReport, sync_with_tasks
from tasks.settings import load_settings

log = logging.getLogger(__name__)

DEFAULT_FHIR_RUN_DIR = Path("var/fhir-server")
DEFAULT_FHIR_PORT = 8090


def publish_report(report: SyncReport, key: str, title: str) -> None:
    """The report as a markdown artifact on the current flow run (no-op outside a run)."""
    try:
        create_markdown_artifact(report.markdown(title), key=key, description=f"{title}: counts, failures, "
                                 "reconciliation (de-identified study UIDs)")
    except RuntimeError:
        pass  # called outside a flow run: nothing to attach it to


@flow(name="fhir-resync", log_prints=False, persist_result=False)
def fhir_resync(only_failed: bool = False, force: bool = False) -> dict:
    """Send the catalog's studies to the FHIR server as ImagingStudy + Patient.

    only_failed: only the studies the FHIR ledger has as failed. force: send unchanged studies too
    (e.g. after the server was rebuilt); without it, studies whose resources did not change are skipped.
    """
    logger = get_run_logger()
    settings = load_settings()
    if not settings.fhir.base_url:
        logger.warning("fhir.base_url is not set: nothing to sync")
        return {"selected": 0, "aborted": "fhir.base_url is not set"}
    report = sync_with_tasks(settings, only_failed=only_failed, force=force, logger=logger)
    publish_report(report, key="fhir-resync-summary", title="FHIR resync")
    summary = report.as_dict()
    summary.pop("failures")
    summary.pop("reconciliation")
    return summary


def local_fhir_up(run_dir: Path = DEFAULT_FHIR_RUN_DIR, port: int = DEFAULT_FHIR_PORT,
                  data_dir: Path | None = None) -> tuple[str | None, str]:
    """Start the local HAPI FHIR server if Java is available (for ``pacsflow stack up``).

    Returns (base URL or None, a sentence for the user). Data persist in ``data_dir`` (default
    ``run_dir/data``). Builds the server first if needed (~1 min the first time).
    """
    from deployments import fhir_server

    if not fhir_server.java_available():
        return None, ("FHIR server not started: Java 17+ is not installed (Debian: apt-get install "
                      "openjdk-17-jdk-headless maven); the pipeline runs without FHIR")
    if fhir_server.read_pid(run_dir) is not None and fhir_server.is_ready(fhir_server.base_url(port)):
        url = fhir_server.base_url(port)
        return url, f"FHIR server already running: {url}"
    try:
        handle = fhir_server.start(port, run_dir, data_dir=data_dir or Path(run_dir) / "data")
    except fhir_server.FhirServerError as exc:
        return None, f"FHIR server not started: {exc}"
    return handle.base_url, (f"FHIR server up: {handle.base_url} (pid {handle.pid}); "
                             f"set PACSFLOW_FHIR__BASE_URL={handle.base_url} to sync to it")


def local_fhir_down(run_dir: Path = DEFAULT_FHIR_RUN_DIR) -> str:
    """Stop the local HAPI FHIR server started by :func:`local_fhir_up`."""
    from deployments import fhir_server

    try:
        stopped = fhir_server.stop(run_dir)
    except fhir_server.FhirServerError as exc:
        return f"FHIR server: {exc}"
    return "FHIR server stopped" if stopped else "FHIR server was not running"
