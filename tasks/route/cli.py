"""``pacsflow route``: check routing rules before the listener uses them.

``route test FILE...`` shows what the rules decide for files at hand; ``route dry-run`` runs them
over the studies already in the catalog. Both print rule names, destinations, SOP classes,
modalities and counts: never patient attributes. pydicom, DuckDB and the settings are imported
when a command runs, so ``pacsflow --help`` stays fast.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from pacsflow.catalog.views import Catalog
    from pacsflow.tasks.route.rules import Decision, RoutingRules

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)

ERROR_PREFIX = "pacsflow: error: "

# Catalog columns whose values de-identification leaves as they were received, by keyword. Other
# keywords (StationName, descriptions, institution) are cleaned or replaced in the catalog, and
# calling_ae is not kept at all: rules that read them are not decided from the catalog.
CATALOG_KEYWORDS: dict[str, str] = {
    "Modality": "modality", "BodyPartExamined": "body_part_examined", "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model_name", "SOPClassUID": "sop_class_uid",
}

# One row per series and SOP class: the rules read series-level values (and the SOP class).
DRY_RUN_SQL = (
    "SELECT i.study_uid, i.series_uid, s.modality, s.body_part_examined, s.manufacturer, "
    "s.manufacturer_model_name, i.sop_class_uid, count(*) AS instances "
    "FROM instances i JOIN series s ON s.study_uid = i.study_uid AND s.series_uid = i.series_uid "
    "WHERE i.study_date BETWEEN ? AND ? "
    "GROUP BY ALL ORDER BY i.study_uid, i.series_uid"
)

app = typer.Typer(
    name="route",
    help="Check routing rules (listener.rules_file): on files at hand, or over the catalog.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _fail(exc: BaseException) -> NoReturn:
    """A configuration problem (rules, settings, catalog folder): one line, exit status 2."""
    stderr.print(f"{ERROR_PREFIX}{type(exc).__name__}: {exc}", markup=False)
    raise typer.Exit(2)


def _settings() -> Any:
    from pacsflow.tasks.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as exc:
        _fail(exc)


def load_rules(path: Path | None) -> RoutingRules:
    """The rules of ``path``, else of the listener.rules_file setting (exit 2 when unusable)."""
    from pacsflow.tasks.route.rules import RoutingRules, RulesError

    if path is None:
        path = _settings().listener.rules_file
        if path is None:
            _fail(RulesError("listener.rules_file is not set: pass --rules FILE"))
    try:
        return RoutingRules.load(path)
    except RulesError as exc:
        _fail(exc)


RulesOption = Annotated[
    Optional[Path], typer.Option("--rules", help="rules file (YAML); default: the listener.rules_file setting")
]


# -- route test ------------------------------------------------------------------------------------


def file_summary(path: Path, rules: RoutingRules, calling_ae: str) -> tuple[str, Decision]:
    """``SOP class name, Modality X`` of a file's header, and what the rules decide for it."""
    from pydicom import dcmread
    from pydicom.uid import UID

    from pacsflow.tasks.route.rules import Subject

    ds = dcmread(path, stop_before_pixels=True)
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    modality = str(ds.get("Modality", "") or "none")
    described = f"{sop_class.name or 'unknown SOP class'}, Modality {modality}"
    return described, rules.decide(Subject.of_dataset(ds, calling_ae))


def decision_table(rules: RoutingRules, decision: Decision) -> Table:
    table = Table(show_header=True, header_style="bold")
    for name in ("destination", "AE title", "copy", "private blocks added"):
        table.add_column(name, overflow="fold")
    for forward in decision.forwards:
        dest = rules.destinations[forward.destination]
        blocks = "; ".join(block.describe() for block in forward.annotations) or "none"
        copy = "de-identified" if dest.deidentify else "original"
        table.add_row(escape(dest.name), escape(dest.ae_title), copy, escape(blocks))
    return table


