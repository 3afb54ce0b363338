"""The views file of ``pacsflow catalog views`` opens in DuckDB 1.x, not only in the DuckDB pacsflow runs with.

DuckDB 1.x is pinned (``DUCKDB_1``) in a test-only virtual environment, made once with pip from the
package index and kept under ``build/`` (git-ignored) so later runs reuse it; ``.ci/run`` makes it the
same way. The file is opened there in a subprocess. Without the index the test is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pacsflow.catalog import views
from pacsflow.catalog.store import CatalogStore
from tests.unit.test_catalog_views import make_study

DUCKDB_1 = "1.1.3"
CACHE = Path(__file__).resolve().parents[2] / "build" / f"duckdb-{DUCKDB_1}-venv"


@pytest.fixture(scope="session")
def duckdb1_python() -> Path:
    """The python of a venv holding duckdb==DUCKDB_1 (made on first use; ``.ready`` marks it complete)."""
    python = CACHE / "bin" / "python"
    if (CACHE / ".ready").exists() and python.exists():
        return python
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(CACHE)], check=True, capture_output=True)
    try:
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                        f"duckdb=={DUCKDB_1}"], check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(CACHE, ignore_errors=True)
        detail = (getattr(exc, "stderr", None) or "").strip().splitlines()[-1:] or [type(exc).__name__]
        pytest.skip(f"cannot install duckdb=={DUCKDB_1} into a test venv with pip: {detail[0]}")
    (CACHE / ".ready").write_text(DUCKDB_1)
    return python


OPEN = textwrap.dedent("""
    import json, sys, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)
    out = {"version": duckdb.__version__}
    for t in ("studies", "series", "instances"):
        out[t] = con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
    out["months"] = con.execute(
        "SELECT list(study_month ORDER BY study_uid) FROM studies").fetchone()[0]
    out["snapshot"] = con.execute("SELECT version, created_at::VARCHAR FROM catalog_snapshot").fetchone()[0]
    print(json.dumps(out))
""")


def _open_with_duckdb1(python: Path, db: Path) -> dict:
    done = subprocess.run([str(python), "-c", OPEN, str(db)], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_views_file_opens_in_duckdb_1(tmp_path, duckdb1_python):
    root = tmp_path / "catalog"
    store = CatalogStore(root)
    store.commit(make_study("1.6.1", "20040119", ("CT",), 3))
    store.commit(make_study("1.6.2", None, ("CT", "MR"), 2))
    db = views.write_views_database(root, tmp_path / "catalog.duckdb")
    got = _open_with_duckdb1(duckdb1_python, db)
    assert got == {"version": DUCKDB_1, "studies": 2, "series": 3, "instances": 7,
                   "months": ["2004-01", None], "snapshot": 2}
    # live: a later commit shows without writing the file again
    store.delete(["1.6.1"])
    assert _open_with_duckdb1(duckdb1_python, db)["instances"] == 4


def test_writing_the_views_file_again_replaces_a_newer_format_file(tmp_path, duckdb1_python):
    """A file written by an earlier pacsflow in DuckDB's newest format becomes readable by 1.x."""
    import duckdb

    root = tmp_path / "catalog"
    CatalogStore(root).commit(make_study("1.6.1", "20040119", ("CT",), 1))
    db = tmp_path / "catalog.duckdb"
    duckdb.connect(str(db)).close()  # the installed DuckDB's default storage format
    views.write_views_database(root, db)
    assert _open_with_duckdb1(duckdb1_python, db)["studies"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog", "catalog.duckdb"]  # no temporary left
