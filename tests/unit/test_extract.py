"""pacsflow.tasks.lake.rows on real sample files shipped with pydicom (read from the installed package)."""

from __future__ import annotations

import copy
import datetime as dt
import gc
import io
import logging
import os
import warnings
import weakref
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pacsflow.catalog.schema import SCHEMAS
from pacsflow.tasks.lake import rows as extract
from pacsflow.tasks.core.errors import BadDicom
from pacsflow.tasks.lake.rows import StudyExtractor

INGESTED = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)


def read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def add_file(ex: StudyExtractor, name: str, ds: pydicom.Dataset | None = None) -> pydicom.Dataset:
    path = get_testdata_file(name)
    ds = ds if ds is not None else pydicom.dcmread(path, stop_before_pixels=True)
    ex.add(ds, file_path=f"file://lake/{name}", file_size=os.path.getsize(path), sha256="AB" * 32)
    return ds


def single(name: str) -> tuple[dict, dict, dict, StudyExtractor]:
    ex = StudyExtractor()
    add_file(ex, name)
    t = ex.tables(INGESTED)
    return t["studies"].to_pylist()[0], t["series"].to_pylist()[0], t["instances"].to_pylist()[0], ex


def assert_schemas(tables):
    assert list(tables) == ["studies", "series", "instances"]
    for name, table in tables.items():
        assert table.schema.equals(SCHEMAS[name], check_metadata=True), name


