"""QIDO-RS (PS3.18 10.6) answered from the catalog: studies, series and instances searches.

Matching keys are the attributes the catalog holds in typed columns (:data:`ATTRIBUTES` with a
``match`` kind): UIDs (single or a list, separated by ``,`` or ``\\``), strings (exact, or with the
``*`` and ``?`` wildcards), dates and date ranges, integers, and ModalitiesInStudy (any of a list).
Any other attribute as a matching key is refused (400): the catalog cannot answer it, and ignoring
it would return studies the client excluded. ``fuzzymatching`` is accepted and ignored (the catalog
holds no person names to match fuzzily).

Returned attributes: the level's catalog attributes (and those of the higher levels when the search
is not scoped to a study or series), plus ``includefield`` ones. An ``includefield`` attribute the
catalog has no column for is read from the DICOM JSON of the first instance of each answer (for
studies and series: one more query for the page's rows only). ``includefield=all`` adds, at the
instance level, every attribute of the instance's DICOM JSON; at the study and series levels the
patient and study attributes viewers show (:data:`JSON_DEFAULTS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import date
from typing import Any, Iterable

import duckdb
from fastapi import APIRouter, HTTPException, Request, Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from pacsflow.tasks.web.accept import accepts_json
from pacsflow.tasks.web.app import Reader
from pacsflow.tasks.web.index import CatalogIndex, study_month
from pacsflow.tasks.web.services import QueryError, check_uid, services

STUDY, SERIES, INSTANCE = "study", "series", "instance"
LEVELS = (STUDY, SERIES, INSTANCE)
MEDIA_TYPE = "application/dicom+json"
WARNING_CAPPED = ("299 pacsflow: The number of results exceeded the maximum supported by the server. "
                  "Additional results can be requested.")
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield"}
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9]{1,64}$")


@dataclass(frozen=True)
class Attribute:
    """An attribute the catalog holds in a column: its level, SQL expression and how it matches."""

    tag: str
    level: str
    sql: str
    match: str | None  # uid, string, date, int, any_of; None: returned only

    @property
    def vr(self) -> str:
        return str(dictionary_VR(int(self.tag, 16)))


def _attrs(level: str, alias: str, rows: Iterable[tuple[str, str, str | None]]) -> list[Attribute]:
    return [Attribute(tag_hex(keyword), level, f"{alias}.{column}", match) for keyword, column, match in rows]


def tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


ATTRIBUTES: dict[str, Attribute] = {a.tag: a for a in (
    _attrs(STUDY, "st", [
        ("StudyInstanceUID", "study_uid", "uid"), ("StudyDate", "study_date", "date"),
        ("StudyTime", "study_time", None), ("AccessionNumber", "accession_number", "string"),
        ("ModalitiesInStudy", "modalities", "any_of"), ("StudyDescription", "study_description", "string"),
        ("PatientID", "patient_pseudo_id", "string"), ("PatientSex", "patient_sex", "string"),
        ("PatientAge", "patient_age", None), ("StudyID", "study_id", "string"),
        ("InstitutionName", "institution_name", "string"),
        ("NumberOfStudyRelatedSeries", "number_of_series", None),
        ("NumberOfStudyRelatedInstances", "number_of_instances", None),
    ])
    + _attrs(SERIES, "se", [
        ("SeriesInstanceUID", "series_uid", "uid"), ("Modality", "modality", "string"),
        ("SeriesNumber", "series_number", "int"), ("SeriesDescription", "series_description", "string"),
        ("BodyPartExamined", "body_part_examined", "string"), ("SeriesDate", "series_date", "date"),
        ("SeriesTime", "series_time", None), ("Manufacturer", "manufacturer", "string"),
        ("ManufacturerModelName", "manufacturer_model_name", "string"), ("ProtocolName", "protocol_name", "string"),
        ("Laterality", "laterality", "string"), ("NumberOfSeriesRelatedInstances", "number_of_instances", None),
    ])
    + _attrs(INSTANCE, "i", [
        ("SOPInstanceUID", "sop_instance_uid", "uid"), ("SOPClassUID", "sop_class_uid", "uid"),
        ("InstanceNumber", "instance_number", "int"), ("Rows", "rows", None), ("Columns", "columns", None),
        ("BitsAllocated", "bits_allocated", None), ("NumberOfFrames", "number_of_frames", None),
        ("AvailableTransferSyntaxUID", "transfer_syntax_uid", None),
    ])
)}
_KEY_OF = {STUDY: tag_hex("StudyInstanceUID"), SERIES: tag_hex("SeriesInstanceUID"),
           INSTANCE: tag_hex("SOPInstanceUID")}
JSON_DEFAULTS = [tag_hex(k) for k in ("PatientName", "PatientBirthDate", "ReferringPhysicianName")]

_FROM = {
    STUDY: "FROM studies st",
    SERIES: "FROM series se JOIN studies st ON st.study_uid = se.study_uid",
    INSTANCE: "FROM instances i JOIN series se ON se.study_uid = i.study_uid AND se.series_uid = i.series_uid "
              "JOIN studies st ON st.study_uid = i.study_uid",
}
_ORDER = {
    STUDY: "ORDER BY st.study_date DESC NULLS LAST, st.study_time DESC NULLS LAST, st.study_uid",
    SERIES: "ORDER BY se.study_uid, se.series_number NULLS LAST, se.series_uid",
    INSTANCE: "ORDER BY i.study_uid, i.series_uid, i.instance_number NULLS LAST, i.sop_instance_uid",
}
# The first instance's DICOM JSON of each answer, for includefield attributes without a column.
_JSON_OF = {
    STUDY: "SELECT study_uid AS k, arg_min(dicom_json, sop_instance_uid) AS j FROM instances "
           "WHERE study_uid IN (SELECT unnest(?)) GROUP BY study_uid",
    SERIES: "SELECT series_uid AS k, arg_min(dicom_json, sop_instance_uid) AS j FROM instances "
            "WHERE study_uid IN (SELECT unnest(?)) AND series_uid IN (SELECT unnest(?)) GROUP BY series_uid",
    INSTANCE: "SELECT sop_instance_uid AS k, dicom_json AS j FROM instances "
              "WHERE study_uid IN (SELECT unnest(?)) AND sop_instance_uid IN (SELECT unnest(?))",
}


@dataclass
class Search:
    """One parsed QIDO-RS request: where clauses with their bound values and what to return."""

    level: str
    scoped: dict[str, str]  # path UIDs: study (and series)
    where: list[str]
    params: list[Any]
    columns: list[Attribute]
    json_tags: list[str]
    json_all: bool
    limit: int
    offset: int
    capped: bool


def _tag_of(name: str) -> str:
    """The 8-hex tag of a keyword or tag given in a query; QueryError when it names no attribute."""
    if _TAG.match(name):
        tag = name.upper()
        if keyword_for_tag(int(tag, 16)):
            return tag
    else:
        number = tag_for_keyword(name)
        if number is not None:
            return f"{number:08X}"
    shown = name if _SAFE_NAME.match(name) else "(not shown)"
    raise QueryError(f"unknown attribute or query parameter: {shown}")


def _levels_in(level: str) -> tuple[str, ...]:
    return LEVELS[: LEVELS.index(level) + 1]


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _date(text: str) -> date:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise QueryError("malformed date: use YYYYMMDD or a range YYYYMMDD-YYYYMMDD") from None


def _condition(attr: Attribute, value: str) -> tuple[str, list[Any]]:
    """A WHERE clause for one matching key, with its bound values."""
    if attr.match == "uid":
        uids = [check_uid(u) for u in re.split(r"[,\\]", value) if u]
        return f"{attr.sql} IN (SELECT unnest(?))", [uids]
    if attr.match == "any_of":
        return f"list_has_any({attr.sql}, ?)", [[v for v in re.split(r"[,\\]", value) if v]]
    if attr.match == "int":
        if not value.lstrip("-").isdigit():
            raise QueryError("malformed integer matching value")
        return f"{attr.sql} = ?", [int(value)]
    if attr.match == "date":
        found = _DATE.match(value)
        if not found or not (found.group(1) or found.group(3)) or (found.group(3) and not found.group(2)):
            raise QueryError("malformed date: use YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        low, dash, high = found.groups()
        if not dash:
            return f"{attr.sql} = ?", [_date(low)]
        bounds = [(f"{attr.sql} >= ?", low), (f"{attr.sql} <= ?", high)]
        used = [(clause, _date(text)) for clause, text in bounds if text]
        return " AND ".join(c for c, _ in used), [d for _, d in used]
    if "*" in value or "?" in value:
        return f"{attr.sql} LIKE ? ESCAPE '\\'", [_like(value)]
    return f"{attr.sql} = ?", [value]


def _returned(level: str, scoped: dict[str, str]) -> list[Attribute]:
    """The default attributes: the level's, the key UIDs of the levels above, and all attributes of
    the levels above that the path does not fix (a search of all series returns study attributes)."""
    out = []
    for attr in ATTRIBUTES.values():
        own = attr.level == level
        above = attr.level in _levels_in(level) and not own
        if own or (above and (attr.tag == _KEY_OF[attr.level] or attr.level not in scoped)):
            out.append(attr)
    return out


def _paging(raw: dict[str, str], cap: int) -> tuple[int, int, bool]:
    try:
        limit = int(raw.get("limit", cap))
        offset = int(raw.get("offset", 0))
    except ValueError:
        raise QueryError("limit and offset are non-negative integers") from None
    if limit < 0 or offset < 0:
        raise QueryError("limit and offset are non-negative integers")
    return min(limit, cap), offset, limit > cap


def parse(level: str, scoped: dict[str, str], items: list[tuple[str, str]], cap: int) -> Search:
    """Parse a request's query parameters (``items``, in order) for a search at ``level``."""
    allowed = _levels_in(level)
    search = Search(level, {k: check_uid(v) for k, v in scoped.items()}, [], [], _returned(level, scoped), [],
                    False, 0, 0, False)
    for lvl, uid in search.scoped.items():
        search.where.append(f"{ATTRIBUTES[_KEY_OF[lvl]].sql} = ?")
        search.params.append(uid)
    controls: dict[str, str] = {}
    for name, value in items:
        if name in _CONTROL:
            if name == "includefield":
                _include(search, value, allowed)
            else:
                controls[name] = value
            continue
        attr = ATTRIBUTES.get(_tag_of(name))
        if attr is None or attr.match is None or attr.level not in allowed:
            raise QueryError(f"not a matching key here: {name if _SAFE_NAME.match(name) else '(not shown)'}")
        if value:  # an empty value matches everything
            clause, values = _condition(attr, value)
            search.where.append(clause)
            search.params.extend(values)
    search.limit, search.offset, search.capped = _paging(controls, cap)
    return search


