"""The pure FHIR mapping (pacsflow.tasks.fhir.mapping) on catalog rows built by the real pipeline pieces."""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from pacsflow.catalog.views import connect
from pacsflow.tasks.core.errors import FhirMappingError, PermanentError
from pacsflow.tasks.fhir.mapping import (
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    MAPPING_VERSION,
    SNOMED_SYSTEM,
    URI_SYSTEM,
    MappingOptions,
    body_site,
    bodypart_table,
    build_study,
    content_hash,
    laterality,
    resource_json,
    started,
    transaction_bundle,
)
from pacsflow.tasks.settings import load_settings
from tests.helpers import build_catalog

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
OPTIONS = MappingOptions(pseudonym_system="urn:pacsflow:test:pseudonym")

Rows = tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def catalog_rows(tmp_path_factory) -> dict[str, Rows]:
    """Eight studies (CT, MR, MG; patients with several studies), through de-id and the catalog."""
    root = tmp_path_factory.mktemp("fhirmap")
    studies = build_catalog(root, key=b"fhir-map-test-key-0123456789", studies=8, patients=3, days=20,
                            end_date=dt.date(2026, 11, 27), seed=11, instances_per_series=(2, 4),
                            modalities=("CT", "MR", "MG"))  # US may be quarantined (burned-in text)
    assert len(studies) == 8
    con = connect(root / "catalog")
    try:
        rows: dict[str, Rows] = {}
        for st in con.sql("SELECT * FROM studies ORDER BY study_uid").to_arrow_table().to_pylist():
            uid = st["study_uid"]
            se = con.sql("SELECT * FROM series WHERE study_uid = ?", params=[uid]).to_arrow_table().to_pylist()
            ins = con.sql("SELECT * FROM instances WHERE study_uid = ?", params=[uid]).to_arrow_table().to_pylist()
            rows[uid] = (st, se, ins)
    finally:
        con.close()
    assert len(rows) == 8
    return rows


def _build(rows: Rows, options: MappingOptions = OPTIONS):
    return build_study(rows[0], rows[1], rows[2], options)


# -- ImagingStudy ---------------------------------------------------------------------------------
def test_imaging_study_identifier_status_subject_counts(catalog_rows):
    for uid, rows in catalog_rows.items():
        st, se, ins = rows
        res = _build(rows)
        doc = resource_json(res.imaging_study)
        assert doc["identifier"] == [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}]
        assert doc["status"] == "available"
        assert doc["subject"] == {"reference": f"Patient/{res.patient_identity.resource_id}"}
        assert doc["numberOfSeries"] == st["number_of_series"] == len(se) == len(doc["series"])
        assert doc["numberOfInstances"] == st["number_of_instances"] == len(ins)
        assert sum(len(s["instance"]) for s in doc["series"]) == len(ins)
        assert doc["modality"] == [{"system": DCM_SYSTEM, "code": m} for m in st["modalities"]]
        assert doc["started"] == st["study_date"].isoformat()  # no time zone configured: the date only


def test_series_and_instances_follow_the_rows(catalog_rows):
    for rows in catalog_rows.values():
        _st, se, ins = rows
        doc = resource_json(_build(rows).imaging_study)
        by_uid = {r["series_uid"]: r for r in se}
        numbers = [s.get("number") for s in doc["series"]]
        assert numbers == sorted(numbers)
        for s in doc["series"]:
            row = by_uid[s["uid"]]
            assert s["modality"] == {"system": DCM_SYSTEM, "code": row["modality"]}
            assert s["number"] == row["series_number"]
            assert s["numberOfInstances"] == row["number_of_instances"] == len(s["instance"])
            inst_rows = {r["sop_instance_uid"]: r for r in ins if r["series_uid"] == s["uid"]}
            for i in s["instance"]:
                r = inst_rows[i["uid"]]
                assert i["sopClass"] == {"system": URI_SYSTEM, "code": f"urn:oid:{r['sop_class_uid']}"}
                assert i["number"] == r["instance_number"]
                assert i["title"] == "\\".join(r["image_type"])


