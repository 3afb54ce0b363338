"""The wheel installs one namespace, pacsflow.*, and nothing else at the top level.

Built with pip from this checkout, unpacked into a fresh virtual environment (the dependencies come
from the test environment's site-packages on PYTHONPATH, where no .pth file runs), and imported
from a folder outside the checkout, as a user's `pip install .` would be.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, cwd=out)
    [whl] = out.glob("pacsflow-*.whl")
    return whl


def test_the_wheel_holds_only_the_pacsflow_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pacsflow"}
    assert "pacsflow/tasks/deid/data/ps3.15-table-e1-1-2024b.json" in names
    assert "pacsflow/tasks/fhir/data/bodypart_snomed.json" in names
    assert {"pacsflow/deployments/automations/run-failed.yaml", "pacsflow/deployments/automations/nightly-overdue.yaml",
            "pacsflow/deployments/automations/work-pool-not-ready.yaml"} <= set(names)
    assert all(f"pacsflow/{d}/py.typed" in names for d in ("flows", "tasks", "catalog", "deployments"))
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pacsflow = pacsflow.flows.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"pacsflow." + p.parent.relative_to(ROOT).as_posix().replace("/", ".")
               for d in ("flows", "tasks", "catalog", "deployments") for p in (ROOT / d).rglob("*.py")}
    assert folders <= listed, "add the new package to [tool.setuptools] packages"


def test_a_fresh_environment_imports_pacsflow_and_not_the_folders(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "prefect")}

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=120)

    ok = run("import pacsflow.flows.nightly, pacsflow.tasks.deid.deidentifier as d; "
             "print(d.__file__); d.load_profile()")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip().startswith(site)
    shipped = run("from pacsflow.flows.alerts import automation_files as f; print(*(p.name for p in f()))")
    assert shipped.stdout.split() == ["nightly-overdue.yaml", "run-failed.yaml", "work-pool-not-ready.yaml"], \
        shipped.stderr[-2000:]
    for old in ("tasks", "flows", "catalog", "deployments"):
        gone = run(f"import {old}")
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr, old
