"""PS3.15 E.1-1 conformance: one test per action code and per option, nested sequences,
structured content, overlays and curves, private blocks, file meta, IOD-type choices."""

from __future__ import annotations

import datetime as dt
import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsflow.tasks.deid import iod as deid_iod
from pacsflow.tasks.deid.deidentifier import (
    OPTION_CODES,
    DeidReport,
    Deidentifier,
    Option,
    Originals,
    load_profile,
    load_safe_private,
    patient_day_shift,
    pseudonymize_uid,
)
from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.deid.instance import encode

KEY = b"profile-test-key-0123456789"
CT = "1.2.840.10008.5.1.4.1.1.2"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
UNKNOWN_SOP = "1.2.3.4.5.6.7.8.9"
BASIC = [Option.RETAIN_MODIFIED_DATES]  # the Basic Profile with shifted dates (no descriptor kept)


def ct() -> Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def roundtrip(ds: Dataset, originals: Originals | None) -> tuple[Dataset, bytes]:
    raw = encode(ds, originals)  # audited for the originals
    return pydicom.dcmread(io.BytesIO(raw)), raw


def codes(ds: Dataset) -> list[str]:
    return [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


# -- the table as data ----------------------------------------------------------------------
def test_every_action_code_of_the_table_is_handled():
    profile = load_profile()
    seen = {r.basic for r in profile.rules.values()} | {a for r in profile.rules.values() for a in r.options.values()}
    assert seen == {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


def test_iod_table_has_types_and_source():
    types = deid_iod.types_for_sop_class(CT)
    assert types["00100020"] == "2"  # PatientID is Type 2 in the Patient module
    assert types["00080023"] in ("2", "2C")  # ContentDate
    assert "dicom-standard 0.1.0" in deid_iod.table_source()
    assert deid_iod.types_for_sop_class(UNKNOWN_SOP) is None


@pytest.mark.parametrize(
    "code, typ, known, expected",
    [
        ("Z/D", "1", True, "D"), ("Z/D", "2", True, "Z"), ("Z/D", None, True, "Z"),
        ("X/Z", "2", True, "Z"), ("X/Z", "3", True, "X"), ("X/Z", None, True, "X"),
        ("X/D", "1C", True, "D"), ("X/D", "3", True, "X"),
        ("X/Z/D", "1", True, "D"), ("X/Z/D", "2C", True, "Z"), ("X/Z/D", "3", True, "X"),
        ("X/Z/U*", "1", True, "U"), ("X/Z/U*", "2", True, "Z"), ("X/Z/U*", "3", True, "X"),
        ("X/D", None, False, "D"), ("X/Z", None, False, "Z"), ("X/Z/U*", None, False, "U"),
    ],
)
def test_combined_codes_choose_by_type(code, typ, known, expected):
    assert deid_iod.choose(code, typ, known) == expected


# -- one test per basic action code -----------------------------------------------------------
def test_action_D_dummy_value():
    ds = ct()
    ds.ClinicalTrialSponsorName = "Sponsor Of Doe"  # (0012,0010) D
    Deidentifier(KEY, BASIC).apply(ds)
    assert ds.ClinicalTrialSponsorName == "ANONYMIZED"


def test_action_Z_empty_value():
    ds = ct()
    ds.AccessionNumber = "ACC12345"  # Z
    ds.ReferringPhysicianName = "Who^Doctor"  # Z
    Deidentifier(KEY, BASIC).apply(ds)
    assert ds["AccessionNumber"].is_empty and ds["ReferringPhysicianName"].is_empty


def test_action_X_removed():
    ds = ct()
    ds.InstitutionAddress = "1 Main Street"  # X
    ds.ImageComments = "patient was anxious"
    Deidentifier(KEY, BASIC).apply(ds)
    assert "InstitutionAddress" not in ds and "ImageComments" not in ds


def test_action_K_keeps_with_option():
    ds = ct()
    ds.PatientAge = "045Y"  # X, K under Retain Patient Characteristics
    Deidentifier(KEY, [Option.RETAIN_PATIENT_CHARACTERISTICS]).apply(ds)
    assert ds.PatientAge == "045Y"


def test_action_C_shifts_dates():
    ds = ct()
    ds.StudyDate = "20200115"
    ds.StudyTime = "101010"
    pid = ds.PatientID
    Deidentifier(KEY, [Option.RETAIN_MODIFIED_DATES]).apply(ds)
    expected = dt.date(2020, 1, 15) + dt.timedelta(days=patient_day_shift(KEY, pid))
    assert ds.StudyDate == expected.strftime("%Y%m%d")
    assert ds.StudyTime == "101010"


def test_action_U_remaps_uids_everywhere_consistently():
    ds = ct()
    study = ds.StudyInstanceUID
    ds.ReferencedStudySequence = Sequence([Dataset()])
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = study
    Deidentifier(KEY, BASIC).apply(ds)
    assert ds.StudyInstanceUID == pseudonymize_uid(KEY, study)
    assert ds.StudyInstanceUID.startswith("2.25.") and len(ds.StudyInstanceUID) <= 64


# -- combined codes, by the attribute's type in the object's IOD -------------------------------
def test_combined_Z_D_type2_in_ct_is_zero_length():
    ds = ct()
    ds.ContrastBolusAgent = "Iodine by Dr Doe"  # Z/D, Type 2 in the CT IOD
    Deidentifier(KEY, BASIC).apply(ds)
    assert ds["ContrastBolusAgent"].is_empty


def test_combined_X_Z_type3_removed_type2_zeroed():
    ds = ct()
    ds.AcquisitionDate = "20200101"  # X/Z; Type 3 in CT (General Image module)
    ds.RequestedProcedureDescription = "CT Doe"  # X/Z, not in the CT IOD
    Deidentifier(KEY, []).apply(ds)
    assert "AcquisitionDate" not in ds and "RequestedProcedureDescription" not in ds


def test_combined_X_D_type3_removed():
    ds = ct()
    ds.ProtocolName = "Doe protocol"  # X/D, Type 3 in CT
    Deidentifier(KEY, BASIC).apply(ds)
    assert "ProtocolName" not in ds


def test_combined_X_Z_D_type1_gets_dummy_in_unknown_iod():
    ds = ct()
    ds.SOPClassUID = UNKNOWN_SOP
    ds.InstitutionName = "St Elsewhere"  # X/Z/D: unknown IOD -> D (never keeps the value)
    ds.OperatorsName = "Op^Erator"
    Deidentifier(KEY, BASIC).apply(ds)
    assert ds.InstitutionName == "ANONYMIZED" and ds.OperatorsName == "ANONYMIZED"


def test_combined_X_Z_U_star_type1_in_presentation_state_is_remapped():
    ps = Dataset()
    ps.SOPClassUID = GSPS
    ps.SOPInstanceUID = "1.2.3.4.100"
    ps.StudyInstanceUID = "1.2.3.4"
    ps.SeriesInstanceUID = "1.2.3.4.1"
    ps.PatientID = "P1"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4.1"
    series.ReferencedImageSequence = Sequence([ref])  # (0008,1115)>(0008,1140): Type 1 in GSPS
    ps.ReferencedSeriesSequence = Sequence([series])
    Deidentifier(KEY, BASIC).apply(ps)
    item = ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == pseudonymize_uid(KEY, "1.2.3.4.5")
    assert item.ReferencedSOPClassUID == CT


def test_combined_X_Z_U_star_type3_in_ct_is_removed():
    ds = ct()
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds.ReferencedImageSequence = Sequence([ref])  # Type 3 in the CT IOD
    ds.SourceImageSequence = Sequence([ref])
    Deidentifier(KEY, BASIC).apply(ds)
    assert "ReferencedImageSequence" not in ds and "SourceImageSequence" not in ds


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", list(Option))
def test_every_option_is_selectable_and_recorded(option):
    if option == Option.RETAIN_FULL_DATES:
        options = [option]
    else:
        options = [option, Option.RETAIN_MODIFIED_DATES] if option != Option.RETAIN_MODIFIED_DATES else [option]
    ds = ct()
    originals = Deidentifier(KEY, options).apply(ds)
    back, _ = roundtrip(ds, originals)
    assert OPTION_CODES[option][0] in codes(back)
    assert "113100" in codes(back)
    assert option.value in list(back.DeidentificationMethod)
    assert back.PatientIdentityRemoved == "YES"


def test_option_retain_uids():
    ds = ct()
    uid = ds.SOPInstanceUID
    Deidentifier(KEY, [Option.RETAIN_UIDS]).apply(ds)
    assert ds.SOPInstanceUID == uid == ds.file_meta.MediaStorageSOPInstanceUID


def test_option_retain_device_identity():
    ds = ct()
    ds.DeviceSerialNumber = "SN-998877"
    ds.StationName = "CTSTATION1"
    Deidentifier(KEY, [Option.RETAIN_DEVICE_IDENTITY]).apply(ds)
    assert ds.DeviceSerialNumber == "SN-998877" and ds.StationName == "CTSTATION1"
    ds = ct()
    ds.DeviceSerialNumber = "SN-998877"
    Deidentifier(KEY, BASIC).apply(ds)
    assert "DeviceSerialNumber" not in ds  # X/Z/D, Type 3 in CT


def test_option_retain_institution_identity():
    ds = ct()
    ds.InstitutionName = "St Elsewhere Hospital"
    Deidentifier(KEY, [Option.RETAIN_INSTITUTION_IDENTITY]).apply(ds)
    assert ds.InstitutionName == "St Elsewhere Hospital"


def test_option_retain_patient_characteristics():
    ds = ct()
    ds.PatientSex = "F"
    ds.PatientWeight = "61.5"
    Deidentifier(KEY, [Option.RETAIN_PATIENT_CHARACTERISTICS]).apply(ds)
    assert ds.PatientSex == "F" and str(ds.PatientWeight) == "61.5"
    ds = ct()
    ds.PatientWeight = "61.5"
    Deidentifier(KEY, BASIC).apply(ds)
    assert "PatientWeight" not in ds


def test_option_full_dates_keeps_and_no_option_removes_dates():
    ds = ct()
    date = ds.StudyDate
    Deidentifier(KEY, [Option.RETAIN_FULL_DATES]).apply(ds)
    assert ds.StudyDate == date and ds.LongitudinalTemporalInformationModified == "UNMODIFIED"
    ds = ct()
    Deidentifier(KEY, []).apply(ds)
    assert ds["StudyDate"].is_empty and ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_option_modified_dates_same_shift_for_every_study_of_a_patient():
    a, b = ct(), ct()
    b.StudyDate = "20100101"
    d = Deidentifier(KEY, [Option.RETAIN_MODIFIED_DATES])
    shift = patient_day_shift(KEY, a.PatientID)
    d.apply(a)
    d.apply(b)
    assert b.StudyDate == (dt.date(2010, 1, 1) + dt.timedelta(days=shift)).strftime("%Y%m%d")
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_option_clean_descriptors_removes_identifying_values_and_keeps_the_rest():
    ds = ct()
    ds.PatientName = "Smithson^Johanna"
    ds.StudyDescription = "CT chest for Smithson 20200115 follow-up"
    ds.SeriesDescription = "AXIAL 5mm"
    Deidentifier(KEY, [Option.CLEAN_DESCRIPTORS]).apply(ds)
    assert "Smithson" not in ds.StudyDescription and "20200115" not in ds.StudyDescription
    assert "CT chest" in ds.StudyDescription
    assert ds.SeriesDescription == "AXIAL 5mm"
    ds = ct()
    ds.StudyDescription = "CT chest"
    Deidentifier(KEY, BASIC).apply(ds)
    assert "StudyDescription" not in ds


def _sr() -> Dataset:
    ds = ct()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    ds.Modality = "SR"
    ds.PatientName = "Bloggsworth^Frederick"

    def item(value_type: str, **kw) -> Dataset:
        it = Dataset()
        it.RelationshipType = "CONTAINS"
        it.ValueType = value_type
        name = Dataset()
        name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
        it.ConceptNameCodeSequence = Sequence([name])
        for k, v in kw.items():
            setattr(it, k, v)
        return it

    ds.ValueType = "CONTAINER"
    ds.ContentSequence = Sequence(
        [
            item("TEXT", TextValue="Nodule seen; discussed with Frederick Bloggsworth on 20200115"),
            item("PNAME", PersonName="Observer^Olga"),
            item("DATE", Date="20200115"),
            item("NUM"),
        ]
    )
    return ds


def test_structured_content_basic_profile_dummies_text_and_names():
    ds = _sr()
    originals = Deidentifier(KEY, BASIC).apply(ds)
    back, raw = roundtrip(ds, originals)
    assert b"Bloggsworth" not in raw and b"Olga" not in raw
    text, pname, date, num = back.ContentSequence
    assert text.TextValue == "ANONYMIZED" and pname.PersonName == "ANONYMIZED"
    assert text.ConceptNameCodeSequence[0].CodeMeaning == "ANONYMIZED"  # D reaches codes too (recipe 4)
    assert date.Date != "20200115"


def test_option_clean_structured_content_removes_pname_items_and_cleans_text():
    ds = _sr()
    originals = Deidentifier(KEY, [Option.CLEAN_STRUCTURED_CONTENT, Option.RETAIN_MODIFIED_DATES]).apply(ds)
    back, raw = roundtrip(ds, originals)
    assert [i.ValueType for i in back.ContentSequence] == ["TEXT", "DATE", "NUM"]
    assert "Nodule seen" in back.ContentSequence[0].TextValue
    assert b"Bloggsworth" not in raw and b"Frederick" not in raw and b"Olga" not in raw
    assert back.ContentSequence[1].Date != "20200115"


def test_option_clean_graphics_keeps_graphics_cleans_text():
    ds = ct()
    ds.PatientName = "Hargreaves^Penelope"
    text = Dataset()
    text.UnformattedTextValue = "Hargreaves lesion 2cm"
    text.AnchorPointAnnotationUnits = "PIXEL"
    layer = Dataset()
    layer.GraphicLayer = "LAYER1"
    layer.TextObjectSequence = Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([layer])
    d = ds.copy()
    Deidentifier(KEY, [Option.CLEAN_GRAPHICS]).apply(ds)
    assert ds.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "lesion 2cm"
    Deidentifier(KEY, BASIC).apply(d)  # basic: D on the sequence -> text dummied, structure kept
    assert d.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "ANONYMIZED"
    assert d.GraphicAnnotationSequence[0].GraphicLayer == "ANONYMIZED"  # D reaches every value (recipe 4)


# -- depth, repeating groups, private, file meta ------------------------------------------------
def test_nested_sequences_three_deep():
    ds = ct()
    level3 = Dataset()
    level3.PatientName = "Deep^Three"  # Z at depth 3
    level3.ReferencedSOPInstanceUID = "1.2.3.999"  # U at depth 3
    level3.InstitutionAddress = "3 Deep Lane"  # X at depth 3
    level3.add_new(0x00331001, "LO", "private at depth 3")
    level2 = Dataset()
    level2.ReferencedInstanceSequence = Sequence([level3])
    level1 = Dataset()
    level1.DerivationCodeSequence = Sequence([level2])  # not in the table: walked
    ds.RequestAttributesSequence = Sequence([level1])  # X in the table? walked either way
    ds.ReferencedPatientSequence = Sequence([Dataset()])
    ds.ReferencedPatientSequence[0].ReferencedSOPInstanceUID = "1.2.3.999"
    holder = Dataset()
    holder.ReferencedInstanceSequence = Sequence([level1.copy()])
    ds.DerivationCodeSequence = Sequence([holder])
    originals = Deidentifier(KEY, BASIC).apply(ds)
    _, raw = roundtrip(ds, originals)
    assert b"Deep^Three" not in raw and b"3 Deep Lane" not in raw and b"private at depth 3" not in raw
    assert b"1.2.3.999" not in raw
    inner = ds.DerivationCodeSequence[0].ReferencedInstanceSequence[0].DerivationCodeSequence[0]
    leaf = inner.ReferencedInstanceSequence[0]
    assert leaf.ReferencedSOPInstanceUID == pseudonymize_uid(KEY, "1.2.3.999")
    assert "InstitutionAddress" not in leaf and leaf["PatientName"].is_empty


def test_overlays_and_curves_removed_as_groups():
    ds = ct()
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60004000, "LT", "Overlay by Doe")
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x50002500, "LO", "curve label Doe")
    ds.add_new(0x50003000, "OW", b"\x01\x02")
    Deidentifier(KEY, BASIC).apply(ds)
    assert not [t for t in ds.keys() if t.group in (0x6000, 0x5000)]


