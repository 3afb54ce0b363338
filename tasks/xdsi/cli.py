"""``pacsflow xdsi status | check | consent grant|revoke|list``: the XDS-I.b publish ledger and the
research-consent flags, read and set by hand, and the ledger reconciled with the registry. Publishing
itself is ``pacsflow run xdsi-publish`` (the root command line).

No Prefect. The ledger only (``state_root/xdsi_publish.sqlite``, or ``state.url``), but for ``check``,
which asks the registry (ITI-18, :mod:`.reconcile`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

if TYPE_CHECKING:
    from pacsflow.tasks.settings import Settings
    from pacsflow.tasks.xdsi.ledger import LedgerRow, XdsiLedger
    from pacsflow.tasks.xdsi.reconcile import CheckReport

PSEUDONYMS_HELP = "patient pseudonyms: the catalog's patient_pseudo_id, the affinity domain's patient ID"


def format_status(rows: Mapping[str, LedgerRow], *, failed: bool = False) -> str:
    """What `pacsflow xdsi status` prints: studies per status, failures per error code (transient ones
    are sent again by the next run, the others only once the study changes or with --only-failed);
    with ``failed``, each failed study with its code and reason (catalog UIDs, no PHI)."""
    from pacsflow.tasks.xdsi.ledger import PublishStatus

    by_status = Counter(row.status for row in rows.values())
    lines = [f"{status.value:>9}: {by_status.get(status, 0)}" for status in PublishStatus]
    failures = sorted((r for r in rows.values() if r.status is PublishStatus.FAILED), key=lambda r: r.study_uid)
    codes = Counter((r.error_code or "unknown", r.transient) for r in failures)
    for (code, transient), n in sorted(codes.items()):
        lines.append(f"           {n} {code} ({'transient: next run' if transient else 'permanent'})")
    if failed and failures:
        lines += ["", "failed (study, error code, attempts, reason):"]
        lines += [f"  {r.study_uid} {r.error_code or 'unknown'} {r.attempts} {r.reason or ''}" for r in failures]
    return "\n".join(lines)


def format_consents(granted: Mapping[str, str], asked: Iterable[str] = ()) -> str:
    """Each consenting pseudonym with when it was granted; with ``asked``, those pseudonyms with yes/no."""
    asked = list(asked)
    if asked:
        return "\n".join(f"{p}\t{'granted ' + granted[p] if p in granted else 'no consent'}" for p in asked)
    return "\n".join(f"{p}\tgranted {at}" for p, at in granted.items())


def differences_table(report: CheckReport) -> Any:
    """The differences ``pacsflow xdsi check`` found, as a rich table (study, kind, what)."""
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("study", no_wrap=True)  # whole, to copy
    table.add_column("difference", no_wrap=True)
    table.add_column("what", overflow="fold")
    for difference in report.differences:
        table.add_row(difference.study_uid or "-", difference.kind.value, difference.detail)
    return table


def build_app(settings: Callable[[], Settings]) -> typer.Typer:
    app = typer.Typer(name="xdsi", no_args_is_help=True,
                      help="XDS-I.b Imaging Document Source: the publish ledger, its check against the registry "
                           "and research consent (publish with `pacsflow run xdsi-publish`).")
    consent_app = typer.Typer(no_args_is_help=True, help="Research-consent flags per patient pseudonym: with "
                              "xdsi.consent_required, only consenting patients' studies are published.")
    app.add_typer(consent_app, name="consent")

    def ledger() -> XdsiLedger:
        from pacsflow.tasks.xdsi.ledger import XdsiLedger

        s = settings()
        return XdsiLedger.under(s.state_root, s.state.url)

    @app.command("status")
    def status(failed: Annotated[bool, typer.Option("--failed", help="list each failed study with its error "
                                                    "code and reason")] = False) -> None:
        """Studies per publish status (pending, published, failed) and failures per registry error code."""
        typer.echo(format_status(ledger().entries(), failed=failed))

    @app.command("check")
    def check(fix: Annotated[bool, typer.Option("--fix", help="mark each study missing from the registry "
                                                "pending in the ledger, so the next `pacsflow run xdsi-publish` "
                                                "sends it again")] = False) -> None:
        """Reconcile the ledger with the registry: ITI-18 FindDocuments at xdsi.registry_url for each
        patient pseudonym of the published studies.

        Reported, per study:
        missing: its published entry is not in the registry;
        not-approved: the registry has it, but not Approved;
        not-deprecated: the entry it replaced (RPLC) is still Approved;
        unknown: an Approved entry under our pseudonyms the ledger does not know.

        Exit status: 0 no difference, 1 differences (listed),
        2 xdsi.registry_url (PACSFLOW_XDSI__REGISTRY_URL) is not set."""
        from rich.console import Console

        from pacsflow.tasks.core.clock import new_run_id
        from pacsflow.tasks.xdsi.reconcile import check_registry, fix_missing

        s = settings()
        report = check_registry(s)
        console = Console(highlight=False)
        if report.differences:
            console.print(differences_table(report))
        console.print(report.message(), markup=False, soft_wrap=True)
        if fix:
            fixed = fix_missing(s, report, new_run_id())
            console.print(f"marked pending for the next publish run: {len(fixed)}", markup=False, soft_wrap=True)
        if report.differences:
            raise typer.Exit(1)

    @consent_app.command("grant")
    def grant(pseudonyms: Annotated[list[str], typer.Argument(help=PSEUDONYMS_HELP)]) -> None:
        """Record research consent: these patients' studies are published by the next run."""
        ledger().grant(pseudonyms)
        typer.echo(f"consent granted: {len(set(pseudonyms))}")

    @consent_app.command("revoke")
    def revoke(pseudonyms: Annotated[list[str], typer.Argument(help=PSEUDONYMS_HELP)]) -> None:
        """Withdraw research consent: nothing more is published for these patients.

        Manifests already in the registry stay there until the registry deprecates them."""
        ledger().revoke(pseudonyms)
        typer.echo(f"consent revoked: {len(set(pseudonyms))}")

    @consent_app.command("list")
    def list_consents(pseudonyms: Annotated[Optional[list[str]], typer.Argument(
            help="only these pseudonyms (default: every consenting one)")] = None) -> None:
        """The pseudonyms with research consent, and when it was granted.

        With pseudonyms given: whether each of them has consent."""
        typer.echo(format_consents(ledger().consents(), pseudonyms or ()))

    return app
