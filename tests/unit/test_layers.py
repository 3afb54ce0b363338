"""The import contract: which layer may import what (README "Code map").

Read from the code's own import statements (every one, also those inside functions), so a
lower module that starts importing prefect, pynetdicom or httpx fails here, not in review.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("flows", "tasks", "catalog", "deployments")
OLD_TOP_LEVEL = frozenset(PACKAGE_DIRS)

# Third-party libraries that belong to one boundary each.
PREFECT_ALLOWED = ("flows/", "tasks/*/steps.py")
PYNETDICOM_ALLOWED = ("tasks/pacs/client.py", "tasks/pacs/commitment.py", "tasks/pacs/receiver.py",
                      "tasks/pacs/sender.py", "tasks/pacs/status.py")
HTTPX_ALLOWED = ("tasks/fhir/client.py", "tasks/xdsi/client.py", "deployments/")
PSYCOPG_ALLOWED = ("tasks/core/statedb.py",)  # the state database layer: every store reaches PostgreSQL through it
HTTP_SERVER_ALLOWED = ("tasks/web/", "flows/serve.py")  # fastapi, starlette, uvicorn: one HTTP boundary
HTTP_SERVER_LIBRARIES = frozenset({"fastapi", "starlette", "uvicorn"})
DELTALAKE_ALLOWED = ("catalog/table_format.py",)  # the catalog's Delta Lake backend, one module

# pacsflow subpackages a layer must not import (the arrows point one way: flows → tasks → catalog).
FORBIDDEN_INTERNAL = {
    "catalog/": ("pacsflow.tasks", "pacsflow.flows", "pacsflow.deployments"),
    "tasks/": ("pacsflow.flows", "pacsflow.deployments"),
    "tasks/core/": ("pacsflow.tasks.pacs", "pacsflow.tasks.deid", "pacsflow.tasks.lake", "pacsflow.tasks.fhir",
                    "pacsflow.tasks.ingest", "pacsflow.tasks.route", "pacsflow.tasks.hl7", "pacsflow.tasks.settings"),
    "deployments/": ("pacsflow.flows",),
}


@dataclass(frozen=True)
class Import:
    file: str  # repository-relative path
    line: int
    module: str  # absolute dotted name


def imports_of(path: Path, rel: str) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(Import(rel, node.lineno, node.module))
    return found


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(Path(rel).match(p) if "*" in p else (rel.startswith(p) if p.endswith("/") else rel == p)
               for p in patterns)


def _top(module: str) -> str:
    return module.split(".")[0]


def violations(imports: list[Import]) -> list[str]:
    """Every broken rule, one line each (file:line and why)."""
    out = []
    for imp in imports:
        where = f"{imp.file}:{imp.line} imports {imp.module}"
        if _top(imp.module) in OLD_TOP_LEVEL:
            out.append(f"{where}: use the pacsflow.* name")
        if _top(imp.module) == "prefect" and not _matches(imp.file, PREFECT_ALLOWED):
            out.append(f"{where}: only flows/ and tasks/*/steps.py may import prefect")
        if _top(imp.module) == "pynetdicom" and not _matches(imp.file, PYNETDICOM_ALLOWED):
            out.append(f"{where}: only the PACS client, receiver and status map may import pynetdicom")
        if _top(imp.module) == "httpx" and not _matches(imp.file, HTTPX_ALLOWED):
            out.append(f"{where}: only the FHIR and XDS clients (and the local stack) may import httpx")
        if _top(imp.module) == "psycopg" and not _matches(imp.file, PSYCOPG_ALLOWED):
            out.append(f"{where}: only tasks/core/statedb.py may import psycopg")
        if _top(imp.module) in HTTP_SERVER_LIBRARIES and not _matches(imp.file, HTTP_SERVER_ALLOWED):
            out.append(f"{where}: only tasks/web/ and flows/serve.py may import the HTTP server libraries")
        if _top(imp.module) == "deltalake" and not _matches(imp.file, DELTALAKE_ALLOWED):
            out.append(f"{where}: only catalog/table_format.py may import deltalake")
        for layer, banned in FORBIDDEN_INTERNAL.items():
            if imp.file.startswith(layer) and any(imp.module == b or imp.module.startswith(b + ".") for b in banned):
                out.append(f"{where}: {layer} must not depend on it")
    return out


def package_imports() -> list[Import]:
    out = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out += imports_of(path, path.relative_to(ROOT).as_posix())
    return out


def test_the_package_keeps_its_layers():
    assert violations(package_imports()) == []


def test_tests_and_benchmarks_use_the_installed_names():
    imports = []
    for folder in ("tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            imports += imports_of(path, path.relative_to(ROOT).as_posix())
    assert [v for v in violations(imports) if "use the pacsflow.* name" in v] == []


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("tasks/lake/study.py", "import prefect\n", "may import prefect"),
        ("tasks/deid/instance.py", "def f():\n    from pynetdicom import AE\n", "may import pynetdicom"),
        ("tasks/fhir/mapping.py", "import httpx\n", "may import httpx"),
        ("tasks/ingest/ledger.py", "def f():\n    import psycopg\n", "may import psycopg"),
        ("tasks/route/metrics.py", "from fastapi import FastAPI\n", "HTTP server libraries"),
        ("flows/listen.py", "import uvicorn\n", "HTTP server libraries"),
        ("catalog/views.py", "from deltalake import DeltaTable\n", "may import deltalake"),
        ("catalog/store.py", "from pacsflow.tasks.core.errors import BadDicom\n", "catalog/ must not depend"),
        ("tasks/core/files.py", "from pacsflow.tasks.settings import Settings\n", "tasks/core/ must not depend"),
        ("tasks/pacs/client.py", "from pacsflow.flows.nightly import run\n", "tasks/ must not depend"),
        ("flows/cli.py", "from tasks.settings import load_settings\n", "use the pacsflow.* name"),
    ],
)
def test_the_contract_catches_a_violation(tmp_path, rel, source, expected):
    path = tmp_path / "module.py"
    path.write_text(source)
    [problem] = violations(imports_of(path, rel))
    assert expected in problem and rel in problem


def test_steps_and_flows_may_import_prefect(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("from prefect import task\n")
    assert violations(imports_of(path, "tasks/fhir/steps.py")) == []
    assert violations(imports_of(path, "flows/nightly.py")) == []