def test_option_clean_graphics_clears_overlay_bits_and_cleans_curve_text():
    ds = ct()
    ds.PatientName = "Overlaynamed^Person"
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60000022, "LO", "Overlaynamed ROI")
    ds.add_new(0x50002500, "LO", "curve of Overlaynamed")
    ds.add_new(0x50000005, "US", 2)
    Deidentifier(KEY, [Option.CLEAN_GRAPHICS]).apply(ds)
    assert ds[0x60003000].value == b"\x00" * 8 and ds[0x60000010].value == 8
    assert "Overlaynamed" not in ds[0x60000022].value and "Overlaynamed" not in ds[0x50002500].value
    assert ds[0x50000005].value == 2


def _with_private_blocks(ds: Dataset) -> Dataset:
    ge = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    ge.add_new(0x23, "DS", "39.375")  # Table Speed: safe
    ge.add_new(0x9E, "LO", "Pulse Doe")  # safe-listed but LO: free text, removed
    ge.add_new(0x01, "LO", "Secret Doe")  # same block, not listed: removed
    acme = ds.private_block(0x0029, "ACME 1.0", create=True)
    acme.add_new(0x01, "PN", "Private^Person")
    return ds


def test_private_blocks_removed_at_every_depth():
    ds = _with_private_blocks(ct())
    item = _with_private_blocks(Dataset())
    ds.ReferencedInstanceSequence = Sequence([item])
    originals = Deidentifier(KEY, BASIC).apply(ds)
    _, raw = roundtrip(ds, originals)
    assert not [e for e in ds.iterall() if e.tag.is_private]
    assert b"Private^Person" not in raw and b"GEMS_ACQU_01" not in raw


