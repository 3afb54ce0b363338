"""The ``xdsi-publish`` flow: the catalog's new and changed studies as KOS manifests in the XDS.b
repository (RAD-68), one ``xdsi-submit-{batch_no}`` task per batch of studies.

Parameters are booleans only (no PHI). Settings (``xdsi.*``) are read at run time. The loop is
:func:`pacsflow.tasks.xdsi.publish.run_publish`; a task is retried by Prefect only when the repository
was unavailable (``retry_if_transient``), never after a registry error. The run publishes the markdown
artifact ``xdsi-publish-summary`` and ends Failed when a study failed or the run stopped early (its
result dict is in the state all the same: :func:`pacsflow.flows.nightly.run_result`), Completed
otherwise: studies waiting for consent are not failures.

Also here: :func:`publish_with_tasks` and :func:`publish_summary`, which the nightly run's XDS step
(:func:`pacsflow.flows.nightly.publish_xdsi`) uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from pacsflow.flows.nightly import StudiesFailed
from pacsflow.flows.secrets import load_run_settings
from pacsflow.tasks.core.errors import retry_if_transient
from pacsflow.tasks.settings import CatalogSettings, Settings, StateSettings, XdsiSettings
from pacsflow.tasks.xdsi.client import XdsRepositoryClient
from pacsflow.tasks.xdsi.ledger import XdsiLedger
from pacsflow.tasks.xdsi.publish import BatchResult, PublishReport, publish_catalog_batch, run_publish

log = logging.getLogger(__name__)


@task(name="xdsi-submit", task_run_name="xdsi-submit-{batch_no}", persist_result=False, cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)
def xdsi_submit(xdsi: XdsiSettings, catalog_root: Path, state_root: Path, study_uids: list[str], run_id: str,
                batch_no: int = 0, state: StateSettings | None = None,
                catalog: CatalogSettings | None = None) -> BatchResult:
    """One manifest per study of the batch, sent to the repository and recorded in the XDS-I.b ledger.

    Raises XdsUnavailable (retried: the studies this run published or the registry refused are not
    sent again) when the repository does not answer, XdsConfigurationError (not retried) when it
    refuses the configuration.
    """
    ledger = XdsiLedger.under(state_root, state.url if state else None)
    reader = catalog.reader(catalog_root) if catalog is not None else catalog_root
    with XdsRepositoryClient.from_settings(xdsi) as client:
        res = publish_catalog_batch(client, ledger, reader, xdsi, study_uids, run_id=run_id)
    get_run_logger().info("XDS-I.b batch %d: %d published, %d replaced, %d unchanged, %d pending consent, "
                          "%d failed, %d requests", batch_no, len(res.published), len(res.replaced),
                          len(res.unchanged), len(res.pending_consent), len(res.failed), res.requests)
    return res


def publish_with_tasks(settings: Settings, study_uids: Sequence[str] | None = None, *, only_failed: bool = False,
                       logger: logging.Logger | logging.LoggerAdapter | None = None) -> PublishReport:
    """The publish loop inside a flow: one ``xdsi-submit`` task per batch, in order. Study failures
    are recorded and reported, never raised; a missing setting raises XdsConfigurationError."""
    xdsi, catalog_root, state_root = settings.xdsi, settings.catalog_root, settings.state_root

    def submit_step(batch: list[str], run_id: str, batch_no: int) -> BatchResult:
        return xdsi_submit(xdsi, catalog_root, state_root, batch, run_id, batch_no, settings.state, settings.catalog)

    ledger = XdsiLedger.under(state_root, settings.state.url)
    return run_publish(xdsi, settings.catalog.reader(catalog_root), ledger, submit_step, study_uids,
                       only_failed=only_failed, logger=logger or log)


def publish_summary(report: PublishReport, key: str, title: str) -> None:
    """The report as a markdown artifact on the current flow run (nothing outside a run)."""
    try:
        create_markdown_artifact(report.markdown(title), key=key,
                                 description=f"{title}: counts, failures by registry error code (catalog study UIDs)")
    except RuntimeError:
        pass  # called outside a flow run: nothing to attach it to


def final_state(report: PublishReport) -> State:
    """Failed when a study failed or the run stopped early (alerts on Failed runs fire), else
    Completed; the message counts what happened (no PHI), the data is the result dict."""
    result = report.as_dict()
    result.pop("failures")
    if report.ok:
        return Completed(message=report.message(), data=result)
    return Failed(message=report.message(), data=StudiesFailed(report.message(), result))


@flow(name="xdsi-publish", log_prints=False, persist_result=False)
def xdsi_publish(only_failed: bool = False) -> Any:
    """Publish a KOS manifest for each new or changed catalog study to the XDS.b repository (RAD-68).

    only_failed: only the studies whose last attempt failed, including those a registry refused
    (sent again although they did not change). Returns the result dict, or (studies failed) a
    Failed state carrying it.
    """
    logger = get_run_logger()
    report = publish_with_tasks(load_run_settings(), only_failed=only_failed, logger=logger)
    publish_summary(report, key="xdsi-publish-summary", title="XDS-I.b publish")
    return final_state(report)
