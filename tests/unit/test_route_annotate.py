"""pacsflow.tasks.route.annotate: private blocks on real Part 10 files, read back by pydicom and DCMTK."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from pacsflow.tasks.route.annotate import PrivateBlock, annotate, annotated_bytes
from tests.unit.test_route_rules import files_of, make_samples

AI_PRIORITY = PrivateBlock.model_validate(
    {"group": 0x0013, "creator": "AI_PRIORITY", "elements": [{"element": 0x10, "vr": "LO", "value": "HIGH"},
                                                               {"element": 0x11, "vr": "US", "value": 3}]})


@pytest.fixture(scope="module")
def mammogram(tmp_path_factory) -> Path:
    studies = make_samples(tmp_path_factory.mktemp("samples"))
    return next(files_of(s)[0] for s in studies if s.modality == "MG")


@pytest.fixture(scope="module")
def compressed(mammogram, tmp_path_factory) -> Path:
    ds = pydicom.dcmread(mammogram)
    ds.compress(RLELossless)
    path = tmp_path_factory.mktemp("rle") / "mg-rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dcmdump(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "annotated.dcm"
    path.write_bytes(data)
    return subprocess.run(["dcmdump", "+L", str(path)], check=True, capture_output=True).stdout.decode("latin-1")


def _elements(ds: Dataset) -> dict[int, tuple[str, object]]:
    return {int(e.tag): (e.VR, e.value) for e in ds}


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="DCMTK's dcmdump is not installed")
@pytest.mark.parametrize("sample", ["mammogram", "compressed"])
def test_the_block_is_added_and_nothing_else_changes(request, tmp_path, sample):
    source = request.getfixturevalue(sample)
    before = pydicom.dcmread(source)
    data = annotated_bytes(source, [AI_PRIORITY])

    dump = _dcmdump(data, tmp_path)
    assert "(0013,0010) LO [AI_PRIORITY]" in dump
    assert "(0013,1010) LO [HIGH]" in dump and "(0013,1011) US 3" in dump

    after = pydicom.dcmread(tmp_path / "annotated.dcm")
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.file_meta.TransferSyntaxUID == (RLELossless if sample == "compressed" else ExplicitVRLittleEndian)
    assert after.PixelData == before.PixelData
    assert before.PixelData in data and before.PixelData in Path(source).read_bytes()  # the bytes as stored
    added = {t: v for t, v in _elements(after).items() if t not in _elements(before)}
    assert added == {0x00130010: ("LO", "AI_PRIORITY"), 0x00131010: ("LO", "HIGH"), 0x00131011: ("US", 3)}
    assert all(_elements(after)[t] == v for t, v in _elements(before).items())
    assert after.private_block(0x0013, "AI_PRIORITY")[0x10].value == "HIGH"


def test_a_compressed_sample_stays_compressed_and_decodes(compressed):
    before = pydicom.dcmread(compressed)
    after = pydicom.dcmread(io.BytesIO(annotated_bytes(compressed, [AI_PRIORITY])))
    assert after.file_meta.TransferSyntaxUID.is_compressed
    assert (after.pixel_array == before.pixel_array).all()


def test_another_creators_block_is_kept_and_ours_is_reused():
    ds = Dataset()
    ds.private_block(0x0013, "VENDOR X", create=True).add_new(0x10, "LO", "theirs")
    annotate(ds, [AI_PRIORITY])
    annotate(ds, [AI_PRIORITY])  # a second pass reuses our slot
    assert ds[0x00130010].value == "VENDOR X" and ds[0x00131010].value == "theirs"
    assert ds[0x00130011].value == "AI_PRIORITY" and 0x00130012 not in ds
    assert ds[0x00131110].value == "HIGH" and ds[0x00131111].value == 3


@pytest.mark.parametrize(("block", "where"), [
    ({"group": 0x0012, "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": "x"}]}, "group"),
    ({"group": 0x0007, "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": "x"}]}, "group"),
    ({"group": 0xFFFF, "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": "x"}]}, "group"),
    ({"group": "0x00zz", "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": "x"}]}, "group"),
    ({"group": 0x0013, "creator": "", "elements": [{"element": 0x10, "vr": "LO", "value": "x"}]}, "creator"),
    ({"group": 0x0013, "creator": "A\\B", "elements": [{"element": 0x10, "vr": "LO", "value": "x"}]}, "creator"),
    ({"group": 0x0013, "creator": "A", "elements": []}, "elements"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x0F, "vr": "LO", "value": "x"}]}, "elements.0.element"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x10, "vr": "SQ", "value": "x"}]}, "elements.0.vr"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x10, "vr": "SH", "value": "x" * 17}]}, "elements.0"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": "a\\b"}]}, "elements.0"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": "Müller"}]}, "elements.0"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x10, "vr": "US", "value": 70000}]}, "elements.0"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": True}]}, "elements.0.value"),
    ({"group": 0x0013, "creator": "A", "elements": [{"element": 0x10, "vr": "LO", "value": "x"},
                                                    {"element": "10", "vr": "LO", "value": "y"}]}, "elements"),
])
def test_invalid_blocks_are_refused_at_load(block, where):
    with pytest.raises(ValidationError) as caught:
        PrivateBlock.model_validate(block)
    locations = {".".join(str(p) for p in err["loc"]) for err in caught.value.errors()}
    assert where in locations


def test_numbers_become_text_for_text_vrs():
    block = PrivateBlock.model_validate({"group": 0x0013, "creator": "A", "elements": [
        {"element": 0x10, "vr": "LO", "value": 5}, {"element": 0x11, "vr": "IS", "value": 12},
        {"element": 0x12, "vr": "FD", "value": 0.5}]})
    assert [e.value for e in block.elements] == ["5", "12", 0.5]
    ds = Dataset()
    annotate(ds, [block])
    assert ds[0x00131011].value == 12 and ds[0x00131012].value == 0.5
