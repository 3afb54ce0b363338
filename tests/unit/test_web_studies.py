"""The study API and the dashboard's sign-in, on a real catalog and lake built from generated
studies (de-identified, stored and cataloged by the nightly's own pieces) and a real FHIR ledger."""

from __future__ import annotations

import datetime as dt
import shutil
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pacsflow.catalog.views import connect
from pacsflow.tasks.fhir.ledger import FhirSyncLedger
from pacsflow.tasks.settings import load_settings
from pacsflow.tasks.web.app import create_app
from pacsflow.tasks.web.dashboard import COOKIE
from pacsflow.tasks.web.tokens import Scope, TokenStore
from tests.helpers import build_catalog

MODALITIES = ("CT", "MR", "MG")
STUDIES = 9


def make_lake(root: Path, studies: int = STUDIES, seed: int = 3) -> list:
    return build_catalog(root, studies=studies, series_per_study=(1, 3), instances_per_series=(2, 3),
                         end_date=dt.date(2026, 11, 1), days=75, seed=seed, modalities=MODALITIES, rows=32, cols=32)


def serve(root: Path, **overrides):
    places = {"state_root": root / "state", "catalog_root": root / "catalog", "storage_root": str(root / "lake")}
    settings = load_settings(**{**places, **overrides})
    tokens = TokenStore(settings.tokens_path)
    client = TestClient(create_app(settings))
    client.headers["Authorization"] = "Bearer " + tokens.add("analyst", {Scope.READ})
    return client, tokens


def catalog_sql(root: Path, sql: str, params=()) -> list[tuple]:
    with closing(connect(root / "catalog")) as con:
        return con.execute(sql, list(params)).fetchall()


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    make_lake(root)
    return root


@pytest.fixture(scope="module")
def api(lake):
    return serve(lake)[0]


def all_pages(api, limit: int, **params) -> tuple[list[dict], set[int]]:
    studies, totals, offset = [], set(), 0
    while True:
        page = api.get("/api/studies", params={**params, "limit": limit, "offset": offset}).json()
        totals.add(page["total"])
        studies += page["studies"]
        offset += limit
        if not page["studies"]:
            return studies, totals


def test_paging_covers_every_study_once_newest_first_with_the_total(api, lake):
    studies, totals = all_pages(api, 2)
    uids = [s["study_uid"] for s in studies]
    assert totals == {STUDIES} and len(uids) == STUDIES == len(set(uids))
    expected = catalog_sql(lake, "SELECT study_uid FROM studies ORDER BY study_date DESC, study_uid")
    assert uids == [r[0] for r in expected]
    first = studies[0]
    assert first["number_of_series"] >= 1 and first["modalities"] and first["patient_pseudo_id"].startswith("P")
    assert first["fhir"] == {"status": "unsent", "imaging_study_id": None, "updated_at": None}
    assert "study_month" not in first


@pytest.mark.parametrize("name, sql, value", [
    ("modality", "list_contains(modalities, ?)", "mr"),  # CS values are matched in upper case
    ("body_part", "list_contains(body_parts, ?)", None),
    ("manufacturer", "list_contains(manufacturers, ?)", None),
    ("patient", "patient_pseudo_id = ?", None),
])
def test_each_filter_returns_exactly_the_matching_catalog_rows(api, lake, name, sql, value):
    column = {"modality": "modalities[1]", "body_part": "body_parts[1]", "manufacturer": "manufacturers[1]",
              "patient": "patient_pseudo_id"}[name]
    value = value or catalog_sql(lake, f"SELECT {column} FROM studies ORDER BY study_uid LIMIT 1")[0][0]
    bound = value.upper() if name == "modality" else value
    expected = {r[0] for r in catalog_sql(lake, f"SELECT study_uid FROM studies WHERE {sql}", [bound])}
    page = api.get("/api/studies", params={name: value}).json()
    assert 0 < len(expected) < STUDIES and page["total"] == len(expected)
    assert {s["study_uid"] for s in page["studies"]} == expected


