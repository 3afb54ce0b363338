"""Issue 15, item 6 (the command line): every configuration or connection problem ends the real
``pacsflow`` command with one line naming the setting or the peer, exit status 2 (configuration) or
1 (run time), and no traceback; ``--debug`` shows the traceback. The PACS cases run the nightly flow
against a real Orthanc (through the tests' Prefect API, so no run starts a server of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from tests.helpers import free_port

pytestmark = pytest.mark.integration

PACSFLOW = Path(sys.executable).parent / "pacsflow"


def pacsflow(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run the console script; (exit status, stdout + stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW_")}
    proc = subprocess.run([str(PACSFLOW), *args], env={**clean, "COLUMNS": "300", **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr


def error_line(output: str) -> str:
    """The command's one error line; the output holds no traceback."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("pacsflow: error: ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.fixture
def base_env(tmp_path) -> dict[str, str]:
    return {
        "PACSFLOW_STORAGE_ROOT": str(tmp_path / "lake" / "dicom"),
        "PACSFLOW_CATALOG_ROOT": str(tmp_path / "lake" / "catalog"),
        "PACSFLOW_STATE_ROOT": str(tmp_path / "state"),
        "PACSFLOW_DEID_KEY": "cli-errors-test-key-0123456789",
        "PACSFLOW_MIN_FREE_MB": "0",
    }


def _broken_yaml(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "pacsflow.yaml"
    path.write_text("pacs:\n  port: [4242\ndeid_key: do-not-print-me-0123456789\n")
    return {"PACSFLOW_CONFIG": str(path)}


FHIR_PORT = free_port()  # nothing listens there

# (case, command, extra env, exit status, texts the error line must hold)
QUICK_CASES = [
    ("malformed-yaml", ["settings"], _broken_yaml, 2, ["SettingsError", "PACSFLOW_CONFIG", "pacsflow.yaml",
                                                       "not valid YAML"]),
    ("missing-config", ["settings"], lambda t: {"PACSFLOW_CONFIG": str(t / "nowhere.yaml")}, 2,
     ["PACSFLOW_CONFIG", "no file at", "nowhere.yaml"]),
    ("missing-key-file", ["run", "nightly"],
     lambda t: {"PACSFLOW_DEID_KEY": "", "PACSFLOW_DEID_KEY_FILE": str(t / "no.key")}, 2,
     ["deid_key_file", "no.key", "No such file or directory"]),
    ("unreadable-key-file", ["run", "nightly"],
     lambda t: {"PACSFLOW_DEID_KEY": "", "PACSFLOW_DEID_KEY_FILE": str(t)}, 2,
     ["deid_key_file", "Is a directory"]),
    ("missing-catalog", ["catalog", "query", "SELECT count(*) FROM studies"],
     lambda t: {"PACSFLOW_CATALOG_ROOT": str(t / "no-catalog")}, 2,
     ["CatalogNotFound", "catalog_root", "no-catalog"]),
    ("fhir-unreachable", ["run", "fhir-resync"],
     lambda t: {"PACSFLOW_FHIR__BASE_URL": f"http://127.0.0.1:{FHIR_PORT}/fhir", "PACSFLOW_FHIR__MAX_RETRIES": "0"},
     1, ["FhirUnavailable", f"127.0.0.1:{FHIR_PORT}"]),
]


@pytest.mark.parametrize(("case", "args", "extra", "status", "texts"), QUICK_CASES, ids=[c[0] for c in QUICK_CASES])
def test_problems_found_before_a_run_starts_end_in_one_line(tmp_path, base_env, case, args, extra, status, texts):
    env = {**base_env, **extra(tmp_path)}
    env = {k: v for k, v in env.items() if v}  # "" = unset
    code, output = pacsflow(args, env, tmp_path)
    assert code == status, output[-3000:]
    line = error_line(output)
    for text in texts:
        assert text in line, line
    assert "do-not-print-me" not in output


def test_debug_shows_the_traceback(tmp_path, base_env):
    code, output = pacsflow(["--debug", "settings"], {**base_env, **_broken_yaml(tmp_path)}, tmp_path)
    assert code == 2
    assert "Traceback" in output and "SettingsError" in output and "PACSFLOW_CONFIG" in output
    assert "do-not-print-me" not in output


# -- the PACS will not talk to us: found inside the nightly flow --------------------------------
@pytest.fixture(scope="module")
def orthanc(orthanc_factory):
    return orthanc_factory()


@pytest.fixture
def run_env(base_env, orthanc, prefect_api) -> dict[str, str]:
    return {
        **base_env,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PACSFLOW_PACS__PORT": str(orthanc.dicom_port),
        "PACSFLOW_PACS__HTTP_URL": orthanc.rest_url,
        "PACSFLOW_RECEIVER__PORT": str(free_port()),
        "PACSFLOW_PACS__TIMEOUT_S": "20",
    }


PACS_CASES = [
    ("wrong-port", lambda o: {"PACSFLOW_PACS__PORT": str(free_port())}, 1,
     ["PacsUnavailable", "127.0.0.1:", "pacs.host and pacs.port"]),
    ("unknown-called-ae", lambda o: {"PACSFLOW_PACS__CALLED_AE": "NOTTHEPACS"}, 2,
     ["PacsConfigurationError", "NOTTHEPACS@", "pacs.called_ae"]),
    ("calling-ae-refused", lambda o: {"PACSFLOW_CALLING_AE": "STRANGER"}, 2,
     ["PacsConfigurationError", "calling AE 'STRANGER'", "calling_ae"]),
]


@pytest.mark.parametrize(("case", "extra", "status", "texts"), PACS_CASES, ids=[c[0] for c in PACS_CASES])
def test_a_pacs_that_will_not_talk_to_us_ends_the_run_in_one_line(tmp_path, run_env, orthanc, case, extra, status,
                                                                   texts):
    code, output = pacsflow(["run", "nightly"], {**run_env, **extra(orthanc)}, tmp_path)
    assert code == status, output[-3000:]
    line = error_line(output)
    for text in texts:
        assert text in line, line
    assert "timed out" not in line
    # Prefect logged the failure: as one line on the console (the API keeps the traceback)
    assert "Encountered exception during execution" in output


def test_debug_keeps_the_tracebacks_of_a_run(tmp_path, run_env):
    code, output = pacsflow(["--debug", "run", "nightly"], {**run_env, "PACSFLOW_CALLING_AE": "STRANGER"}, tmp_path)
    assert code == 2, output[-3000:]
    assert output.count("Traceback") >= 2  # Prefect's log record and the command's own
    assert "calling AE 'STRANGER'" in output