def _include(search: Search, value: str, allowed: tuple[str, ...]) -> None:
    for name in (n.strip() for n in value.split(",")):
        if not name:
            continue
        if name.lower() == "all":
            search.json_all = True
            search.columns += [a for a in ATTRIBUTES.values() if a.level in allowed and a not in search.columns]
            continue
        tag = _tag_of(name)
        attr = ATTRIBUTES.get(tag)
        if attr is not None and attr.level in allowed:
            if attr not in search.columns:
                search.columns.append(attr)
        elif tag not in search.json_tags:
            search.json_tags.append(tag)


def _sql(search: Search) -> tuple[str, list[Any]]:
    keys = ["st.study_uid AS _study", "se.series_uid AS _series" if search.level != STUDY else "NULL AS _series",
            "i.sop_instance_uid AS _instance" if search.level == INSTANCE else "NULL AS _instance"]
    select = ", ".join(keys + [f"{a.sql} AS c{a.tag}" for a in search.columns])
    where = f"WHERE {' AND '.join(search.where)}" if search.where else ""
    # One row more than the page tells whether the cap cut the answer short.
    sql = f"SELECT {select} {_FROM[search.level]} {where} {_ORDER[search.level]} LIMIT ? OFFSET ?"
    return sql, [*search.params, search.limit + 1, search.offset]


