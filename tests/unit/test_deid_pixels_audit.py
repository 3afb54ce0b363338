"""Pixel policy (burned-in annotation), residual-PHI audit and character sets."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset

from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier, Option
from pacsflow.tasks.deid.audit import ResidualPHIError, audit_bytes
from pacsflow.tasks.deid.pixels import BurnedInAnnotationError, MaskRule, at_risk, parse_masks
from pacsflow.tasks.deid.instance import deidentify_file, encode
from pacsflow.tasks.lake.study import process_study
from pacsflow.tasks.lake.storage import LakeStorage

KEY = b"pixels-test-key-0123456789"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CHARSET_FILES = sorted(p for p in get_charset_files("chr*.dcm"))
HAVE_PYDICOM_DATA = importlib.util.find_spec("data_store") is not None
HAVE_JPEG = importlib.util.find_spec("pylibjpeg") is not None and importlib.util.find_spec("openjpeg") is not None


def us_image(burned: str | None) -> Dataset:
    """A small uncompressed ultrasound image built on CT_small's file meta."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = US_IMAGE
    ds.file_meta.MediaStorageSOPClassUID = US_IMAGE
    ds.Modality = "US"
    ds.Manufacturer = "ACME US"
    ds.ManufacturerModelName = "Sono 1"
    ds.Rows, ds.Columns = 32, 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = (np.ones((32, 32), dtype=np.uint8) * 200).tobytes()
    ds["PixelData"].VR = "OB"
    if burned is None:
        if "BurnedInAnnotation" in ds:
            del ds.BurnedInAnnotation
    else:
        ds.BurnedInAnnotation = burned
    return ds


# -- pixels -------------------------------------------------------------------------------------
def test_burned_in_ultrasound_is_quarantined_by_default_policy():
    deid = Deidentifier(KEY, pixel_policy="quarantine")
    with pytest.raises(BurnedInAnnotationError, match="BurnedInAnnotation is YES"):
        deid.apply(us_image("YES"))


def test_absent_flag_on_ultrasound_is_quarantined_and_no_flag_is_exported():
    deid = Deidentifier(KEY, pixel_policy="quarantine")
    with pytest.raises(BurnedInAnnotationError, match="absent"):
        deid.apply(us_image(None))
    deid.apply(us_image("NO"))  # the device says there is none
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert not at_risk(ct)
    deid.apply(ct)


def test_process_study_quarantines_burned_in_with_a_reason(tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    us_image("YES").save_as(staged / "a.dcm", enforce_file_format=True)
    us_image("NO").save_as(staged / "b.dcm", enforce_file_format=True)
    deid = Deidentifier(KEY, pixel_policy="quarantine")
    out = process_study(staged, "2.25.1", deid, LakeStorage(tmp_path / "lake"), tmp_path / "q", tmp_path / "rows")
    assert out.written == 1
    assert out.quarantined == [("a.dcm", "burned-in annotation: BurnedInAnnotation is YES")]
    assert (tmp_path / "q" / "2.25.1" / "a.dcm").exists()


def test_mask_policy_blanks_configured_regions_and_records_clean_pixel_code():
    masks = [{"modality": "US", "manufacturer": "ACME US", "coordinates": ["0,0,32,8"]}]
    deid = Deidentifier(KEY, pixel_policy="mask", pixel_masks=masks)
    ds = us_image("YES")
    back = pydicom.dcmread(io.BytesIO(encode(ds, deid.apply(ds))))
    arr = back.pixel_array
    assert (arr[:8] == 0).all() and (arr[8:] == 200).all()
    assert back.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in back.DeidentificationMethodCodeSequence]


def test_mask_policy_without_matching_rule_quarantines():
    deid = Deidentifier(KEY, pixel_policy="mask", pixel_masks=[MaskRule(((0, 0, 4, 4),), manufacturer="Other")])
    with pytest.raises(BurnedInAnnotationError, match="no mask rule"):
        deid.apply(us_image("YES"))


@pytest.mark.skipif(not (HAVE_PYDICOM_DATA and HAVE_JPEG), reason="pydicom-data / pylibjpeg-openjpeg not installed")
def test_compressed_ultrasound_is_decoded_masked_and_stored_uncompressed():
    ds = pydicom.dcmread(get_testdata_file("US1_J2KR.dcm"))
    ds.BurnedInAnnotation = "YES"
    rows, cols = int(ds.Rows), int(ds.Columns)
    deid = Deidentifier(KEY, pixel_policy="mask", pixel_masks=[{"modality": "US", "regions": [[0, 0, cols, 20]]}])
    back = pydicom.dcmread(io.BytesIO(encode(ds, deid.apply(ds))))
    assert not back.file_meta.TransferSyntaxUID.is_compressed
    assert (back.pixel_array[:20] == 0).all()
    assert back.pixel_array.shape[:2] == (rows, cols)


