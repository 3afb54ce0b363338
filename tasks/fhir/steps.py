"""Prefect tasks of the FHIR sync: ``fhir-sync`` per batch and ``fhir-reconcile``, and
:func:`sync_with_tasks`, which runs the sync loop (:func:`pacsflow.tasks.fhir.sync.run_sync`) with them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pacsflow.catalog.views import Catalog
from pacsflow.tasks.core.errors import retry_if_transient
from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.fhir.mapping import MappingOptions
from pacsflow.tasks.fhir.sync import (
    BatchResult,
    Difference,
    SyncReport,
    reconcile_catalog,
    run_sync,
    sync_catalog_batch,
)
from pacsflow.tasks.settings import CatalogSettings, FhirSettings, Settings, StateSettings

log = logging.getLogger(__name__)


@task(name="fhir-sync", task_run_name="fhir-sync-{batch_no}", persist_result=False, cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)
def fhir_sync(fhir: FhirSettings, catalog_root: Path, state_root: Path, study_uids: list[str], run_id: str,
              force: bool = False, batch_no: int = 0, state: StateSettings | None = None,
              catalog: CatalogSettings | None = None) -> BatchResult:
    """One transaction Bundle (split only if the server rejects it) for a batch of catalog studies
    (read from the store of ``catalog.backend``), recorded in the FHIR ledger under ``state_root``
    (or in the state database of ``state``).

    Raises FhirUnavailable (retried) when the server is down, FhirConfigurationError (not retried)
    on wrong base URL or credentials.
    """
    with FhirClient.from_settings(fhir) as client:
        ledger = FhirSyncLedger.under(state_root, state.url if state else None)
        res = sync_catalog_batch(client, ledger, _reader(catalog, catalog_root), study_uids,
                                 MappingOptions.from_settings(fhir), run_id=run_id, force=force)
    get_run_logger().info("FHIR batch %d: %d sent, %d unchanged, %d failed, %d transactions", batch_no,
                          len(res.sent), len(res.skipped), len(res.failed), res.transactions)
    return res


@task(name="fhir-reconcile", persist_result=False, cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_if_transient)
def fhir_reconcile(fhir: FhirSettings, catalog_root: Path, study_uids: list[str],
                   catalog: CatalogSettings | None = None) -> list[Difference]:
    """Catalog counts vs the server's ImagingStudy (the sync loop marks differing studies for re-sending)."""
    with FhirClient.from_settings(fhir) as client:
        diffs = reconcile_catalog(client, _reader(catalog, catalog_root), study_uids)
    get_run_logger().info("FHIR reconciliation: %d studies checked, %d differences", len(study_uids), len(diffs))
    return diffs


def _reader(catalog: CatalogSettings | None, catalog_root: Path) -> Catalog:
    # the tasks take the settings, not an opened store: their parameters stay plain data
    return catalog.reader(catalog_root) if catalog is not None else catalog_root


# The parameters mirror sync_catalog's on purpose: the same loop, entered from a flow or from plain code.
def sync_with_tasks(
    settings: Settings,
    study_uids: Sequence[str] | None = None,
    *,
    only_failed: bool = False,
    force: bool = False,
    reconcile_after: bool = True,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> SyncReport:
    """The sync loop inside a flow: one ``fhir-sync`` task per batch (in order), then
    ``fhir-reconcile``. FHIR failures are recorded and reported, never raised."""
    fhir, catalog_root, state_root = settings.fhir, settings.catalog_root, settings.state_root

    def sync_step(batch: list[str], run_id: str, batch_no: int) -> BatchResult:
        return fhir_sync(fhir, catalog_root, state_root, batch, run_id, force, batch_no, settings.state,
                         settings.catalog)

    def reconcile_step(uids: list[str]) -> list[Difference]:
        return fhir_reconcile(fhir, catalog_root, uids, settings.catalog)

    ledger = FhirSyncLedger.under(state_root, settings.state.url)
    return run_sync(fhir, _reader(settings.catalog, catalog_root), ledger, sync_step, reconcile_step, study_uids,
                    only_failed=only_failed, reconcile_after=reconcile_after, logger=logger or log)