def print_file(path: Path, rules: RoutingRules, calling_ae: str) -> bool:
    """What ``path`` would get; False when it cannot be read as DICOM."""
    from pydicom.errors import InvalidDicomError

    try:
        described, decision = file_summary(path, rules, calling_ae)
    except (OSError, InvalidDicomError, ValueError) as exc:
        stderr.print(f"{path}: cannot read it as DICOM ({type(exc).__name__})", markup=False)
        return False
    out.print(f"[bold]{escape(str(path))}[/bold]: {escape(described)}", soft_wrap=True)  # paths stay whole
    if not decision.matched:
        out.print("  no rule matches: forwarded nowhere, not ingested")
        return True
    out.print(f"  rules: {escape(', '.join(decision.matched))}")
    if decision.forwards:
        out.print(decision_table(rules, decision))
    else:
        out.print("  forwarded nowhere")
    out.print(f"  ingest: {'yes' if decision.ingest else 'no'}")
    return True


@app.command("test")
def route_test(
    files: Annotated[list[Path], typer.Argument(help="DICOM files (Part 10) to route")],
    rules_file: RulesOption = None,
    calling_ae: Annotated[
        str, typer.Option("--calling-ae", help="the sender's AE title, as rules on calling_ae see it")
    ] = "",
) -> None:
    """Show, per file, which rules match and where it would go.

    For each destination: the original or a de-identified copy, with which private blocks; and
    whether its study goes to the lake.

    Prints the SOP class and modality of each file, never patient attributes. Exit 1 when a file
    cannot be read, 2 when the rules cannot."""
    rules = load_rules(rules_file)
    readable = [print_file(path, rules, calling_ae) for path in files]
    if not all(readable):
        raise typer.Exit(1)


# -- route dry-run ---------------------------------------------------------------------------------


@dataclass
class Tally:
    studies: set[str] = field(default_factory=set)
    instances: int = 0

    def add(self, study_uid: str, instances: int) -> None:
        self.studies.add(study_uid)
        self.instances += instances


@dataclass
class DryRun:
    """What the rules would have done with the catalog's studies of a window."""

    seen: Tally = field(default_factory=Tally)
    destinations: dict[str, Tally] = field(default_factory=dict)
    ingest: Tally = field(default_factory=Tally)
    undecidable: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rule -> keys the catalog lacks


def dry_run(catalog: Catalog, rules: RoutingRules, since: dt.date, until: dt.date) -> DryRun:
    """Decide every series (per SOP class) of the studies dated ``since``..``until``. A study is
    ingested when one of its objects is, so ingest counts its every instance."""
    from pacsflow.catalog.views import query

    decidable, left = rules.restricted_to(CATALOG_KEYWORDS)
    result = DryRun(destinations={name: Tally() for name in rules.destinations})
    result.undecidable = {rule.name: tuple(sorted(rule.keys() - CATALOG_KEYWORDS.keys()))
                          for rule in rules.rules if rule.name in left}
    per_study: dict[str, int] = {}
    ingested: set[str] = set()
    for row in query(catalog, DRY_RUN_SQL, [since, until]).to_pylist():
        decision = _decide_row(decidable, row)
        study, count = row["study_uid"], int(row["instances"])
        result.seen.add(study, count)
        per_study[study] = per_study.get(study, 0) + count
        for forward in decision.forwards:
            result.destinations[forward.destination].add(study, count)
        if decision.ingest:
            ingested.add(study)
    for study in ingested:
        result.ingest.add(study, per_study[study])
    return result


def _decide_row(rules: RoutingRules, row: dict[str, Any]) -> Decision:
    from pacsflow.tasks.route.rules import Subject

    return rules.decide(Subject.of_mapping({kw: row[col] for kw, col in CATALOG_KEYWORDS.items()}))


def dry_run_table(rules: RoutingRules, result: DryRun) -> Table:
    table = Table(show_header=True, header_style="bold")
    for name in ("destination", "AE title", "copy", "studies", "instances"):
        table.add_column(name, justify="right" if name in ("studies", "instances") else "left")
    for name, tally in result.destinations.items():
        dest = rules.destinations[name]
        copy = "de-identified" if dest.deidentify else "original"
        table.add_row(escape(name), escape(dest.ae_title), copy, str(len(tally.studies)), str(tally.instances))
    table.add_section()
    table.add_row("(ingest)", "", "lake", str(len(result.ingest.studies)), str(result.ingest.instances))
    return table


