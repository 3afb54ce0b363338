"""The ocr pixel policy: burned-in text found by Tesseract, masked, verified gone, else quarantined."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytesseract
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pacsflow.tasks.deid import ocr
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier
from pacsflow.tasks.deid.ocr import OcrConfig, find_text, to_gray8
from pacsflow.tasks.deid.pixels import BurnedInAnnotationError, device_regions

pytestmark = pytest.mark.skipif(not ocr.available(), reason="the tesseract program is not installed")

KEY = b"ocr-test-key-0123456789abcdef"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
NAME, PATIENT_ID = "DOE JOHN", "ID 48213579"
DEID_DATA = Path(importlib.util.find_spec("deid_data").origin).parent / "data" if importlib.util.find_spec(
    "deid_data") else None


def _text_layer(rows: int, cols: int, origin: tuple[int, int]) -> np.ndarray:
    """True where the known name and ID are drawn (a 20-pixel font), at ``origin``."""
    layer = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=20)
    draw.text(origin, NAME, fill=255, font=font)
    draw.text((origin[0], origin[1] + 28), PATIENT_ID, fill=255, font=font)
    return np.asarray(layer) > 0


def secondary_capture(kind: str, frames: int = 1, rows: int = 512, cols: int = 512) -> tuple[Dataset, np.ndarray]:
    """A CT-like image (a noisy disc in quiet air) stored as Secondary Capture (flag absent) with
    the name and ID burned into the air of a corner of every frame (another corner in odd
    frames); returns it and the text mask."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for kw in ("BurnedInAnnotation", "RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC_IMAGE
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:rows, :cols]
    body = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (rows / 3) ** 2
    masks = [_text_layer(rows, cols, (12, 10) if n % 2 == 0 else (cols // 2 + 40, rows - 70)) for n in range(frames)]
    if kind == "rgb":
        base = (rng.normal(8, 3, (frames, rows, cols)) + body * rng.normal(110, 15, (frames, rows, cols)))
        base = base.clip(0, 255).astype(np.uint8)
        arr = np.stack([base, base // 2, base], axis=-1)
        for n, m in enumerate(masks):
            arr[n][m] = (255, 255, 0)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    else:
        arr = rng.normal(20, 5, (frames, rows, cols)) + body * rng.normal(1000, 80, (frames, rows, cols))
        arr = arr.clip(0, 3000).astype(np.uint16)
        if kind == "mono1":
            arr = 3000 - arr  # air is bright
        for n, m in enumerate(masks):
            arr[n][m] = 4095 if kind == "mono2" else 0  # MONOCHROME1: dark on a bright ground
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2" if kind == "mono2" else "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = (arr if frames > 1 else arr[0]).tobytes()
    ds["PixelData"].VR = "OB" if kind == "rgb" else "OW"
    return ds, np.stack(masks)


def _frames(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array
    return arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[np.newaxis]


def _read(frame: np.ndarray, photometric: str) -> str:
    return pytesseract.image_to_string(Image.fromarray(to_gray8(frame, photometric)).resize(
        (frame.shape[1] * 2, frame.shape[0] * 2)), config="--psm 11")


@pytest.mark.parametrize("kind,frames", [("mono2", 1), ("mono1", 1), ("rgb", 2)])
def test_burned_in_text_is_found_masked_and_gone(kind, frames):
    ds, text = secondary_capture(kind, frames)
    photometric = ds.PhotometricInterpretation
    before = _frames(ds)
    for n in range(frames):
        boxes = find_text(to_gray8(before[n], photometric), OcrConfig())
        covered = np.zeros_like(text[n])
        for x0, y0, x1, y1 in boxes:
            covered[y0:y1, x0:x1] = True
        assert covered[text[n]].any()  # OCR finds text where it was burned in
        assert "JOHN" in _read(before[n], photometric)

    report = DeidReport()
    Deidentifier(KEY, pixel_policy="ocr").apply(ds, report)
    after = _frames(ds)
    assert report.actions.get("pixel-ocr-masked") == 1 and "pixel-ocr-clean" not in report.actions
    assert ds.BurnedInAnnotation == "NO" and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert "113101" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    for n in range(frames):
        assert not after[n][text[n]].any()  # every known text pixel is zero
        assert find_text(to_gray8(after[n], photometric), OcrConfig()) == []
        read = _read(after[n], photometric)
        assert "DOE" not in read and "JOHN" not in read and "4821" not in read
        assert (after[n] == before[n]).mean() > 0.9  # the image itself is kept


def test_text_that_stays_is_quarantined_with_counts_only():
    ds, _ = secondary_capture("mono2")
    with pytest.raises(BurnedInAnnotationError, match=r"OCR still reads \d+ text line\(s\)") as err:
        Deidentifier(KEY, pixel_policy="ocr", pixel_ocr=OcrConfig(passes=0)).apply(ds)  # masking disabled
    assert "DOE" not in str(err.value) and "48213579" not in str(err.value)


def test_more_frames_than_the_cap_are_quarantined_unread():
    ds, _ = secondary_capture("rgb", frames=3, rows=128, cols=128)
    with pytest.raises(BurnedInAnnotationError, match="3 frames, more than OCR checks"):
        Deidentifier(KEY, pixel_policy="ocr", pixel_ocr=OcrConfig(max_frames=2)).apply(ds)


def test_flag_yes_without_any_text_found_is_quarantined():
    ds, _ = secondary_capture("mono2")
    ds.PixelData = np.full((512, 512), 300, dtype=np.uint16).tobytes()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotationError, match="YES but OCR located no text"):
        Deidentifier(KEY, pixel_policy="ocr").apply(ds)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg.dcm", "SC_jpeg_no_color_transform.dcm", "SC_rgb_16bit_2frame.dcm"])
def test_real_secondary_capture_without_text_passes_unchanged(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    assert "BurnedInAnnotation" not in ds
    pixels, syntax = ds.PixelData, ds.file_meta.TransferSyntaxUID
    report = DeidReport()
    Deidentifier(KEY, pixel_policy="ocr").apply(ds, report)
    assert report.actions.get("pixel-ocr-clean") == 1
    assert ds.PixelData == pixels and ds.file_meta.TransferSyntaxUID == syntax  # not decoded, not re-encoded
    assert ds.BurnedInAnnotation == "NO"  # checked: no text OCR can read
    assert "113101" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]


def test_ct_without_the_flag_never_reaches_ocr(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("OCR ran on an object not at risk")

    monkeypatch.setattr(pytesseract, "image_to_data", refuse)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = ds.PixelData
    report = DeidReport()
    Deidentifier(KEY, pixel_policy="ocr").apply(ds, report)
    assert ds.PixelData == pixels and not any(k.startswith("pixel") for k in report.actions)


def test_device_regions_come_from_deids_filter_recipe_and_leave_the_header_raw():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Manufacturer, ds.SeriesDescription, ds.BurnedInAnnotation = "GE MEDICAL SYSTEMS", "Dose Report", "YES"
    raw = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encoded(ds)))
    assert (0, 0, 512, 110) in device_regions(raw, 512, 512)  # deid: LABEL Dose Report, ctpcoordinates 0,0,512,110
    assert type(raw._dict[pydicom.tag.Tag("SeriesDescription")]).__name__ == "RawDataElement"
    plain = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert device_regions(plain, 128, 128) == []


def _encoded(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -- deid-data's samples with burned-in text ------------------------------------------------------
US_PHI = {"GREYSCALE_IMAGE.dcm": ("00079241539", "08/29/1951"), "RGB_IMAGE.dcm": ("00047431395", "DOWNTIME")}


@pytest.mark.skipif(DEID_DATA is None, reason="deid-data is not installed")
@pytest.mark.parametrize("name", sorted(US_PHI))
def test_deid_data_ultrasound_text_is_masked(name):
    ds = pydicom.dcmread(DEID_DATA / "ultrasounds" / name)
    photometric = ds.PhotometricInterpretation
    assert all(s in _read(ds.pixel_array, photometric) for s in US_PHI[name])
    report = DeidReport()
    Deidentifier(KEY, pixel_policy="ocr").apply(ds, report)
    assert report.actions.get("pixel-ocr-masked") == 1
    text = _read(ds.pixel_array, photometric)
    assert not any(s in text for s in US_PHI[name])
    assert not ds.pixel_array[:30].any()  # the top line (name, ID, date of birth) is blank


@pytest.mark.skipif(DEID_DATA is None, reason="deid-data is not installed")
def test_deid_data_ultrasound_cine_over_the_frame_cap_is_quarantined():
    ds = pydicom.dcmread(DEID_DATA / "ultrasounds" / "ultrasound-multiframe.dcm")
    with pytest.raises(BurnedInAnnotationError, match="30 frames"):
        Deidentifier(KEY, pixel_policy="ocr", pixel_ocr=OcrConfig(max_frames=10)).apply(ds)


@pytest.mark.skipif(DEID_DATA is None, reason="deid-data is not installed")
@pytest.mark.parametrize("name", ["dicom-cookies/image1.dcm", "humans/ctbrain1.dcm"])
def test_deid_data_secondary_captures_without_text_pass(name):
    ds = pydicom.dcmread(DEID_DATA / name)
    report = DeidReport()
    Deidentifier(KEY, pixel_policy="ocr").apply(ds, report)
    assert report.actions.get("pixel-ocr-clean") == 1 and ds.BurnedInAnnotation == "NO"
