"""Prefect tasks of the FHIR sync: ``fhir-sync`` per batch and ``fhir-reconcile``, and
:func:`sync_with_tasks`, the loop flows run."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.catalog.views import connect as connect_catalog
from pacsflow.tasks.core.clock import new_run_id
from pacsflow.tasks.core.errors import error_text, retry_if_transient
from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.fhir.mapping import MappingOptions
from pacsflow.tasks.fhir.sync import (
    BatchResult,
    Difference,
    SyncReport,
    mark_differences,
    plan_batches,
    reconcile,
    sync_batch,
    warn_identified,
)
from pacsflow.tasks.settings import Settings

log = logging.getLogger(__name__)


@task(name="fhir-sync", task_run_name="fhir-sync-{batch_no}", persist_result=False, cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)
def fhir_sync(settings: Settings, study_uids: list[str], run_id: str, force: bool = False,
              batch_no: int = 0) -> dict[str, Any]:
    """One transaction Bundle (split only if the server rejects it) for a batch of catalog studies.

    Returns the BatchResult as a dict. Raises FhirUnavailable (retried) when the server is down,
    FhirConfigurationError (not retried) on wrong base URL or credentials.
    """
    logger = get_run_logger()
    ledger = FhirSyncLedger.for_settings(settings)
    options = MappingOptions.from_settings(settings.fhir)
    con = connect_catalog(settings.catalog_root)
    try:
        with FhirClient.from_settings(settings.fhir) as client:
            res = sync_batch(client, ledger, con, study_uids, options, run_id=run_id, force=force)
    finally:
        con.close()
    logger.info("FHIR batch %d: %d sent, %d unchanged, %d failed, %d transactions", batch_no, len(res.sent),
                len(res.skipped), len(res.failed), res.transactions)
    return res.as_dict()


@task(name="fhir-reconcile", persist_result=False, cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_if_transient)
def fhir_reconcile(settings: Settings, study_uids: list[str], run_id: str) -> list[dict[str, Any]]:
    """Catalog counts vs the server's ImagingStudy; differing studies are marked for re-sending."""
    con = connect_catalog(settings.catalog_root)
    try:
        with FhirClient.from_settings(settings.fhir) as client:
            diffs = reconcile(client, con, study_uids)
    finally:
        con.close()
    mark_differences(FhirSyncLedger.for_settings(settings), diffs, run_id)
    get_run_logger().info("FHIR reconciliation: %d studies checked, %d differences", len(study_uids), len(diffs))
    return [asdict(d) for d in diffs]


def sync_with_tasks(
    settings: Settings,
    study_uids: Sequence[str] | None = None,
    *,
    only_failed: bool = False,
    force: bool = False,
    reconcile_after: bool = True,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> SyncReport:
    """``sync_catalog`` inside a flow: one ``fhir-sync`` task per batch (in order), then
    ``fhir-reconcile``. FHIR failures are recorded and reported, never raised."""
    logger = logger or log
    started = time.monotonic()
    report = SyncReport(new_run_id())
    warn_identified(settings, logger)
    if not settings.fhir.base_url:
        report.aborted = "fhir.base_url is not set"
        return report
    ledger = FhirSyncLedger.for_settings(settings)
    con = connect_catalog(settings.catalog_root)
    try:
        batches = plan_batches(con, ledger, study_uids, only_failed=only_failed,
                               batch_size=settings.fhir.batch_size)
    finally:
        con.close()
    report.selected = sum(len(b) for b in batches)
    reconcile_uids: list[str] = []
    for i, batch in enumerate(batches):
        state = fhir_sync(settings, batch, report.run_id, force, i, return_state=True)
        res = state.result(raise_on_failure=False)
        if isinstance(res, dict):
            batch_result = BatchResult(**res)
            report.add(batch_result)
            reconcile_uids += batch_result.sent + batch_result.skipped
            continue
        # The task failed after its retries: what happened per study is in the ledger.
        exc = res if isinstance(res, BaseException) else RuntimeError("fhir-sync task did not complete")
        report.aborted = error_text(exc)
        rows = ledger.entries(batch)
        untouched = 0
        for uid in batch:
            row = rows.get(uid)
            if row is None or row.run_id != report.run_id:
                untouched += 1
            elif row.status == "failed":
                report.failed[uid] = row.reason or report.aborted
            else:
                report.sent += 1
        report.not_attempted = untouched + sum(len(b) for b in batches[i + 1 :])
        logger.warning("FHIR sync stopped: %s; %d studies not attempted", report.aborted, report.not_attempted)
        break
    if reconcile_after and reconcile_uids and report.aborted is None:
        state = fhir_reconcile(settings, reconcile_uids, report.run_id, return_state=True)
        res = state.result(raise_on_failure=False)
        if isinstance(res, list):
            report.differences = [Difference(**d) for d in res]
        else:
            report.aborted = "reconciliation: " + (error_text(res) if isinstance(res, BaseException) else "failed")
    report.seconds = round(time.monotonic() - started, 2)
    report.log_summary(logger)
    return report
