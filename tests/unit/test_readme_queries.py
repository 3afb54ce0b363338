"""The README's SQL runs as written against a catalog built by the real pipeline pieces."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from pacsflow.catalog.views import query
from tests.helpers import build_catalog

README = Path(__file__).resolve().parents[2] / "README.md"
SQL_BLOCKS = re.findall(r"```sql\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def catalog_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    build_catalog(root, studies=6, days=40, end_date=dt.date(2026, 11, 27), seed=7, modalities=("CT", "MR", "MG"))
    return root / "catalog"


def test_readme_has_queries():
    assert len(SQL_BLOCKS) >= 4


@pytest.mark.parametrize("sql", SQL_BLOCKS, ids=[f"query{i}" for i in range(len(SQL_BLOCKS))])
def test_readme_query_runs(catalog_root, sql):
    table = query(catalog_root, sql)
    assert table.num_rows > 0