def test_undecodable_compressed_pixels_are_quarantined():
    ds = us_image("YES")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # claims JPEG baseline
    ds.PixelData = b"\x00" * 64  # not an encapsulated JPEG
    deid = Deidentifier(KEY, pixel_policy="mask", pixel_masks=[{"modality": "US", "regions": [[0, 0, 4, 4]]}])
    with pytest.raises(BurnedInAnnotationError, match="cannot be decoded"):
        deid.apply(ds)


def test_mask_rules_parse_deid_coordinates():
    [rule] = parse_masks([{"sop_class_uid": US_IMAGE, "ctpcoordinates": ["0,0,640,50"]}])
    assert rule.regions == ((0, 0, 640, 50),)
    with pytest.raises(ValueError):
        parse_masks([{"regions": [[1, 2, 3]]}])


# -- audit --------------------------------------------------------------------------------------
def test_audit_finds_a_name_left_in_a_kept_attribute():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Winterbottom^Cecilia"
    ds.Manufacturer = "CECILIA WINTERBOTTOM scanner"  # kept by the profile: the full name is a real leak
    originals = Deidentifier(KEY).apply(ds)
    with pytest.raises(ResidualPHIError, match=r"PatientName found in \(0008,0070\) Manufacturer") as err:
        encode(ds, originals)
    assert "Winterbottom" not in str(err.value).lower()


def test_audit_finds_a_leak_inside_a_private_creator_kept_under_safe_private():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = "MRN99887766"
    originals = Deidentifier(KEY).apply(ds)
    ds.add_new(0x00091010, "LO", "MRN99887766")  # simulate a leak after apply
    with pytest.raises(ResidualPHIError, match="PatientID"):
        encode(ds, originals)


def test_audit_passes_clean_output_and_can_be_switched_off():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    originals = Deidentifier(KEY).apply(ds)
    assert originals is not None and originals.values["PatientName"]
    assert audit_bytes(encode(ds, originals), originals) == []

    def leaky() -> Dataset:
        leak = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        leak.Manufacturer = str(leak.PatientName)  # kept by the profile
        return leak

    ds = leaky()
    with pytest.raises(ResidualPHIError):
        encode(ds, Deidentifier(KEY).apply(ds))
    ds = leaky()
    assert Deidentifier(KEY, audit=False).apply(ds) is None  # nothing kept, nothing audited
    assert str(pydicom.dcmread(get_testdata_file("CT_small.dcm")).PatientName).encode() in encode(ds, None)


def test_audit_finds_latin1_and_iso2022_encoded_names():
    fr = pydicom.dcmread(get_charset_files("chrFren.dcm")[0])
    name = str(fr.PatientName)
    originals = Deidentifier(KEY).apply(fr)
    fr.Manufacturer = "note: " + name.split("^")[1]  # "Jérôme", written in ISO_IR 100 (Latin-1)
    with pytest.raises(ResidualPHIError):
        encode(fr, originals)
    jp = pydicom.dcmread(get_charset_files("chrH31.dcm")[0])
    family = str(jp.PatientName).split("=")[1].split("^")[0]  # ideographic family name
    originals = Deidentifier(KEY).apply(jp)
    jp.Manufacturer = family  # encoded with ISO 2022 IR 87 escapes on write
    with pytest.raises(ResidualPHIError):
        encode(jp, originals)


# -- character sets -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", CHARSET_FILES, ids=lambda p: Path(p).name)
def test_charset_files_deidentified_audited_and_readable(path):
    ds = pydicom.dcmread(path)
    raw_names = [ds[t].value for t in ds.keys() if ds[t].VR == "PN" and ds[t].value]
    originals = [pydicom.dcmread(path)[t] for t in ds.keys() if ds[t].VR == "PN"]
    data = encode(ds, Deidentifier(KEY, [Option.RETAIN_MODIFIED_DATES]).apply(ds))  # audited
    back = pydicom.dcmread(io.BytesIO(data))
    back.decode()  # every retained text value decodes with the file's character set
    assert back.PatientIdentityRemoved == "YES"
    for elem in originals:
        raw = pydicom.dcmread(path, defer_size=None)[elem.tag]
        value = str(raw.value)
        if len(value) >= 4:
            assert value.encode("utf-8") not in data
    assert raw_names is not None


