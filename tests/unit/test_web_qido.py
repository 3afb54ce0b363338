"""QIDO-RS over a real lake (sample studies through the ingest functions, a committed catalog):
answers equal the catalog, matching, includefield, paging and its cap, errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydicom.datadict import dictionary_VR

from pacsflow.catalog.store import CatalogStore
from pacsflow.catalog.views import query
from pacsflow.tasks.lake.study import read_rows
from pacsflow.tasks.web.app import create_app
from tests.dicomweb_lake import bearer, build_lake, parse_multipart

DW = "/dicom-web"


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    return build_lake(tmp_path_factory.mktemp("qido"), studies=4, query_limit=5)


@pytest.fixture(scope="module")
def client(lake):
    return TestClient(create_app(lake.settings), headers=bearer(lake.token))


def rows(lake, sql, *params):
    return query(lake.catalog, sql, list(params)).to_pylist()


def values(answers, tag):
    return [a[tag].get("Value", [None])[0] if tag in a else None for a in answers]


def test_the_study_search_answers_every_study_as_the_catalog_has_it(client, lake):
    r = client.get(f"{DW}/studies")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    catalog = {row["study_uid"]: row for row in rows(lake, "SELECT * FROM studies")}
    answers = r.json()
    assert sorted(values(answers, "0020000D")) == sorted(catalog)
    for a in answers:
        row = catalog[a["0020000D"]["Value"][0]]
        assert a["00201206"] == {"vr": "IS", "Value": [row["number_of_series"]]}
        assert a["00201208"] == {"vr": "IS", "Value": [row["number_of_instances"]]}
        assert a["00080061"]["Value"] == row["modalities"] and a["00100020"]["Value"] == [row["patient_pseudo_id"]]
        assert a["00080020"]["Value"] == [row["study_date"].strftime("%Y%m%d")]
        for tag, element in a.items():  # every tag is a real one, with its dictionary VR
            assert element["vr"] == dictionary_VR(int(tag, 16)), tag
        assert "00081190" not in a  # no RetrieveURL without serve.public_base_url


@pytest.mark.parametrize("key", ["StudyInstanceUID", "0020000D"])
def test_uid_lists_patient_ids_dates_and_modalities_match(client, lake, key):
    studies = rows(lake, "SELECT study_uid, patient_pseudo_id, study_date, modalities FROM studies ORDER BY study_uid")
    two = [s["study_uid"] for s in studies[:2]]
    found = client.get(f"{DW}/studies", params={key: ",".join(two)}).json()
    assert sorted(values(found, "0020000D")) == two
    first = studies[0]
    by_patient = client.get(f"{DW}/studies", params={"PatientID": first["patient_pseudo_id"]}).json()
    expected = {s["study_uid"] for s in studies if s["patient_pseudo_id"] == first["patient_pseudo_id"]}
    assert set(values(by_patient, "0020000D")) == expected
    wildcard = client.get(f"{DW}/studies", params={"PatientID": first["patient_pseudo_id"][:4] + "*"}).json()
    assert expected <= set(values(wildcard, "0020000D"))
    day = first["study_date"].strftime("%Y%m%d")
    for date_range in (day, f"{day}-{day}", f"-{day}", f"{day}-"):
        answer = client.get(f"{DW}/studies", params={"StudyDate": date_range}).json()
        low, _, high = date_range.partition("-") if "-" in date_range else (day, "", day)
        expected = {s["study_uid"] for s in studies
                    if (not low or s["study_date"].strftime("%Y%m%d") >= low)
                    and (not high or s["study_date"].strftime("%Y%m%d") <= high)}
        assert set(values(answer, "0020000D")) == expected, date_range
    modality = first["modalities"][0]
    answer = client.get(f"{DW}/studies", params={"ModalitiesInStudy": f"{modality},XA"}).json()
    assert set(values(answer, "0020000D")) == {s["study_uid"] for s in studies if modality in s["modalities"]}


def test_series_and_instance_searches_match_their_keys(client, lake):
    series = rows(lake, "SELECT study_uid, series_uid, modality, body_part_examined, number_of_instances FROM series")
    one = series[0]
    answer = client.get(f"{DW}/studies/{one['study_uid']}/series").json()
    assert sorted(values(answer, "0020000E")) == sorted(s["series_uid"] for s in series
                                                       if s["study_uid"] == one["study_uid"])
    assert "00100020" not in answer[0]  # scoped to a study: no study attributes besides its UID
    everywhere = client.get(f"{DW}/series", params={"Modality": one["modality"],
                                                    "BodyPartExamined": one["body_part_examined"]}).json()
    assert sorted(values(everywhere, "0020000E")) == sorted(
        s["series_uid"] for s in series
        if s["modality"] == one["modality"] and s["body_part_examined"] == one["body_part_examined"])
    assert "00100020" in everywhere[0]  # all series: the study attributes come along
    instances = rows(lake, "SELECT sop_instance_uid, sop_class_uid FROM instances WHERE series_uid = ?",
                     one["series_uid"])
    answer = client.get(f"{DW}/studies/{one['study_uid']}/series/{one['series_uid']}/instances").json()
    assert sorted(values(answer, "00080018")) == sorted(i["sop_instance_uid"] for i in instances)
    assert len(answer) == one["number_of_instances"]
    by_class = client.get(f"{DW}/instances", params={"SOPClassUID": instances[0]["sop_class_uid"], "limit": 100})
    assert set(values(by_class.json(), "00080016")) == {instances[0]["sop_class_uid"]}
    assert client.get(f"{DW}/studies/{one['study_uid']}/instances", params={"limit": 1}).status_code == 200


def test_includefield_adds_catalog_columns_and_attributes_from_dicom_json(client, lake):
    [study] = rows(lake, "SELECT study_uid FROM studies ORDER BY study_uid LIMIT 1")
    first_json = rows(lake, "SELECT json_extract_string(dicom_json, '$.\"00100010\".Value[0].Alphabetic') AS name "
                            "FROM instances WHERE study_uid = ? ORDER BY sop_instance_uid LIMIT 1", study["study_uid"])
    [answer] = client.get(f"{DW}/studies", params={"StudyInstanceUID": study["study_uid"],
                                                   "includefield": "PatientName,00180015"}).json()
    assert answer["00100010"]["vr"] == "PN"
    assert answer["00100010"]["Value"][0]["Alphabetic"] == first_json[0]["name"]
    assert answer["00180015"]["vr"] == "CS"
    [every] = client.get(f"{DW}/studies", params={"StudyInstanceUID": study["study_uid"],
                                                  "includefield": "all", "fuzzymatching": "true"}).json()
    assert {"00100010", "00080090"} <= set(every)
    inst = client.get(f"{DW}/studies/{study['study_uid']}/instances", params={"includefield": "all", "limit": 1})
    assert "00280004" in inst.json()[0]  # PhotometricInterpretation: only in the DICOM JSON


def test_paging_walks_every_study_and_the_cap_says_so(client, lake):
    total = rows(lake, "SELECT count(*) AS n FROM instances")[0]["n"]
    seen: list[str] = []
    for offset in range(0, total + 5, 5):
        r = client.get(f"{DW}/instances", params={"offset": offset})
        if r.status_code == 204:
            break
        assert "Warning" not in r.headers  # no limit asked for: the server's default page
        seen += values(r.json(), "00080018")
    assert len(seen) == len(set(seen)) == total
    capped = client.get(f"{DW}/instances", params={"limit": 50})
    assert len(capped.json()) == 5 and capped.headers["Warning"].startswith("299 ")
    assert "Warning" not in client.get(f"{DW}/instances", params={"limit": 3}).headers


def test_no_match_is_204(client):
    assert client.get(f"{DW}/studies", params={"PatientID": "NOBODY"}).status_code == 204


@pytest.mark.parametrize("params", [
    {"StudyInstanceUID": "1.2.x"}, {"StudyDate": "2024"}, {"StudyDate": "20241301"}, {"NoSuchKeyword": "1"},
    {"PatientName": "DOE^JOHN"}, {"limit": "-1"}, {"SeriesNumber": "one"}, {"includefield": "Bogus"},
])
def test_malformed_searches_are_400_without_echoing_values(client, params):
    r = client.get(f"{DW}/studies", params=params)
    assert r.status_code == 400
    for value in params.values():
        if value not in ("Bogus",):
            assert value not in r.text


def test_malformed_path_uids_and_missing_tokens(client, lake):
    assert client.get(f"{DW}/studies/1.2.abc/series").status_code == 400
    assert client.get(f"{DW}/studies/{'1.' * 40}1/series").status_code == 400
    assert TestClient(create_app(lake.settings)).get(f"{DW}/studies").status_code == 401
    assert client.get(f"{DW}/studies", headers={"Accept": "application/xml"}).status_code == 406


def test_retrieve_urls_follow_the_public_base_url(tmp_path):
    lake = build_lake(tmp_path, studies=1, modalities=("CT",), public_base_url="https://pf.example.org/")
    client = TestClient(create_app(lake.settings), headers=bearer(lake.token))
    [study] = client.get(f"{DW}/studies").json()
    uid = study["0020000D"]["Value"][0]
    assert study["00081190"] == {"vr": "UR", "Value": [f"https://pf.example.org/dicom-web/studies/{uid}"]}
    series = client.get(f"{DW}/studies/{uid}/series").json()[0]
    assert series["00081190"]["Value"][0].startswith(f"https://pf.example.org/dicom-web/studies/{uid}/series/")


def test_a_commit_after_start_is_seen_by_the_next_search(tmp_path):
    lake = build_lake(tmp_path / "a", studies=1, modalities=("CT",))
    client = TestClient(create_app(lake.settings), headers=bearer(lake.token))
    assert len(client.get(f"{DW}/studies").json()) == 1
    other = build_lake(tmp_path / "b", studies=2, modalities=("MR",), seed=99)
    rows_dirs = [str(p) for p in (tmp_path / "b" / "rows").iterdir()]
    CatalogStore(lake.catalog).commit(read_rows(rows_dirs))
    assert len(client.get(f"{DW}/studies").json()) == 1 + len(rows(other, "SELECT study_uid FROM studies"))


def test_on_delta_searches_and_retrieves_read_the_tables_and_see_each_commit(tmp_path):
    from pacsflow.tasks.settings import load_settings

    lake = build_lake(tmp_path / "a", studies=2, modalities=("CT",))
    settings = load_settings(storage_root=lake.settings.storage_root, state_root=lake.settings.state_root,
                             catalog_root=tmp_path / "delta-catalog", catalog={"backend": "delta"})
    delta = settings.catalog.open_store(settings.catalog_root)
    delta.commit(read_rows([str(p) for p in (tmp_path / "a" / "rows").iterdir()]))
    client = TestClient(create_app(settings), headers=bearer(lake.token))
    expected = sorted(r["study_uid"] for r in rows(lake, "SELECT study_uid FROM studies"))
    assert sorted(values(client.get(f"{DW}/studies").json(), "0020000D")) == expected
    study, series, sop, path = rows(lake, "SELECT study_uid, series_uid, sop_instance_uid, file_path FROM instances "
                                          "ORDER BY sop_instance_uid LIMIT 1")[0].values()
    one = client.get(f"{DW}/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": "*/*"})
    [(_, body)] = parse_multipart(one.headers["content-type"], one.content)
    assert one.status_code == 200 and body == open(path, "rb").read()
    other = build_lake(tmp_path / "b", studies=1, modalities=("MR",), seed=99)
    delta.commit(read_rows([str(p) for p in (tmp_path / "b" / "rows").iterdir()]))
    assert len(client.get(f"{DW}/studies").json()) == 2 + len(rows(other, "SELECT study_uid FROM studies"))
