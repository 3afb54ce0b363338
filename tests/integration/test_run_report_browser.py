"""The run report as a browser shows it: headless Chromium parses the page (its DOM must hold the
charts, their marks, labels and numbers) and paints it (the screenshot must show the charts'
colours, not a blank or broken page). The markdown artifact's ``data:`` images too."""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pacsflow.tasks.ingest.report import (
    BLUE, GREEN, ORANGE, PURPLE, SKY, VERMILLION, render_report, report_markdown, write_report,
)
from tests.browser import dump_dom, sample_history, screenshot

pytestmark = pytest.mark.integration
NIGHTS = 14


class Dom(HTMLParser):
    """The serialized DOM: per chart (svg id), its elements by tag/class; all visible text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.charts: dict[str, Counter[str]] = {}
        self.legends: dict[str, list[str]] = {}
        self.text: list[str] = []
        self._chart: str | None = None
        self._cls = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self._chart = a.get("id") or "?"
            self.charts[self._chart] = Counter()
        elif self._chart:
            self.charts[self._chart][f"{tag}.{a.get('class') or ''}"] += 1
        self._cls = a.get("class") or ""

    def handle_endtag(self, tag):
        if tag == "svg":
            self._chart = None

    def handle_data(self, data):
        if data.strip():
            self.text.append(data.strip())
            if self._chart and self._cls == "legend-label":
                self.legends.setdefault(self._chart, []).append(data.strip())


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _pixels(png: Path) -> Counter[tuple[int, int, int]]:
    with Image.open(png) as im:
        raw = im.convert("RGB").tobytes()
    return Counter(zip(raw[0::3], raw[1::3], raw[2::3]))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("report")
    runs = sample_history(tmp / "history.sqlite", NIGHTS)
    return write_report(tmp / "_reports" / "report.html", render_report(runs)), runs


def test_chromium_parses_every_chart_with_its_marks_labels_and_numbers(report):
    page, runs = report
    dom = Dom(dump_dom(page))
    assert set(dom.charts) == {"modality-instances", "modality-studies", "studies", "quarantined", "throughput",
                               "duration"}
    studies = dom.charts["studies"]
    assert studies["circle.point"] == NIGHTS * 3 and studies["polyline.line"] == 3
    assert studies["text.x-label"] == NIGHTS and studies["text.y-tick"] >= 3
    assert dom.legends["studies"] == ["found", "cataloged", "failed"]
    assert dom.charts["quarantined"]["rect.bar"] == NIGHTS and dom.charts["duration"]["rect.bar"] == NIGHTS
    night = runs[-1]
    assert dom.charts["modality-instances"]["rect.bar"] == len(night.modalities) == 5
    assert dom.charts["modality-instances"]["text.value"] == 5  # the numbers on the bars
    assert dom.charts["modality-studies"]["rect.bar"] == 10  # studies and series per modality
    text = " ".join(dom.text)
    for m in night.modalities:  # the night's numbers, as a table and on the chart
        assert m.modality in text and f"{m.instances:,}" in text
    assert f"{int(night.count('instances')):,}" in text and night.run_id in text
    failed_night = next(r for r in runs if r.count("cataloged") == 0)
    assert failed_night.run_id in text  # the all-failed night is in the trend table


def test_chromium_paints_the_charts(report, tmp_path):
    page, _ = report
    png = screenshot(page, tmp_path / "report.png", height=2600)
    assert png.stat().st_size > 50_000
    pixels = _pixels(png)
    with Image.open(png) as im:
        assert im.size == (1380, 2600)
    assert len(pixels) > 50  # text, axes and six colours: not a blank page
    white = pixels[(255, 255, 255)] / sum(pixels.values())
    assert 0.3 < white < 0.97
    for colour in (BLUE, GREEN, VERMILLION, ORANGE, SKY, PURPLE):  # each series drawn, in its colour
        assert pixels[_rgb(colour)] > 40, colour


def test_the_artifact_charts_render_as_images(report, tmp_path):
    """The markdown artifact's charts are ``data:`` SVG images (what the Prefect UI shows): a
    browser must paint them as such."""
    _, runs = report
    md = report_markdown(runs)
    images = re.findall(r"!\[([^\]]+)\]\((data:image/svg\+xml;base64,[^)]+)\)", md)
    assert len(images) == 6
    html = "<!DOCTYPE html><html><body style='margin:0'>" + "".join(
        f'<img alt="{alt}" src="{src}" width="640" height="300">' for alt, src in images) + "</body></html>"
    page = write_report(tmp_path / "artifact.html", html)
    pixels = _pixels(screenshot(page, tmp_path / "artifact.png", width=1280, height=900))
    for colour in (BLUE, GREEN, ORANGE, SKY, PURPLE):
        assert pixels[_rgb(colour)] > 40, colour  # a broken image would paint its icon, not bars
