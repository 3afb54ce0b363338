"""The shipped automation files, as `pacsflow alerts apply` fills them in (no server: the end to end
test against a real one is tests/integration/test_alerts.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from uuid import uuid4

import pytest
import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from pacsflow.flows import console as errors_console
from pacsflow.flows.alerts import (
    DEFAULT_BLOCK,
    DEFAULT_NIGHTLY_HOURS,
    DEFAULT_WORK_POOL,
    AlertOptions,
    automation_files,
    duration_text,
    load_automations,
)
from pacsflow.flows.cli import app
from pacsflow.flows.compact import compact_catalog
from pacsflow.flows.fhir_resync import fhir_resync
from pacsflow.flows.nightly import nightly_ingest
from pacsflow.flows.sweep import reconciliation_sweep
from pacsflow.flows.xdsi_publish import xdsi_publish
from pacsflow.tasks.settings import SettingsError

ROOT = Path(__file__).resolve().parents[2]
BLOCK = uuid4()


@pytest.fixture(scope="module")
def automations():
    found = load_automations(AlertOptions(BLOCK, nightly_hours=6.5, work_pool="site-pool"))
    return {a.name: a for a in found}


def test_every_file_fills_in_and_notifies_through_the_block(automations):
    assert sorted(automations) == ["pacsflow-nightly-overdue", "pacsflow-run-failed", "pacsflow-work-pool-not-ready"]
    assert len(automation_files()) == 3
    for automation in automations.values():
        assert "${" not in automation.model_dump_json()
        [action] = automation.actions
        assert action.type == "send-notification" and action.block_document_id == BLOCK


def test_a_failed_or_crashed_run_of_any_of_our_flows_alerts(automations):
    trigger = automations["pacsflow-run-failed"].trigger
    ours = {f.name for f in (nightly_ingest, reconciliation_sweep, compact_catalog, fhir_resync, xdsi_publish)}
    assert set(trigger.match_related["prefect.resource.name"]) == ours  # renaming a flow must update the file
    assert trigger.match_related["prefect.resource.role"] == ["flow"]
    assert set(trigger.match["prefect.state-type"]) == {"FAILED", "CRASHED"}  # by type, whatever the state's name
    assert trigger.posture == "Reactive" and trigger.expect == {"prefect.flow-run.*"}
    assert trigger.for_each == {"prefect.resource.id"}


def test_the_nightly_overdue_alert_waits_for_an_end_within_the_hours(automations):
    trigger = automations["pacsflow-nightly-overdue"].trigger
    assert trigger.posture == "Proactive" and trigger.within == dt.timedelta(hours=6.5)
    assert trigger.after == {"prefect.flow-run.Late", "prefect.flow-run.Running"}
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.match_related["prefect.resource.name"] == [nightly_ingest.name]
    assert trigger.for_each == {"prefect.resource.id"}  # one clock per run
    assert automations["pacsflow-nightly-overdue"].actions[0].subject.endswith("after 390 min")


def test_the_work_pool_alert_names_the_pool(automations):
    trigger = automations["pacsflow-work-pool-not-ready"].trigger
    assert trigger.expect == {"prefect.work-pool.not-ready"}
    assert trigger.match["prefect.resource.name"] == ["site-pool"]
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert pools == {DEFAULT_WORK_POOL}


def test_notifications_name_runs_and_states_but_carry_no_messages_logs_or_parameters(automations):
    for automation in automations.values():
        text = automation.actions[0].subject + automation.actions[0].body
        for leak in ("message", "parameters", "logs", "event.resource", "event.payload"):
            assert leak not in text, (automation.name, leak)
    failed = automations["pacsflow-run-failed"].actions[0]
    assert "{{ flow_run.name }}" in failed.subject and "{{ flow_run.state.name }}" in failed.subject


def test_an_unknown_placeholder_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrigger: {type: event}\nactions: [{type: send-notification, "
                   "block_document_id: '${block_document_id}', body: '${nobody}'}]\n")
    with pytest.raises(SettingsError, match=r"bad.yaml: unknown placeholder \$\{nobody\}"):
        load_automations(AlertOptions(BLOCK), [bad])


@pytest.mark.parametrize(("seconds", "text"), [(21600, "6 h"), (5400, "90 min"), (10, "10 s")])
def test_deadlines_read_as_people_write_them(seconds, text):
    assert duration_text(seconds) == text


def test_apply_needs_the_server_of_the_deployments():
    """Without PREFECT_API_URL Prefect would put the automations on a throwaway server."""
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["alerts", "apply"])
    assert isinstance(result.exception, SettingsError) and "PREFECT_API_URL" in str(result.exception)
    assert errors_console.exit_status(result.exception) == 2


@pytest.mark.parametrize("command", ["apply", "webhook"])
def test_alerts_commands_have_help(command):
    result = CliRunner().invoke(app, ["alerts", command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and f"Usage: pacsflow alerts {command}" in " ".join(result.output.split())
    if command == "apply":  # the command's defaults (kept light, without Prefect) are the module's
        assert DEFAULT_BLOCK in result.output and DEFAULT_WORK_POOL in result.output
        assert f"[default: {DEFAULT_NIGHTLY_HOURS}]" in result.output
