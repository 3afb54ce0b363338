"""The run history (SQLite under state_root) and the run report renderer, on generated histories."""

from __future__ import annotations

import base64
import datetime as dt
import re
import stat
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from pacsflow.tasks.settings import Settings
from pacsflow.tasks.ingest.bookkeeping import RunSummary
from pacsflow.tasks.ingest.history import ModalityCount, RunHistory, RunRecord, cataloged_by_modality, history_path
from pacsflow.tasks.ingest.report import (
    Chart, Series, chart_svg, render_report, report_markdown, run_labels, write_report, y_axis,
)
from tests.unit.test_catalog_views import make_study

SVG = "{http://www.w3.org/2000/svg}"
T0 = dt.datetime(2026, 11, 1, 1, 30, tzinfo=dt.timezone.utc)
CT_MR = (ModalityCount("CT", 4, 9, 900), ModalityCount("MR", 2, 6, 300))


def night(i: int, *, found=10, cataloged=9, failed=1, instances=1200, seconds=60.0, quarantined=2,
          modalities=CT_MR) -> RunRecord:
    start = T0 + dt.timedelta(days=i)
    counts = {"found": found, "queued": found, "cataloged": cataloged, "failed": failed, "instances": instances,
              "seconds": seconds, "quarantined_objects": quarantined}
    return RunRecord(f"run-{i}", "nightly", start, start + dt.timedelta(seconds=seconds), "2026-10-30..2026-11-01",
                     counts, modalities)


