"""The dashboard as an analyst sees it: ``pacsflow serve`` runs on a real catalog, lake and FHIR
ledger; headless Chromium signs in once with ``?token=`` (then the cookie), parses the page and paints
it. Every bar and point must carry the catalog's count for its category, counted here independently
from the catalog's rows; the screenshot must show each chart's colours.

``python -m tests.integration.test_dashboard_browser docs/dashboard.png`` makes the README's picture.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from pacsflow.catalog.views import connect
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.ingest.report import BLUE, GREEN, ORANGE, PURPLE, SKY
from pacsflow.tasks.settings import load_settings
from pacsflow.tasks.web.tokens import Scope, TokenStore
from tests.browser import chromium
from tests.helpers import build_catalog, free_port

pytestmark = pytest.mark.integration
STUDIES, SYNCED = 30, 20
MARK = re.compile(r'<(?:rect|circle) class="(?:bar|point)" data-series="([^"]*)"[^>]*><title>([^<]*)</title>')
CHART = re.compile(r'<svg [^>]*class="chart" id="([^"]+)".*?</svg>', re.S)


def make_deployment(root: Path) -> tuple[Path, str]:
    """A lake of generated studies over about a year, two thirds of them synced to FHIR and one
    failed; returns the catalog root and a read token."""
    build_catalog(root, studies=STUDIES, series_per_study=(1, 4), instances_per_series=(1, 4),
                  end_date=dt.date(2026, 11, 1), days=330, seed=11, modalities=("CT", "MR", "MG", "US"),
                  rows=16, cols=16)
    settings = load_settings(state_root=root / "state", catalog_root=root / "catalog")
    uids = sorted(r[0] for r in sql(root / "catalog", "SELECT study_uid FROM studies"))
    ledger = FhirSyncLedger.under(settings.state_root)
    ledger.mark_synced([(u, "h", f"is-{i}") for i, u in enumerate(uids[:SYNCED])], "run-1")
    ledger.mark_failed([(uids[SYNCED], "FhirRejected: HAPI-0450", False)], "run-1")
    return root / "catalog", TokenStore(settings.tokens_path).add("analyst", {Scope.READ})


def sql(catalog: Path, query: str) -> list[tuple]:
    with closing(connect(catalog)) as con:
        return con.execute(query).fetchall()


@contextmanager
def pacsflow_serve(root: Path) -> Iterator[str]:
    """``pacsflow serve`` as a process, configured through the environment; its base URL."""
    port = free_port()
    env = dict(os.environ, PACSFLOW_STATE_ROOT=str(root / "state"), PACSFLOW_CATALOG_ROOT=str(root / "catalog"),
               PACSFLOW_STORAGE_ROOT=str(root / "lake"), PACSFLOW_SERVE__PORT=str(port))
    env.pop("PACSFLOW_CONFIG", None)
    cli = Path(sys.executable).with_name("pacsflow")
    proc = subprocess.Popen([str(cli), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pacsflow serve did not start: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    catalog, token = make_deployment(root)
    with pacsflow_serve(root) as url:
        yield url, token, catalog


def marks(dom: str) -> dict[str, dict[tuple[str, str], float]]:
    """Per chart: (series, category) -> the number its bar or point says it shows."""
    out: dict[str, dict[tuple[str, str], float]] = {}
    for chart in CHART.finditer(dom):
        found = out.setdefault(chart.group(1), {})
        for series, title in MARK.findall(chart.group(0)):
            series, title = html.unescape(series), html.unescape(title)
            label, value = title.removeprefix(series + ", ").rsplit(": ", 1)
            found[series, label] = float(value.replace(",", ""))
    return out


def expected_counts(catalog: Path) -> dict[str, dict[tuple[str, str], float]]:
    """The same numbers, counted in Python from plain rows of the catalog."""
    series_rows = sql(catalog, "SELECT study_month, modality, study_uid, body_part_examined FROM series")
    instance_rows = sql(catalog, "SELECT s.study_month, s.modality FROM instances i JOIN series s USING (series_uid)")
    studies = Counter((month, modality) for month, modality, _uid in {r[:3] for r in series_rows})
    instances = Counter(instance_rows)
    per_study = Counter(Counter(r[2] for r in series_rows).values())
    body = Counter(r[3] for r in series_rows)
    body_studies = Counter(part for part, _uid in {(r[3], r[2]) for r in series_rows})
    return {
        "modality-studies": {(m, month): float(n) for (month, m), n in studies.items()},
        "modality-instances": {(m, month): float(n) for (month, m), n in instances.items()},
        "series-per-study": {("studies", str(k)): float(n) for k, n in per_study.items()},
        "body-parts": {**{("series", k): float(n) for k, n in body.items()},
                       **{("studies", k): float(n) for k, n in body_studies.items()}},
        "fhir-state": {("studies", "synced"): SYNCED, ("studies", "failed"): 1.0,
                       ("studies", "unsent"): float(STUDIES - SYNCED - 1)},
    }


def test_chromium_draws_every_chart_from_the_catalogs_counts(served):
    url, token, catalog = served
    dom = chromium("--dump-dom", f"{url}/dashboard?token={token}")  # redirected, then signed in by the cookie
    drawn = marks(dom)
    assert set(drawn) == {"modality-studies", "modality-instances", "body-parts", "devices", "series-per-study",
                          "fhir-state"}
    for chart, counts in expected_counts(catalog).items():
        nonzero = {k: v for k, v in drawn[chart].items() if v}
        assert nonzero == counts, chart  # every bar/point with a count is the catalog's count
    months = {label for _series, label in drawn["modality-studies"]}
    assert len(months) >= 6 and {s for s, _ in drawn["modality-studies"]} == {"CT", "MR", "MG", "US"}
    assert sum(v for (s, _), v in drawn["devices"].items() if s == "series") == sql(
        catalog, "SELECT count(*) FROM series")[0][0]
    assert f"{STUDIES - SYNCED} studies (1 failed, {STUDIES - SYNCED - 1} never sent)" in dom
    identifiers = sql(catalog, "SELECT patient_pseudo_id, study_uid FROM studies")
    assert token not in dom and not [v for row in identifiers for v in row if v in dom]  # counts only


def test_without_a_token_chromium_gets_the_sign_in_form(served):
    url, _, _ = served
    dom = chromium("--dump-dom", f"{url}/dashboard")
    assert 'name="token"' in dom and "<svg" not in dom


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def screenshot(url: str, token: str, png: Path, height: int = 1900) -> Path:
    chromium(f"--screenshot={png}", f"--window-size=1380,{height}", f"{url}/dashboard?token={token}")
    return png


def test_chromium_paints_the_charts_in_their_colours(served, tmp_path):
    url, token, _ = served
    png = screenshot(url, token, tmp_path / "dashboard.png")
    with Image.open(png) as im:
        raw = im.convert("RGB").tobytes()
    pixels = Counter(zip(raw[0::3], raw[1::3], raw[2::3]))
    assert 0.3 < pixels[(255, 255, 255)] / sum(pixels.values()) < 0.97
    for colour in (BLUE, ORANGE, GREEN, SKY, PURPLE):  # modalities, body parts, devices, series, FHIR
        assert pixels[_rgb(colour)] > 40, colour


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        _catalog, read_token = make_deployment(Path(tmp))
        with pacsflow_serve(Path(tmp)) as base:
            print(screenshot(base, read_token, Path(sys.argv[1]).resolve(), height=1640))