def _day(value: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter("expected YYYY-MM-DD", param_hint=option) from None


@app.command("dry-run")
def route_dry_run(
    since: Annotated[str, typer.Option("--since", help="first study date, YYYY-MM-DD")],
    until: Annotated[Optional[str], typer.Option("--until", help="last study date, YYYY-MM-DD; default today")]
    = None,
    rules_file: RulesOption = None,
) -> None:
    """Run the rules over the catalog: what each destination would have received.

    Prints, per destination, how many studies and instances of the window would have gone there,
    and how many studies would have been ingested.

    The catalog holds de-identified values: rules are decided on Modality, BodyPartExamined,
    Manufacturer, ManufacturerModelName and SOPClassUID, which de-identification keeps. A rule that
    reads anything else (calling_ae, StationName, ...) is listed as not decidable and left out."""
    from pacsflow.catalog.errors import CatalogNotFound

    first = _day(since, "--since")
    last = _day(until, "--until") if until else dt.date.today()
    rules = load_rules(rules_file)
    try:
        settings = _settings()
        result = dry_run(settings.catalog.reader(settings.catalog_root), rules, first, last)
    except CatalogNotFound as exc:
        _fail(exc)
    out.print(f"{first.isoformat()} .. {last.isoformat()}: {len(result.seen.studies)} studies, "
              f"{result.seen.instances} instances in the catalog")
    out.print(dry_run_table(rules, result))
    for name, keys in result.undecidable.items():
        out.print(f"rule {escape(name)}: not decidable from the catalog (reads {escape(', '.join(keys))}); "
                  "left out")


# -- route status | retry | drop (the outbox) -------------------------------------------------------


def _outbox() -> Any:
    from pacsflow.tasks.route.outbox import Outbox

    settings = _settings()
    if not (settings.listener_dir / "outbox.sqlite").exists():
        _fail(FileNotFoundError(f"no outbox under {settings.listener_dir} (state_root): has the listener run here?"))
    return Outbox.for_settings(settings)


DestinationOption = Annotated[Optional[str], typer.Option("--destination", "-d", help="only this destination")]
IdsOption = Annotated[Optional[list[int]], typer.Option("--id", help="only this outbox row (repeatable)")]


@app.command("status")
def route_status() -> None:
    """Objects per destination and delivery state, then the dead-lettered ones with their last error."""
    from pacsflow.tasks.route.outbox import DeliveryState, format_status

    outbox = _outbox()
    out.print(format_status(outbox.depth(), outbox.rows(state=DeliveryState.DEAD)), markup=False, soft_wrap=True)


@app.command("retry")
def route_retry(
    destination: DestinationOption = None,
    ids: IdsOption = None,
    now: Annotated[bool, typer.Option("--now", help="deliver them from this process now, not by the listener")]
    = False,
    rules_file: RulesOption = None,
) -> None:
    """Queue dead-lettered objects again (all, one destination's, or the given rows).

    The running listener delivers them, or this command does with ``--now``."""
    outbox = _outbox()
    count = outbox.retry(destination, ids)
    out.print(f"{count} dead-lettered objects queued again")
    if now and count:
        from pacsflow.tasks.route.forwarder import Forwarder
        from pacsflow.tasks.route.outbox import Backoff

        settings, rules = _settings(), load_rules(rules_file)
        forwarder = Forwarder(outbox, rules.destinations, settings.listener.ae_title,
                              Backoff.from_settings(settings.listener), settings.listener.timeout_s)
        out.print(f"{forwarder.deliver_due()} delivered")


@app.command("drop")
def route_drop(destination: DestinationOption = None, ids: IdsOption = None) -> None:
    """Give dead-lettered objects up for good (their prepared copies are deleted).

    Name a destination or rows: nothing is dropped without one."""
    if destination is None and not ids:
        _fail(ValueError("route drop: name --destination or --id (nothing is dropped by default)"))
    out.print(f"{_outbox().drop(destination, ids)} dead-lettered objects dropped")
