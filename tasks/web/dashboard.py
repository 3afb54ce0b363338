"""The analysts' dashboard (``/dashboard``): charts of the catalog and of its FHIR sync, drawn on the
server as inline SVG with the run report's charts (:mod:`pacsflow.tasks.ingest.report`), each with
its numbers in a table below it. No script, nothing fetched (the Content-Security-Policy says so),
counts only: no UID, no pseudonym.

**Signing in from a browser.** A browser cannot send an ``Authorization`` header when someone types
an address, so the page also takes the read token once as ``/dashboard?token=…``: it answers with a
redirect to ``/dashboard`` that sets the token in a cookie (``HttpOnly``, ``SameSite=Strict``,
``Path=/dashboard``, ``Secure`` under HTTPS, 8 hours), which takes the token out of the address bar
again. Without a token the page shows a one-field form that does the same. Programs send the
``Authorization: Bearer`` header as for every other route.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from html import escape
from typing import Any, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from pacsflow.tasks.ingest.report import (
    BLUE, GREEN, ORANGE, PURPLE, SKY, VERMILLION, Chart, Series, chart_svg, fmt,
)
from pacsflow.tasks.settings import Settings
from pacsflow.tasks.web.app import context
from pacsflow.tasks.web.studies import LedgerView, catalog_rows
from pacsflow.tasks.web.tokens import Principal, Scope

router = APIRouter(tags=["dashboard"])

COOKIE = "pacsflow_dashboard"
COOKIE_SECONDS = 8 * 3600
TOP_CATEGORIES = 20  # body parts, manufacturers: the most frequent; the rest are summed as "other"
MODALITY_COLOURS = (BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE)
NO_VALUE = "(none)"

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'"
_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}

_SQL_MONTHS = ("SELECT study_month AS month, modality, count(DISTINCT study_uid) AS studies, "
               "CAST(sum(number_of_instances) AS BIGINT) AS instances FROM series GROUP BY ALL "
               "ORDER BY month NULLS LAST, modality NULLS LAST")
_SQL_BODY_PARTS = ("SELECT body_part_examined AS label, count(DISTINCT study_uid) AS studies, count(*) AS series "
                   "FROM series GROUP BY ALL ORDER BY studies DESC, series DESC, label NULLS LAST")
_SQL_DEVICES = ("SELECT concat_ws(' ', manufacturer, manufacturer_model_name) AS label, "
                "count(DISTINCT study_uid) AS studies, count(*) AS series "
                "FROM series GROUP BY ALL ORDER BY series DESC, studies DESC, label")
_SQL_SERIES_PER_STUDY = ("SELECT number_of_series AS n, count(*) AS studies FROM studies "
                         "GROUP BY ALL ORDER BY n")
_SQL_TOTALS = ("SELECT (SELECT count(*) FROM studies) AS studies, (SELECT count(*) FROM series) AS series, "
               "(SELECT CAST(coalesce(sum(number_of_instances), 0) AS BIGINT) FROM studies) AS instances, "
               "(SELECT max(ingested_at) FROM studies) AS last_ingested, "
               "(SELECT version FROM catalog_snapshot) AS snapshot, "
               "(SELECT created_at FROM catalog_snapshot) AS snapshot_at")
_SQL_FHIR = ("SELECT count(*) FILTER (WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))) AS synced, "
             "count(*) FILTER (WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))) AS failed, "
             "count(*) AS studies FROM studies")


@dataclass
class Facts:
    """What the page shows besides its charts: the catalog's size and both freshnesses."""

    totals: dict[str, Any]
    fhir: dict[str, Any]
    generated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))


def _label(value: Any) -> str:
    return NO_VALUE if value is None or value == "" else str(value)


