"""pacsflow's alerts: Prefect automations read from ``deployments/automations/*.yaml`` and put on
the Prefect server that runs the deployments, notifying through a notification block there.

The files hold ``${...}`` placeholders for what differs between sites (the block, the nightly
deadline, the work pool); ``{{ ... }}`` in them are Prefect's own templates, filled in when an
automation fires. Applying is idempotent: an automation is found by its name and updated, so running
``pacsflow alerts apply`` again after editing a file or changing an option replaces, never adds.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from pacsflow.tasks.settings import SettingsError

BLOCK_NAME = "pacsflow-alerts"
DEFAULT_BLOCK = f"custom-webhook/{BLOCK_NAME}"
DEFAULT_WORK_POOL = "pacsflow-local"  # prefect.yaml's pool
DEFAULT_NIGHTLY_HOURS = 6.0


def automation_files() -> list[Path]:
    """The automation files shipped with the package (``deployments/automations/``)."""
    folder = resources.files("pacsflow.deployments") / "automations"
    return sorted(Path(str(folder)).glob("*.yaml"))


@dataclass(frozen=True)
class AlertOptions:
    """What the automation files leave open: where notifications go and the site's limits."""

    block_document_id: UUID
    nightly_hours: float = DEFAULT_NIGHTLY_HOURS
    work_pool: str = DEFAULT_WORK_POOL

    def placeholders(self) -> dict[str, Any]:
        seconds = round(self.nightly_hours * 3600)
        return {
            "block_document_id": str(self.block_document_id),
            "nightly_deadline_s": seconds,
            "nightly_deadline": duration_text(seconds),
            "work_pool": self.work_pool,
        }


def duration_text(seconds: int) -> str:
    """``6 h``, ``90 min``, ``15 s``: the deadline as the notification names it."""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _fill(node: Any, values: dict[str, Any]) -> Any:
    """``node`` with every ``${name}`` replaced; a string that is one placeholder becomes the value
    itself (a number stays a number). An unknown placeholder is an error, not left in place."""
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if not isinstance(node, str) or "$" not in node:
        return node
    whole = node.strip()
    if whole.startswith("${") and whole.endswith("}") and whole[2:-1] in values:
        return values[whole[2:-1]]
    return string.Template(node).substitute(values)


def load_automations(options: AlertOptions, files: Iterable[Path] | None = None) -> list[AutomationCore]:
    """The automations of ``files`` (default: the shipped ones) with the placeholders filled in,
    validated by Prefect's own model."""
    found = []
    for path in automation_files() if files is None else files:
        try:
            raw = _fill(yaml.safe_load(path.read_text()), options.placeholders())
        except KeyError as exc:
            raise SettingsError(f"{path.name}: unknown placeholder ${{{exc.args[0]}}}") from None
        for item in raw if isinstance(raw, list) else [raw]:
            found.append(AutomationCore.model_validate(item))
    return found


def notification_block_id(client: SyncPrefectClient, ref: str) -> UUID:
    """The id of the notification block ``ref`` (``<block-type-slug>/<name>``, as ``prefect block
    ls`` shows it) on the server."""
    slug, _, name = ref.partition("/")
    if not name:
        raise SettingsError(f"--block {ref!r}: expected <block-type-slug>/<name>, e.g. {DEFAULT_BLOCK}")
    try:
        document = client.read_block_document_by_name(name=name, block_type_slug=slug, include_secrets=False)
    except ObjectNotFound:
        raise SettingsError(f"--block {ref!r}: no such block on the Prefect server; create one first "
                            "(README \"Alerts\")") from None
    capabilities = document.block_schema.capabilities if document.block_schema else []
    if "notify" not in capabilities:
        raise SettingsError(f"--block {ref!r} is not a notification block")
    return document.id


def put_automations(client: SyncPrefectClient, automations: list[AutomationCore]) -> list[tuple[str, str]]:
    """Create each automation, or update the one of the same name (and delete further copies of
    that name, left by hand or by ``prefect automation create``). Returns (name, what was done)."""
    done = []
    for automation in automations:
        same_name = client.read_automations_by_name(automation.name)
        if not same_name:
            client.create_automation(automation)
            done.append((automation.name, "created"))
            continue
        *extra, keep = same_name  # the server lists the most recently updated first: keep the oldest
        client.update_automation(keep.id, automation)
        for copy in extra:
            client.delete_automation(copy.id)
        done.append((automation.name, "updated" + (f", {len(extra)} duplicates deleted" if extra else "")))
    return done


def save_webhook_block(url: str, name: str = BLOCK_NAME) -> str:
    """A ``custom-webhook`` notification block on the server that POSTs JSON to ``url``: ``text``
    (what Slack, Mattermost and Teams incoming webhooks show) and ``subject``/``body`` apart.
    Replaces the block of that name. Returns the reference ``--block`` takes."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    _require_api()
    block = CustomWebhookNotificationBlock(
        name=name, url=url,
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
    )
    block.save(name, overwrite=True)
    return f"{block.get_block_type_slug()}/{name}"


def _require_api() -> None:
    # Without a URL Prefect would start a throwaway server of this process and keep nothing.
    if not PREFECT_API_URL.value():
        raise SettingsError("PREFECT_API_URL is not set: point it at the Prefect server that runs the "
                            "deployments, e.g. http://127.0.0.1:4200/api")


def apply_alerts(block: str = DEFAULT_BLOCK, nightly_hours: float = DEFAULT_NIGHTLY_HOURS,
                 work_pool: str = DEFAULT_WORK_POOL) -> list[tuple[str, str]]:
    """Put pacsflow's automations on the Prefect server of ``PREFECT_API_URL``, notifying through
    ``block``. Returns (automation name, what was done) for each."""
    _require_api()
    if nightly_hours * 3600 < 10:
        raise SettingsError("--nightly-hours: Prefect needs at least 10 seconds")
    with get_client(sync_client=True) as client:
        options = AlertOptions(notification_block_id(client, block), nightly_hours, work_pool)
        return put_automations(client, load_automations(options))
