"""The migration workbench's flows: inventory a legacy PACS, run its migration inside a time window
and at a pace, and reconcile what it holds with what the lake holds (README "The migration workbench").

The operator's choices (window, rate, paused) live in the state database
(:class:`~pacsflow.tasks.migrate.store.MigrationStore`): every worker of a deployment that shares
``state.url`` reads the same ones. :func:`migration_gate` is what a shard calls before each retrieve.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from pacsflow.catalog.errors import CatalogNotFound
from pacsflow.catalog.views import confined
from pacsflow.flows.secrets import load_run_settings
from pacsflow.tasks.core.clock import new_run_id, parse_dicom_date
from pacsflow.tasks.core.errors import PermanentError, retry_if_transient
from pacsflow.tasks.core.files import write_atomic
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.ingest.history import RunHistory, history_path
from pacsflow.tasks.ingest.leases import Leases
from pacsflow.tasks.ingest.ledger import Ledger, LedgerEntry
from pacsflow.tasks.ingest.report import chart_svg, report_dir, svg_data_uri
from pacsflow.tasks.ingest.shards import source_of
from pacsflow.tasks.migrate import inventory as inv
from pacsflow.tasks.migrate import reconcile as rec
from pacsflow.tasks.migrate.control import decide, window_hours_a_day
from pacsflow.tasks.migrate.store import InventoryPass, MigrationStore
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.pacs.models import PacsPeer
from pacsflow.tasks.pacs.planning import Window, discover
from pacsflow.tasks.settings import DEFAULT_SOURCE, Settings

RATE_LIMIT = "migrate-rate"  # the Prefect global concurrency limit that paces retrieves (slot decay)
DEFAULT_INSTANCES_PER_S = 190.0  # README "Performance": one 2-core node's nightly rate
LISTED = 50  # studies named in an artifact at most (the CSV has them all)
# (API, rate) pairs whose limit this process has set up: a gate on a server no migrate-run has
# prepared yet makes the limit itself, once.
_ENSURED: set[tuple[str | None, float]] = set()


class MigrationNotReady(PermanentError):
    """Something a migration needs is missing: an inventory pass, or the plan flow."""

    reason = "migration-not-ready"


def migration_store(settings: Settings, source: str | None = None) -> MigrationStore:
    """The migration's store: the operator's settings and the first PACS's inventory passes; or
    the passes of the named ``source`` (``settings.sources``)."""
    return MigrationStore.under(settings.state_root, settings.state.url, source)


def named_source(settings: Settings, source: str | None) -> str | None:
    """``source`` as ``settings.sources`` names it (None: the first PACS, ``pacs``); an unknown
    name is an error before any C-FIND."""
    settings.for_source(source)
    return None if source == DEFAULT_SOURCE else source


def of_source(settings: Settings, source: str | None, entries: dict[str, LedgerEntry]) -> dict[str, LedgerEntry]:
    """Those of the ledger's ``entries`` that came from ``source``'s PACS, by the shard each was
    planned in (one no shard holds came from the first PACS, through the nightly run). With one
    PACS, all of them (and the leases table is not opened)."""
    if not settings.sources:
        return entries
    shards = Leases.under(settings.state_root, settings.state.url).shards_of(entries)
    return {uid: e for uid, e in entries.items() if source_of(shards.get(uid, "")) == source}


def _pseudonym(settings: Settings) -> Callable[[str], str]:
    """The de-identifier's UID mapping: names a study or object as the catalog does."""
    return Deidentifier.from_settings(settings.resolve_deid_key(), settings.deid).uid