def test_option_retain_safe_private_keeps_listed_numeric_elements_only():
    ds = _with_private_blocks(ct())
    originals = Deidentifier(KEY, [Option.RETAIN_SAFE_PRIVATE]).apply(ds)
    back, raw = roundtrip(ds, originals)
    block = back.private_block(0x0019, "GEMS_ACQU_01")
    assert str(block[0x23].value) == "39.375"
    assert 0x00191001 not in back and 0x0019109E not in back
    assert b"Secret Doe" not in raw and b"Pulse Doe" not in raw
    assert not [t for t in back.keys() if t.group == 0x0029]
    assert (0x0019, "GEMS_ACQU_01", 0x23) in load_safe_private()


def test_file_meta_replaced_and_preamble_zeroed():
    ds = ct()
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    ds.preamble = b"DOE JOHN" + b"\x00" * 120
    originals = Deidentifier(KEY, BASIC).apply(ds)
    back, raw = roundtrip(ds, originals)
    assert raw[:128] == b"\x00" * 128
    assert "SourceApplicationEntityTitle" not in back.file_meta
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.file_meta.ImplementationVersionName == "PACSFLOW_DEID2"
    assert b"HOSPITAL_PACS" not in raw


def test_group_lengths_dropped_and_report_counts_actions():
    ds = ct()
    ds.add_new(0x00080000, "UL", 1234)
    report = DeidReport()
    Deidentifier(KEY, BASIC).apply(ds, report)
    assert 0x00080000 not in ds
    assert report.actions["U"] >= 3 and report.actions["X"] >= 1


