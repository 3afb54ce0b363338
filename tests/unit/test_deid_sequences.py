"""Sequence actions reach every leaf: D dummies every value of its items (codes included), X and
Z leave nothing, K and C keep coded concepts. One test per kind of sequence, each checking the
encoded bytes for the original values and the output for its item structure."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsflow.tasks.deid.deidentifier import DEFAULT_OPTIONS, Deidentifier, Option, pseudonymize_uid
from pacsflow.tasks.deid.instance import encode

KEY = b"sequence-test-key-0123456789"
BASIC = [Option.RETAIN_MODIFIED_DATES]
EVERY_CLEAN = [Option.CLEAN_DESCRIPTORS, Option.CLEAN_STRUCTURED_CONTENT, Option.CLEAN_GRAPHICS,
               Option.RETAIN_MODIFIED_DATES]
# D-action sequences have no option that softens them: whatever the options, D reaches every leaf.
OPTION_SETS = {"basic": BASIC, "default": list(DEFAULT_OPTIONS), "every-clean": EVERY_CLEAN,
               "retain-all": [Option.RETAIN_DEVICE_IDENTITY, Option.RETAIN_INSTITUTION_IDENTITY,
                              Option.RETAIN_SAFE_PRIVATE, Option.RETAIN_FULL_DATES,
                              Option.RETAIN_PATIENT_CHARACTERISTICS]}


def ct() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Oakenshaw^Winifred"
    return ds


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def deidentify(ds: Dataset, options) -> tuple[Dataset, bytes]:
    Deidentifier(KEY, options).apply(ds)
    raw = encode(ds, None)  # audit off: the test itself searches the bytes
    return pydicom.dcmread(io.BytesIO(raw)), raw


def assert_gone(raw: bytes, *values: str) -> None:
    left = [v for v in values if v.encode("latin-1") in raw]
    assert not left, f"original values left in the output: {left}"


def assert_valid(raw: bytes) -> None:
    """The output parses and every value is valid for its VR, at every depth (pydicom raises
    on reading an invalid value in this mode)."""
    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        ds = pydicom.dcmread(io.BytesIO(raw))
        for elem in ds.iterall():
            assert elem.value is not None or elem.is_empty
    finally:
        config.settings.reading_validation_mode = mode


def shape(ds: Dataset) -> list:
    """The item structure: tags in order, with the shape of every item of every sequence."""
    return [(int(e.tag), [shape(i) for i in e.value] if e.VR == "SQ" else None) for e in ds]


# -- Person Identification Code Sequence (0040,1101): D -------------------------------------------
def _person_identification() -> Dataset:
    item = code("BADGE778812", "L-HOSP-STAFF", "Staff card of Winifred Oakenshaw")
    item.CodingSchemeVersion = "2019R7"
    item.ContextIdentifier = "STAFF88"
    item.ContextGroupVersion = "20190412093000"
    item.ContextUID = "1.2.826.0.1.3680043.2.1143.77"
    item.add_new(0x00080121, "SQ", Sequence([code("EQ9137", "L-HOSP-ROLE", "Night porter badge 9137")]))
    return item


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_person_identification_codes_are_dummied_under_every_option_set(name):
    ds = ct()
    ds.PersonIdentificationCodeSequence = Sequence([_person_identification()])
    before = shape(ds.PersonIdentificationCodeSequence[0])
    back, raw = deidentify(ds, OPTION_SETS[name])
    assert_gone(raw, "BADGE778812", "L-HOSP-STAFF", "Oakenshaw", "2019R7", "STAFF88", "20190412",
                "1.2.826.0.1.3680043.2.1143.77", "EQ9137", "L-HOSP-ROLE", "porter")
    item = back.PersonIdentificationCodeSequence[0]
    assert shape(item) == before  # same item, same tags, same nesting
    assert item.CodeValue == "ANONYMIZED" and item.CodeMeaning == "ANONYMIZED"
    assert item.ContextGroupVersion == "19000101000000"
    assert item.ContextUID == pseudonymize_uid(KEY, "1.2.826.0.1.3680043.2.1143.77")
    assert item.EquivalentCodeSequence[0].CodeValue == "ANONYMIZED"
    assert_valid(raw)


def test_person_identification_nested_in_an_identification_sequence():
    ds = ct()
    ds.SOPClassUID = "1.2.3.4.5.6.7.8.9"  # no IOD known: combined codes take D
    operator = Dataset()
    operator.PersonIdentificationCodeSequence = Sequence([_person_identification()])
    operator.PersonAddress = "12 Quarry Lane, Ashbourne"  # X inside D: removed
    operator.PersonTelephoneNumbers = "0161 4960 771"  # X inside D: removed
    operator.InstitutionName = "St Elsewhere Infirmary"  # X/Z/D, unknown IOD -> D
    operator.InstitutionCodeSequence = Sequence([code("SEI-0042", "L-NHS-ORG", "St Elsewhere Infirmary")])
    ds.OperatorIdentificationSequence = Sequence([operator])  # X/D -> D
    back, raw = deidentify(ds, BASIC)
    assert_gone(raw, "BADGE778812", "Oakenshaw", "Quarry", "4960 771", "Elsewhere", "SEI-0042", "L-NHS-ORG")
    out = back.OperatorIdentificationSequence[0]
    assert "PersonAddress" not in out and "PersonTelephoneNumbers" not in out
    assert out.InstitutionName == "ANONYMIZED"
    assert out.PersonIdentificationCodeSequence[0].CodeValue == "ANONYMIZED"
    assert_valid(raw)


# -- an annotation sequence with codes and text (Graphic Annotation, D; C with Clean Graphics) ----
def _annotation() -> Dataset:
    text = Dataset()
    text.UnformattedTextValue = "Oakenshaw: lesion 2cm"
    text.AnchorPointAnnotationUnits = "PIXEL"
    text.AnchorPoint = [101.5, 77.25]
    text.ConceptNameCodeSequence = Sequence([code("LES4471", "L-ANNOT", "Lesion seen by Dr Thistlewood")])
    graphic = Dataset()
    graphic.GraphicAnnotationUnits = "PIXEL"
    graphic.GraphicDimensions = 2
    graphic.NumberOfGraphicPoints = 2
    graphic.GraphicData = [10.5, 20.5, 30.5, 40.5]
    graphic.GraphicType = "POLYLINE"
    layer = Dataset()
    layer.GraphicLayer = "WINIFRED"
    layer.TextObjectSequence = Sequence([text])
    layer.GraphicObjectSequence = Sequence([graphic])
    return layer


def test_annotation_sequence_under_d_keeps_no_code_text_or_number():
    ds = ct()
    ds.GraphicAnnotationSequence = Sequence([_annotation()])
    before = shape(ds.GraphicAnnotationSequence[0])
    back, raw = deidentify(ds, DEFAULT_OPTIONS)  # no Clean Graphics: the sequence's action is D
    assert_gone(raw, "Oakenshaw", "lesion 2cm", "LES4471", "L-ANNOT", "Thistlewood", "WINIFRED")
    layer = back.GraphicAnnotationSequence[0]
    assert shape(layer) == before
    graphic = layer.GraphicObjectSequence[0]
    assert graphic.GraphicType == "POLYLINE"  # an enumerated value: the item stays a valid graphic
    assert list(graphic.GraphicData) == [0.0] * 4  # the values' count stays valid for the module
    assert list(layer.TextObjectSequence[0].AnchorPoint) == [0.0, 0.0]
    assert graphic.NumberOfGraphicPoints == 0
    assert_valid(raw)


def test_annotation_sequence_under_clean_graphics_keeps_codes_and_graphics_cleans_text():
    ds = ct()
    ds.GraphicAnnotationSequence = Sequence([_annotation()])
    back, raw = deidentify(ds, [Option.CLEAN_GRAPHICS])
    layer = back.GraphicAnnotationSequence[0]
    text = layer.TextObjectSequence[0]
    assert text.UnformattedTextValue == "lesion 2cm"  # the patient's name cleaned out of the text
    assert text.ConceptNameCodeSequence[0].CodeValue == "LES4471"  # coded concepts stay under C
    assert list(layer.GraphicObjectSequence[0].GraphicData) == [10.5, 20.5, 30.5, 40.5]
    assert_gone(raw, "Oakenshaw")


# -- a flow-identifier-like sequence (0034,0001): binary identifiers, a UID, numbers, codes, text --
def test_flow_identifier_sequence_leaves_only_dummies():
    ds = ct()
    flow = Dataset()
    flow.FlowIdentifier = b"FLOW-7f3a9c21e5b8"  # 17 bytes: padded on write
    flow.SourceIdentifier = b"CAMERA-THEATRE-04"
    flow.FlowTransferSyntaxUID = "1.2.826.0.1.3680043.2.1143.99"
    flow.FlowRTPSamplingRate = 90000
    flow.add_new(0x00080104, "LO", "Theatre 4 camera of Dr Thistlewood")  # CodeMeaning-like text
    flow.ConceptNameCodeSequence = Sequence([code("CAM0004", "L-THEATRE", "Theatre camera four")])
    ds.FlowIdentifierSequence = Sequence([flow])
    before = shape(ds.FlowIdentifierSequence[0])
    back, raw = deidentify(ds, DEFAULT_OPTIONS)
    assert_gone(raw, "FLOW-7f3a9c21e5b8", "CAMERA-THEATRE-04", "1.2.826.0.1.3680043.2.1143.99", "Thistlewood",
                "CAM0004", "L-THEATRE", "Theatre camera")
    assert struct.pack("<I", 90000) not in raw
    out = back.FlowIdentifierSequence[0]
    assert shape(out) == before
    assert set(out.FlowIdentifier) == {0} and len(out.FlowIdentifier) == 18  # zeros, its own (even) length
    assert out.FlowRTPSamplingRate == 0
    assert out.FlowTransferSyntaxUID == pseudonymize_uid(KEY, "1.2.826.0.1.3680043.2.1143.99")
    assert_valid(raw)


# -- structured content: CODE, TEXT, PNAME items, nested deeper ------------------------------------
def _content_item(value_type: str, concept: tuple[str, str, str], **values) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([code(*concept)])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _sr() -> Dataset:
    ds = ct()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    measured = Dataset()
    measured.NumericValue = "17.25"
    measured.MeasurementUnitsCodeSequence = Sequence([code("mm", "UCUM", "millimeter")])
    deeper = _content_item("CONTAINER", ("121070", "DCM", "Findings"))
    deeper.ContentSequence = Sequence([
        _content_item("TEXT", ("121071", "DCM", "Finding"), TextValue="Seen by Winifred Oakenshaw 20200115"),
        _content_item("CODE", ("121071", "DCM", "Finding"),
                      ConceptCodeSequence=Sequence([code("STAFF4471", "L-HOSP", "Reviewed by Thistlewood")])),
        _content_item("DATETIME", ("111526", "DCM", "DateTime Started"), DateTime="20200115083000"),
        _content_item("NUM", ("410668003", "SCT", "Length"), MeasuredValueSequence=Sequence([measured])),
        _content_item("PNAME", ("121008", "DCM", "Person Observer Name"), PersonName="Thistlewood^Ambrose"),
    ])
    ds.ContentSequence = Sequence([
        _content_item("CODE", ("121071", "DCM", "Finding"),
                      ConceptCodeSequence=Sequence([code("BADGE778812", "L-HOSP-STAFF", "Oakenshaw badge")])),
        _content_item("TEXT", ("121106", "DCM", "Comment"), TextValue="Discussed with Oakenshaw on 20200115"),
        _content_item("PNAME", ("121008", "DCM", "Person Observer Name"), PersonName="Oakenshaw^Winifred"),
        deeper,
    ])
    return ds


def test_structured_content_under_d_keeps_no_original_value_at_any_depth():
    ds = _sr()
    before = shape(ds)[[int(e.tag) for e in ds].index(0x0040A730)]
    back, raw = deidentify(ds, BASIC)
    assert_gone(raw, "BADGE778812", "L-HOSP-STAFF", "Oakenshaw", "Winifred", "Thistlewood", "STAFF4471",
                "Discussed", "Seen by", "20200115", "17.25", "millimeter", "UCUM", "121071", "Findings")
    after = shape(back)[[int(e.tag) for e in back].index(0x0040A730)]
    assert after == before  # every content item and every nested item kept, tag for tag
    deeper = back.ContentSequence[3].ContentSequence
    assert deeper[1].ConceptCodeSequence[0].CodeValue == "ANONYMIZED"
    assert deeper[3].MeasuredValueSequence[0].NumericValue == 0
    assert deeper[2].DateTime == "19000101000000"
    # the enumerated structure stays, so the tree still reads as SR content
    assert [i.ValueType for i in deeper] == ["TEXT", "CODE", "DATETIME", "NUM", "PNAME"]
    assert {i.RelationshipType for i in back.ContentSequence} == {"CONTAINS"}
    assert_valid(raw)


def test_enumerated_attribute_with_a_value_outside_its_set_is_dummied():
    ds = _sr()
    ds.ContentSequence[0].ValueType = "OAKENSHAW"  # not a value type: could be anything
    back, raw = deidentify(ds, BASIC)
    assert_gone(raw, "OAKENSHAW")
    assert back.ContentSequence[0].ValueType == "ANONYMIZED"


def test_unlisted_names_and_dates_are_not_kept():
    """Attributes Table E.1-1 does not list: a PN is dummied and a date follows the date rule."""
    ds = ct_with(SecondaryReviewerName="Oakenshaw^Winifred", EvaluatorName="Thistlewood^Ambrose",
                 StudyUpdateDateTime="20200115083000", SecondaryReviewDate="20200116")
    back, raw = deidentify(ds, BASIC)
    assert_gone(raw, "Thistlewood", "Oakenshaw", "Winifred", "20200115", "20200116")
    assert back.SecondaryReviewerName == back.EvaluatorName == "ANONYMIZED"
    shift = Deidentifier(KEY, BASIC).date_as_deidentified("20200115", "1CT1")
    assert back.StudyUpdateDateTime == shift + "083000"  # shifted like every date of the patient
    back, _ = deidentify(ct_with(StudyUpdateDateTime="20200115083000"), [])
    assert not back.StudyUpdateDateTime  # no date option: emptied
    back, _ = deidentify(ct_with(StudyUpdateDateTime="20200115083000"), [Option.RETAIN_FULL_DATES])
    assert back.StudyUpdateDateTime == "20200115083000"  # the option keeps dates, listed or not


def ct_with(**values) -> Dataset:
    ds = ct()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_command_group_elements_never_reach_the_file():
    ds = ct()
    ds.add_new(0x00001000, "UI", "1.2.826.0.1.3680043.9.9999.1")  # Affected SOP Instance UID
    ds.add_new(0x00001001, "UI", "1.2.826.0.1.3680043.9.9999.2")  # Requested SOP Instance UID
    back, raw = deidentify(ds, BASIC)
    assert not [e for e in back if e.tag.group == 0]


def test_structured_content_under_clean_keeps_codes_cleans_text_removes_names():
    ds = _sr()
    back, raw = deidentify(ds, [Option.CLEAN_STRUCTURED_CONTENT, Option.RETAIN_MODIFIED_DATES])
    top = back.ContentSequence
    assert [i.ValueType for i in top] == ["CODE", "TEXT", "CONTAINER"]  # PNAME items removed
    assert [i.ValueType for i in top[2].ContentSequence] == ["TEXT", "CODE", "DATETIME", "NUM"]
    assert top[0].ConceptCodeSequence[0].CodeValue == "BADGE778812"  # a coded concept stays under C
    assert top[2].ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    assert "Discussed with" in top[1].TextValue and "Seen by" in top[2].ContentSequence[0].TextValue
    assert str(top[2].ContentSequence[3].MeasuredValueSequence[0].NumericValue) == "17.25"  # numbers kept
    assert top[2].ContentSequence[2].DateTime != "20200115083000"  # shifted
    assert_gone(raw, "Winifred", "Thistlewood^Ambrose", "Discussed with Oakenshaw", "20200115")
    assert_valid(raw)


# -- private items inside standard sequences ------------------------------------------------------
def _private_item(item: Dataset) -> Dataset:
    block = item.private_block(0x0019, "GEMS_ACQU_01", create=True)
    block.add_new(0x23, "DS", "41.625")  # on the safe list: kept under Retain Safe Private ...
    block.add_new(0x01, "LO", "Oakenshaw private note")
    return item


def test_private_elements_go_inside_d_even_when_safe():
    ds = ct()
    item = _private_item(_person_identification())
    ds.PersonIdentificationCodeSequence = Sequence([item])
    back, raw = deidentify(ds, [Option.RETAIN_SAFE_PRIVATE])
    assert_gone(raw, "41.625", "Oakenshaw", "BADGE778812")
    assert not [e for e in back.PersonIdentificationCodeSequence[0] if e.tag.is_private]


def test_safe_private_elements_stay_inside_walked_sequences():
    ds = ct()
    ds.ReferencedImageSequence = Sequence([_private_item(Dataset())])  # K in the table: walked
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.999"
    ds.SOPClassUID = "1.2.3.4.5.6.7.8.9"
    back, raw = deidentify(ds, [Option.RETAIN_SAFE_PRIVATE])
    item = back.ReferencedImageSequence[0]
    assert str(item.private_block(0x0019, "GEMS_ACQU_01")[0x23].value) == "41.625"
    assert_gone(raw, "Oakenshaw private note", "1.2.3.999")


# -- the table's own rule inside D: the stricter action wins ---------------------------------------
def test_nested_rules_inside_d_stricter_wins():
    ds = ct()
    item = _person_identification()
    item.PatientName = "Oakenshaw^Winifred"  # Z inside D: emptied
    item.InstitutionAddress = "1 Infirmary Road"  # X inside D: removed
    item.DeviceSerialNumber = "SN-88213"  # K under Retain Device Identity: D still dummies it
    item.StudyDescription = "CT chest for Thistlewood"  # C under Clean Descriptors: D dummies it
    item.StudyDate = "20200115"  # C under Modified Dates: D writes the dummy date, not a shifted one
    item.ReferencedSOPInstanceUID = "1.2.3.999"  # U: remapped like every UID
    ds.PersonIdentificationCodeSequence = Sequence([item])
    back, raw = deidentify(ds, [Option.RETAIN_DEVICE_IDENTITY, Option.CLEAN_DESCRIPTORS,
                                Option.RETAIN_MODIFIED_DATES])
    out = back.PersonIdentificationCodeSequence[0]
    assert out["PatientName"].is_empty and "InstitutionAddress" not in out
    assert out.DeviceSerialNumber == "ANONYMIZED" and out.StudyDescription == "ANONYMIZED"
    assert out.StudyDate == "19000101"
    assert out.ReferencedSOPInstanceUID == pseudonymize_uid(KEY, "1.2.3.999")
    assert_gone(raw, "Infirmary Road", "SN-88213", "Thistlewood", "1.2.3.999", "BADGE778812")


# -- X and Z sequences: nothing nested survives ---------------------------------------------------
def test_x_sequence_is_removed_with_its_codes():
    ds = ct()
    request = Dataset()
    request.RequestedProcedureID = "RP778812"
    request.ScheduledProcedureStepID = "SPS4471"
    request.ScheduledProtocolCodeSequence = Sequence([code("PROT4471", "L-HOSP", "Oakenshaw protocol")])
    ds.RequestAttributesSequence = Sequence([request])  # X (C only under Clean Descriptors)
    back, raw = deidentify(ds, BASIC)
    assert "RequestAttributesSequence" not in back
    assert_gone(raw, "RP778812", "SPS4471", "PROT4471", "Oakenshaw protocol")


def test_z_sequence_is_emptied_with_its_codes():
    ds = ct()
    prep = Dataset()
    prep.SpecimenPreparationStepContentItemSequence = Sequence(
        [_content_item("CODE", ("111701", "DCM", "Processing type"),
                       ConceptCodeSequence=Sequence([code("LAB4471", "L-LAB", "Stained by Thistlewood")]))]
    )
    ds.SpecimenPreparationSequence = Sequence([prep])  # Z (C only under Clean Structured Content)
    back, raw = deidentify(ds, DEFAULT_OPTIONS)
    assert "SpecimenPreparationSequence" in back and len(back.SpecimenPreparationSequence) == 0
    assert_gone(raw, "LAB4471", "L-LAB", "Thistlewood", "Processing type")


def test_d_on_multi_valued_leaves_keeps_the_value_count():
    ds = ct()
    item = Dataset()
    item.ImagePositionPatient = ["-151.25", "-172.5", "-68.125"]
    item.ImageType = ["DERIVED", "SECONDARY", "LOCALIZER"]
    item.ReferencedFrameNumber = [3, 4]
    ds.PersonIdentificationCodeSequence = Sequence([item])
    back, raw = deidentify(ds, BASIC)
    out = back.PersonIdentificationCodeSequence[0]
    assert list(out.ImagePositionPatient) == [0, 0, 0]
    assert list(out.ImageType) == ["ANONYMIZED"] * 3
    assert list(out.ReferencedFrameNumber) == [0, 0]
    assert_gone(raw, "-172.5", "LOCALIZER")


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr"])
def test_d_on_items_read_from_a_file(implicit):
    """Items as read from a file hold raw elements (implicit VR: no VR at all): the same rules."""
    ds = _sr()
    item = Dataset()
    item.ImagePositionPatient = ["-151.25", "-172.5", "-68.125"]
    item.ReferencedFrameNumber = [3, 4]
    item.SimpleFrameList = [7, 8, 9]  # UL, binary
    item.FlowIdentifier = b"FLOW-7f3a9c21e5b8"
    ds.ContentSequence[0].add_new(0x00401101, "SQ", Sequence([item]))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=implicit, little_endian=True)
    staged = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    back, raw = deidentify(staged, BASIC)
    assert_gone(raw, "BADGE778812", "Oakenshaw", "Thistlewood", "STAFF4471", "-172.5", "FLOW-7f3a9c21e5b8")
    assert struct.pack("<3I", 7, 8, 9) not in raw
    out = back.ContentSequence[0].PersonIdentificationCodeSequence[0]
    assert list(out.ImagePositionPatient) == [0, 0, 0] and list(out.ReferencedFrameNumber) == [0, 0]
    assert list(out.SimpleFrameList) == [0, 0, 0]
    assert back.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "ANONYMIZED"
    assert_valid(raw)
