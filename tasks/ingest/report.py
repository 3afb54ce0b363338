"""The run report: the trend of the last nights and the night's breakdown by modality, as one
self-contained HTML page with inline SVG charts (and the same charts as images for a markdown
artifact).

Plain code (no Prefect). Counts only: the page holds what the run history holds. Nothing in it
is fetched (no script, no font, no stylesheet from elsewhere; a Content-Security-Policy says so),
so it opens from a file share or a mail attachment as it does in a browser next to the catalog.
Each chart is a standalone SVG document (its styles are attributes), which is what lets the
markdown artifact show it as a ``data:`` image; every number in a chart is also in a table.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Callable, Sequence

from pacsflow.tasks.core.files import write_atomic
from pacsflow.tasks.ingest.history import RunRecord

REPORTS_DIR = "_reports"  # under catalog_root: a leading '_' keeps hive-style readers and globs out

# Okabe-Ito: told apart by readers with the common colour-vision deficiencies.
BLUE, GREEN, VERMILLION, ORANGE, SKY, PURPLE, GREY = (
    "#0072B2", "#009E73", "#D55E00", "#E69F00", "#56B4E9", "#CC79A7", "#555555")

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 72, 20, 64, 64
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"
MAX_X_LABELS = 16
MAX_VALUE_LABELS = 16  # bars and points get their number printed up to this many categories


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float]
    color: str


@dataclass(frozen=True)
class Chart:
    """One chart: categories along x (nights, or modalities), one or more series of values."""

    ident: str
    title: str
    y_label: str
    labels: Sequence[str]
    series: Sequence[Series]
    kind: str = "bar"  # 'bar' (grouped when several series) | 'line'
    integers: bool = True  # counts: no tick at 0.5


# -- scales --------------------------------------------------------------------------------------
def nice_step(span: float, ticks: int = 4, *, integers: bool = True) -> float:
    """A tick step of 1, 2 or 5 times a power of ten that splits ``span`` into about ``ticks`` steps."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return max(step, 1.0) if integers else step


def y_axis(values: Sequence[float], *, integers: bool = True) -> tuple[float, list[float]]:
    """The axis top and its ticks (from 0) for ``values``; an all-zero chart still gets 0..1."""
    top_value = max([0.0, *values])
    step = nice_step(top_value, integers=integers) if top_value > 0 else 1.0
    top = step * max(1, math.ceil(top_value / step - 1e-9))
    return top, [step * i for i in range(int(round(top / step)) + 1)]


