"""Flow tests: the real Prefect engine (a temporary local API via prefect_test_harness)
driving the real flow against a real Orthanc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from prefect.testing.utilities import prefect_test_harness

from pacsflow.deployments.local.orthanc import OrthancServer
from tests.helpers import free_port
from tests.integration.conftest import hapi, orthanc_factory  # noqa: F401  (fixture re-export)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass
class Lake:
    root: Path
    orthanc: OrthancServer
    receiver_port: int

    @property
    def storage(self) -> Path:
        return self.root / "lake" / "dicom"

    @property
    def catalog(self) -> Path:
        return self.root / "lake" / "catalog"

    @property
    def state(self) -> Path:
        return self.root / "state"


@pytest.fixture
def lake(tmp_path, orthanc_factory, monkeypatch, prefect_api) -> Iterator[Lake]:  # noqa: F811
    """A fresh Orthanc and empty lake/state folders, wired through PACSFLOW_* settings."""
    receiver_port = free_port()
    server = orthanc_factory(receiver_port=receiver_port)
    lake = Lake(tmp_path, server, receiver_port)
    env = {
        "PACSFLOW_PACS__PORT": str(server.dicom_port),
        "PACSFLOW_PACS__HTTP_URL": server.rest_url,
        "PACSFLOW_RECEIVER__PORT": str(receiver_port),
        "PACSFLOW_STORAGE_ROOT": str(lake.storage),
        "PACSFLOW_CATALOG_ROOT": str(lake.catalog),
        "PACSFLOW_STATE_ROOT": str(lake.state),
        "PACSFLOW_DEID_KEY": "flow-test-key-0123456789",
        "PACSFLOW_RETRY_DELAY_S": "0.2",
        "PACSFLOW_RETRIEVE_RETRIES": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield lake
    server.stop(graceful=False)
