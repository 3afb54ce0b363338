"""The study API (``/api/studies``): one JSON answer per study that joins the catalog, the FHIR state
and the storage state.

* **Catalog**: read through :func:`pacsflow.catalog.views.query`, the confined read-only path of
  ``pacsflow catalog query`` (one SELECT, the current snapshot's Parquet files and nothing else);
  every value is a bound parameter, the WHERE clause is assembled from constant fragments.
* **FHIR**: the sync ledger (``state_root/fhir_sync.sqlite`` opened read-only, or its schema at
  ``state.url`` through :class:`pacsflow.tasks.fhir.ledger.FhirSyncLedger`), and only its
  non-identifying columns: the catalog's pseudonymous study UID, status, redacted reason,
  attempts, the ImagingStudy id, the time of the last update. The ledger does not keep resource
  versions: ``?check=fhir`` reads the ImagingStudy from the server (its id, ``meta.versionId``) and
  the reconciliation's differences (:func:`pacsflow.tasks.fhir.sync.reconcile_catalog`).
* **Storage**: the objects the catalog lists for the study, looked up in ``storage_root`` (local or
  any fsspec URL); ``?check=storage`` reads each file and compares its SHA-256. A catalog path that
  does not lie under ``storage_root`` is reported and never opened.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import duckdb
from fastapi import APIRouter, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fsspec.implementations.local import LocalFileSystem

from pacsflow.catalog.errors import CatalogNotFound
from pacsflow.catalog.views import query as catalog_query
from pacsflow.tasks.core.errors import PacsflowError, error_text
from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.fhir.ledger import LEDGER_NAME, FhirSyncLedger
from pacsflow.tasks.fhir.mapping import study_identity
from pacsflow.tasks.fhir.sync import reconcile_catalog
from pacsflow.tasks.lake.storage import open_root
from pacsflow.tasks.settings import Settings, StorageSettings
from pacsflow.tasks.web.app import Reader, context

router = APIRouter(prefix="/api", tags=["study API"])

UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
FHIR_STATES = ("synced", "failed", "unsent")
CHECKS = ("fhir", "storage")
DEFAULT_LIMIT = 100
_CHUNK = 1 << 20

# Filter name -> constant SQL fragment with one placeholder. CS values (modality, body part) are
# upper case in DICOM; the other values are matched as given.
_FILTERS = {
    "modality": "list_contains(modalities, ?)",
    "body_part": "list_contains(body_parts, ?)",
    "manufacturer": "list_contains(manufacturers, ?)",
    "patient": "patient_pseudo_id = ?",
    "study_date_from": "study_date >= ?",
    "study_date_to": "study_date <= ?",
}
_UPPER = {"modality", "body_part"}
_IN_LIST = "study_uid IN (SELECT unnest(?::VARCHAR[]))"
_NOT_IN_LIST = "study_uid NOT IN (SELECT unnest(?::VARCHAR[]))"
_ORDER = " ORDER BY study_date DESC NULLS LAST, study_uid"
_SQL_PAGE = "SELECT * EXCLUDE (study_month), count(*) OVER () AS _total FROM studies"
_SQL_COUNT = "SELECT count(*) AS n FROM studies"
_SQL_STUDY = "SELECT * EXCLUDE (study_month) FROM studies WHERE study_uid = ?"
_SQL_SERIES = ("SELECT * EXCLUDE (study_month, study_uid, study_date) FROM series WHERE study_uid = ? "
               "ORDER BY series_number NULLS LAST, series_uid")
_SQL_FILES = ("SELECT series_uid, sop_instance_uid, file_path, file_size, file_sha256 FROM instances "
              "WHERE study_uid = ? ORDER BY series_uid, instance_number NULLS LAST, sop_instance_uid")
_SQL_LEDGER_STATES = ("SELECT study_uid, status, reason, transient, attempts, server_id, updated_at FROM fhir_studies "
                      "WHERE study_uid IN ({})")
_LEDGER_CHUNK = 500  # UIDs per IN (...) list: a page is at most serve.query_limit studies


def catalog_rows(settings: Settings, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of one constant SELECT over the catalog's current snapshot (503 without a catalog)."""
    try:
        return catalog_query(settings.catalog.reader(settings.catalog_root), sql, list(params)).to_pylist()
    except CatalogNotFound as exc:
        raise HTTPException(503, str(exc)) from None


