"""PID → FHIR Patient (identified and research modes), sparse merges, HL7 nulls, A40 merge plans.

Every produced Patient is validated with the fhir.resources R4B model."""

from __future__ import annotations

import datetime as dt

import pytest
from fhir.resources.R4B.patient import Patient

from pacsflow.tasks.deid.deidentifier import patient_pseudonym
from pacsflow.tasks.fhir.mapping import MappingOptions, build_study
from pacsflow.tasks.hl7.mapping import (
    MappingConfig,
    Mode,
    is_swapped_repeat,
    merge_patient,
    merge_plan,
    patient_change,
)
from pacsflow.tasks.hl7.message import Hl7Error, parse_adt
from tests import hl7_samples as s

KEY = bytes(range(32))
IDENTIFIED = MappingConfig(mode=Mode.IDENTIFIED, identifier_systems=s.SYSTEMS)
RESEARCH = MappingConfig(mode=Mode.RESEARCH, research_authority="HOSP", key=KEY,
                         pseudonym_system="urn:pacsflow:pseudonym")


def _valid(doc: dict) -> dict:
    Patient.model_validate(doc)
    return doc


def _change(raw: bytes, config: MappingConfig = IDENTIFIED):
    change = patient_change(parse_adt(raw), config)
    _valid(change.resource)
    return change


