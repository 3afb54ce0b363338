"""``pacsflow xdsi status | consent grant|revoke|list``: the XDS-I.b publish ledger and the research-consent
flags, read and set by hand. Publishing itself is ``pacsflow run xdsi-publish`` (the root command line).

No Prefect, no network: the ledger only (``state_root/xdsi_publish.sqlite``, or ``state.url``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

if TYPE_CHECKING:
    from pacsflow.tasks.settings import Settings
    from pacsflow.tasks.xdsi.ledger import LedgerRow, XdsiLedger

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


def build_app(settings: Callable[[], Settings]) -> typer.Typer:
    app = typer.Typer(name="xdsi", no_args_is_help=True,
                      help="XDS-I.b Imaging Document Source: the publish ledger and research consent "
                           "(publish with `pacsflow run xdsi-publish`).")
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