def set_raw(ds: pydicom.Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put a raw (as-read-from-file) element, possibly malformed, into ds."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    return pydicom.dcmread(buf, stop_before_pixels=True)


# -- real files -----------------------------------------------------------------------------------
def test_ct_small_values_and_types():
    study, series, inst, ex = single("CT_small.dcm")
    ds = read("CT_small.dcm")
    assert study["study_uid"] == ds.StudyInstanceUID
    assert study["patient_pseudo_id"] == "1CT1"
    assert study["study_date"] == dt.date(2004, 1, 19)
    assert study["study_time"] == "072730"
    assert study["study_id"] == "1CT1"
    assert study["modalities"] == ["CT"]
    assert study["manufacturers"] == ["GE MEDICAL SYSTEMS"]
    assert study["institution_name"] == "JFK IMAGING CENTER"
    assert study["patient_sex"] == "O"
    assert study["patient_age"] == "000Y" and study["patient_age_years"] == 0.0
    assert (study["number_of_series"], study["number_of_instances"]) == (1, 1)
    assert study["total_file_size"] == os.path.getsize(get_testdata_file("CT_small.dcm"))
    assert study["min_content_date"] == study["max_content_date"] == dt.date(1997, 4, 30)
    assert study["ingested_at"] == INGESTED
    assert study["accession_number"] is None  # present but empty

    assert series["series_uid"] == ds.SeriesInstanceUID
    assert series["series_number"] == 1
    assert series["modality"] == "CT"
    assert series["series_date"] == dt.date(1997, 4, 30)
    assert series["series_time"] == "112749"
    assert series["manufacturer_model_name"] == "RHAPSODE"
    assert series["frame_of_reference_uid"] == ds.FrameOfReferenceUID
    assert series["number_of_instances"] == 1
    assert series["study_date"] == dt.date(2004, 1, 19)

    assert inst["sop_instance_uid"] == ds.SOPInstanceUID
    assert inst["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
    assert inst["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
    assert inst["instance_number"] == 1
    assert (inst["rows"], inst["columns"], inst["bits_allocated"]) == (128, 128, 16)
    assert inst["number_of_frames"] is None
    assert inst["photometric_interpretation"] == "MONOCHROME2"
    assert inst["pixel_spacing"] == [0.661468, 0.661468]
    assert inst["slice_thickness"] == 5.0
    assert inst["image_position_patient"] == pytest.approx([-158.135803, -179.035797, -75.699997])
    assert inst["image_orientation_patient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert inst["image_type"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert inst["content_date"] == dt.date(1997, 4, 30)
    assert inst["content_time"] == "113008"
    assert inst["file_path"] == "file://lake/CT_small.dcm"
    assert inst["file_sha256"] == "ab" * 32
    assert inst["study_date"] == dt.date(2004, 1, 19)
    assert ex.malformed_values == 0


def test_mr_small():
    study, series, inst, _ = single("MR_small.dcm")
    assert study["modalities"] == ["MR"] and study["patient_sex"] == "F"
    assert study["study_date"] == dt.date(2004, 8, 26)
    assert series["series_date"] is None  # absent in the file
    assert inst["pixel_spacing"] == [0.3125, 0.3125]
    assert (inst["rows"], inst["columns"]) == (64, 64)


def test_rtplan_has_no_image_attributes():
    study, series, inst, ex = single("rtplan.dcm")
    assert study["modalities"] == ["RTPLAN"]
    assert series["series_number"] == 2
    assert inst["transfer_syntax_uid"] == "1.2.840.10008.1.2"  # implicit VR little endian
    for col in ("rows", "columns", "pixel_spacing", "instance_number", "image_position_patient", "image_type"):
        assert inst[col] is None, col
    assert ex.malformed_values == 0


def test_empty_number_tags_and_missing_study_date():
    study, series, inst, _ = single("reportsi_with_empty_number_tags.dcm")
    assert study["study_date"] is None and study["study_time"] is None
    assert series["study_date"] is None and inst["study_date"] is None
    assert study["modalities"] == ["SR"]
    assert inst["content_date"] == dt.date(2005, 5, 30)


def test_bad_vr_file_gives_null_not_exception():
    with pytest.warns(UserWarning):  # pydicom's own complaint about IS '1A'
        study, _, inst, ex = single("badVR.dcm")
    assert inst["instance_number"] is None
    assert ex.malformed_values == 1
    assert study["modalities"] == ["RTDOSE"]


def test_multiframe_color():
    _, _, inst, _ = single("SC_rgb_rle_2frame.dcm")
    assert inst["number_of_frames"] == 2
    assert inst["samples_per_pixel"] == 3
    assert inst["photometric_interpretation"] == "RGB"
    assert inst["transfer_syntax_uid"] == "1.2.840.10008.1.2.5"


def _local_sample_files() -> list[Path]:
    base = Path(pydicom.data.__file__).parent  # never get_testdata_files(): it may download
    return sorted(p for p in [*base.glob("test_files/*.dcm"), *base.glob("charset_files/*.dcm")] if p.is_file())


def test_every_shipped_sample_extracts_or_raises_bad_dicom():
    files = _local_sample_files()
    assert len(files) > 80
    extracted = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's complaints about odd files
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001 - files pydicom itself cannot parse are not our concern
                continue
            ex = StudyExtractor()
            try:
                ex.add(ds, file_path=str(path), file_size=path.stat().st_size, sha256="0" * 64)
            except BadDicom:
                assert len(ex) == 0
                continue
            assert_schemas(ex.tables(INGESTED))
            extracted += 1
    assert extracted > 60


def test_character_set_file():
    path = Path(pydicom.data.__file__).parent / "charset_files" / "chrFren.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ex = StudyExtractor()
    ex.add(ds, file_path="x", file_size=1, sha256="0" * 64)
    assert_schemas(ex.tables(INGESTED))


# -- aggregation ----------------------------------------------------------------------------------
def _variant(ds, study, series, sop, **attrs):
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _study_from_samples():
    ct, mr = read("CT_small.dcm"), read("MR_small.dcm")
    return [
        _variant(ct, "1.2.3", "1.2.3.1", "1.2.3.1.1", ContentDate="20040119", InstanceNumber=1),
        _variant(ct, "1.2.3", "1.2.3.1", "1.2.3.1.2", ContentDate="20040121", InstanceNumber=2),
        _variant(mr, "1.2.3", "1.2.3.2", "1.2.3.2.1", ContentDate="20040120", BodyPartExamined="HEAD"),
    ]


def test_study_aggregates_series_and_instances():
    ex = StudyExtractor()
    for i, ds in enumerate(_study_from_samples()):
        ex.add(ds, file_path=f"f{i}", file_size=100 + i, sha256=f"{i:064x}")
    t = ex.tables(INGESTED)
    assert_schemas(t)
    (study,) = t["studies"].to_pylist()
    assert study["modalities"] == ["CT", "MR"]
    assert study["body_parts"] == ["HEAD"]
    assert study["manufacturers"] == ["GE MEDICAL SYSTEMS", "TOSHIBA_MEC"]
    assert (study["number_of_series"], study["number_of_instances"]) == (2, 3)
    assert study["total_file_size"] == 303
    assert (study["min_content_date"], study["max_content_date"]) == (dt.date(2004, 1, 19), dt.date(2004, 1, 21))
    series = t["series"].to_pylist()
    assert [s["series_uid"] for s in series] == ["1.2.3.1", "1.2.3.2"]
    assert [s["number_of_instances"] for s in series] == [2, 1]
    assert [s["total_file_size"] for s in series] == [201, 102]
    assert series[0]["min_content_date"] == dt.date(2004, 1, 19)
    assert series[0]["max_content_date"] == dt.date(2004, 1, 21)
    # every series/instance row carries the study's date
    assert {s["study_date"] for s in series} == {study["study_date"]}
    assert [i["sop_instance_uid"] for i in t["instances"].to_pylist()] == ["1.2.3.1.1", "1.2.3.1.2", "1.2.3.2.1"]


def test_output_does_not_depend_on_add_order():
    datasets = _study_from_samples()
    results = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        ex = StudyExtractor()
        for i in order:
            ex.add(datasets[i], file_path=f"f{i}", file_size=10, sha256=f"{i:064x}")
        results.append(ex.tables(INGESTED))
    for other in results[1:]:
        for name in results[0]:
            assert other[name].equals(results[0][name]), name


def test_duplicate_instance_kept_once_deterministically(caplog):
    ds = read("CT_small.dcm")
    ex = StudyExtractor()
    with caplog.at_level(logging.WARNING, logger="pacsflow.tasks.lake.rows"):
        ex.add(ds, file_path="b", file_size=1, sha256="b" * 64)
        ex.add(ds, file_path="a", file_size=1, sha256="a" * 64)
        ex.add(ds, file_path="c", file_size=1, sha256="c" * 64)
    assert len(ex) == 1 and ex.duplicates == 2
    (inst,) = ex.tables(INGESTED)["instances"].to_pylist()
    assert inst["file_path"] == "a"
    assert ds.SOPInstanceUID in caplog.text and "1CT1" not in caplog.text  # UIDs only


# -- odd values -----------------------------------------------------------------------------------
def test_malformed_values_become_null_and_are_counted():
    ds = read("CT_small.dcm")
    set_raw(ds, "InstanceNumber", "IS", b"abc ")
    set_raw(ds, "StudyDate", "DA", b"20041345")
    set_raw(ds, "SliceThickness", "DS", b"n/a ")
    set_raw(ds, "PixelSpacing", "DS", b"0.5\\x ")
    set_raw(ds, "SeriesNumber", "IS", b"3\\4 ")  # multi-valued where one is expected: first
    set_raw(ds, "PatientAge", "AS", b"45 years")
    set_raw(ds, "StudyTime", "TM", b"")
    set_raw(ds, "Rows", "US", b"\x01")  # truncated binary value
    set_raw(ds, "ContentDate", "DA", b"1997.04.30")  # ACR-NEMA style
    set_raw(ds, "BurnedInAnnotation", "CS", b"MAYBE ")
    del ds.Columns
    ds = roundtrip(ds)  # as if read from a file

    ex = StudyExtractor()
    with pytest.warns(UserWarning):
        ex.add(ds, file_path="x", file_size=1, sha256="0" * 64)
    t = ex.tables(INGESTED)
    assert_schemas(t)
    (study,), (series,), (inst,) = (t[n].to_pylist() for n in ("studies", "series", "instances"))
    assert inst["instance_number"] is None
    assert study["study_date"] is None and inst["study_date"] is None
    assert inst["slice_thickness"] is None
    assert inst["pixel_spacing"] is None
    assert series["series_number"] == 3
    assert study["patient_age"] == "45 years" and study["patient_age_years"] is None
    assert study["study_time"] is None
    assert inst["rows"] is None and inst["columns"] is None
    assert inst["content_date"] == dt.date(1997, 4, 30)
    assert inst["burned_in_annotation"] is None
    assert ex.malformed_values >= 7


def test_deidentification_attributes():
    ds = read("CT_small.dcm")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ["pacsflow recipe 2024.1", "DICOM PS3.15 E.1"]
    ds.BurnedInAnnotation = "NO"
    ex = StudyExtractor()
    ex.add(ds, file_path="x", file_size=1, sha256="0" * 64)
    t = ex.tables(INGESTED)
    (study,) = t["studies"].to_pylist()
    assert study["patient_identity_removed"] is True
    assert study["deidentification_method"] == "pacsflow recipe 2024.1; DICOM PS3.15 E.1"
    assert t["instances"].to_pylist()[0]["burned_in_annotation"] is False


def test_sop_uid_falls_back_to_file_meta_and_missing_file_meta_is_null():
    ds = read("CT_small.dcm")
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    ex = StudyExtractor()
    assert ex.add(ds, file_path="x", file_size=1, sha256="0" * 64) == sop

    ds2 = _variant(read("CT_small.dcm"), ds.StudyInstanceUID, "9.9", "9.9.1")
    del ds2.file_meta
    ex.add(ds2, file_path="y", file_size=1, sha256="0" * 64)
    insts = {i["sop_instance_uid"]: i for i in ex.tables(INGESTED)["instances"].to_pylist()}
    assert insts["9.9.1"]["transfer_syntax_uid"] is None
    assert insts[sop]["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_identifiers_raise_bad_dicom_and_keep_the_study(missing):
    ex = StudyExtractor()
    good = read("CT_small.dcm")
    ex.add(good, file_path="x", file_size=1, sha256="0" * 64)
    bad = _variant(good, good.StudyInstanceUID, good.SeriesInstanceUID, "1.2.3.4.5")
    delattr(bad, missing)
    with pytest.raises(BadDicom) as err:
        ex.add(bad, file_path="y", file_size=1, sha256="0" * 64)
    assert "1.2.3.4.5" in str(err.value) and "1CT1" not in str(err.value)
    assert len(ex) == 1
    assert ex.tables(INGESTED)["studies"].num_rows == 1


def test_no_sop_uid_at_all():
    ds = pydicom.dcmread(get_testdata_file("no_meta.dcm"), force=True, stop_before_pixels=True)
    with pytest.raises(BadDicom):
        StudyExtractor().add(ds, file_path="x", file_size=1, sha256="0" * 64)


def test_instance_of_another_study_is_refused():
    ex = StudyExtractor()
    add_file(ex, "CT_small.dcm")
    with pytest.raises(BadDicom, match="belongs to study"):
        add_file(ex, "MR_small.dcm")
    assert len(ex) == 1
    with pytest.raises(BadDicom):
        add_file(StudyExtractor(study_uid="1.2.3"), "MR_small.dcm")


def test_tables_without_instances_and_ingested_at_defaults():
    with pytest.raises(ValueError):
        StudyExtractor().tables()
    ex = StudyExtractor()
    add_file(ex, "CT_small.dcm")
    before = dt.datetime.now(dt.timezone.utc)
    (study,) = ex.tables()["studies"].to_pylist()
    assert before - dt.timedelta(seconds=1) <= study["ingested_at"] <= dt.datetime.now(dt.timezone.utc)
    naive = dt.datetime(2024, 1, 2, 3, 4, 5)
    (study,) = ex.tables(naive)["studies"].to_pylist()
    assert study["ingested_at"] == naive.replace(tzinfo=dt.timezone.utc)


def test_add_does_not_keep_the_dataset_or_read_pixels():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # with pixel data
    pixel_elem_before = ds.get_item("PixelData")
    ex = StudyExtractor()
    ex.add(ds, file_path="x", file_size=1, sha256="0" * 64)
    assert ds.get_item("PixelData") is pixel_elem_before  # not converted/touched
    kept = weakref.ref(ds)
    del ds, pixel_elem_before
    gc.collect()
    assert kept() is None  # the extractor holds no reference to the Dataset
    assert len(ex) == 1


# -- coercions ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("func", "raw", "expected"),
    [
        (extract.to_int32, "12", 12),
        (extract.to_int32, " 12.0 ", 12),
        (extract.to_int32, "12.5", None),
        (extract.to_int32, "99999999999", None),
        (extract.to_int32, "", None),
        (extract.to_int32, ["7", "8"], 7),
        (extract.to_float, "1e3", 1000.0),
        (extract.to_float, "nan", None),
        (extract.to_float, "inf", None),
        (extract.to_float_list, ["1", "2"], [1.0, 2.0]),
        (extract.to_float_list, "2.5", [2.5]),
        (extract.to_float_list, [], None),
        (extract.to_date, "20240229", dt.date(2024, 2, 29)),
        (extract.to_date, "20230229", None),
        (extract.to_date, "2024.02.01", dt.date(2024, 2, 1)),
        (extract.to_date, "20240101-20240131", None),
        (extract.to_date, ["20240101", "20240102"], dt.date(2024, 1, 1)),
        (extract.to_time_text, "072730.123 ", "072730.123"),
        (extract.to_time_text, "07:27", "07:27"),
        (extract.to_time_text, "noon", None),
        (extract.to_yes_no, "yes", True),
        (extract.to_yes_no, "NO ", False),
        (extract.to_yes_no, "", None),
        (extract.age_in_years, "045Y", 45.0),
        (extract.age_in_years, "006M", 0.5),
        (extract.age_in_years, "014D", round(14 / 365.25, 4)),
        (extract.age_in_years, "Y", None),
        (extract.to_str, " A\x00", "A"),
        (extract.to_str, b"B ", "B"),
        (extract.to_str_list, ["A", "", "B"], ["A", "B"]),
    ],
)
def test_coercions(func, raw, expected):
    assert func(raw) == expected
