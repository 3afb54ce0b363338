"""The first de-identifier on real sample files shipped with pydicom."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsflow.tasks.deid.deidentifier import (
    Deidentifier,
    Option,
    load_profile,
    patient_day_shift,
    patient_pseudonym,
    pseudonymize_uid,
)

KEY = b"test-key-0123456789abcdef"
SAMPLES = [
    "CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "chrFren.dcm", "chrH31.dcm", "chrX1.dcm", "chrSQEncoding.dcm",
]


def _read(name: str) -> Dataset:
    if name.startswith("chr"):
        return pydicom.dcmread(get_charset_files(name)[0])
    return pydicom.dcmread(get_testdata_file(name))


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_profile_is_loaded_from_the_standard_table():
    profile = load_profile()
    assert profile.edition == "2024b"
    assert len(profile.rules) > 600
    assert profile.rules[0x00100010].basic == "Z"  # PatientName
    assert profile.rules[0x0020000D].basic == "U"  # StudyInstanceUID
    assert profile.private_rule is not None and profile.private_rule.basic == "X"


@pytest.mark.parametrize("name", SAMPLES)
def test_identifiers_do_not_survive_encoding(name):
    ds = _read(name)
    name_bytes = ds.PatientName.original_string if "PatientName" in ds else b""
    originals = [str(ds.get(k, "")).encode() for k in ("PatientID", "StudyInstanceUID", "SOPInstanceUID")]
    Deidentifier(KEY).apply(ds)
    raw = _encode(ds)
    back = pydicom.dcmread(io.BytesIO(raw))
    for value in [name_bytes, *originals]:
        if len(value) >= 4:
            assert value not in raw
    assert back.PatientIdentityRemoved == "YES"
    if "StudyInstanceUID" in back:  # chrSQEncoding is a bare fragment without UIDs
        assert back.StudyInstanceUID.startswith("2.25.")
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID.startswith("2.25.")
    assert "113100" in [item.CodeValue for item in back.DeidentificationMethodCodeSequence]


def test_pseudonyms_are_keyed_and_deterministic():
    assert patient_pseudonym(KEY, "123") == patient_pseudonym(KEY, "123")
    assert patient_pseudonym(KEY, "123") != patient_pseudonym(b"another-key-0123456789", "123")
    uid = pseudonymize_uid(KEY, "1.2.3.4")
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert uid == pseudonymize_uid(KEY, "1.2.3.4") != pseudonymize_uid(KEY, "1.2.3.5")


def test_same_patient_same_pseudonym_and_date_shift_across_studies():
    a, b = _read("CT_small.dcm"), _read("MR_small.dcm")
    b.PatientID = a.PatientID
    date_a = a.StudyDate
    d = Deidentifier(KEY)
    d.apply(a)
    d.apply(b)
    assert a.PatientID == b.PatientID == a.PatientName
    shift = patient_day_shift(KEY, "1CT1")
    assert shift < 0
    import datetime as dt

    expected = dt.datetime.strptime(date_a, "%Y%m%d").date() + dt.timedelta(days=patient_day_shift(KEY, _read("CT_small.dcm").PatientID))
    assert a.StudyDate == expected.strftime("%Y%m%d")
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_references_are_remapped_consistently_and_private_tags_removed():
    ds = _read("CT_small.dcm")
    sop = ds.SOPInstanceUID
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = sop
    ds.ReferencedInstanceSequence = Sequence([ref])  # not in the table: walked, UIDs remapped
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "Secret Name")
    nested = Dataset()
    inner = Dataset()
    inner.PatientName = "Nested^Name"
    inner.add_new(0x00191001, "LO", "private nested")
    nested.ReferencedPatientSequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([nested])
    Deidentifier(KEY).apply(ds)
    assert ds.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ReferencedInstanceSequence[0].ReferencedSOPClassUID == _read("CT_small.dcm").SOPClassUID
    raw = _encode(ds)
    assert b"Secret Name" not in raw and b"Nested^Name" not in raw and b"private nested" not in raw
    assert not any(elem.tag.is_private for elem in ds.iterall())


def test_retain_uids_option_keeps_uids():
    ds = _read("MR_small.dcm")
    uid = ds.StudyInstanceUID
    Deidentifier(KEY, [Option.RETAIN_UIDS]).apply(ds)
    assert ds.StudyInstanceUID == uid
    assert "113110" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


def test_full_and_modified_dates_are_exclusive():
    from pacsflow.tasks.core.errors import DeidentificationError

    with pytest.raises(DeidentificationError):
        Deidentifier(KEY, [Option.RETAIN_FULL_DATES, Option.RETAIN_MODIFIED_DATES])


def test_empty_key_refused():
    from pacsflow.tasks.core.errors import DeidentificationError

    with pytest.raises(DeidentificationError):
        Deidentifier(b"")