# -- inventory ---------------------------------------------------------------------------------
@task(name="inventory-studies", persist_result=False, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_if_transient)
def inventory_studies(peer: PacsPeer, window: Window) -> list[inv.InventoryStudy]:
    """Study-level C-FIND per day (splitting answers the PACS caps), then each study's series."""
    client = PacsClient(peer)
    with client.query_session():
        found, warnings = discover(client.find_studies, window, peer.pacs.result_cap)
        studies = [inv.InventoryStudy(s.study_uid, s.study_date, tuple(
            inv.SeriesCount(modality or inv.UNKNOWN, n or 0, uid) for uid, modality, n in client.find_series(s.study_uid)
        )) for s in found]
    logger = get_run_logger()
    for w in warnings:
        logger.warning(w)
    logger.info("inventory %s: %d studies, %d series", window, len(studies), sum(len(s.series) for s in studies))
    return studies


def measured_rate(settings: Settings) -> float:
    """Instances/s: the setting, else the median of the last nightly runs, else one node's figure."""
    if settings.migrate.instances_per_s:
        return settings.migrate.instances_per_s
    runs = [r.instances_per_second for r in RunHistory(history_path(settings.state_root)).last(10, flow="nightly")]
    rates = sorted(r for r in runs if r > 0)
    return rates[len(rates) // 2] if rates else DEFAULT_INSTANCES_PER_S


def catalog_rows(settings: Settings, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows of one SELECT over the catalog the settings name (none when there is no catalog yet)."""
    try:
        con, _version = confined(settings.catalog.reader(settings.catalog_root))
    except CatalogNotFound:
        return []
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def bytes_per_instance(settings: Settings) -> dict[str, float]:
    """Stored bytes per instance and modality, as the catalog measured them."""
    rows = catalog_rows(settings, "SELECT s.modality, avg(i.file_size) FROM instances i JOIN series s "
                        "USING (study_uid, series_uid) WHERE s.modality IS NOT NULL GROUP BY 1")
    return {str(m): float(n) for m, n in rows}


def _range(store: MigrationStore, since: dt.date | None, until: dt.date | None) -> Window:
    previous = store.latest()
    if since is not None:
        return Window(since, until or dt.date.today())
    if previous is None:
        raise MigrationNotReady("migrate inventory: give --since for the first pass (later passes repeat its range)")
    return Window(previous.since, until or previous.until)


def months(window: Window) -> list[Window]:
    """``window`` cut at month boundaries."""
    out, start = [], window.start
    while start <= window.end:
        following = (start.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
        out.append(Window(start, min(window.end, following - dt.timedelta(days=1))))
        start = following
    return out


def _in_range(studies: Iterable[inv.InventoryStudy], window: Window) -> list[inv.InventoryStudy]:
    return [s for s in studies if (d := parse_dicom_date(s.study_date)) is not None and window.start <= d <= window.end]


@flow(name="migrate-inventory", persist_result=False)
def migrate_inventory(since: dt.date | None = None, until: dt.date | None = None,
                      source: str | None = None) -> dict[str, Any]:
    """Count what the PACS holds from ``since`` to ``until`` (StudyDate; default: the previous pass's
    range), store the pass, and list the studies added since the previous pass and those changed on
    the PACS after they were migrated. Returns totals and the estimate; names studies by pseudonym.
    ``source``: that PACS of ``settings.sources`` (its passes apart); default the first, ``pacs``."""
    settings = load_run_settings()
    source = named_source(settings, source)
    store = migration_store(settings, source)
    window = _range(store, since, until)
    previous = store.latest()
    peer = PacsPeer.from_settings(settings.for_source(source))
    # A task run a month: its retries repeat that month's C-FINDs, not the whole pass's.
    studies = [s for month in months(window) for s in inventory_studies(peer, month)]
    done = store.record_pass(window.start, window.end, studies)
    added: list[inv.InventoryStudy] = []
    if previous is not None:
        seen = {s.study_uid for s in store.studies(previous.id)}
        added = inv.added_since(seen, _in_range(studies, Window(previous.since, previous.until)))
    ledger = Ledger(settings.ledger_path, settings.state.url)
    migrated = {uid: e.instances for uid, e in ledger.entries().items()
                if e.status == "cataloged" and e.instances is not None}
    changed = inv.changed_since_migrated(studies, migrated)
    totals = inv.totals(studies)
    estimate = inv.estimate(totals, instances_per_s=measured_rate(settings), bytes_per_instance=bytes_per_instance(
        settings), window_hours_a_day=window_hours_a_day(migration_store(settings).config()))
    pseudonym = _pseudonym(settings)
    result = {"pass": done.id, "source": source or DEFAULT_SOURCE, "window": str(window), "studies": len(studies),
              "series": sum(t.series for t in totals), "instances": estimate.instances,
              "bytes": estimate.bytes, "estimate": estimate.describe(),
              "added": sorted(pseudonym(s.study_uid) for s in added),
              "changed": sorted(pseudonym(s.study_uid) for s in changed),
              "totals": [vars(t) for t in totals]}
    create_markdown_artifact(inventory_markdown(result), key="migrate-inventory",
                             description=f"migration inventory pass {done.id}")
    get_run_logger().info("inventory pass %d: %d studies, %d added since the previous pass, %d changed after "
                          "migration; %s", done.id, len(studies), len(added), len(changed), estimate.describe())
    return result


def inventory_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Inventory pass {result['pass']} of {result['source']} ({result['window']})", "",
             f"{result['studies']:,} studies, {result['series']:,} series. Estimate: {result['estimate']}.", "",
             "| year | modality | studies | series | instances |", "|---|---|---|---|---|"]
    lines += [f"| {t['year']} | {t['modality']} | {t['studies']:,} | {t['series']:,} | {t['instances']:,} |"
              for t in result["totals"]]
    for key, what in (("added", "added since the previous pass"), ("changed", "changed after they were migrated")):
        names = result[key]
        lines += ["", f"**{len(names)} studies {what}**" + (":" if names else "")]
        lines += [f"- {n}" for n in names[:LISTED]] + (["- ..."] if len(names) > LISTED else [])
    return "\n".join(lines)


# -- reconcile ---------------------------------------------------------------------------------
def _cataloged_in_range(ledger: Ledger, window: Window) -> dict[str, LedgerEntry]:
    """The ledger's cataloged studies whose StudyDate (the PACS's) lies in the pass's range."""
    return {uid: e for uid, e in ledger.entries().items() if e.status == "cataloged"
            and (d := parse_dicom_date(e.study_date)) is not None and window.start <= d <= window.end}


def _catalog_counts(settings: Settings, studies: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for study, series, n in catalog_rows(settings, "SELECT study_uid, series_uid, count(*) FROM instances "
                                         "WHERE study_uid IN (SELECT unnest(?)) GROUP BY 1, 2", [studies]):
        out.setdefault(study, {})[series] = int(n)
    return out


def _stored_objects(settings: Settings, studies: list[str]) -> list[rec.StoredObject]:
    rows = catalog_rows(settings, "SELECT study_uid, sop_instance_uid, file_path, file_sha256 FROM instances "
                        "WHERE study_uid IN (SELECT unnest(?)) ORDER BY 1, 2", [studies])
    return [rec.StoredObject(*r) for r in rows]


def _digest(settings: Settings) -> Callable[[str], str | None]:
    """SHA-256 of what is stored at a catalog path or URL now (None: nothing there)."""
    from pacsflow.tasks.lake.storage import open_root

    fs, _root = open_root(settings.storage_root, settings.storage)

    def digest(path: str) -> str | None:
        sha = hashlib.sha256()
        try:
            with fs.open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(chunk)
        except FileNotFoundError:
            return None
        return sha.hexdigest()

    return digest


@flow(name="migrate-reconcile", persist_result=False)
def migrate_reconcile(sample: float | None = None, source: str | None = None) -> dict[str, Any]:
    """Per study and series of the latest inventory pass: the PACS's count, the ledger's (retrieved)
    and the catalog's, and the SHA-256 of a ``sample`` of stored objects (1.0: all; default
    ``migrate.checksum_sample``) read again. Writes CSV files and a progress chart beside the
    catalog's reports, and Prefect artifacts; pseudonymous UIDs only. ``source``: that PACS of
    ``settings.sources`` (its latest pass, the studies that came from it); default the first."""
    settings = load_run_settings()
    source = named_source(settings, source)
    store = migration_store(settings, source)
    done = store.latest()
    if done is None:
        raise MigrationNotReady("migrate reconcile: no inventory pass yet (pacsflow migrate inventory --since ...)")
    studies, pseudonym = store.studies(done.id), _pseudonym(settings)
    ledger = Ledger(settings.ledger_path, settings.state.url)
    in_range = of_source(settings, source, _cataloged_in_range(ledger, Window(done.since, done.until)))
    scope = sorted({pseudonym(s.study_uid) for s in studies} | {e.pseudo_uid for e in in_range.values()})
    held = Counter(q["pseudo_uid"] for q in ledger.quarantine_entries())
    rows = rec.reconcile(inv.series_counts(studies), _catalog_counts(settings, scope),
                         {e.pseudo_uid: e.instances or 0 for e in in_range.values()},
                         {s: held[s] for s in scope if held[s]}, pseudonym)
    fraction = sample or settings.migrate.checksum_sample
    checked = rec.sample(_stored_objects(settings, scope), fraction, seed=f"pass-{done.id}")
    findings = rec.check_objects(checked, _digest(settings))
    years = {pseudonym(s.study_uid): (d.strftime("%Y") if (d := parse_dicom_date(s.study_date)) else inv.UNKNOWN)
             for s in studies}
    progress = rec.progress_by_year(years, rows)
    result: dict[str, Any] = {"pass": done.id, "source": source or DEFAULT_SOURCE,
              "studies": sum(not r.series for r in rows),
              "differences": len(rec.differences(rows)), "objects_checked": len(checked),
              "checksum_findings": len(findings),
              "migrated": sum(p.migrated for p in progress), "on_pacs": sum(p.on_pacs for p in progress)}
    result["report"] = str(_write_reconcile(settings, done, rows, findings, progress, result))
    get_run_logger().info("reconcile pass %d: %d studies, %d differences, %d of %d checked objects differ",
                          done.id, result["studies"], result["differences"], len(findings), len(checked))
    return result


def _write_reconcile(settings: Settings, done: InventoryPass, rows: list[rec.ReconcileRow],
                     findings: list[rec.ChecksumFinding], progress: list[rec.YearProgress],
                     result: dict[str, Any]) -> Path:
    """The CSV files and the chart under ``<catalog_root>/_reports/migrate/``, and the artifacts."""
    folder = report_dir(settings.catalog_root) / "migrate"
    named = "" if result["source"] == DEFAULT_SOURCE else f"-{result['source']}"
    stem = f"reconcile{named}-pass{done.id}-{new_run_id()}"
    svg = chart_svg(rec.progress_chart(progress))
    write_atomic(folder / f"{stem}.csv", rec.as_csv(rows).encode())
    write_atomic(folder / f"{stem}-checksums.csv", rec.checksums_csv(findings).encode())
    write_atomic(folder / f"{stem}-progress.svg", svg.encode())
    differ = rec.differences(rows)
    create_table_artifact([vars(r) for r in differ[:1000]] or [{"status": "no difference"}],
                          key="migrate-reconcile", description=f"reconcile pass {done.id}: differences")
    lines = [f"# Reconcile pass {done.id} of {result['source']}", "",
             f"{result['studies']:,} studies, {len(differ):,} differences; {result['objects_checked']:,} stored "
             f"objects re-checked, {len(findings):,} differ. Migrated {result['migrated']:,} of "
             f"{result['on_pacs']:,} studies on the PACS.", "", f"![progress]({svg_data_uri(svg)})", "",
             f"Report: `{folder / stem}.csv`"]
    lines += [f"- {f.study} {f.instance}: {f.status}" for f in findings[:LISTED]]
    create_markdown_artifact("\n".join(lines), key="migrate-reconcile-summary",
                             description=f"reconcile pass {done.id}")
    return folder / f"{stem}.csv"


# -- run, pause, resume, and the gate a shard calls ---------------------------------------------
def ensure_rate_limit(per_min: float) -> None:
    """The global concurrency limit that lets ``per_min`` studies a minute through: as many slots
    as a minute's worth (the burst), each given back at ``per_min / 60`` a second."""
    limit, decay = max(1, math.ceil(per_min)), per_min / 60
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(RATE_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                name=RATE_LIMIT, limit=limit, slot_decay_per_second=decay))
            return
        if current.limit != limit or current.slot_decay_per_second != decay or not current.active:
            client.update_global_concurrency_limit(RATE_LIMIT, GlobalConcurrencyLimitUpdate(
                limit=limit, slot_decay_per_second=decay, active=True))


def migration_gate(n_studies: int = 1, *, settings: Settings | None = None) -> None:
    """Call before retrieving ``n_studies`` studies of a migration: returns when they may go.

    No migration configured (``pacsflow migrate run`` never ran against this state database):
    returns at once. Paused: raises ``MigrationPaused``; outside the window: raises
    ``MigrationWindowClosed`` (both ``MigrationHeld``, a TransientError: stop the shard, leave its
    studies to the next plan; do not retry in seconds). With a rate, waits on the Prefect rate
    limit ``migrate-rate`` first, and checks the window again after the wait."""
    settings = settings or load_run_settings()
    config = migration_store(settings).config()
    if config is None:
        return
    decide(config, dt.datetime.now()).raise_if_held()
    if config.rate_per_min:
        from prefect.concurrency.sync import rate_limit

        if (PREFECT_API_URL.value(), config.rate_per_min) not in _ENSURED:  # once a process, not per retrieve
            ensure_rate_limit(config.rate_per_min)
            _ENSURED.add((PREFECT_API_URL.value(), config.rate_per_min))
        rate_limit(RATE_LIMIT, occupy=max(1, min(n_studies, math.ceil(config.rate_per_min))), strict=True)
        decide(config, dt.datetime.now()).raise_if_held()


def _plan_flow() -> Any:
    try:
        module = importlib.import_module("pacsflow.flows.plan")
    except ModuleNotFoundError as exc:
        if exc.name != "pacsflow.flows.plan":
            raise
        raise MigrationNotReady("migrate run: the plan flow (pacsflow.flows.plan) is not in this installation; "
                                "update pacsflow to a version with shard flows") from None
    return module.plan


@flow(name="migrate-run", persist_result=False)
def migrate_run(since: dt.date | None = None, until: dt.date | None = None) -> dict[str, Any]:
    """When the migration's window is open and it is not paused, plan its shards (the ``plan``
    flow, as a subflow, over ``since``..``until``); otherwise do nothing and say why: no C-FIND and
    no C-MOVE leave here then. Scheduled every few minutes, it starts the shards as the window opens."""
    settings = load_run_settings()
    config = migration_store(settings).config()
    logger = get_run_logger()
    if config is None:
        logger.info("no migration configured (pacsflow migrate run --window ...): nothing to do")
        return {"status": "no migration configured"}
    if config.rate_per_min:  # the Prefect server's limit follows the last `migrate run --rate`
        ensure_rate_limit(config.rate_per_min)
    decision = decide(config, dt.datetime.now())
    if not decision.go:
        logger.info("migration %s: no shard started", decision.status)
        return {"status": decision.status}
    plan = _plan_flow()
    return {"status": "started", "plan": plan(since=since, until=until)}