def test_body_site_from_body_part_examined(catalog_rows):
    seen = set()
    for rows in catalog_rows.values():
        by_uid = {r["series_uid"]: r for r in rows[1]}
        for s in resource_json(_build(rows).imaging_study)["series"]:
            part = by_uid[s["uid"]]["body_part_examined"]
            if part:
                seen.add(part)
                assert s["bodySite"]["system"] == SNOMED_SYSTEM
                assert s["bodySite"]["code"] == bodypart_table()[part]["code"]
    assert seen  # the sample data has CHEST, HEAD, KNEE, LSPINE, BREAST, ABDOMEN ...


@pytest.mark.parametrize("term, code", [
    ("CHEST", "43799004"), ("ABDOMEN", "818981001"), ("HEAD", "69536005"), ("BRAIN", "12738006"),
    ("BREAST", "76752008"), ("PELVIS", "816092008"), ("SPINE", "421060004"), ("CSPINE", "122494005"),
    ("TSPINE", "122495006"), ("LSPINE", "122496007"), ("KNEE", "72696002"), ("SHOULDER", "16982005"),
    ("HIP", "24136001"), ("EXTREMITY", "66019005"), ("NECK", "45048000"), ("HEART", "80891009"),
    ("LIVER", "10200004"), ("KIDNEY", "64033007"), ("WHOLEBODY", "38266002"), ("ABDOMENPELVIS", "818982008"),
])
def test_body_part_table_values_from_ps3_16_annex_l(term, code):
    assert body_site(term) == {"system": SNOMED_SYSTEM, "code": code, "display": bodypart_table()[term]["display"]}


def test_body_part_lookup_is_lenient_on_case_and_blanks_and_strict_otherwise():
    assert body_site(" chest ")["code"] == "43799004"
    assert body_site("L-SPINE") is None  # not a defined term: no guess
    assert body_site("") is None and body_site(None) is None


def test_body_part_table_is_well_formed():
    doc = json.loads((Path(__file__).resolve().parents[2] / "tasks/fhir/data/bodypart_snomed.json").read_text())
    assert "PS3.16" in doc["source"] and "Annex L" in doc["source"]
    for term, entry in doc["terms"].items():
        assert term == term.upper() and " " not in term and len(term) <= 16  # CS, 16 chars max
        assert entry["code"].isdigit() and entry["display"]


def test_laterality_codes():
    assert laterality("L")["code"] == "419161000"
    assert laterality("R")["code"] == "419465000"
    assert laterality("B")["code"] == "51440002"
    assert laterality("U") is None and laterality(None) is None


def test_laterality_in_series(catalog_rows):
    rows = next(iter(catalog_rows.values()))
    st, se, ins = copy.deepcopy(rows)
    se[0]["laterality"] = "R"
    doc = resource_json(build_study(st, se, ins, OPTIONS).imaging_study)
    first = next(s for s in doc["series"] if s["uid"] == se[0]["series_uid"])
    assert first["laterality"] == {"system": SNOMED_SYSTEM, "code": "419465000", "display": "Unilateral right"}


def test_started_needs_a_time_zone_for_the_time():
    assert started(dt.date(2026, 3, 1), "101112.5", None) == "2026-03-01"
    assert started(dt.date(2026, 3, 1), "101112.5", "Europe/Zurich") == "2026-03-01T10:11:12.500000+01:00"
    assert started(dt.date(2026, 7, 1), "1011", "Europe/Zurich") == "2026-07-01T10:11:00+02:00"  # summer time
    assert started("20260701", "10:11:12", "UTC") == "2026-07-01T10:11:12+00:00"
    assert started(dt.date(2026, 7, 1), "garbage", "UTC") == "2026-07-01"
    assert started(None, "101112", "UTC") is None


def test_procedure_code_when_the_row_has_one(catalog_rows):
    st, se, ins = copy.deepcopy(next(iter(catalog_rows.values())))
    st["procedure_codes"] = [
        {"code_value": "24627-2", "coding_scheme_designator": "LN", "code_meaning": "CT Chest"},
        {"code_value": "CTCHC", "coding_scheme_designator": "99ACME", "code_meaning": "CT Chest with contrast"},
    ]
    doc = resource_json(build_study(st, se, ins, OPTIONS).imaging_study)
    assert doc["procedureCode"][0]["coding"] == [{"system": "http://loinc.org", "code": "24627-2",
                                                  "display": "CT Chest"}]
    assert doc["procedureCode"][1] == {"text": "CT Chest with contrast"}  # a local scheme: text only


