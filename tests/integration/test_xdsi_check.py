"""`pacsflow xdsi check` against the real IPF XDS.b peer (deployments/xds-peer): the manifest tests'
catalog (five studies, two patients) published with pacsflow's own publish loop, then the ledger
reconciled with the registry by ITI-18 FindDocuments. A second peer, which has nothing, stands for a
registry that lost everything: every study is missing; `--fix` and a publish to it make the two agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pacsflow.flows.cli import app
from pacsflow.tasks.settings import Settings, load_settings
from pacsflow.tasks.xdsi.ledger import PublishStatus, XdsiLedger
from pacsflow.tasks.xdsi.publish import publish_catalog
from pacsflow.tasks.xdsi.reconcile import check_registry
from tests.integration.test_xds_peer import peer  # noqa: F401  (fixture re-export: one peer, skips without Java)
from tests.integration.test_xdsi_publish import own_peer
from tests.unit.test_xdsi_manifest import catalog  # noqa: F401  (fixture re-export: the five-study catalog)
from tests.xds_peer import XdsPeer
from tests.xdsi_samples import SOURCE_OID

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _settings(catalog_root: Path, state: Path, to: XdsPeer) -> Settings:
    return load_settings(catalog_root=catalog_root, state_root=state, xdsi={
        "repository_url": to.url("xds-iti41"), "registry_url": to.url("xds-iti18"), "source_oid": SOURCE_OID,
        "pseudonym_oid": to.authority, "retrieve_url": "http://127.0.0.1:9/dicom-web", "max_retries": 1,
        "retry_backoff_s": 0.1})


def _env(settings: Settings) -> dict[str, str]:
    x = settings.xdsi
    return {"PACSFLOW_CATALOG_ROOT": str(settings.catalog_root), "PACSFLOW_STATE_ROOT": str(settings.state_root),
            "PACSFLOW_XDSI__REGISTRY_URL": x.registry_url or "", "PACSFLOW_XDSI__PSEUDONYM_OID": x.pseudonym_oid or ""}


def test_published_studies_agree_and_a_registry_that_lost_them_reports_each(peer: XdsPeer, catalog,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    catalog_root, state = catalog.root / "catalog", tmp_path / "state"
    settings = _settings(catalog_root, state, peer)
    report = publish_catalog(settings)
    assert (report.ok, report.published) == (True, 5), report.message()

    checked = check_registry(settings)
    assert (checked.studies, checked.patients, checked.entries, checked.differences) == (5, 2, 5, [])
    result = CliRunner().invoke(app, ["xdsi", "check"], env=_env(settings))
    assert result.exit_code == 0, result.output
    assert "no difference" in result.output

    with own_peer(tmp_path / "empty-peer") as empty:  # a registry that knows none of it
        moved = _settings(catalog_root, state, empty)
        result = CliRunner().invoke(app, ["xdsi", "check", "--fix"], env=_env(moved))
        assert result.exit_code == 1, result.output
        for study in catalog.studies:
            assert study in result.output
        assert "5 missing" in result.output and "marked pending for the next publish run: 5" in result.output
        rows = XdsiLedger.under(state).entries()
        assert {r.status for r in rows.values()} == {PublishStatus.PENDING}

        again = publish_catalog(moved)
        assert (again.ok, again.published, again.replaced) == (True, 5, 0), again.message()
        assert check_registry(moved).differences == []
        # the first registry still holds the same KOS UIDs (deterministic), under the same entryUUIDs
        assert check_registry(settings).differences == []