def fmt(value: float) -> str:
    """1,234 for whole numbers, 12.5 otherwise."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}"


# -- SVG -----------------------------------------------------------------------------------------
def _text(x: float, y: float, text: str, **attrs: object) -> str:
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(text)}</text>'


def _frame(chart: Chart, top: float, ticks: Sequence[float]) -> list[str]:
    """Title, legend, y grid and ticks, axis label, x axis."""
    plot_h, right = HEIGHT - TOP - BOTTOM, WIDTH - RIGHT
    out = [_text(LEFT, 24, chart.title, font_size=16, font_weight="bold", fill="#222", class_="chart-title")]
    x = LEFT
    for s in chart.series:
        out.append(f'<rect class="legend-swatch" x="{x}" y="36" width="12" height="12" fill="{s.color}"/>')
        out.append(_text(x + 17, 46, s.name, font_size=12, fill="#222", class_="legend-label"))
        x += 30 + 7 * len(s.name)
    for tick in ticks:
        y = TOP + plot_h - plot_h * tick / top
        out.append(f'<line x1="{LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        out.append(_text(LEFT - 6, y + 4, fmt(tick), font_size=11, fill=GREY, text_anchor="end", class_="y-tick"))
    mid = TOP + plot_h / 2
    out.append(_text(16, mid, chart.y_label, font_size=12, fill="#222", text_anchor="middle",
                     transform=f"rotate(-90 16 {mid:.1f})", class_="y-label"))
    out.append(f'<line x1="{LEFT}" x2="{right}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#333"/>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#333"/>')
    return out


def _x_labels(chart: Chart) -> list[str]:
    n = len(chart.labels)
    band = (WIDTH - LEFT - RIGHT) / n
    every = math.ceil(n / MAX_X_LABELS)
    slanted = n > 6
    out = []
    for i, label in enumerate(chart.labels):
        if i % every and i != n - 1:
            continue
        x, y = LEFT + band * (i + 0.5), HEIGHT - BOTTOM + 16
        attrs: dict[str, object] = {"font_size": 11, "fill": "#222", "class_": "x-label"}
        attrs.update({"text_anchor": "end", "transform": f"rotate(-35 {x:.1f} {y:.1f})"} if slanted
                     else {"text_anchor": "middle"})
        out.append(_text(x, y, label, **attrs))
    return out


def _marks(chart: Chart, top: float) -> list[str]:
    """Bars (grouped) or lines with points; each mark has a tooltip, and its number when few."""
    n, plot_h = len(chart.labels), HEIGHT - TOP - BOTTOM
    band = (WIDTH - LEFT - RIGHT) / n
    base = TOP + plot_h
    # Several lines' numbers would print over each other: those are in the table.
    numbered = n <= MAX_VALUE_LABELS and (chart.kind == "bar" or len(chart.series) == 1)
    out = []
    for k, s in enumerate(chart.series):
        points = []
        for i, value in enumerate(s.values):
            y = base - plot_h * value / top
            tip = f"<title>{escape(f'{s.name}, {chart.labels[i]}: {fmt(value)}')}</title>"
            if chart.kind == "line":
                x = LEFT + band * (i + 0.5)
                points.append(f"{x:.1f},{y:.1f}")
                out.append(f'<circle class="point" data-series="{escape(s.name)}" cx="{x:.1f}" cy="{y:.1f}" r="4" '
                           f'fill="{s.color}">{tip}</circle>')
            else:
                width = band * 0.75 / len(chart.series)
                x = LEFT + band * i + band * 0.125 + width * k
                out.append(f'<rect class="bar" data-series="{escape(s.name)}" x="{x:.1f}" y="{y:.1f}" '
                           f'width="{width:.1f}" height="{base - y:.1f}" fill="{s.color}">{tip}</rect>')
                x += width / 2
            if numbered:
                out.append(_text(x, y - 6, fmt(value), font_size=10, fill="#222", text_anchor="middle",
                                 class_="value"))
        if chart.kind == "line" and len(points) > 1:
            out.insert(0, f'<polyline class="line" data-series="{escape(s.name)}" points="{" ".join(points)}" '
                          f'fill="none" stroke="{s.color}" stroke-width="2"/>')
    return out


def chart_svg(chart: Chart) -> str:
    """A standalone SVG document (it renders inline in HTML and as an image)."""
    top, ticks = y_axis([v for s in chart.series for v in s.values], integers=chart.integers)
    labelled = f"{chart.ident}-title {chart.ident}-desc"
    summary = "; ".join(f"{s.name}: " + ", ".join(fmt(v) for v in s.values) for s in chart.series)
    body = [*_frame(chart, top, ticks), *(_x_labels(chart) + _marks(chart, top) if chart.labels else [])]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{chart.ident}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="{labelled}" font-family="{escape(FONT)}">'
        f'<title id="{chart.ident}-title">{escape(chart.title)}</title>'
        f'<desc id="{chart.ident}-desc">{escape(summary)}</desc>'
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>' + "".join(body) + "</svg>"
    )


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


# -- the report ----------------------------------------------------------------------------------
def run_labels(runs: Sequence[RunRecord]) -> list[str]:
    """Nights by start date; with the time as well when one day has several runs."""
    for pattern in ("%m-%d", "%m-%d %H:%M", "%m-%d %H:%M:%S"):
        labels = [r.started_at.strftime(pattern) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [r.run_id for r in runs]


def _duration_unit(runs: Sequence[RunRecord]) -> tuple[str, float]:
    return ("minutes", 60.0) if max([r.seconds for r in runs], default=0) >= 180 else ("seconds", 1.0)


def trend_charts(runs: Sequence[RunRecord]) -> list[Chart]:
    """Found / cataloged / failed studies, quarantined objects, instances per second, duration."""
    labels = run_labels(runs)

    def counts(name: str) -> list[float]:
        return [r.count(name) for r in runs]

    unit, per = _duration_unit(runs)
    return [
        Chart("studies", "Studies per run", "studies", labels,
              [Series("found", counts("found"), BLUE), Series("cataloged", counts("cataloged"), GREEN),
               Series("failed", counts("failed"), VERMILLION)], kind="line"),
        Chart("quarantined", "Quarantined objects per run", "objects", labels,
              [Series("quarantined objects", counts("quarantined_objects"), ORANGE)]),
        Chart("throughput", "Throughput", "instances per second", labels,
              [Series("instances/s", [r.instances_per_second for r in runs], SKY)], kind="line", integers=False),
        Chart("duration", "Run duration", unit, labels,
              [Series(f"duration ({unit})", [round(r.seconds / per, 1) for r in runs], PURPLE)], integers=False),
    ]


def modality_charts(run: RunRecord) -> list[Chart]:
    """What ``run`` cataloged, by modality (none when it cataloged nothing)."""
    if not run.modalities:
        return []
    labels = [m.modality for m in run.modalities]
    return [
        Chart("modality-instances", "Instances cataloged by modality", "instances", labels,
              [Series("instances", [m.instances for m in run.modalities], BLUE)]),
        Chart("modality-studies", "Studies and series cataloged by modality", "studies, series", labels,
              [Series("studies", [m.studies for m in run.modalities], GREEN),
               Series("series", [m.series for m in run.modalities], ORANGE)]),
    ]


TREND_COLUMNS: tuple[tuple[str, Callable[[RunRecord], object]], ...] = (
    ("run", lambda r: r.run_id),
    ("window", lambda r: r.window),
    ("found", lambda r: fmt(r.count("found"))),
    ("cataloged", lambda r: fmt(r.count("cataloged"))),
    ("failed", lambda r: fmt(r.count("failed"))),
    ("quarantined objects", lambda r: fmt(r.count("quarantined_objects"))),
    ("instances", lambda r: fmt(r.count("instances"))),
    ("instances/s", lambda r: fmt(r.instances_per_second)),
    ("duration (s)", lambda r: fmt(r.seconds)),
)


def _table(ident: str, caption: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<table id="{ident}"><caption>{escape(caption)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _headline(run: RunRecord) -> str:
    failed = int(run.count("failed"))
    verdict = (f'<p class="verdict bad">{failed} of {fmt(run.count("queued"))} studies failed</p>' if failed
               else '<p class="verdict good">no study failed</p>')
    facts = (f"window {run.window} · {fmt(run.count('found'))} found · {fmt(run.count('cataloged'))} cataloged · "
             f"{fmt(run.count('instances'))} instances · {fmt(run.instances_per_second)} instances/s · "
             f"{fmt(run.seconds)} s")
    return f'{verdict}<p class="facts">{escape(facts)}</p>'


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px;color:#222;
max-width:1340px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts svg{max-width:100%;height:auto;border:1px solid #ddd}
.verdict{font-weight:bold;margin:4px 0}.bad{color:#D55E00}.good{color:#009E73}.facts,.note{color:#555;margin:4px 0}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}caption{text-align:left;font-weight:bold;padding:4px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_report(runs: Sequence[RunRecord], *, title: str = "pacsflow run report",
                  generated_at: dt.datetime | None = None) -> str:
    """The whole page for ``runs`` (oldest first; the last one is the night being reported)."""
    when = (generated_at or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    parts = [f'<h1>{escape(title)}</h1><p class="note">generated {escape(when)} from the run history '
             f"({len(runs)} runs, counts only)</p>"]
    if not runs:
        parts.append('<p class="verdict">No runs recorded yet.</p>')
    else:
        night = runs[-1]
        parts.append(f"<h2>Run {escape(night.run_id)}</h2>{_headline(night)}")
        by_modality = modality_charts(night)
        parts.append('<div class="charts">' + "".join(chart_svg(c) for c in by_modality) + "</div>" if by_modality
                     else '<p class="note">Nothing cataloged in this run.</p>')
        if night.modalities:
            parts.append(_table("modality-table", "Cataloged in this run, by modality",
                                ("modality", "studies", "series", "instances"),
                                [(m.modality, fmt(m.studies), fmt(m.series), fmt(m.instances))
                                 for m in night.modalities]))
        parts.append(f"<h2>Last {len(runs)} runs</h2>")
        parts.append('<div class="charts">' + "".join(chart_svg(c) for c in trend_charts(runs)) + "</div>")
        parts.append(_table("trend-table", "Per run (oldest first)", [c for c, _ in TREND_COLUMNS],
                            [[get(r) for _, get in TREND_COLUMNS] for r in runs]))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>" + "".join(parts) + "</body></html>\n"
    )


def report_markdown(runs: Sequence[RunRecord], report_path: Path | None = None) -> str:
    """The report for a markdown artifact: the charts as ``data:`` images (the Prefect UI shows
    those), the night's counts and where the full page is."""
    if not runs:
        return "# Run report\n\nNo runs recorded yet."
    night = runs[-1]
    charts = [*modality_charts(night), *trend_charts(runs)]
    lines = [f"# Run report: {night.run_id}", "",
             f"{int(night.count('failed'))} failed · {fmt(night.count('cataloged'))} cataloged · "
             f"{fmt(night.count('instances'))} instances · last {len(runs)} runs below", ""]
    if report_path is not None:
        lines += [f"Full report (charts and tables): `{report_path}`", ""]
    lines += [f"![{c.title}]({svg_data_uri(chart_svg(c))})" for c in charts]
    return "\n".join(lines) + "\n"


def report_dir(catalog_root: Path) -> Path:
    return Path(catalog_root) / REPORTS_DIR


def write_report(path: Path, html: str) -> Path:
    """Atomically: a browser or a copy job never sees half a page."""
    return write_atomic(Path(path), html.encode("utf-8"))