def test_date_range_and_combined_filters(api, lake):
    dates = sorted(r[0] for r in catalog_sql(lake, "SELECT study_date FROM studies"))
    lo, hi = dates[2], dates[-3]
    page = api.get("/api/studies", params={"study_date_from": lo.isoformat(),
                                           "study_date_to": hi.strftime("%Y%m%d")}).json()
    assert page["total"] == sum(lo <= d <= hi for d in dates) and all(
        lo.isoformat() <= s["study_date"] <= hi.isoformat() for s in page["studies"])
    both = api.get("/api/studies", params={"modality": "CT", "study_date_from": lo.isoformat()}).json()
    expected = catalog_sql(lake, "SELECT count(*) FROM studies WHERE list_contains(modalities, 'CT') "
                                 "AND study_date >= ?", [lo])[0][0]
    assert both["total"] == expected


def test_fhir_state_from_the_ledger_and_its_filter(tmp_path, lake):
    client, _ = serve(lake, state_root=tmp_path / "state")
    uids = [s["study_uid"] for s in client.get("/api/studies").json()["studies"]]
    ledger = FhirSyncLedger.under(tmp_path / "state")
    ledger.mark_synced([(uids[0], "hash", "is-1")], "run-1")
    ledger.mark_failed([(uids[1], "FhirRejected: HAPI-0450", False)], "run-1")
    synced = client.get("/api/studies", params={"fhir": "synced"}).json()
    assert [s["study_uid"] for s in synced["studies"]] == [uids[0]]
    assert synced["studies"][0]["fhir"]["imaging_study_id"] == "is-1"
    assert synced["studies"][0]["fhir"]["updated_at"].startswith(str(dt.date.today().year))
    failed = client.get("/api/studies", params={"fhir": "failed"}).json()["studies"]
    assert [s["study_uid"] for s in failed] == [uids[1]] and failed[0]["fhir"]["reason"] == "FhirRejected: HAPI-0450"
    unsent = client.get("/api/studies", params={"fhir": "unsent", "limit": 100}).json()
    assert unsent["total"] == STUDIES - 2 and {s["study_uid"] for s in unsent["studies"]} == set(uids) - set(uids[:2])
    one = client.get(f"/api/studies/{uids[1]}").json()["fhir"]
    assert one["status"] == "failed" and one["attempts"] == 1 and one["transient"] is False


def test_one_study_joins_its_row_series_and_storage(api, lake):
    uid, n_series, n_instances, size = catalog_sql(
        lake, "SELECT study_uid, number_of_series, number_of_instances, total_file_size FROM studies "
              "ORDER BY number_of_series DESC, study_uid LIMIT 1")[0]
    body = api.get(f"/api/studies/{uid}").json()
    assert body["study"]["study_uid"] == uid and body["study"]["number_of_instances"] == n_instances
    series = catalog_sql(lake, "SELECT series_uid FROM series WHERE study_uid = ? ORDER BY series_number", [uid])
    assert [s["series_uid"] for s in body["series"]] == [r[0] for r in series] and len(series) == n_series
    assert sum(s["number_of_instances"] for s in body["series"]) == n_instances
    storage = body["storage"]
    assert storage["objects"] == storage["present"] == n_instances
    assert storage["bytes_cataloged"] == storage["bytes_present"] == size > 0
    assert storage["missing"] == storage["size_mismatches"] == storage["outside_storage_root"] == []
    assert storage["checksums_verified"] is False and "checksum_mismatches" not in storage
    assert body["fhir"]["status"] == "unsent"


def _files(root: Path, uid: str) -> list[tuple[str, str]]:
    return catalog_sql(root, "SELECT sop_instance_uid, file_path FROM instances WHERE study_uid = ? "
                             "ORDER BY sop_instance_uid", [uid])