def _value(attr: Attribute, value: Any) -> dict[str, Any]:
    element: dict[str, Any] = {"vr": attr.vr}
    if value is None or value == []:
        return element
    values = value if isinstance(value, list) else [value]
    if isinstance(values[0], date):
        values = [v.strftime("%Y%m%d") for v in values]
    element["Value"] = values
    return element


def _json_rows(con: duckdb.DuckDBPyConnection, search: Search, rows: list[dict[str, Any]]) -> dict[str, dict]:
    key = {STUDY: "_study", SERIES: "_series", INSTANCE: "_instance"}[search.level]
    studies = sorted({r["_study"] for r in rows})
    params: list[Any] = [studies] if search.level == STUDY else [studies, [r[key] for r in rows]]
    found = con.execute(_JSON_OF[search.level], params).fetchall()
    return {k: json.loads(j) for k, j in found if j}


def _in_month(search: Search, month: str | None) -> Search:
    """``search`` (scoped to a study) limited to the study's month partition, which holds all its
    rows: DuckDB then opens one file of series and instances instead of every month's."""
    aliases = {STUDY: [], SERIES: ["se"], INSTANCE: ["se", "i"]}[search.level]
    return replace(search, where=search.where + [f"{a}.study_month IS NOT DISTINCT FROM ?" for a in aliases],
                   params=search.params + [month] * len(aliases))


