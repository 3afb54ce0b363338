"""Analysts' columns: acquisition parameters, retained characteristics and descriptors, DICOM JSON."""

from __future__ import annotations

import datetime as dt
import json

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pacsflow.catalog.views import query
from pacsflow.tasks.lake import rows
from pacsflow.tasks.lake.dicom_json import dicom_json_dict
from pacsflow.tasks.lake.rows import StudyExtractor
from tests.helpers import build_catalog, pydicom_sample_files

STUDY = "2.25.1"


def instance(sop: str, series: str = "2.25.2", **attrs) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, series, sop
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def extract(*datasets: Dataset) -> dict[str, list[dict]]:
    ex = StudyExtractor()
    for ds in datasets:
        ex.add(ds, file_path=f"x/{ds.SOPInstanceUID}", file_size=1, sha256="0" * 64)
    return {name: t.to_pylist() for name, t in ex.tables(dt.datetime(2024, 1, 1)).items()}


def test_mr_parameters_per_instance_and_summarised_per_series():
    mr = dict(MagneticFieldStrength="3", ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP"],
              SequenceName="*tir2d1_15", MRAcquisitionType="2D", RepetitionTime="9000", InversionTime="2500",
              FlipAngle="150", SpacingBetweenSlices="5.5", SliceThickness="5")
    t = extract(instance("2.25.10", EchoTime="81", **mr), instance("2.25.11", EchoTime="9.5", **mr))
    first = t["instances"][0]
    assert (first["magnetic_field_strength"], first["repetition_time"], first["echo_time"]) == (3.0, 9000.0, 81.0)
    assert (first["inversion_time"], first["flip_angle"], first["sequence_name"]) == (2500.0, 150.0, "*tir2d1_15")
    assert first["scanning_sequence"] == ["SE", "IR"] and first["sequence_variant"] == ["SK", "SP"]
    assert first["spacing_between_slices"] == 5.5 and first["mr_acquisition_type"] == "2D"
    (series,) = t["series"]
    assert series["echo_times"] == [9.5, 81.0]  # multi-echo: both values
    assert series["repetition_times"] == [9000.0] and series["inversion_times"] == [2500.0]
    assert (series["magnetic_field_strength"], series["sequence_name"], series["scanning_sequence"]) == (
        3.0, "*tir2d1_15", ["SE", "IR"])
    assert (series["slice_thickness"], series["spacing_between_slices"]) == (5.0, 5.5)


def test_ct_exposure_kernel_and_contrast():
    t = extract(
        instance("2.25.10", KVP="120", Exposure="250", ConvolutionKernel=["Br40d", "3"], ContrastBolusAgent="Omnipaque"),
        instance("2.25.11", KVP="80", XRayTubeCurrent="200", ExposureTime="500", ContrastBolusAgent="NONE"),
        instance("2.25.12", ExposureInuAs="125000"),
    )
    a, b, c = t["instances"]
    assert (a["kvp"], a["exposure_mas"], a["convolution_kernel"]) == (120.0, 250.0, "Br40d; 3")
    assert (a["contrast_bolus_agent"], a["contrast_present"]) == ("Omnipaque", True)
    assert (b["exposure_mas"], b["contrast_present"]) == (100.0, False)
    assert (c["exposure_mas"], c["contrast_present"]) == (125.0, None)
    (series,) = t["series"]
    assert series["kvps"] == [80.0, 120.0] and series["contrast_present"] is True
    assert series["convolution_kernel"] == "Br40d; 3"


def test_mammography_view_and_laterality():
    t = extract(instance("2.25.10", ViewPosition="CC", ImageLaterality="R", ImagerPixelSpacing=["0.07", "0.07"]),
                instance("2.25.11", ViewPosition="MLO", ImageLaterality="R"))
    assert [(i["view_position"], i["image_laterality"]) for i in t["instances"]] == [("CC", "R"), ("MLO", "R")]
    assert t["instances"][0]["imager_pixel_spacing"] == [0.07, 0.07]
    assert t["series"][0]["view_positions"] == ["CC", "MLO"] and t["series"][0]["laterality"] == "R"


@pytest.mark.parametrize("stored, text, years", [("045Y", "045Y", 45.0), ("093Y", "090Y", 90.0),
                                                 ("090Y", "090Y", 90.0), ("045 years", "045 years", None)])
