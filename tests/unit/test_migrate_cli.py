"""`pacsflow migrate pause|resume|status` and the checks `run` makes before it starts anything."""

from typer.testing import CliRunner

from pacsflow.flows.cli import app
from pacsflow.tasks.migrate.control import MigrationConfig
from pacsflow.tasks.migrate.store import MigrationStore

runner = CliRunner()


def test_pause_resume_and_status_act_on_the_state_database(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path))
    assert "no migration configured" in runner.invoke(app, ["migrate", "status"]).output
    refused = runner.invoke(app, ["migrate", "pause"])
    assert refused.exit_code == 1 and "no migration configured" in refused.output
    bad = runner.invoke(app, ["migrate", "run", "--window", "19:00-25:00"])
    assert bad.exit_code == 2 and MigrationStore.under(tmp_path).config() is None

    MigrationStore.under(tmp_path).save_config(MigrationConfig("19:00-06:00", rate_per_min=60))
    paused = runner.invoke(app, ["migrate", "pause"])
    assert paused.exit_code == 0 and "(paused)" in paused.output
    assert MigrationStore.under(tmp_path).config().paused
    assert "now: paused" in runner.invoke(app, ["migrate", "status"]).output
    assert runner.invoke(app, ["migrate", "resume"]).exit_code == 0
    assert MigrationStore.under(tmp_path).config() == MigrationConfig("19:00-06:00", rate_per_min=60)
