"""The README's SQL runs as written against a catalog built by the real pipeline pieces."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import pytest

from catalog.store import CatalogStore
from catalog.views import query
from deployments.local import sampledata
from tasks.deid import Deidentifier
from tasks.process import process_study, read_rows
from tasks.storage import LakeStorage

README = Path(__file__).resolve().parents[2] / "README.md"
SQL_BLOCKS = re.findall(r"```sql\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def catalog_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    studies = sampledata.generate(root / "in", studies=6, days=40, end_date=dt.date(2026, 11, 27), seed=7)
    deid = Deidentifier(b"readme-key-0123456789")
    rows = []
    for s in studies:
        staged = root / "staging" / s.study_uid
        staged.mkdir(parents=True)
        for f in s.path.rglob("*.dcm"):
            shutil.copy(f, staged / f.name)
        out = process_study(staged, deid.study_ref(s.study_uid), deid, LakeStorage(root / "lake"),
                            root / "quarantine", root / "rows" / s.study_uid)
        assert out.written == s.n_instances and not out.quarantined
        rows.append(out.rows_dir)
    CatalogStore(root / "catalog").commit(read_rows(rows))
    return root / "catalog"


def test_readme_has_queries():
    assert len(SQL_BLOCKS) >= 4


@pytest.mark.parametrize("sql", SQL_BLOCKS, ids=[f"query{i}" for i in range(len(SQL_BLOCKS))])
def test_readme_query_runs(catalog_root, sql):
    table = query(catalog_root, sql)
    assert table.num_rows > 0
