"""The research defaults: descriptors cleaned of names, IDs and dates; ages capped at 90."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsflow.tasks.deid import ages
from pacsflow.tasks.deid.audit import ResidualPHIError
from pacsflow.tasks.deid.choices import DEFAULT_OPTIONS, Option
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.deid.descriptors import clean_descriptor, scrubber
from pacsflow.tasks.deid.instance import encode
from pacsflow.tasks.settings import DeidSettings

KEY = b"descriptor-test-key-0123456789"


def ct() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Whitcombe^Rosalind"
    return ds


def deidentified(ds: Dataset, options=DEFAULT_OPTIONS) -> Dataset:
    originals = Deidentifier(KEY, options).apply(ds)
    return pydicom.dcmread(io.BytesIO(encode(ds, originals)))  # audited: raises on a leak


@pytest.mark.parametrize(
    "text, kept, gone",
    [
        ("CT head requested by Dr Smith-Jones", "CT head", "Smith"),
        ("CT HEAD REQUESTED BY DR SMITH-JONES", "CT HEAD", "SMITH"),
        ("Knee Mr. J. van der Berg", "Knee", "Berg"),
        ("Prof Anna Schmidt abdomen", "abdomen", "Schmidt"),
        ("MRI spine ordered by Watson", "MRI spine", "Watson"),
        ("CT chest 12/03/2021 acc 778812", "CT chest", "778812"),
        ("follow-up 12 Mar 2021", "follow-up", "Mar"),
        ("March 12, 2021 CT", "CT", "2021"),
        ("MRN: A123456 chest", "chest", "123456"),
        ("Series ACC20231234 axial", "Series", "1234"),
        ("call 555 123 4567 or jo@example.org", "call", "4567"),
        ("Mammo screening 2019", "Mammo screening", "2019"),
    ],
)
def test_patterns_remove_names_dates_and_ids(text, kept, gone):
    out = clean_descriptor(text, None)
    assert out.startswith(kept) and gone not in out


@pytest.mark.parametrize(
    "text",
    ["DR CHEST PA", "MR BRAIN WO CONTRAST", "MRI brain MS protocol", "T2 FLAIR AX", "t1_mprage_sag_p2_iso",
     "AXIAL 5mm", "CT ABD/PELVIS W CONTRAST", "Mammo 2048", "LEFT LATERAL DECUBITUS"],
)
def test_imaging_descriptions_are_kept_as_they_are(text):
    assert clean_descriptor(text, None) == text


def test_the_objects_own_values_go_short_name_parts_only_as_whole_words():
    own = scrubber(["Whitcombe", "PID778"], ["Lee"])
    assert clean_descriptor("Annual knee for Lee Whitcombe PID778", own) == "Annual knee for"


def test_the_objects_own_uids_go_wherever_they_occur_the_longest_first():
    own = scrubber(["1.2.840.99.7", "1.2.840.99.77", "Whitcombe"], [])
    assert own is not None and own.sub("#", "ref 1.2.840.99.77; see 1.2.840.99.7 WHITCOMBE") == "ref #; see # #"
    assert scrubber(["1.2.840.99.7"], []).sub("#", "x1.2.840.99.7") == "x#"  # anywhere, as every long token


def test_default_options_keep_characteristics_and_cleaned_descriptors():
    assert DeidSettings().options == list(DEFAULT_OPTIONS)
    assert {Option.RETAIN_PATIENT_CHARACTERISTICS, Option.CLEAN_DESCRIPTORS, Option.RETAIN_MODIFIED_DATES} == set(
        DEFAULT_OPTIONS)
    ds = ct()
    ds.StudyDescription = "CT head requested by Dr Smith-Jones"
    ds.SeriesDescription = "AXIAL 5mm for Whitcombe"
    ds.ProtocolName = "Head 20200115"
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = "F", "045Y", "61.5"
    out = deidentified(ds)
    assert out.StudyDescription == "CT head requested by"
    assert out.SeriesDescription == "AXIAL 5mm for"
    assert out.ProtocolName == "Head"
    assert (out.PatientSex, out.PatientAge, str(out.PatientWeight)) == ("F", "045Y", "61.5")
    assert "113108" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}


def test_names_noted_anywhere_in_the_object_are_removed_from_every_descriptor():
    # the operator and a physician nested in a sequence come after the study description
    ds, item = ct(), Dataset()
    ds.StudyDescription, ds.OperatorsName = "Brain seen by Lee and Okonkwo", "Lee^Ann"
    item.PerformingPhysicianName = "Okonkwo^Chidi"
    ds.ReferencedStudySequence = Sequence([item])  # removed by the profile, after the description
    out = deidentified(ds)
    assert out.StudyDescription == "Brain seen by and"


def test_the_audit_still_catches_a_name_in_an_attribute_the_profile_keeps():
    ds = ct()
    ds.ManufacturerModelName = "Whitcombe Rosalind"  # kept by the profile, not a descriptor: the full name leaks
    with pytest.raises(ResidualPHIError, match="PatientName"):
        encode(ds, Deidentifier(KEY).apply(ds))


@pytest.mark.parametrize(
    "stored, written",
    [("045Y", "045Y"), ("089Y", "089Y"), ("090Y", "090Y"), ("093Y", "090Y"), ("1100M", None), ("099Y", "090Y"),
     ("012M", "012M"), ("300W", "300W"), ("999M", "999M"), ("abc", None)],
)
def test_stored_ages_are_capped_at_90(stored, written):
    assert ages.capped(stored) == written


def test_ages_of_90_or_more_in_any_unit_become_090Y_in_the_output():
    for stored in ("093Y", "120Y", "999Y"):
        ds = ct()
        ds.PatientAge = stored
        assert deidentified(ds).PatientAge == "090Y"
    ds = ct()
    ds.PatientAge = "Y45"  # malformed: AS could carry anything
    assert "PatientAge" not in deidentified(ds)


@pytest.mark.parametrize(
    "birth, on, age",
    [("19300101", "20240101", "090Y"), ("19341231", "20240101", "089Y"), ("19800601", "20240531", "043Y"),
     ("20230101", "20240601", "017M"), ("20240101", "20240115", "014D"), ("20240101", "20230101", None),
     ("", "20240101", None)],
)
def test_computed_ages(birth, on, age):
    assert ages.computed(birth, on) == age


def test_age_is_computed_from_the_birth_date_when_missing_and_capped():
    ds = ct()
    del ds.PatientAge
    ds.PatientBirthDate, ds.StudyDate = "19200315", "20240101"
    out = deidentified(ds)
    assert out.PatientAge == "090Y" and not out.get("PatientBirthDate")
    ds = ct()
    ds.PatientAge = "093Y"
    assert "PatientAge" not in deidentified(ds, [Option.RETAIN_MODIFIED_DATES])  # not retained without the option