def run(index: CatalogIndex, search: Search, base_url: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The DICOM JSON answers of ``search`` and whether the server's cap cut them short."""
    with index.connection() as con:
        if STUDY in search.scoped:
            found, month = study_month(con, search.scoped[STUDY])
            if not found:
                return [], False
            search = _in_month(search, month)
        sql, params = _sql(search)
        cursor = con.execute(sql, params)
        names = [d[0] for d in cursor.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
        more = len(rows) > search.limit
        rows = rows[: search.limit]
        wants_json = bool(search.json_tags) or search.json_all
        from_json = _json_rows(con, search, rows) if wants_json and rows else {}
    key = {STUDY: "_study", SERIES: "_series", INSTANCE: "_instance"}[search.level]
    return [_answer(search, row, from_json.get(row[key], {}), base_url) for row in rows], more and search.capped


def _answer(search: Search, row: dict[str, Any], instance_json: dict[str, Any],
            base_url: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if search.json_all and search.level == INSTANCE:
        out.update(instance_json)
    elif search.json_all:
        out.update({t: instance_json[t] for t in JSON_DEFAULTS if t in instance_json})
    for tag in search.json_tags:
        out[tag] = instance_json.get(tag, {"vr": str(dictionary_VR(int(tag, 16)))})
    for attr in search.columns:
        out[attr.tag] = _value(attr, row[f"c{attr.tag}"])
    out[tag_hex("InstanceAvailability")] = {"vr": "CS", "Value": ["ONLINE"]}
    if base_url:
        out[tag_hex("RetrieveURL")] = {"vr": "UR", "Value": [retrieve_url(base_url, row, search.level)]}
    return dict(sorted(out.items()))


def retrieve_url(base_url: str, row: dict[str, Any], level: str) -> str:
    """``<base>/dicom-web/studies/<uid>[/series/<uid>[/instances/<uid>]]``."""
    url = f"{base_url.rstrip('/')}/dicom-web/studies/{row['_study']}"
    if level in (SERIES, INSTANCE):
        url += f"/series/{row['_series']}"
    if level == INSTANCE:
        url += f"/instances/{row['_instance']}"
    return url


# -- routes (mounted under /dicom-web) ---------------------------------------------------------------

router = APIRouter(tags=["QIDO-RS"])


def answer(request: Request, level: str, scoped: dict[str, str]) -> Response:
    if not accepts_json(request.headers.get("accept")):
        raise HTTPException(406, "QIDO-RS answers application/dicom+json")
    svc = services(request)
    try:
        search = parse(level, scoped, request.query_params.multi_items(), svc.query_limit)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    found, capped = run(svc.index, search, svc.public_base_url)
    headers = {"Warning": WARNING_CAPPED} if capped else {}
    if not found:
        return Response(status_code=204, headers=headers)
    return Response(json.dumps(found, separators=(",", ":")), media_type=MEDIA_TYPE, headers=headers)


@router.get("/studies", summary="Search for studies")
def search_studies(request: Request, who: Reader) -> Response:
    return answer(request, STUDY, {})


@router.get("/series", summary="Search for series")
def search_series(request: Request, who: Reader) -> Response:
    return answer(request, SERIES, {})


@router.get("/instances", summary="Search for instances")
def search_instances(request: Request, who: Reader) -> Response:
    return answer(request, INSTANCE, {})


@router.get("/studies/{study}/series", summary="Search for a study's series")
def search_study_series(study: str, request: Request, who: Reader) -> Response:
    return answer(request, SERIES, {STUDY: study})


@router.get("/studies/{study}/instances", summary="Search for a study's instances")
def search_study_instances(study: str, request: Request, who: Reader) -> Response:
    return answer(request, INSTANCE, {STUDY: study})


@router.get("/studies/{study}/series/{series}/instances", summary="Search for a series' instances")
def search_series_instances(study: str, series: str, request: Request, who: Reader) -> Response:
    return answer(request, INSTANCE, {STUDY: study, SERIES: series})
