"""The reconciliation sweep: find what the nightly windows missed.

A study can reach the PACS long after its StudyDate (an outside import, a corrected study). The
nightly window starts at the watermark minus ``overlap_days``, so such a study is never in it. The
sweep C-FINDs the last ``sweep_lookback_days`` days (C-FIND only where nothing changed), compares each
study's instance count with the ledger, and retrieves just the studies that are new, grew or failed,
through the nightly pipeline itself. Its artifact ``sweep-cost`` says what it asked of the PACS.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pacsflow.flows.nightly import final_state, run_name, run_nightly
from pacsflow.flows.secrets import load_run_settings


@flow(name="reconciliation-sweep", flow_run_name=run_name("sweep"), log_prints=False, persist_result=False)
def reconciliation_sweep(lookback_days: int | None = None) -> Any:
    """C-FIND the last ``lookback_days`` days (default: setting ``sweep_lookback_days``) and retrieve
    only what the ledger does not have as it is at the PACS. Returns what the nightly flow does
    (a Failed state carrying the result when studies failed: ``pacsflow.flows.nightly.run_result``)."""
    logger = get_run_logger()
    settings = load_run_settings()
    days = lookback_days or settings.sweep_lookback_days
    today = dt.date.today()
    summary = run_nightly(settings, since=today - dt.timedelta(days=days - 1), until=today, logger=logger,
                          artifacts="sweep")
    result: dict[str, Any] = {**summary.as_dict(), "lookback_days": days}
    _publish_cost(result)
    logger.info("sweep over %d days: %d C-FIND requests, %d studies at the PACS, %d retrieved", days,
                result["pacs_queries"], result["found"], result["queued"])
    return final_state(summary, result)


def _publish_cost(result: dict[str, Any]) -> None:
    lines = [
        "# Reconciliation sweep: cost",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {result[k]} |" for k in ("lookback_days", "pacs_queries", "found", "queued", "cataloged",
                                             "failed")],
    ]
    try:
        create_markdown_artifact("\n".join(lines), key="sweep-cost",
                                 description="What the sweep asked of the PACS and what it retrieved")
    except RuntimeError:
        pass  # outside a flow run: nothing to attach it to
