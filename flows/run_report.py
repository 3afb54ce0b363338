"""The run report at the end of a run: record the run in the history, write the HTML report
next to the catalog and show it in the Prefect UI (a markdown artifact with the charts, and a link
artifact to the page). ``pacsflow report`` writes the same page from the history alone.

The report is a by-product: whatever goes wrong here is logged and never fails the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from pacsflow.tasks.core.errors import error_text
from pacsflow.tasks.core.files import purge_older_than
from pacsflow.tasks.ingest.bookkeeping import RunSummary
from pacsflow.tasks.ingest.history import RunHistory, RunRecord, cataloged_by_modality, history_path
from pacsflow.tasks.ingest.report import render_report, report_dir, report_markdown, write_report
from pacsflow.tasks.settings import Settings

log = logging.getLogger(__name__)
REPORT_RUNS = 30  # nights in the trend
REPORT_RETENTION_DAYS = 400  # per-run pages kept beside the catalog (the history itself is kept whole)


def publish_report(settings: Settings, summary: RunSummary, catalog_uids: Sequence[str], *, flow: str = "nightly",
                   logger: logging.Logger | logging.LoggerAdapter | None = None) -> Path | None:
    """Record ``summary`` (and what ``catalog_uids`` hold by modality) in the history; write
    ``<catalog_root>/_reports/<run_id>.html`` and ``<flow>-latest.html``; attach both artifacts.
    Returns the run's page, or None when it could not be written (logged)."""
    logger = logger or log
    try:
        by_modality = cataloged_by_modality(settings.catalog.reader(settings.catalog_root), catalog_uids)
        history = RunHistory(history_path(settings.state_root))
        history.record(summary, by_modality, flow=flow)
        runs = history.last(REPORT_RUNS, flow=flow)
        page = write_pages(settings.catalog_root, runs, f"{summary.run_id}.html", f"{flow}-latest.html")
        purge_older_than(page.parent, REPORT_RETENTION_DAYS)
    except Exception as exc:  # noqa: BLE001 - a report must not fail the night it reports on
        logger.error("run report not written: %s", error_text(exc))
        return None
    attach(runs, page, flow)
    logger.info("run report: %s", page)
    return page


def write_pages(catalog_root: Path, runs: Sequence[RunRecord], *names: str) -> Path:
    """The report of ``runs`` under each of ``names`` in the reports folder; returns the first."""
    html = render_report(runs, title=f"pacsflow run report ({runs[-1].flow if runs else 'no runs'})")
    paths = [write_report(report_dir(catalog_root) / name, html) for name in names]
    return paths[0]


def attach(runs: Sequence[RunRecord], page: Path, flow: str) -> None:
    """The charts as a markdown artifact (the UI shows ``data:`` images) and a link to the page."""
    try:
        create_markdown_artifact(report_markdown(runs, page), key=f"{flow}-run-report",
                                 description=f"Run report: this run by modality and the last {len(runs)} runs")
        create_link_artifact(page.resolve().as_uri(), link_text=page.name, key=f"{flow}-run-report-page",
                             description="The run report as an HTML page beside the catalog")
    except RuntimeError:
        pass  # outside a flow run: nothing to attach them to


def report_from_history(settings: Settings, runs: int, flow: str = "nightly") -> Path | None:
    """``<catalog_root>/_reports/<flow>-last-<runs>.html`` from the history alone (``pacsflow
    report``); None when no run has recorded a history yet."""
    path = history_path(settings.state_root)
    if not path.is_file():
        return None
    return write_pages(settings.catalog_root, RunHistory(path).last(runs, flow=flow), f"{flow}-last-{runs}.html")