def test_storage_check_finds_a_changed_and_a_missing_file(tmp_path):
    make_lake(tmp_path, studies=1, seed=5)
    client, _ = serve(tmp_path)
    uid = catalog_sql(tmp_path, "SELECT study_uid FROM studies")[0][0]
    files = _files(tmp_path, uid)
    assert len(files) >= 2
    clean = client.get(f"/api/studies/{uid}", params={"check": "storage"}).json()["storage"]
    assert clean["checksums_verified"] is True and clean["checksum_mismatches"] == []
    (changed_sop, changed), (gone_sop, gone) = files[0], files[1]
    data = bytearray(Path(changed).read_bytes())
    data[-1] ^= 0xFF  # the same size: only the checksum tells
    Path(changed).write_bytes(bytes(data))
    Path(gone).unlink()
    quick = client.get(f"/api/studies/{uid}").json()["storage"]
    assert quick["missing"] == [gone_sop] and quick["present"] == len(files) - 1 and quick["size_mismatches"] == []
    checked = client.get(f"/api/studies/{uid}", params={"check": "storage"}).json()["storage"]
    assert [m["sop_instance_uid"] for m in checked["checksum_mismatches"]] == [changed_sop]
    assert checked["checksum_mismatches"][0]["storage"] != checked["checksum_mismatches"][0]["catalog"]


def test_files_outside_the_storage_root_are_reported_and_never_read(tmp_path):
    make_lake(tmp_path, studies=1, seed=6)
    uid = catalog_sql(tmp_path, "SELECT study_uid FROM studies")[0][0]
    files = _files(tmp_path, uid)
    study_dir = Path(files[0][1]).parent.parent  # <lake>/<study>/<series>/<sop>.dcm
    outside = tmp_path / "outside"
    shutil.move(study_dir, outside)
    study_dir.symlink_to(outside, target_is_directory=True)  # the catalog's paths now lead out of the lake
    client, _ = serve(tmp_path)
    storage = client.get(f"/api/studies/{uid}", params={"check": "storage"}).json()["storage"]
    assert sorted(storage["outside_storage_root"]) == sorted(sop for sop, _ in files)
    assert storage["present"] == 0 and storage["checksum_mismatches"] == [] and storage["missing"] == []
    other, _ = serve(tmp_path, storage_root=str(tmp_path / "lake" / "nowhere"))
    assert other.get(f"/api/studies/{uid}").json()["storage"]["outside_storage_root"] != []


def test_fhir_check_without_a_server_says_so(api, lake):
    uid = catalog_sql(lake, "SELECT min(study_uid) FROM studies")[0][0]
    fhir = api.get(f"/api/studies/{uid}", params={"check": "fhir"}).json()["fhir"]
    assert fhir["check"] == {"error": "fhir.base_url is not set"} and fhir["status"] == "unsent"


@pytest.mark.parametrize("params", [
    {"limit": "x"}, {"limit": "-1"}, {"limit": "1001"}, {"offset": "1.5"}, {"modalty": "CT"},
    {"study_date_from": "2026-13-01"}, {"study_date_to": "yesterday"}, {"fhir": "maybe"}, {"modality": ""},
    {"modality": "X" * 300},
])
def test_malformed_search_parameters_are_400(api, params):
    answer = api.get("/api/studies", params=params)
    assert answer.status_code == 400 and answer.json()["detail"]


def test_repeated_parameters_are_400(api):
    assert api.get("/api/studies?modality=CT&modality=MR").status_code == 400


@pytest.mark.parametrize("path", ["1.2.x", "1..2", ".1.2", "1" * 65, "1.2.3%2E%2E", "1.2;DROP", "%20"])
def test_malformed_study_uids_are_400(api, path):
    assert api.get(f"/api/studies/{path}").status_code == 400


def test_an_encoded_slash_reaches_no_route(api):
    assert api.get("/api/studies/1.2.3%2F..%2F..%2Fetc").status_code == 404