def test_endpoint_when_a_wado_rs_base_url_is_set(catalog_rows):
    url = "https://pacs.example.org/dicom-web"
    res = _build(next(iter(catalog_rows.values())), MappingOptions(wado_rs_base_url=url))
    ep = resource_json(res.endpoint)
    assert ep["address"] == url and ep["status"] == "active"
    assert ep["connectionType"]["code"] == "dicom-wado-rs"
    study = resource_json(res.imaging_study)
    assert study["endpoint"] == [{"reference": f"Endpoint/{ep['id']}"}]
    assert study["series"] and all(se["endpoint"] == study["endpoint"] for se in study["series"])
    assert ep["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": url}]
    plain = resource_json(_build(next(iter(catalog_rows.values()))).imaging_study)
    assert "endpoint" not in plain and not any("endpoint" in se for se in plain["series"])


def test_the_endpoint_address_is_serves_public_url_unless_fhir_names_another():
    public = load_settings(serve={"public_base_url": "https://pacsflow.example.org/"})
    assert MappingOptions.from_settings(public.fhir).wado_rs_base_url == "https://pacsflow.example.org/dicom-web"
    proxied = load_settings(serve={"public_base_url": "https://pacsflow.example.org"},
                            fhir={"wado_rs_base_url": "https://proxy.example.org/wado"})
    assert proxied.fhir.wado_rs_base_url == "https://proxy.example.org/wado"
    assert load_settings().fhir.wado_rs_base_url is None


# -- Patient --------------------------------------------------------------------------------------
def test_patient_is_the_pseudonym_only(catalog_rows):
    for rows in catalog_rows.values():
        st = rows[0]
        doc = resource_json(_build(rows).patient)
        assert doc["identifier"] == [{"system": OPTIONS.pseudonym_system, "value": st["patient_pseudo_id"]}]
        assert set(doc) <= {"resourceType", "id", "meta", "identifier", "gender"}
        assert doc["meta"]["security"][0]["code"] == "PSEUDED"


def test_no_name_or_birth_date_unless_identified(catalog_rows):
    st, se, ins = copy.deepcopy(next(iter(catalog_rows.values())))
    st.update(patient_name="Doe^Jane^Q^Dr", patient_birth_date=dt.date(1970, 5, 6), patient_sex="F")
    deid = resource_json(build_study(st, se, ins, OPTIONS).patient)
    assert "name" not in deid and "birthDate" not in deid
    assert deid["gender"] == "female"
    ident = build_study(st, se, ins, MappingOptions(pseudonym_system="urn:hospital:mrn", identified=True))
    doc = resource_json(ident.patient)
    assert doc["name"] == [{"use": "official", "family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr"]}]
    assert doc["birthDate"] == "1970-05-06"
    assert "id" not in doc  # the hospital's Patient may exist under its own id
    assert resource_json(ident.imaging_study)["subject"]["reference"] == "Patient?identifier=urn:hospital:mrn|" + \
        st["patient_pseudo_id"]


def test_the_json_sent_is_the_json_of_the_validated_models(catalog_rows):
    """build_study sends the documents it validated instead of serializing the models back: they
    must be the same FHIR JSON, in every mode."""
    tz_options = MappingOptions(pseudonym_system="urn:x", wado_rs_base_url="https://pacs.example.org/dicom-web",
                                timezone="Europe/Zurich")
    ident_options = MappingOptions(pseudonym_system="urn:hospital:mrn", identified=True)
    checked = 0
    for rows in catalog_rows.values():
        st, se, ins = copy.deepcopy(rows)
        st.update(patient_name="Doe^Jane^Q^Dr", patient_birth_date=dt.date(1970, 5, 6))
        for options in (OPTIONS, tz_options, ident_options):
            res = build_study(st, se, ins, options)
            assert res.study_json == resource_json(res.imaging_study)
            assert res.patient_json == resource_json(res.patient)
            if res.endpoint is not None:
                assert res.endpoint_json == resource_json(res.endpoint)
                checked += 1
    assert checked == len(catalog_rows)


