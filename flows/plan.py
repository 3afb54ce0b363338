"""The plan flow: a window's work cut into shards, one ``ingest-shard`` flow run each, on whatever
workers the pool has; and, on every run, recovery of shards whose run died.

Each run C-FINDs the window of each PACS (the one in ``settings.pacs`` and every named one in
``settings.sources``; as the nightly run does: that PACS's watermark minus the overlap .. today,
plus earlier transient failures by UID), keeps what the ledger lacks, cuts it into shards (a
StudyDate day of one PACS, split above ``shards.max_studies``; the key names a named PACS) and
stores them in the leases table; a study already in an unfinished shard stays there, so a study
that two PACS hold is planned once. Then every unfinished shard without a live run gets one
(:func:`pacsflow.tasks.ingest.shards.shards_to_start`): a new shard, a shard whose run failed,
crashed, was cancelled or is unknown to the server, and a shard whose run still looks alive but
whose leases all ran out (a killed worker leaves its run RUNNING; that run is marked Crashed
here). A PACS's watermark (one each) moves to day D only once every shard of that PACS up to D is
done. Parameters and results carry dates, shard keys and counts only.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Crashed

from pacsflow.flows.ingest_shard import slot_of
from pacsflow.flows.migrate import named_source
from pacsflow.flows.nightly import (
    Logger,
    NightlyRun,
    discover_work,
    name_flow_run,
    open_run,
    run_name,
    run_window,
)
from pacsflow.flows.secrets import load_run_settings
from pacsflow.tasks.core.clock import new_run_id
from pacsflow.tasks.deid.manifest import object_id
from pacsflow.tasks.ingest.bookkeeping import RunBook
from pacsflow.tasks.ingest.leases import Leases, ShardProgress
from pacsflow.tasks.ingest.shards import (
    RunSeen,
    ShardStart,
    cut_shards,
    shards_to_start,
    source_of,
    source_watermarks,
    watermark_name,
)
from pacsflow.tasks.pacs.planning import Window
from pacsflow.tasks.pacs.tls import check_tls_files
from pacsflow.tasks.settings import DEFAULT_SOURCE, Settings


@flow(name="plan", flow_run_name=run_name("plan"), log_prints=False, persist_result=False)
def plan(since: dt.date | None = None, until: dt.date | None = None, source: str | None = None) -> dict[str, Any]:
    """C-FIND the window of each PACS, cut the work into shards, start an ingest-shard run per shard
    that needs one.

    since/until: StudyDate window (default: each PACS's last watermark minus the overlap .. today).
    source: plan this PACS only (a name of ``sources``, or ``pacs``); default every one.
    """
    return plan_shards(load_run_settings(), since, until, get_run_logger(), source)


@dataclass(frozen=True)
class SourcePlan:
    """What one planning pass found on one PACS (counts and dates only)."""

    source: str | None
    window: Window
    found: int
    queued: int
    cut: int

    @property
    def label(self) -> str:
        return self.source or DEFAULT_SOURCE


def planned_sources(settings: Settings, source: str | None) -> list[str | None]:
    """The PACS a pass plans: all (None, the one in ``pacs``, first), or the one named."""
    return [None, *sorted(settings.sources)] if source is None else [named_source(settings, source)]


def plan_source(settings: Settings, source: str | None, run: NightlyRun, leases: Leases, since: dt.date | None,
                until: dt.date | None, logger: Logger) -> SourcePlan:
    """C-FIND one PACS over its own window and store its new shards (keys with its name)."""
    settings = settings.for_source(source)
    check_tls_files(settings)
    window = run_window(settings, run.ledger, since, until, watermark_name(source))
    book = RunBook(run.ledger, run.run_id, window, max_attempts=settings.max_attempts,
                   object_id=partial(object_id, run.key))
    with slot_of(settings, run.run_id, logger, gated=False)(1):
        items = discover_work(settings, run, window, book, logger)
    planned = leases.open_studies(i.study_uid for i in items)  # in an unfinished shard already: it stays there
    cut = cut_shards([i for i in items if i.study_uid not in planned], settings.shards.max_studies, source)
    for shard in cut:
        leases.add(shard.key, shard.study_uids, shard.day, reopen=True)
    return SourcePlan(source, window, book.summary.found, len(items), len(cut))


def plan_shards(settings: Settings, since: dt.date | None, until: dt.date | None, logger: Logger,
                source: str | None = None) -> dict[str, Any]:
    """One planning pass (see the module) over every PACS, or the one named; returns its counts."""
    run = open_run(settings, new_run_id())
    leases = Leases.under(settings.state_root, settings.state.url)
    sources = planned_sources(settings, source)
    plans = [plan_source(settings, s, run, leases, since, until, logger) for s in sources]
    name_flow_run(f"plan {dt.date.today().isoformat()} ({plans_text(plans, lambda p: str(p.window))})")
    progress = [p for p in leases.shards() if source_of(p.shard) in sources]
    starts = shards_to_start(progress, run_states(leases.runs(), progress), settings.shards.lease_s)
    for start in starts:
        start_shard(settings, leases, start, logger)
    unfinished = [p for p in progress if not p.finished]
    watermarks = {}
    for source_id, watermark in source_watermarks({p.source: p.window.end for p in plans}, unfinished).items():
        run.ledger.advance_watermark(watermark, watermark_name(source_id))
        watermarks[source_id or DEFAULT_SOURCE] = run.ledger.watermark_of(watermark_name(source_id)) or watermark
    publish_plan(progress, starts)
    reasons = Counter(s.why for s in starts)
    result = {"window": plans_text(plans, lambda p: str(p.window)), "found": sum(p.found for p in plans),
              "queued": sum(p.queued for p in plans), "shards_cut": sum(p.cut for p in plans),
              "shards": len(progress), "unfinished": len(unfinished), "started": reasons.pop("new", 0),
              "restarted": sum(reasons.values()), "restarted_by_reason": dict(reasons),
              "watermark": min(watermarks.values()).isoformat(),
              "sources": {p.label: {"window": str(p.window), "found": p.found, "queued": p.queued,
                                    "shards_cut": p.cut, "watermark": watermarks[p.label].isoformat()}
                          for p in plans}}
    logger.info("plan %s: %d studies to process in %d shards; %d shards started, %d restarted; watermark %s",
                result["window"], result["queued"], result["shards_cut"], result["started"], result["restarted"],
                plans_text(plans, lambda p: watermarks[p.label].isoformat()))
    return result


def plans_text(plans: list[SourcePlan], what: Callable[[SourcePlan], str]) -> str:
    """``what`` of the one PACS as it is; of several, each after its name."""
    if len(plans) == 1 and plans[0].source is None:
        return what(plans[0])
    return "; ".join(f"{p.label} {what(p)}" for p in plans)


def run_states(runs: dict[str, str], progress: list[ShardProgress]) -> dict[str, RunSeen | None]:
    """The newest flow run of each unfinished shard that has one, as the server sees it now
    (None: the server does not know it)."""
    wanted = {p.shard: runs[p.shard] for p in progress if not p.finished and p.shard in runs}
    if not wanted:
        return {}
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[UUID(i) for i in wanted.values()])), limit=len(wanted))
    now = dt.datetime.now(dt.timezone.utc)
    seen = {str(r.id): RunSeen(r.state.type.value, (now - r.state.timestamp).total_seconds())
            for r in found if r.state is not None}
    return {shard: seen.get(run_id) for shard, run_id in wanted.items()}


def start_shard(settings: Settings, leases: Leases, start: ShardStart, logger: Logger) -> None:
    """A new ingest-shard flow run for ``start.shard`` (not waited for). A run that died while
    RUNNING is marked Crashed first, so the UI and alerts tell what happened."""
    previous = leases.runs().get(start.shard)
    if start.why == "stale" and previous:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(UUID(previous), Crashed(message="its leases ran out: the worker is gone; "
                                                                      "the next plan started the shard again"),
                                      force=True)
    leases.forget_expired(start.shard)
    flow_run = run_deployment(settings.shards.deployment, parameters={"shard": start.shard}, timeout=0,
                              as_subflow=False)
    assert isinstance(flow_run, FlowRun)  # called from sync code: the run itself, not a coroutine
    leases.started(start.shard, str(flow_run.id))
    (logger.info if start.why == "new" else logger.warning)("shard %s: flow run %s started (%s)", start.shard,
                                                            flow_run.name, start.why)


def publish_plan(progress: list[ShardProgress], starts: list[ShardStart]) -> None:
    """The unfinished shards and what this pass did about each (keys and counts only)."""
    why = {s.shard: s.why for s in starts}
    rows = [{"shard": p.shard, "studies": p.studies, "done": p.done, "held": p.held, "expired": p.expired,
             "started": why.get(p.shard, "")} for p in progress if not p.finished]
    try:
        create_table_artifact(rows, key="plan-shards", description=f"{len(rows)} unfinished shards; "
                              f"{len(starts)} runs started ({', '.join(sorted(set(why.values()))) or 'none'})")
    except RuntimeError:  # outside a flow run: nothing to attach it to
        pass