def test_unknown_study_404_bad_check_400_and_auth(api, lake):
    uid = catalog_sql(lake, "SELECT min(study_uid) FROM studies")[0][0]
    assert api.get("/api/studies/1.2.3.4").status_code == 404
    assert api.get(f"/api/studies/{uid}", params={"check": "pixels"}).status_code == 400
    assert api.get(f"/api/studies/{uid}", params={"verbose": "1"}).status_code == 400
    anonymous = TestClient(api.app)
    assert anonymous.get("/api/studies").status_code == 401 and anonymous.get(f"/api/studies/{uid}").status_code == 401
    writer = TokenStore(api.app.state.ctx.settings.tokens_path).add("modality", {Scope.WRITE})
    assert anonymous.get("/api/studies", headers={"Authorization": f"Bearer {writer}"}).status_code == 403


def test_dashboard_sign_in_token_once_then_cookie(lake):
    client, tokens = serve(lake)
    browser = TestClient(client.app)
    assert browser.get("/dashboard").status_code == 401 and 'name="token"' in browser.get("/dashboard").text
    assert browser.get("/dashboard", params={"token": "made-up"}).status_code == 401
    writer = tokens.add("stow", {Scope.WRITE})
    assert browser.get("/dashboard", headers={"Authorization": f"Bearer {writer}"}).status_code == 403
    reader = tokens.add("browser", {Scope.READ})
    signed = browser.get("/dashboard", params={"token": reader}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/dashboard"
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    page = browser.get("/dashboard")  # the cookie alone now
    assert page.status_code == 200 and browser.cookies.get(COOKIE) == reader
    assert "default-src 'none'" in page.headers["content-security-policy"] and "<svg" in page.text
    tokens.revoke("browser")
    assert browser.get("/dashboard").status_code == 401  # a revoked token's cookie is worth nothing
    assert client.get("/dashboard").status_code == 200  # programs: the Authorization header


def test_on_delta_and_postgresql_the_api_reads_the_configured_stores(tmp_path, lake, postgresql_url):
    from pacsflow.tasks.lake.study import read_rows

    overrides = {"catalog_root": tmp_path / "catalog", "state_root": tmp_path / "state",
                 "catalog": {"backend": "delta"}, "state": {"url": postgresql_url}}
    delta = load_settings(storage_root=str(lake / "lake"), **overrides)
    delta.catalog.open_store(delta.catalog_root).commit(read_rows(sorted((lake / "rows").iterdir())))
    client, _ = serve(lake, **overrides)
    studies, totals = all_pages(client, 4)
    expected = [r[0] for r in catalog_sql(lake, "SELECT study_uid FROM studies ORDER BY study_date DESC, study_uid")]
    assert totals == {STUDIES} and [s["study_uid"] for s in studies] == expected
    uids = expected
    ledger = FhirSyncLedger.under(tmp_path / "another-machine", postgresql_url)
    ledger.mark_synced([(uids[0], "hash", "is-1")], "run-1")
    ledger.mark_failed([(uids[1], "FhirRejected: HAPI-0450", False)], "run-1")
    synced = client.get("/api/studies", params={"fhir": "synced"}).json()["studies"]
    assert [s["study_uid"] for s in synced] == [uids[0]] and synced[0]["fhir"]["imaging_study_id"] == "is-1"
    unsent = client.get("/api/studies", params={"fhir": "unsent", "limit": 100}).json()
    assert unsent["total"] == STUDIES - 2
    one = client.get(f"/api/studies/{uids[1]}").json()
    assert one["fhir"]["status"] == "failed" and one["fhir"]["attempts"] == 1
    assert one["storage"]["present"] == one["study"]["number_of_instances"] > 0
    assert not (tmp_path / "state" / "fhir_sync.sqlite").exists() and not (tmp_path / "catalog" / "_current").exists()
