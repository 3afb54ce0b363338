"""The residual-PHI audit locates every hit and quarantines only what the rules call a leak."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsflow.tasks.deid.audit import ResidualPHIError, audit_hits
from pacsflow.tasks.deid.choices import DEFAULT_OPTIONS, Option
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.deid.instance import encode

KEY = b"audit-located-test-key-0123456789"


def ct(patient: str = "Pelvis^Anna") -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = patient
    return ds


def code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def exported(ds: Dataset) -> tuple[Dataset, list]:
    """De-identify, encode with the audit (raises on a leak) and return the output and every hit."""
    originals = Deidentifier(KEY, DEFAULT_OPTIONS).apply(ds)
    data = encode(ds, originals)
    return pydicom.dcmread(io.BytesIO(data)), audit_hits(data, originals, ds)


def quarantined(ds: Dataset) -> str:
    originals = Deidentifier(KEY, DEFAULT_OPTIONS).apply(ds)
    with pytest.raises(ResidualPHIError) as err:
        encode(ds, originals)
    return str(err.value)


def assert_no_value(message: str, *values: str) -> None:
    for value in values:
        assert value.lower() not in message.lower()


def test_a_physician_named_like_the_manufacturer_does_not_quarantine():
    ds = ct("Whitcombe^Rosalind")
    ds.ReferringPhysicianName = "Philips^Anna"
    ds.Manufacturer = "Philips Medical Systems"
    out, hits = exported(ds)
    assert out.Manufacturer == "Philips Medical Systems"
    assert out.ReferringPhysicianName == ""
    assert [(h.where, h.leak) for h in hits] == [("(0008,0070) Manufacturer", False)]
    assert hits[0].source in ("PersonName", "ReferringPhysicianName")


def test_a_family_name_equal_to_a_body_part_in_a_retained_term_or_code_meaning_does_not_quarantine():
    ds = ct("Pelvis^Anna")
    ds.BodyPartExamined = "PELVIS"
    ds.AnatomicRegionSequence = Sequence([code("12921003", "Pelvis")])
    ds.ProcedureCodeSequence = Sequence([code("1", "CT head"), code("2", "CT of pelvis")])
    out, hits = exported(ds)
    assert out.BodyPartExamined == "PELVIS"
    assert out.AnatomicRegionSequence[0].CodeMeaning == "Pelvis"
    assert {h.where for h in hits} == {"(0018,0015) BodyPartExamined", "(0008,2218)[0]>(0008,0104) CodeMeaning",
                                       "(0008,1032)[1]>(0008,0104) CodeMeaning"}
    assert not any(h.leak for h in hits)


def test_a_full_name_copied_into_a_retained_free_text_quarantines_with_its_path():
    ds = ct("Johnson^Mary")
    ds.DetectorDescription = "calibrated by Mary Johnson"  # LT, not in Table E.1-1: retained as is
    ds.ProcedureCodeSequence = Sequence([code("1", "CT"), code("2", "JOHNSON, MARY review")])
    message = quarantined(ds)
    assert "PatientName found in (0018,7006) DetectorDescription" in message
    assert "PatientName found in (0008,1032)[1]>(0008,0104) CodeMeaning" in message
    assert_no_value(message, "Johnson", "Mary")


def test_an_original_uid_left_in_retained_text_quarantines_but_not_inside_a_longer_number():
    ds = ct()
    sop = str(ds.SOPInstanceUID)
    ds.DetectorDescription = f"calibration of {sop}"
    message = quarantined(ds)
    assert "SOPInstanceUID found in (0018,7006) DetectorDescription" in message
    assert_no_value(message, sop)
    ds = ct()
    ds.DetectorDescription = f"calibration of {ds.SOPInstanceUID}1 and x{ds.SOPInstanceUID}"  # not whole words
    _, hits = exported(ds)
    assert not [h for h in hits if h.source == "SOPInstanceUID"]


def test_a_one_part_name_is_a_whole_value_and_quarantines():
    ds = ct("Pelvis")
    ds.BodyPartExamined = "PELVIS"
    message = quarantined(ds)
    assert "PatientName found in (0018,0015) BodyPartExamined" in message
    assert_no_value(message, "Pelvis")


def test_a_hit_in_a_cleaned_descriptor_quarantines():
    ds = ct("Pelvis^Anna")
    ds.StudyDescription = "Pelvis CT"
    original = ds["StudyDescription"]
    originals = Deidentifier(KEY, DEFAULT_OPTIONS).apply(ds)
    assert ds.StudyDescription == "CT"  # the cleaner removed the name
    ds["StudyDescription"] = original  # as if the cleaner had missed it: unchanged, but its action is C
    with pytest.raises(ResidualPHIError, match=r"PatientName found in \(0008,1030\) StudyDescription") as err:
        encode(ds, originals)
    assert_no_value(str(err.value), "Pelvis", "Anna")


def test_a_retained_attribute_whose_value_changed_after_the_snapshot_quarantines():
    ds = ct("Philips^Anna")
    originals = Deidentifier(KEY, DEFAULT_OPTIONS).apply(ds)
    ds.Manufacturer = "Philips Medical Systems"  # not its own original value
    with pytest.raises(ResidualPHIError, match=r"PatientName found in \(0008,0070\) Manufacturer") as err:
        encode(ds, originals)
    assert_no_value(str(err.value), "Philips", "Anna")


def test_a_name_in_the_pixel_data_quarantines():
    ds = ct("Winterbottom^Cecilia")
    pixels = bytearray(ds.PixelData)
    pixels[1000:1012] = b"Winterbottom"
    ds.PixelData = bytes(pixels)
    message = quarantined(ds)
    assert "PatientName found in (7FE0,0010) PixelData" in message
    assert_no_value(message, "Winterbottom", "Cecilia")


def test_a_name_in_a_retained_identifying_attribute_quarantines_but_not_in_a_retained_term():
    ds = ct("Pelvis^Anna")
    ds.InstitutionName = "Pelvis Clinic"  # kept under Retain Institution Identity, yet identifying
    originals = Deidentifier(KEY, [*DEFAULT_OPTIONS, Option.RETAIN_INSTITUTION_IDENTITY]).apply(ds)
    with pytest.raises(ResidualPHIError, match=r"PatientName found in \(0008,0080\) InstitutionName") as err:
        encode(ds, originals)
    assert_no_value(str(err.value), "Pelvis", "Anna")
    clean = ct("Pelvis^Anna")
    clean.ImageType = ["ORIGINAL", "PRIMARY", "PELVIS"]
    out, hits = exported(clean)
    assert list(out.ImageType) == ["ORIGINAL", "PRIMARY", "PELVIS"]
    assert [(h.where, h.leak) for h in hits] == [("(0008,0008) ImageType", False)]


def test_clean_objects_have_no_hits():
    ds = ct("Whitcombe^Rosalind")
    ds.PixelData = (np.arange(128 * 128, dtype=np.uint16) % 4000).tobytes()
    out, hits = exported(ds)
    assert hits == []
    assert out.PatientIdentityRemoved == "YES"


def test_the_message_names_the_first_paths_and_counts_the_rest():
    ds = ct("Johnson^Mary")
    ds.ProcedureCodeSequence = Sequence([code(str(i), f"Mary Johnson {i}") for i in range(10)])
    message = quarantined(ds)
    assert message.count("PatientName found in (0008,1032)[") == 8
    assert message.endswith("; and 2 more")
    assert_no_value(message, "Johnson", "Mary")