# -- ids and hashes -------------------------------------------------------------------------------
def test_ids_are_deterministic_valid_and_distinct(catalog_rows):
    ids = set()
    for rows in catalog_rows.values():
        a, b = _build(rows), _build(copy.deepcopy(rows))
        for x, y in ((a.imaging_study, b.imaging_study), (a.patient, b.patient)):
            assert x.id == y.id and FHIR_ID.match(x.id)
        ids.add(a.imaging_study.id)
        assert a.study_identity.full_url == b.study_identity.full_url
        assert a.study_identity.full_url.startswith("urn:uuid:")
    assert len(ids) == len(catalog_rows)
    patients = {_build(r).patient.id for r in catalog_rows.values()}
    pseudonyms = {r[0]["patient_pseudo_id"] for r in catalog_rows.values()}
    assert len(patients) == len(pseudonyms) < len(catalog_rows)  # one Patient id per pseudonym


def test_hash_is_stable_and_sees_changes(catalog_rows):
    rows = next(iter(catalog_rows.values()))
    st, se, ins = copy.deepcopy(rows)
    base = _build(rows).hash
    rng = random.Random(3)
    rng.shuffle(se)
    rng.shuffle(ins)
    assert build_study(st, se, ins, OPTIONS).hash == base  # row order does not matter
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    grown = copy.deepcopy(rows)
    grown[0]["number_of_instances"] += 1
    assert _build(grown).hash != base
    assert _build(rows, MappingOptions(pseudonym_system="urn:other")).hash != base


def test_content_hash_is_canonical():
    a = {"resourceType": "Patient", "id": "x", "gender": "male"}
    b = {"gender": "male", "id": "x", "resourceType": "Patient"}
    assert content_hash([a]) == content_hash([b])
    assert content_hash([a]) != content_hash([dict(a, gender="female")])
    assert MAPPING_VERSION  # part of every hash


def test_invalid_rows_are_a_typed_per_study_error_without_values(catalog_rows):
    st, se, ins = copy.deepcopy(next(iter(catalog_rows.values())))
    se[0]["modality"] = None
    with pytest.raises(FhirMappingError) as err:
        build_study(st, se, ins, OPTIONS)
    assert isinstance(err.value, PermanentError)
    assert "modality" in str(err.value) and st["study_uid"] in str(err.value)
    assert st["patient_pseudo_id"] not in str(err.value)
    st2, se2, ins2 = copy.deepcopy(next(iter(catalog_rows.values())))
    st2["patient_pseudo_id"] = None
    with pytest.raises(FhirMappingError):
        build_study(st2, se2, ins2, OPTIONS)


# -- Bundle ---------------------------------------------------------------------------------------
def test_bundle_dedupes_patients_and_links_by_full_url(catalog_rows):
    built = [_build(r, MappingOptions(pseudonym_system="urn:p", wado_rs_base_url="http://x/dicom-web"))
             for r in catalog_rows.values()]
    bundle = transaction_bundle(built)
    assert bundle["type"] == "transaction"
    urls = [e["request"]["url"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls))  # never two entries for one identity
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("ImagingStudy") == len(built)
    assert kinds.count("Patient") == len({b.patient_identity for b in built})
    assert kinds.count("Endpoint") == 1
    full_urls = {e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]}
    for e in bundle["entry"]:
        assert e["request"]["method"] == "PUT"
        assert e["request"]["url"].startswith(e["resource"]["resourceType"] + "?identifier=")
        if e["resource"]["resourceType"] == "ImagingStudy":
            assert full_urls[e["resource"]["subject"]["reference"]] == "Patient"
            assert full_urls[e["resource"]["endpoint"][0]["reference"]] == "Endpoint"
            assert all(se["endpoint"] == e["resource"]["endpoint"] for se in e["resource"]["series"])
            assert e["request"]["url"] == "ImagingStudy?identifier=urn:dicom:uid|" + \
                e["resource"]["identifier"][0]["value"]
    with pytest.raises(ValueError):
        transaction_bundle([built[0], built[0]])