# -- the FHIR ledger, read-only ---------------------------------------------------------------------
class LedgerView:
    """The FHIR sync ledger, read only: on one machine its SQLite file opened read-only (never
    created, never written: it lies in the PHI zone, of which the service reads this one file and
    only these columns; no file yet means no study was ever sent); with ``url`` (state.url) the
    ledger's schema in PostgreSQL, where every machine's sync writes it."""

    def __init__(self, state_root: Path, url: str | None = None) -> None:
        self.path = Path(state_root) / LEDGER_NAME
        self.url = url
        self._shared: FhirSyncLedger | None = None

    @classmethod
    def of(cls, settings: Settings) -> LedgerView:
        return cls(settings.state_root, settings.state.url)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.url is not None:
            if self._shared is None:
                self._shared = FhirSyncLedger.under(self.path.parent, self.url)
            with self._shared.db.tx(serialized=False) as tx:
                return [tuple(r) for r in tx.execute(sql, params).fetchall()]
        if not self.path.is_file():
            return []
        con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            con.close()

    def states(self, study_uids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per study UID of ``study_uids`` that the ledger knows, its last sync outcome."""
        uids, rows = list(study_uids), []
        for i in range(0, len(uids), _LEDGER_CHUNK):
            part = uids[i : i + _LEDGER_CHUNK]
            rows += self._rows(_SQL_LEDGER_STATES.format(", ".join("?" * len(part))), part)
        return {r[0]: {"status": r[1], "reason": r[2], "transient": bool(r[3]), "attempts": r[4],
                       "imaging_study_id": r[5], "updated_at": r[6]} for r in rows}

    def uids(self, status: str | None = None) -> list[str]:
        if status is None:
            return [r[0] for r in self._rows("SELECT study_uid FROM fhir_studies")]
        return [r[0] for r in self._rows("SELECT study_uid FROM fhir_studies WHERE status = ?", [status])]

    def last_synced_at(self) -> str | None:
        rows = self._rows("SELECT max(updated_at) FROM fhir_studies WHERE status = 'synced'")
        return rows[0][0] if rows else None


def fhir_state(entry: dict[str, Any] | None) -> dict[str, Any]:
    """A study's ledger entry as the API shows it; ``unsent`` when the ledger has none."""
    if entry is None:
        return {"status": "unsent", "imaging_study_id": None, "updated_at": None}
    return entry


# -- parameters ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyQuery:
    """A parsed ``/api/studies`` request: filters, FHIR state, page."""

    filters: dict[str, Any]
    fhir: str | None
    limit: int
    offset: int


def _bad(message: str) -> HTTPException:
    return HTTPException(400, message)


def _date(name: str, value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value) if "-" in value else dt.datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise _bad(f"{name}: a date is YYYY-MM-DD or YYYYMMDD") from None


def _count(name: str, value: str | None, default: int, top: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 0 <= int(value) <= top:
        raise _bad(f"{name}: a whole number from 0 to {top}")
    return int(value)


def parse_query(params: Any, max_limit: int) -> StudyQuery:
    """The request's query parameters checked (400 for an unknown, repeated or malformed one)."""
    known = {*_FILTERS, "fhir", "limit", "offset"}
    for name in params.keys():
        if name not in known:
            raise _bad(f"unknown parameter {name!r}; known: {', '.join(sorted(known))}")
        if len(params.getlist(name)) > 1:
            raise _bad(f"{name}: give it once")
    filters: dict[str, Any] = {}
    for name in _FILTERS:
        value = params.get(name)
        if value is None:
            continue
        if not value.strip() or len(value) > 256:
            raise _bad(f"{name}: 1 to 256 characters")
        filters[name] = _date(name, value) if name.startswith("study_date") else \
            value.upper() if name in _UPPER else value
    fhir = params.get("fhir")
    if fhir is not None and fhir not in FHIR_STATES:
        raise _bad(f"fhir: one of {', '.join(FHIR_STATES)}")
    limit = _count("limit", params.get("limit"), min(DEFAULT_LIMIT, max_limit), max_limit)
    return StudyQuery(filters, fhir, max(limit, 1), _count("offset", params.get("offset"), 0, 1 << 40))


def _where(q: StudyQuery, ledger: LedgerView) -> tuple[str, list[Any]]:
    clauses = [_FILTERS[name] for name in q.filters]
    params: list[Any] = list(q.filters.values())
    if q.fhir == "unsent":
        clauses.append(_NOT_IN_LIST)
        params.append(ledger.uids())
    elif q.fhir is not None:
        clauses.append(_IN_LIST)
        params.append(ledger.uids(q.fhir))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def search_studies(settings: Settings, q: StudyQuery) -> dict[str, Any]:
    """One page of the catalog's studies that match ``q``, each with its FHIR state, and the total."""
    ledger = LedgerView.of(settings)
    where, params = _where(q, ledger)
    rows = catalog_rows(settings, _SQL_PAGE + where + _ORDER + " LIMIT ? OFFSET ?", [*params, q.limit, q.offset])
    total = rows[0]["_total"] if rows else catalog_rows(settings, _SQL_COUNT + where, params)[0]["n"]
    states = ledger.states([r["study_uid"] for r in rows])
    studies = [{**{k: v for k, v in r.items() if k != "_total"}, "fhir": fhir_state(states.get(r["study_uid"]))}
               for r in rows]
    return {"total": total, "limit": q.limit, "offset": q.offset, "studies": studies}


# -- storage ------------------------------------------------------------------------------------------
class LakeReader:
    """Read access to ``storage_root`` that refuses any path outside it."""

    def __init__(self, storage_root: str, storage: StorageSettings | None = None) -> None:
        self.fs, root = open_root(storage_root, storage)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.realpath(root) if self.local else root.rstrip("/")

    def inside(self, file_path: str) -> str | None:
        """The path to open for a catalog ``file_path``, or None when it lies outside the root
        (after following links, for a local root; no ``..`` segment, for a URL)."""
        if self.local:
            path = os.path.realpath(file_path.removeprefix("file://"))
        else:
            path = self.fs._strip_protocol(file_path)
            if ".." in path.split("/"):
                return None
        return path if path.startswith(self.root + "/") else None

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.size(path))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def sha256(self, path: str) -> str | None:
        digest = hashlib.sha256()
        try:
            with self.fs.open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()


def storage_state(storage_root: str, files: list[dict[str, Any]], verify: bool,
                  storage: StorageSettings | None = None) -> dict[str, Any]:
    """The catalog's objects of one study against the storage: present, bytes, missing, sizes that
    differ, paths outside the root; with ``verify`` every file's SHA-256 as well."""
    lake = LakeReader(storage_root, storage)
    out: dict[str, Any] = {"objects": len(files), "present": 0, "bytes_cataloged": 0, "bytes_present": 0,
                           "missing": [], "size_mismatches": [], "outside_storage_root": [],
                           "checksums_verified": verify}
    if verify:
        out["checksum_mismatches"] = []
    for row in files:
        sop, expected = row["sop_instance_uid"], int(row["file_size"])
        out["bytes_cataloged"] += expected
        path = lake.inside(row["file_path"])
        if path is None:
            out["outside_storage_root"].append(sop)
            continue
        size = lake.size(path)
        if size is None:
            out["missing"].append(sop)
            continue
        out["present"] += 1
        out["bytes_present"] += size
        if size != expected:
            out["size_mismatches"].append({"sop_instance_uid": sop, "catalog": expected, "storage": size})
        if verify:
            actual = lake.sha256(path)
            if actual != row["file_sha256"]:
                out["checksum_mismatches"].append({"sop_instance_uid": sop, "catalog": row["file_sha256"],
                                                   "storage": actual})
    return out


# -- FHIR, live -----------------------------------------------------------------------------------------
def fhir_check(settings: Settings, study_uid: str) -> dict[str, Any]:
    """The server's ImagingStudy of the study (id, version, counts) and the reconciliation's
    differences; an ``error`` (one line, no PHI) when the server cannot answer."""
    if not settings.fhir.base_url:
        return {"error": "fhir.base_url is not set"}
    try:
        with FhirClient.from_settings(settings.fhir, max_retries=1) as client:
            hits = client.search_by_identifier(
                "ImagingStudy", [study_identity(study_uid).token],
                elements=["identifier", "status", "numberOfSeries", "numberOfInstances"])
            diffs = reconcile_catalog(client, settings.catalog.reader(settings.catalog_root), [study_uid])
    except (PacsflowError, duckdb.Error) as exc:
        return {"error": error_text(exc)}
    found = [{"id": r.get("id"), "version": r.get("meta", {}).get("versionId"),
              "last_updated": r.get("meta", {}).get("lastUpdated"), "status": r.get("status"),
              "number_of_series": r.get("numberOfSeries"), "number_of_instances": r.get("numberOfInstances")}
             for r in hits]
    return {"imaging_studies": found,
            "differences": [{"field": d.field, "catalog": d.catalog, "server": d.server, "text": d.text()}
                            for d in diffs]}


def _checks(values: list[str]) -> set[str]:
    checks = {c.strip() for v in values for c in v.split(",") if c.strip()}
    if not checks <= set(CHECKS):
        raise _bad(f"check: {', '.join(CHECKS)} (comma-separated or repeated)")
    return checks


def study_view(settings: Settings, study_uid: str, checks: set[str]) -> dict[str, Any]:
    """The catalog row with its series, the FHIR state and the storage state of one study."""
    if len(study_uid) > 64 or not UID_PATTERN.fullmatch(study_uid):
        raise _bad("a study UID is digits and dots, at most 64 characters")
    found = catalog_rows(settings, _SQL_STUDY, [study_uid])
    if not found:
        raise HTTPException(404, "no study with this UID in the catalog")
    series = catalog_rows(settings, _SQL_SERIES, [study_uid])
    fhir = fhir_state(LedgerView.of(settings).states([study_uid]).get(study_uid))
    if "fhir" in checks:
        fhir = {**fhir, "check": fhir_check(settings, study_uid)}
    files = catalog_rows(settings, _SQL_FILES, [study_uid])
    return {"study": found[0], "series": series, "fhir": fhir,
            "storage": storage_state(settings.storage_root, files, "storage" in checks, settings.storage)}


@router.get("/studies", summary="Search the catalog's studies, with their FHIR state")
def list_studies(request: Request, _principal: Reader) -> Any:
    """Filters: ``modality``, ``body_part``, ``manufacturer``, ``patient`` (the pseudonym),
    ``study_date_from``, ``study_date_to`` (YYYY-MM-DD), ``fhir`` (synced, failed, unsent);
    paging: ``limit`` (at most ``serve.query_limit``), ``offset``. Newest studies first."""
    settings = context(request).settings
    return jsonable_encoder(search_studies(settings, parse_query(request.query_params, settings.serve.query_limit)))


@router.get("/studies/{study}", summary="One study: catalog, FHIR and storage state")
def get_study(study: str, request: Request, _principal: Reader) -> Any:
    """``check=fhir`` reads the ImagingStudy from the FHIR server and reconciles it;
    ``check=storage`` verifies every file's SHA-256 (both: ``check=fhir,storage``)."""
    unknown = set(request.query_params) - {"check"}
    if unknown:
        raise _bad(f"unknown parameter {sorted(unknown)[0]!r}; known: check")
    settings = context(request).settings
    return jsonable_encoder(study_view(settings, study, _checks(request.query_params.getlist("check"))))
