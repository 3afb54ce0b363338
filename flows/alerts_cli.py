"""``pacsflow alerts``: put pacsflow's Prefect automations on the server (``flows/alerts.py``).

Prefect loads only when a command runs, so ``pacsflow --help`` stays quick. Errors (no
``PREFECT_API_URL``, an unknown block) end the command with one line, exit status 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

out = Console()

BLOCK_HELP = "notification block on the server, <block-type-slug>/<name> as `prefect block ls` shows it"


def build_app() -> typer.Typer:
    app = typer.Typer(help="Prefect automations that notify operators (README \"Alerts\").",
                      no_args_is_help=True)

    @app.command("apply")
    def apply(
        block: Annotated[str, typer.Option(help=BLOCK_HELP)] = "custom-webhook/pacsflow-alerts",
        nightly_hours: Annotated[float, typer.Option(help="alert when the nightly run has not finished this "
                                                     "many hours after it became due or started")] = 6.0,
        work_pool: Annotated[str, typer.Option(help="the work pool of the deployments (prefect.yaml)")]
        = "pacsflow-local",
    ) -> None:
        """Create or update (by name) pacsflow's automations on the Prefect server.

        The automations of deployments/automations/*.yaml (a run Failed or Crashed, the nightly
        overdue, the work pool not ready) go to the server of PREFECT_API_URL; re-running updates them."""
        from pacsflow.flows.alerts import apply_alerts

        for name, what in apply_alerts(block, nightly_hours, work_pool):
            out.print(f"{name}: {what}")

    @app.command("webhook")
    def webhook(
        url: Annotated[str, typer.Argument(help="the URL notifications are POSTed to (JSON)")],
        name: Annotated[str, typer.Option(help="the block's name")] = "pacsflow-alerts",
    ) -> None:
        """Create (or replace) a custom-webhook notification block for the alerts.

        The block is saved on the Prefect server of PREFECT_API_URL; give it to `pacsflow alerts apply --block`."""
        from pacsflow.flows.alerts import save_webhook_block

        ref = save_webhook_block(url, name)
        out.print(f"saved notification block {ref}; now: pacsflow alerts apply --block {ref}")

    return app