def test_identified_a01_maps_every_pid_field():
    change = _change(s.A01)
    doc = change.resource
    assert (change.identity.system, change.identity.value) == (s.HOSPITAL_OID, "4711")
    assert doc["identifier"][0] == {"system": s.HOSPITAL_OID, "value": "4711", "type": {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}
    assert doc["identifier"][1]["system"] == IDENTIFIED.default_identifier_system
    assert doc["name"] == [
        {"family": "Beispiel", "given": ["Anna", "Maria"], "prefix": ["Dr."], "use": "official"},
        {"family": "Muster", "given": ["Anni"], "use": "nickname"},
    ]
    assert (doc["birthDate"], doc["gender"]) == ("1975-03-14", "female")
    assert doc["address"] == [{"line": ["Hauptstr. 1"], "city": "Berlin", "postalCode": "10115",
                               "country": "DEU", "use": "home"}]
    assert doc["telecom"] == [{"system": "phone", "value": "49301234567", "use": "home"},
                              {"system": "email", "value": "anna@example.org", "use": "home"},
                              {"system": "phone", "value": "49307654321", "use": "work"}]
    assert doc["communication"][0]["language"]["coding"][0] == {
        "system": "urn:ietf:bcp:47", "code": "de", "display": "German"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"} in \
        doc["maritalStatus"]["coding"]
    assert change.last_updated == dt.datetime(2026, 11, 30, 9, 14, tzinfo=dt.timezone.utc)
    assert "meta" not in doc and "id" not in doc and change.event == "A01"


@pytest.mark.parametrize("code,gender", [("M", "male"), ("F", "female"), ("O", "other"), ("A", "other"),
                                         ("N", "other"), ("U", "unknown")])
def test_gender_through_the_guides_concept_map(code, gender):
    raw = s.adt("A08", s.pid(f8=code))
    assert _change(raw).resource["gender"] == gender


def test_unknown_sex_code_names_pid8():
    with pytest.raises(Hl7Error) as err:
        _change(s.adt("A08", s.pid(f8="Q")))
    assert (err.value.location, err.value.code) == ("PID-8", 103)


@pytest.mark.parametrize("fields,expected", [
    ({"f29": "20261101", "f30": "Y"}, {"deceasedDateTime": "2026-11-01"}),
    ({"f29": "202611011230+0100", "f30": "Y"}, {"deceasedDateTime": "2026-11-01T12:30:00+01:00"}),
    ({"f29": "202611011230"}, {"deceasedDateTime": "2026-11-01"}),  # a time without offset: the date
    ({"f30": "Y"}, {"deceasedBoolean": True}),
    ({"f30": "N"}, {"deceasedBoolean": False}),
])
def test_death(fields, expected):
    doc = _change(s.adt("A08", s.pid(**fields))).resource
    assert {k: v for k, v in doc.items() if k.startswith("deceased")} == expected


def test_birth_date_keeps_its_precision():
    assert _change(s.adt("A08", s.pid(f7="1975"))).resource["birthDate"] == "1975"
    assert _change(s.adt("A08", s.pid(f7="197503"))).resource["birthDate"] == "1975-03"
    with pytest.raises(Hl7Error) as err:
        _change(s.adt("A08", s.pid(f7="19751399")))
    assert err.value.location == "PID-7"


def test_latin1_name_reaches_the_resource():
    assert _change(s.LATIN1).resource["name"] == [{"family": "Müller", "given": ["Zoë"]}]


def test_sparse_a08_keeps_what_it_omits():
    existing = _change(s.A01).resource
    update = _change(s.A08_SPARSE)
    assert set(update.resource) == {"resourceType", "identifier", "telecom"}
    merged = _valid(merge_patient({**existing, "id": "p1"}, update.update))
    assert merged["telecom"] == [{"system": "phone", "value": "49305555555", "use": "home"}]
    for kept in ("name", "birthDate", "gender", "address", "communication", "maritalStatus"):
        assert merged[kept] == existing[kept]
    assert merged["id"] == "p1"
    assert merged["identifier"] == existing["identifier"]  # united, not replaced by the one sent


def test_hl7_null_erases():
    existing = _change(s.A01).resource
    update = _change(s.A08_NULLS)
    assert update.erased == {"gender", "telecom"}
    merged = _valid(merge_patient(existing, update.update))
    assert "gender" not in merged and "telecom" not in merged
    assert merged["name"] == existing["name"]


def test_deceased_variants_replace_each_other():
    dead = {"resourceType": "Patient", "deceasedDateTime": "2026-11-01"}
    assert merge_patient(dead, {"deceasedBoolean": False}) == {"resourceType": "Patient", "deceasedBoolean": False}
    assert merge_patient(dead, {"deceasedBoolean": None}) == {"resourceType": "Patient"}


def test_merge_into_nothing_is_the_incoming():
    update = _change(s.A28)
    assert merge_patient(None, update.update) == update.resource


# -- research mode ---------------------------------------------------------------------------------
def _imaging_patient(patient_id: str) -> dict:
    """The Patient the imaging sync builds for the study of a DICOM PatientID (de-identified row)."""
    study = {"study_uid": "1.2.3.4", "patient_pseudo_id": patient_pseudonym(KEY, patient_id), "patient_sex": "F"}
    built = build_study(study, [], [], MappingOptions(pseudonym_system=RESEARCH.pseudonym_system))
    return built.patient_json


def test_research_mode_is_the_imaging_patient():
    change = _change(s.A01, RESEARCH)
    imaging = _imaging_patient("4711")
    assert change.resource["id"] == imaging["id"]
    assert change.resource["identifier"] == imaging["identifier"]
    assert change.resource["meta"]["security"] == imaging["meta"]["security"]
    assert change.identity.value == patient_pseudonym(KEY, "4711")
    merged = _valid(merge_patient(imaging, change.update))
    assert merged["id"] == imaging["id"] and len(merged["identifier"]) == 1


def test_research_mode_keeps_only_gender_birth_year_and_deceased():
    raw = s.adt("A01", s.PID_FULL + "|" * 13 + "20261101")  # PID-29
    doc = _change(raw, RESEARCH).resource
    assert set(doc) == {"resourceType", "id", "meta", "identifier", "gender", "birthDate", "deceasedBoolean"}
    assert (doc["gender"], doc["birthDate"], doc["deceasedBoolean"]) == ("female", "1975", True)
    text = repr(doc)
    for phi in ("4711", "Beispiel", "Anna", "Berlin", "1234567", "example.org", "1975-03", "X-99", "2026-11"):
        assert phi not in text


def test_research_mode_drops_a_birth_year_of_90_or_more():
    doc = _change(s.adt("A01", s.pid(f7="19340101", f8="M")), RESEARCH).resource
    assert "birthDate" not in doc and doc["gender"] == "male"


def test_research_mode_without_patient_characteristics_drops_gender():
    config = MappingConfig(mode=Mode.RESEARCH, research_authority="HOSP", key=KEY, retain_characteristics=False)
    assert "gender" not in _change(s.A01, config).resource


def test_research_mode_needs_the_authority_identifier():
    with pytest.raises(Hl7Error) as err:
        _change(s.adt("A01", "PID|1||99^^^OTHER^MR"), RESEARCH)
    assert (err.value.location, err.value.code) == ("PID-3", 101)
    with pytest.raises(ValueError):
        MappingConfig(mode="research", research_authority="HOSP")


# -- A40 -------------------------------------------------------------------------------------------
def _applied_a40() -> tuple[dict, dict]:
    """The two research Patients after the A40 of 0815 into 4711, checked."""
    plan = merge_plan(parse_adt(s.A40), RESEARCH)
    survivor_id, merged_id = _imaging_patient("4711")["id"], _imaging_patient("0815")["id"]
    assert (plan.survivor_id, plan.merged_id) == (survivor_id, merged_id)
    survivor = _valid(merge_patient(_imaging_patient("4711"), plan.survivor_update()))
    merged = _valid(merge_patient(_imaging_patient("0815"), plan.merged_update()))
    assert survivor["link"][0]["type"] == "replaces"
    assert survivor["link"][0]["other"]["reference"] == f"Patient/{merged_id}"
    assert merged["active"] is False
    assert merged["link"] == [{"other": {"reference": f"Patient/{survivor_id}", "identifier": {
        "system": RESEARCH.pseudonym_system, "value": patient_pseudonym(KEY, "4711")}}, "type": "replaced-by"}]
    return survivor, merged


def test_a40_links_both_patients_in_research_mode():
    survivor, merged = _applied_a40()
    assert [link["type"] for link in survivor["link"] + merged["link"]] == ["replaces", "replaced-by"]


def test_a40_identified_uses_ids_given_or_conditional_references():
    plan = merge_plan(parse_adt(s.A40), IDENTIFIED)
    assert plan.merged.value == "0815" and plan.survivor.identity.value == "4711"
    assert plan.survivor_update("abc")["link"][0]["other"]["reference"] == "Patient/abc"
    conditional = plan.merged_update()["link"][0]["other"]["reference"]
    assert conditional == plan.survivor.identity.conditional_url
    _valid({"resourceType": "Patient", **plan.merged_update("s1")})


def test_repeated_a40_with_swapped_identifiers_is_detected():
    survivor, merged = _applied_a40()
    same_again = merge_plan(parse_adt(s.A40), RESEARCH)
    swapped = merge_plan(parse_adt(s.A40_SWAPPED), RESEARCH)
    # The swapped plan's survivor is the Patient merged before, and vice versa.
    assert is_swapped_repeat(merged, survivor, swapped)
    assert not is_swapped_repeat(survivor, merged, same_again)
    assert not is_swapped_repeat(None, None, swapped)


def test_a40_of_one_patient_into_itself_is_refused():
    raw = s.adt("A40", "PID|1||4711^^^HOSP^MR", "MRG|4711^^^HOSP^MR")
    with pytest.raises(Hl7Error) as err:
        merge_plan(parse_adt(raw), IDENTIFIED)
    assert err.value.location == "MRG-1"


def test_merge_plan_needs_an_a40():
    with pytest.raises(ValueError):
        merge_plan(parse_adt(s.A01), IDENTIFIED)


def test_an_older_message_only_fills_what_the_patient_lacks():
    newer = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": s.HOSPITAL_OID, "value": "4711"}],
             "telecom": [{"system": "phone", "value": "49305555555", "use": "home"}], "deceasedBoolean": False,
             "link": [{"other": {"reference": "Patient/p0"}, "type": "replaces"}]}
    older = _change(s.A01).update | {"gender": None, "deceasedDateTime": "2026-01-01"}
    filled = _valid(merge_patient(newer, older, fill_only=True))
    for kept in ("id", "telecom", "deceasedBoolean", "link"):  # the newer values stand, nothing erased
        assert filled[kept] == newer[kept], kept
    assert "deceasedDateTime" not in filled  # a choice the Patient has is not filled with another variant
    a01 = _change(s.A01).resource
    for added in ("name", "birthDate", "address", "communication", "maritalStatus"):
        assert filled[added] == a01[added], added
    assert "gender" not in filled  # the older message's null erases nothing
    assert filled["identifier"][0] == newer["identifier"][0] and len(filled["identifier"]) == len(a01["identifier"])
    assert merge_patient(newer, older)["telecom"] != newer["telecom"]  # what fill_only prevents
