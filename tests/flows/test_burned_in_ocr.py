"""Burned-in text end to end: ultrasound frames with a patient's name and ID drawn into a corner,
in a real Orthanc, through the nightly flow under the default pixel policy (ocr): the text is
found, blanked and verified gone in the lake; a flagged object whose text OCR cannot find is
quarantined instead."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont

from pacsflow.catalog.views import query
from pacsflow.deployments.local import sampledata
from pacsflow.flows.nightly import nightly_ingest, run_result
from pacsflow.tasks.deid.ocr import OcrConfig, find_text, to_gray8
from pacsflow.tasks.deid.pixels import device_regions
from pacsflow.tasks.ingest.ledger import Ledger

pytestmark = pytest.mark.integration

TODAY = dt.date.today()
ROWS, COLS = 240, 320  # a small ultrasound frame, still large enough for a readable overlay line
OVERLAY = "DOE^JANE 123456"  # what a scanner burns in: the patient's name and ID, top left
CLEAN_PIXELS = "113101"  # DCM code of the Clean Pixel Data Option


def _overlay() -> np.ndarray:
    """True where the overlay's glyphs are, in a ROWS x COLS frame."""
    layer = Image.new("L", (COLS, ROWS), 0)
    ImageDraw.Draw(layer).text((8, 6), OVERLAY, fill=255, font=ImageFont.load_default(size=16))
    return np.asarray(layer) > 0


def _ink_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _read_text(frame: np.ndarray) -> list:
    return find_text(to_gray8(frame, "MONOCHROME2"), OcrConfig())


def _burn_in(path: Path, text: np.ndarray | None) -> np.ndarray:
    """Flag the file BurnedInAnnotation YES and, given ``text``, draw it in bright pixels into the
    frame; returns the frame as stored."""
    ds = pydicom.dcmread(path)
    frame = ds.pixel_array.copy()
    if text is not None:
        frame[text] = 255
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = frame.tobytes()
    ds.save_as(path)
    return frame


def _artifacts(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found}


def test_burned_in_text_is_masked_by_ocr_and_unfound_text_is_quarantined(lake, tmp_path):
    # An ultrasound study: one series of three frames with the overlay, flagged YES as a scanner
    # does; a second series of one frame flagged YES with no text at all. A clean CT alongside.
    [us] = sampledata.generate(tmp_path / "us", studies=1, days=1, end_date=TODAY, seed=83, modalities=("US",),
                               series_per_study=(1, 1), instances_per_series=(3, 3), rows=ROWS, cols=COLS)
    blank_series = sampledata.add_series(us, tmp_path / "us", instances=1, seed=89, rows=ROWS, cols=COLS)
    [ct] = sampledata.generate(tmp_path / "ct", studies=1, days=1, end_date=TODAY, seed=97, modalities=("CT",),
                               series_per_study=(1, 1), instances_per_series=(2, 2))
    text = _overlay()
    x0, y0, x1, y1 = _ink_box(text)
    originals: dict[int, np.ndarray] = {}
    for path in sorted((us.path / us.series_uids[0]).glob("*.dcm")):
        originals[int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber)] = _burn_in(path, text)
    [blank_path] = sorted(blank_series.path.glob("*.dcm"))
    blank = _burn_in(blank_path, None)
    assert sorted(originals) == [1, 2, 3]

    # Before: OCR reads the overlay where it was drawn, and nothing in the blank frame (where no
    # device region of deid's filter recipe applies either: nothing there would be blanked).
    for frame in originals.values():
        boxes = _read_text(frame)
        assert any(bx0 <= x0 and by0 <= y0 and bx1 >= x1 and by1 >= y1 for bx0, by0, bx1, by1 in boxes), boxes
    assert _read_text(blank) == []
    assert device_regions(pydicom.dcmread(blank_path), ROWS, COLS) == []
    sampledata.load([tmp_path / "us", tmp_path / "ct"], "127.0.0.1", lake.orthanc.dicom_port)

    state = nightly_ingest(return_state=True)  # default settings: pixel policy ocr

    result = run_result(state)
    assert (result["outcome"], result["found"], result["cataloged"], result["cataloged_partial"],
            result["failed"]) == ("partial", 2, 2, 1, 0)
    assert result["quarantined_objects"] == 1
    assert result["instances"] == len(originals) + ct.n_instances

    # The catalog holds every frame with the overlay, flagged NO; the blank series is not there.
    rows = query(lake.catalog, "SELECT file_path, instance_number, burned_in_annotation, series_uid FROM instances "
                 "WHERE sop_class_uid = $1 ORDER BY instance_number", [sampledata.US_IMAGE_STORAGE]).to_pylist()
    assert [(r["instance_number"], r["burned_in_annotation"]) for r in rows] == [(1, False), (2, False), (3, False)]
    assert len({r["series_uid"] for r in rows}) == 1
    assert query(lake.catalog, "SELECT count(*) FROM instances WHERE burned_in_annotation").column(0)[0].as_py() == 0

    # Each lake file: flag NO, Clean Pixel Data recorded, the overlay zeroed, the image kept, no text read.
    for row in rows:
        ds = pydicom.dcmread(row["file_path"])
        before, after = originals[row["instance_number"]], ds.pixel_array
        assert ds.BurnedInAnnotation == "NO"
        assert CLEAN_PIXELS in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert not after[y0:y1, x0:x1].any()
        changed = after != before
        assert changed[text].all() and not after[changed].any()  # only blanked, and the text is gone
        near = np.zeros_like(changed)
        near[max(0, y0 - 16):y1 + 16, max(0, x0 - 16):x1 + 16] = True
        assert not (changed & ~near).any()  # nothing blanked away from the overlay's line
        assert (after == before).mean() > 0.9
        assert _read_text(after) == []
    # CT does not burn text in: its objects are not read, nor marked as cleaned.
    for path in query(lake.catalog, "SELECT file_path FROM instances WHERE sop_class_uid != $1",
                      [sampledata.US_IMAGE_STORAGE]).column(0).to_pylist():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.Modality == "CT" and CLEAN_PIXELS not in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]

    # The flagged frame without text is quarantined, as itself, with a reason naming OCR.
    ledger = Ledger(lake.state / "ledger.sqlite")
    [entry] = ledger.quarantine_entries()
    assert "BurnedInAnnotation is YES but OCR located no text" in entry["reason"], entry["reason"]
    assert entry["pseudo_uid"] == ledger.entries()[us.study_uid].pseudo_uid
    [held] = list((lake.state / "quarantine" / entry["pseudo_uid"]).glob("*.dcm"))
    assert np.array_equal(pydicom.dcmread(held).pixel_array, blank)

    # The run's de-identification manifest counts the masked objects, and the quarantined one.
    artifacts = _artifacts(state.state_details.flow_run_id)
    manifest = artifacts["nightly-deid-manifest"]
    assert "- pixel policy: ocr;" in manifest
    assert f"| pixel-ocr-masked | {len(originals)} |" in manifest and "pixel-ocr-clean" not in manifest
    assert "1 quarantined" in manifest and "OCR located no text" in manifest
    table = json.loads(artifacts["nightly-ingest-studies"])
    assert sorted((r["outcome"], r["quarantined"]) for r in table) == [("cataloged", 0), ("cataloged-partial", 1)]
