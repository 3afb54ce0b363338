"""Fault tests run against the same real servers as the flow tests: their fixtures, re-exported."""

from __future__ import annotations

from tests.flows.conftest import lake, prefect_api  # noqa: F401  (fixture re-export)
from tests.integration.conftest import hapi, orthanc_factory  # noqa: F401  (fixture re-export)
