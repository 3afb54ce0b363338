"""The ``fhir-resync`` flow: replay the catalog to the FHIR server (no DICOM is touched).

Parameters are booleans only (no PHI). Settings (``fhir.*``) are read at run time. The run publishes
the markdown artifact ``fhir-resync-summary``: counts, failed studies with reasons, reconciliation
differences (study UIDs are the catalog's de-identified ones).

Also here: :func:`publish_report`, which the nightly flow's FHIR step uses too.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pacsflow.tasks.fhir.sync import SyncReport
from pacsflow.tasks.fhir.steps import sync_with_tasks
from pacsflow.flows.secrets import load_run_settings

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
    settings = load_run_settings()
    if not settings.fhir.base_url:
        logger.warning("fhir.base_url is not set: nothing to sync")
        return {"selected": 0, "aborted": "fhir.base_url is not set"}
    report = sync_with_tasks(settings, only_failed=only_failed, force=force, logger=logger)
    publish_report(report, key="fhir-resync-summary", title="FHIR resync")
    summary = report.as_dict()
    summary.pop("failures")
    summary.pop("reconciliation")
    return summary