def test_ages_of_90_or_more_are_one_category_in_the_catalog_too(stored, text, years):
    (study,) = extract(instance("2.25.10", PatientAge=stored, PatientSize="1.72", PatientWeight="61.5"))["studies"]
    assert (study["patient_age"], study["patient_age_years"]) == (text, years)
    assert (study["patient_size"], study["patient_weight"]) == (1.72, 61.5)


def test_dicom_json_has_every_attribute_but_pixels_and_binary():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = ds.get_item("PixelData")
    (inst,) = extract(ds)["instances"]
    doc = json.loads(inst["dicom_json"])
    assert doc["00180060"] == {"vr": "DS", "Value": [120.0]}  # KVP, not a typed-column-only value
    assert doc["00100010"]["vr"] == "PN"
    assert "7FE00010" not in doc and not any(v["vr"] in ("OB", "OW", "UN") for v in doc.values())
    assert ds.get_item("PixelData") is pixels  # pixel data never converted
    assert dicom_json_dict(Dataset()) == {}


def test_pipeline_defaults_fill_the_analysts_columns_without_identifiers(tmp_path):
    studies = build_catalog(tmp_path, studies=3, days=5, end_date=dt.date(2026, 1, 31), seed=11,
                            modalities=("CT", "MR", "MG"))
    root = tmp_path / "catalog"
    study = query(root, "SELECT * FROM studies").to_pylist()
    assert all(s["patient_sex"] and s["patient_age"] and s["study_description"] for s in study)
    assert all(s["institution_name"] is None for s in study)  # Retain Institution Identity is not a default
    series = query(root, "SELECT * FROM series").to_pylist()
    assert all(s["series_description"] and s["protocol_name"] and s["station_name"] is None for s in series)
    mr = [s for s in series if s["modality"] == "MR"]
    assert mr and all(s["magnetic_field_strength"] and s["echo_times"] and s["repetition_times"] for s in mr)
    assert all(s["kvps"] and s["convolution_kernel"] for s in series if s["modality"] == "CT")
    assert all(s["view_positions"] for s in series if s["modality"] == "MG")
    # DICOM JSON is the de-identified object: no original name, ID or UID in it
    texts = query(root, "SELECT dicom_json FROM instances").column(0).to_pylist()
    originals = {s.patient_id for s in studies} | {s.study_uid for s in studies}
    for s in studies:
        ds = pydicom.dcmread(next(s.path.rglob("*.dcm")), stop_before_pixels=True)
        for keyword in ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName"):
            originals.update(p for p in str(ds.get(keyword, "")).split("^") if len(p) >= 5)
    assert texts and not any(o in t for t in texts for o in originals if o)
    kvp = query(root, """SELECT count(*) FROM instances i JOIN series s USING (series_uid)
                         WHERE s.modality = 'CT' AND json_extract_string(i.dicom_json, '$."00180060".Value[0]') IS NULL""")
    assert kvp.column(0)[0].as_py() == 0


def test_contrast_present_coercion():
    assert [rows.contrast_present(v) for v in ("Iohexol", "none", "", None)] == [True, False, None, None]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "SC_rgb.dcm"])
def test_dicom_json_says_what_pydicom_says(name):
    """Our encoder (written for speed) agrees with pydicom's PS3.18 JSON on every element it writes."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ours = dicom_json_dict(ds)
    theirs = ds.to_json_dict(bulk_data_threshold=1 << 62, bulk_data_element_handler=None)

    def plain(doc):  # sequences compared item by item, binary elements left out as ours does
        return {k: ({"vr": "SQ", "Value": [plain(i) for i in v.get("Value", [])]} if v["vr"] == "SQ" else v)
                for k, v in doc.items() if v["vr"] not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN")
                and not k.startswith("7FE0")}

    assert ours and plain(ours) == plain(theirs)


def _convert_standard(ds) -> None:
    """Convert every standard element at every depth (private ones stay raw, as in the lake)."""
    for tag in list(ds._dict):
        if not tag.is_private:
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value or ():
                    _convert_standard(item)


@pytest.mark.parametrize("path", pydicom_sample_files(), ids=lambda p: p.name)
def test_dicom_json_of_raw_elements_equals_that_of_converted_ones(path):
    """Text values read straight from raw bytes give the JSON pydicom's conversion gives."""
    try:
        raw = pydicom.dcmread(path, force=True)
        converted = pydicom.dcmread(path, force=True)
        _convert_standard(converted)
    except Exception:  # noqa: BLE001 - files pydicom cannot read or convert are not the point here
        pytest.skip("pydicom cannot read and convert this file")
    assert dicom_json_dict(raw) == dicom_json_dict(converted)