@pytest.mark.parametrize("name, text", [("chrFren.dcm", "Éq. Échographie Nîmes"), ("chrH31.dcm", "山田装置"),
                                        ("chrX1.dcm", "Wâçλ Ωmega"), ("chrRuss.dcm", "Прибор")])
def test_retained_text_stays_correctly_encoded(name, text):
    ds = pydicom.dcmread(get_charset_files(name)[0])
    ds.Manufacturer = text  # not in the table: kept
    ds.save_as(buf := io.BytesIO(), enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))  # now a raw element in the file's encoding
    back = pydicom.dcmread(io.BytesIO(encode(ds, Deidentifier(KEY).apply(ds))))
    assert back.Manufacturer == text
    assert list(back.SpecificCharacterSet if back["SpecificCharacterSet"].VM > 1 else [back.SpecificCharacterSet]) == \
        list(ds.SpecificCharacterSet if ds["SpecificCharacterSet"].VM > 1 else [ds.SpecificCharacterSet])


def test_deidentify_file_hands_back_the_originals_for_the_audit(tmp_path):
    src = tmp_path / "x.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), src)
    ds, originals = deidentify_file(src, Deidentifier(KEY), DeidReport())
    assert originals is not None and originals.values["PatientName"]
    assert ds.PatientIdentityRemoved == "YES"
    ds.StudyDescription = str(pydicom.dcmread(src).PatientID)  # a leak the audit must see
    with pytest.raises(ResidualPHIError, match="PatientID"):
        encode(ds, originals)


@pytest.mark.parametrize(
    "suffix, risky",
    [("7", True), ("7.4", True), ("6.1", True), ("3.1", True), ("12.1", True), ("77.1.4", True), ("1", True),
     ("1.1", True), ("1.2.1", True), ("2", False), ("4", False), ("128", False), ("30", False), ("11.1", False)],
)
def test_sop_classes_that_burn_text_in(suffix, risky):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1." + suffix
    ds.Modality = "CT"  # not a modality that burns text in: the SOP class decides
    ds.PixelData = b"\x00\x00"
    assert at_risk(ds) is risky


DEID_DATA = importlib.util.find_spec("deid_data")


@pytest.mark.skipif(DEID_DATA is None, reason="deid-data not installed")
@pytest.mark.parametrize("name", ["GREYSCALE_IMAGE.dcm", "ultrasound-multiframe.dcm"])
def test_real_burned_in_ultrasound_quarantined_or_masked(name, tmp_path):
    path = Path(DEID_DATA.submodule_search_locations[0]) / "data" / "ultrasounds" / name
    staged = tmp_path / "staged"
    staged.mkdir()
    shutil.copy(path, staged / name)
    out = process_study(staged, "2.25.9", Deidentifier(KEY, pixel_policy="quarantine"), LakeStorage(tmp_path / "lake"),
                        tmp_path / "q", tmp_path / "rows")
    assert out.written == 0 and out.quarantined == [(name, "burned-in annotation: BurnedInAnnotation is YES")]
    ds = pydicom.dcmread(tmp_path / "q" / "2.25.9" / name)
    cols = int(ds.Columns)
    deid = Deidentifier(KEY, pixel_policy="mask", pixel_masks=[{"modality": "US", "regions": [[0, 0, cols, 40]]}])
    back = pydicom.dcmread(io.BytesIO(encode(ds, deid.apply(ds))))
    arr = back.pixel_array
    top = arr[:, :40] if int(back.get("NumberOfFrames", 1) or 1) > 1 else arr[:40]
    assert not top.any() and arr.any()
    assert back.BurnedInAnnotation == "NO"


@pytest.mark.parametrize("policy", ["ocr", "quarantine", "mask"])
def test_a_photograph_of_the_patient_is_quarantined_whatever_its_flag(policy):
    """A face identifies: no policy but allow lets a VL photograph through, flag NO or not."""
    from pydicom.data import get_testdata_file

    from pacsflow.tasks.deid.pixels import RecognizableFeaturesError

    ds = pydicom.dcmread(get_testdata_file("US1_J2KR.dcm"))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"  # VL Photographic Image
    ds.Modality, ds.BurnedInAnnotation = "XC", "NO"
    with pytest.raises(RecognizableFeaturesError, match="photograph may show a face"):
        Deidentifier(b"photo-key-0123456789", pixel_policy=policy,
                     pixel_masks=[{"regions": [[0, 0, 10, 10]]}]).apply(ds)
    Deidentifier(b"photo-key-0123456789", pixel_policy="allow").apply(ds)  # the site's own call
    assert ds.PatientIdentityRemoved == "YES"