class Page(HTMLParser):
    """Elements by tag and class, and the visible text (outside <title>/<style>/<desc>)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._hidden = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._hidden += tag in ("title", "style", "desc")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("title", "style", "desc")

    def handle_data(self, data):
        if not self._hidden and data.strip():
            self.text.append(data.strip())

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(1 for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split()))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


# -- history ---------------------------------------------------------------------------------------
def summary(run_id: str, **counts) -> RunSummary:
    s = RunSummary(run_id, "2026-11-01..2026-11-02")
    for k, v in counts.items():
        setattr(s, k, v)
    return s


def test_history_keeps_runs_in_order_with_their_modalities(tmp_path):
    history = RunHistory(history_path(tmp_path / "state"))
    history.record(summary("a", found=5, cataloged=5, instances=50, seconds=10.0), CT_MR, finished_at=T0)
    history.record(summary("b", found=7, failed=7, seconds=4.0), (), finished_at=T0 + dt.timedelta(days=1))
    history.record(summary("s", found=1), (), flow="sweep", finished_at=T0 + dt.timedelta(days=2))

    runs = history.last(5, flow="nightly")
    assert [r.run_id for r in runs] == ["a", "b"]  # oldest first
    assert runs[0].modalities == CT_MR and runs[1].modalities == ()
    assert (runs[0].count("found"), runs[0].count("instances"), runs[0].instances_per_second) == (5, 50, 5.0)
    assert runs[1].count("failed") == 7 and runs[1].instances_per_second == 0.0
    assert runs[0].started_at == T0 - dt.timedelta(seconds=10)
    assert [r.run_id for r in history.last(1)] == ["s"]  # every flow, newest
    assert history.last(0) == []
    mode = stat.S_IMODE((tmp_path / "state" / "run-history.sqlite").stat().st_mode)
    assert mode == 0o600


def test_recording_a_run_again_replaces_its_row(tmp_path):
    history = RunHistory(history_path(tmp_path))
    history.record(summary("a", found=1), CT_MR, finished_at=T0)
    history.record(summary("a", found=2), CT_MR[:1], finished_at=T0)
    (run,) = history.last(10)
    assert run.count("found") == 2 and run.modalities == CT_MR[:1]
    assert run.count("a_counter_added_later") == 0


@pytest.mark.parametrize("backend", ["snapshot", "delta"])
def test_cataloged_by_modality_counts_only_the_given_studies(tmp_path, backend):
    settings = Settings(catalog_root=tmp_path / "catalog", state_root=tmp_path / "state", catalog={"backend": backend})
    store = settings.catalog.open_store(settings.catalog_root)
    store.commit(make_study("1.5.1", "20040119", ("CT",), 3))
    store.commit(make_study("1.5.2", "20040825", ("MR",), 2))
    store.commit(make_study("1.5.3", "20050301", ("CT", "MR"), 2))

    reader = settings.catalog.reader(settings.catalog_root)
    counts = cataloged_by_modality(reader, ["1.5.1", "1.5.3", "1.9.9"])
    assert counts == [ModalityCount("CT", 2, 2, 5), ModalityCount("MR", 1, 1, 2)]
    assert cataloged_by_modality(reader, []) == []


# -- renderer --------------------------------------------------------------------------------------
def svgs(html: str) -> dict[str, ET.Element]:
    """Every chart, parsed as the standalone XML document it must be."""
    return {el.get("id"): el for el in (ET.fromstring(m) for m in re.findall(r"<svg .*?</svg>", html, re.S))}


def test_a_fortnight_renders_every_chart_with_its_numbers():
    runs = [night(i, found=10 + i, cataloged=9 + i, instances=1000 + 100 * i) for i in range(14)]
    html = render_report(runs)
    charts = svgs(html)
    assert set(charts) == {"studies", "quarantined", "throughput", "duration", "modality-instances",
                           "modality-studies"}
    studies = charts["studies"]
    assert len(studies.findall(f"{SVG}circle")) == 14 * 3  # found, cataloged, failed per night
    assert len(studies.findall(f"{SVG}polyline")) == 3
    assert len(charts["quarantined"].findall(f"{SVG}rect[@class='bar']")) == 14
    assert len(charts["modality-studies"].findall(f"{SVG}rect[@class='bar']")) == 4  # studies + series, CT + MR
    legend = [t.text for t in studies.iter(f"{SVG}text") if t.get("class") == "legend-label"]
    assert legend == ["found", "cataloged", "failed"]
    page = Page(html)
    assert page.count("table") == 2 and page.count("tr") == 1 + 2 + 1 + 14
    assert "run-13" in page.text and "2,300" in page.text  # newest night's id and instances in the table
    assert "1 of 23 studies failed" in page.text
    x_labels = [t.text for t in studies.iter(f"{SVG}text") if t.get("class") == "x-label"]
    assert x_labels[0] == "11-01" and x_labels[-1] == "11-14"


def test_first_night_is_one_point_per_series_and_no_line():
    html = render_report([night(0)])
    studies = svgs(html)["studies"]
    assert len(studies.findall(f"{SVG}circle")) == 3 and not studies.findall(f"{SVG}polyline")
    assert "Last 1 runs" in Page(html).text


def test_zero_instances_and_zero_seconds_draw_a_flat_chart_without_nan():
    html = render_report([night(0, cataloged=0, failed=0, instances=0, seconds=0.0, quarantined=0, modalities=())])
    assert "nan" not in html.lower() and "inf" not in html.lower()
    throughput = svgs(html)["throughput"]
    (point,) = throughput.findall(f"{SVG}circle")
    ticks = [t.text for t in throughput.iter(f"{SVG}text") if t.get("class") == "y-tick"]
    assert ticks[0] == "0" and float(point.get("cy")) == pytest.approx(300 - 64)  # on the x axis
    assert "Nothing cataloged in this run." in Page(html).text
    assert "no study failed" in Page(html).text


def test_a_night_where_everything_failed_says_so():
    runs = [night(0), night(1, found=40, cataloged=0, failed=40, instances=0, modalities=())]
    page = Page(render_report(runs))
    assert "40 of 40 studies failed" in page.text
    assert page.find("p", **{"class": "verdict bad"})
    assert not page.find("svg", id="modality-instances")  # nothing cataloged: no modality chart
    failed = [c for c in svgs(render_report(runs))["studies"].findall(f"{SVG}circle") if c.get("data-series") == "failed"]
    assert len(failed) == 2 and float(failed[1].get("cy")) < float(failed[0].get("cy"))  # higher on the chart


def test_no_runs_yet():
    page = Page(render_report([]))
    assert "No runs recorded yet." in page.text and not page.count("svg")


def test_the_page_fetches_nothing_and_escapes_what_it_shows():
    html = render_report([night(0, modalities=(ModalityCount("<script>x</script>", 1, 1, 1),))])
    page = Page(html)
    assert not page.count("script") and not page.count("link") and not page.count("img")
    assert "<script>x</script>" in page.text  # shown as text, not run
    (csp,) = page.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert "default-src 'none'" in (csp["content"] or "")
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", html)


def test_many_nights_thin_the_x_labels():
    html = render_report([night(i) for i in range(60)])
    studies = svgs(html)["studies"]
    x_labels = [t for t in studies.iter(f"{SVG}text") if t.get("class") == "x-label"]
    assert 8 <= len(x_labels) <= 17 and x_labels[-1].text == "12-30"
    assert not [t for t in studies.iter(f"{SVG}text") if t.get("class") == "value"]  # too many to print


def test_several_runs_on_one_day_are_told_apart_by_time():
    runs = [night(0), night(0)]
    runs[1] = RunRecord("b", "nightly", T0 + dt.timedelta(hours=2), T0 + dt.timedelta(hours=3), "w", runs[1].counts)
    assert run_labels(runs) == ["11-01 01:30", "11-01 03:30"]


@pytest.mark.parametrize("values,top,ticks", [
    ([0, 0], 1, [0, 1]),
    ([3], 3, [0, 1, 2, 3]),
    ([120, 95], 150, [0, 50, 100, 150]),
    ([0.4], 0.4, [0, 0.1, 0.2, 0.30000000000000004, 0.4]),
])
def test_y_axis_is_round(values, top, ticks):
    got_top, got_ticks = y_axis(values, integers=max(values) >= 1 or not values)
    assert got_top == pytest.approx(top) and got_ticks == pytest.approx(ticks)


def test_markdown_artifact_embeds_each_chart_as_an_svg_image(tmp_path):
    md = report_markdown([night(0), night(1)], tmp_path / "r.html")
    images = re.findall(r"!\[([^\]]+)\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", md)
    assert [t for t, _ in images][:2] == ["Instances cataloged by modality", "Studies and series cataloged by modality"]
    assert len(images) == 6
    for _, data in images:
        assert ET.fromstring(base64.b64decode(data)).tag == f"{SVG}svg"
    assert str(tmp_path / "r.html") in md


def test_written_atomically_and_readable(tmp_path):
    chart = Chart("c", "T", "y", ["a"], [Series("s", [1], "#000")])
    path = write_report(tmp_path / "_reports" / "x.html", f"<html>{chart_svg(chart)}</html>")
    assert path.read_text().startswith("<html><svg") and [p.name for p in path.parent.iterdir()] == ["x.html"]