def test_unknown_option_refused():
    with pytest.raises(DeidentificationError, match="choose from: Clean Descriptors"):
        Deidentifier(KEY, ["Retain Everything"])
    with pytest.raises(DeidentificationError, match="choose from: ocr, quarantine, mask, allow"):
        Deidentifier(KEY, pixel_policy="export")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_fast_encoder_writes_what_save_as_writes(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    Deidentifier(KEY, [Option.RETAIN_MODIFIED_DATES, Option.CLEAN_DESCRIPTORS]).apply(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert encode(ds, None) == buf.getvalue()


def test_deidentifier_pickles_for_worker_processes():
    import pickle

    d = Deidentifier(KEY, [Option.RETAIN_UIDS], pixel_policy="mask", pixel_masks=[{"modality": "US", "regions": [[0, 0, 1, 1]]}])
    back = pickle.loads(pickle.dumps(d))
    assert back.options == d.options and back.pixel_policy == d.pixel_policy and back.pixel_masks == d.pixel_masks
    assert back.uid("1.2.3") == d.uid("1.2.3")


def test_received_objects_are_checked_before_de_identification(tmp_path):
    """Broken objects become BadDicom (quarantined with the reason), never another error."""
    import pathlib

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from pacsflow.tasks.core.errors import BadDicom
    from pacsflow.tasks.deid.instance import read_instance

    def broken(name: str, keyword: str, vr: str, raw: bytes):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds._dict[Tag(keyword)] = RawDataElement(Tag(keyword), vr, len(raw), raw, 0, False, True)
        path = tmp_path / name
        ds.save_as(path)
        return path

    assert read_instance(pathlib.Path(get_testdata_file("CT_small.dcm"))).Rows == 128
    cases = {
        broken("rows.dcm", "Rows", "US", b"\x80"): "not numbers",
        broken("date.dcm", "StudyDate", "DA", b"2004-01-19"): "unparseable DA value in (0008,0020) StudyDate",
        broken("ds.dcm", "SliceThickness", "DS", b"abc "): "unparseable DS value in (0018,0050) SliceThickness",
    }
    for path, reason in cases.items():
        with pytest.raises(BadDicom, match=reason.replace("(", r"\(").replace(")", r"\)")):
            read_instance(path)
