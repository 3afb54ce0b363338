"""mypy over the package as it installs (pacsflow.*): strict for the pure modules, the usual checks
elsewhere (settings in pyproject.toml). The folders are linked under build/typecheck/pacsflow so mypy
sees the namespace that pip installs; its cache in .mypy_cache keeps reruns fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "catalog", "deployments")


def _namespace_tree() -> Path:
    tree = ROOT / "build" / "typecheck"
    (tree / "pacsflow").mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = tree / "pacsflow" / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    return tree


def test_mypy_passes_over_the_package():
    tree = _namespace_tree()
    env = {**os.environ, "MYPYPATH": str(tree)}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "pacsflow"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