def _top(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """The first TOP_CATEGORIES rows, and one row "other" summing the rest."""
    if len(rows) <= TOP_CATEGORIES:
        return rows
    rest = rows[TOP_CATEGORIES - 1:]
    return [*rows[:TOP_CATEGORIES - 1], {"label": "other", **{c: sum(r[c] for r in rest) for c in columns}}]


def month_range(months: set[str]) -> list[str]:
    """Every month from the first to the last of ``months`` ('YYYY-MM'): a month without studies is
    a zero on the time axis, not a gap that joins its neighbours."""
    if not months:
        return []
    (year, month), (last_year, last_month) = (map(int, m.split("-")) for m in (min(months), max(months)))
    out = []
    while (year, month) <= (last_year, last_month):
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def modality_charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """Studies and instances per (shifted) study month, one line (bars for one month) per modality."""
    months = month_range({r["month"] for r in rows if r["month"]})
    months += [NO_VALUE] if any(not r["month"] for r in rows) else []
    modalities = sorted({_label(r["modality"]) for r in rows})
    kind = "line" if len(months) > 1 else "bar"
    charts = []
    for ident, title, column in (("modality-studies", "Studies by modality and month", "studies"),
                                 ("modality-instances", "Instances by modality and month", "instances")):
        value = {(_label(r["month"]), _label(r["modality"])): r[column] for r in rows}
        series = [Series(m, [value.get((month, m), 0) for month in months], MODALITY_COLOURS[i % 6])
                  for i, m in enumerate(modalities)]
        charts.append(Chart(ident, title, column, months, series, kind=kind))
    return charts


def category_chart(ident: str, title: str, rows: list[dict[str, Any]]) -> tuple[Chart, list[str]]:
    """Studies and series per category (body part, manufacturer and model); the labels whole, for
    the table (the chart shortens them to fit under its bars)."""
    rows = _top([{**r, "label": _label(r["label"])} for r in rows], ("studies", "series"))
    full = [r["label"] for r in rows]
    room = 18 if len(rows) > 6 else 14  # more than six labels are slanted
    # The middle goes: names of one maker's models share their start and differ at the end.
    labels = [label if len(label) <= room else label[:room // 2 - 1] + "…" + label[-(room // 2):] for label in full]
    return Chart(ident, title, "studies, series", labels,
                 [Series("studies", [r["studies"] for r in rows], GREEN),
                  Series("series", [r["series"] for r in rows], ORANGE)]), full


def fhir_chart(fhir: dict[str, Any]) -> Chart:
    labels = ["synced", "failed", "unsent"]
    return Chart("fhir-state", "The catalog's studies in FHIR", "studies", labels,
                 [Series("studies", [fhir[k] for k in labels], PURPLE)])


def collect(settings: Settings) -> tuple[list[Chart], list[tuple[Chart, list[list[str]]]], Facts]:
    """Run the dashboard's queries: the charts, each with its table's rows, and the facts."""
    months = catalog_rows(settings, _SQL_MONTHS)
    ledger = LedgerView.of(settings)
    fhir = catalog_rows(settings, _SQL_FHIR, [ledger.uids("synced"), ledger.uids("failed")])[0]
    fhir["unsent"] = fhir["studies"] - fhir["synced"] - fhir["failed"]
    fhir["last_synced_at"] = ledger.last_synced_at()
    body, body_labels = category_chart("body-parts", "Body parts", catalog_rows(settings, _SQL_BODY_PARTS))
    devices, device_labels = category_chart("devices", "Manufacturers and models",
                                            catalog_rows(settings, _SQL_DEVICES))
    per_study = catalog_rows(settings, _SQL_SERIES_PER_STUDY)
    histogram = Chart("series-per-study", "Series per study", "studies", [_label(r["n"]) for r in per_study],
                      [Series("studies", [r["studies"] for r in per_study], SKY)])
    charts = [*modality_charts(months), body, devices, histogram, fhir_chart(fhir)]
    full = {"body-parts": body_labels, "devices": device_labels}
    tables = [(c, [[label, *(fmt(s.values[i]) for s in c.series)]
                   for i, label in enumerate(full.get(c.ident, c.labels))]) for c in charts]
    return charts, tables, Facts(catalog_rows(settings, _SQL_TOTALS)[0], fhir)


def _when(value: Any) -> str:
    if value is None:
        return "never"
    return value.isoformat(timespec="seconds") if isinstance(value, dt.datetime) else str(value)


def _facts_html(f: Facts) -> str:
    t, h = f.totals, f.fhir
    owed = h["failed"] + h["unsent"]
    items = [
        ("catalog", f"{fmt(t['studies'])} studies, {fmt(t['series'])} series, {fmt(t['instances'])} instances"),
        ("catalog snapshot", f"v{t['snapshot']} committed {_when(t['snapshot_at'])}"),
        ("last study ingested", _when(t["last_ingested"])),
        ("FHIR last sync", _when(h["last_synced_at"])),
        ("FHIR owed", f"{fmt(owed)} studies ({fmt(h['failed'])} failed, {fmt(h['unsent'])} never sent)"),
    ]
    rows = "".join(f'<dt>{escape(k)}</dt><dd id="fact-{i}">{escape(v)}</dd>' for i, (k, v) in enumerate(items))
    return f'<dl class="facts">{rows}</dl>'


def _table_html(chart: Chart, rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in ["", *(s.name for s in chart.series)])
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<table id="{chart.ident}-table"><caption>{escape(chart.title)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 8px}.note{color:#555}
.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:14px}
.facts dt{font-weight:bold}.facts dd{margin:0}
.panels{display:flex;flex-wrap:wrap;gap:16px}.panel svg{max-width:100%;height:auto;border:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0 12px;font-size:12px}caption{text-align:left;font-weight:bold}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}
"""


def page(title: str, body: str) -> str:
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>\n")


def render_dashboard(charts: list[Chart], tables: list[tuple[Chart, list[list[str]]]], facts: Facts) -> str:
    panels = "".join(f'<div class="panel">{chart_svg(c)}{_table_html(c, rows)}</div>'
                     for c, rows in zip(charts, (r for _, r in tables), strict=True))
    note = (f'<p class="note">generated {escape(_when(facts.generated_at))} from the catalog and the FHIR '
            "sync ledger; counts only. Study dates are shifted by de-identification: trust trends over "
            "years, not single months.</p>")
    return page("pacsflow dashboard", f"<h1>pacsflow dashboard</h1>{note}{_facts_html(facts)}"
                f'<div class="panels">{panels}</div>')


def _sign_in(status: int, message: str) -> HTMLResponse:
    form = ('<form method="get" action=""><label>read token <input type="password" name="token" '
            'autocomplete="off" required></label> <button type="submit">open</button></form>')
    return HTMLResponse(page("pacsflow dashboard: sign in", f"<h1>pacsflow dashboard</h1>"
                             f'<p class="note">{escape(message)}</p>{form}'), status, headers=_HEADERS)


def _principal(request: Request) -> Principal | None:
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    token = bearer.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE)
    return context(request).tokens.check(token) if token else None


@router.get("/dashboard", response_class=HTMLResponse, summary="The analysts' dashboard (read scope)")
def dashboard(request: Request, token: str | None = None) -> Response:
    """Charts of the catalog and its FHIR sync. Sign in with the ``Authorization`` header, or once
    with ``?token=`` (answered with a cookie and a redirect that drops the token from the address)."""
    if token is not None:
        principal = context(request).tokens.check(token)
        if principal is None or not principal.may(Scope.READ):
            return _sign_in(401, "That token is not a valid read token.")
        request.state.principal = principal.name
        response = RedirectResponse(request.url.path, 303, headers=_HEADERS)
        response.set_cookie(COOKIE, token, max_age=COOKIE_SECONDS, path="/dashboard", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response
    principal = _principal(request)
    if principal is None:
        return _sign_in(401, "A read token is needed (pacsflow token add NAME --scope read).")
    request.state.principal = principal.name
    if not principal.may(Scope.READ):
        return _sign_in(403, "This token lacks the read scope.")
    charts, tables, facts = collect(context(request).settings)
    return HTMLResponse(render_dashboard(charts, tables, facts), headers=_HEADERS)
