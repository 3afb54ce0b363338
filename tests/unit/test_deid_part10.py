"""Our dataset writer writes exactly what pydicom's writes: on every sample file, as read and
after de-identification (raw, converted and new elements, sequences at every depth, both VR
encodings, several character sets)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset as pydicom_write_dataset

from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.deid import part10
from pacsflow.tasks.deid.deidentifier import Deidentifier
from tests.helpers import pydicom_sample_files

SAMPLES = pydicom_sample_files()


def _both(path: Path, deidentify: bool) -> tuple[bytes, bytes] | None:
    """pydicom's bytes and ours for the file (each writer gets its own copy: pydicom's converts
    elements in the dataset it writes), in the encoding ``instance.encode`` writes; None when
    pydicom cannot write it, or the file is not one we write (big endian, unreadable)."""
    out = []
    for write in (pydicom_write_dataset, part10.write_dataset):
        ds = _read(path)
        if ds is None:
            return None
        if deidentify:
            try:
                Deidentifier(b"part10-test-key-0123456789", pixel_policy=None, audit=False).apply(ds)
            except DeidentificationError:
                return None
        fp = DicomBytesIO()
        ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        implicit = ts.is_implicit_VR if ts is not None and ts.is_transfer_syntax else ds.original_encoding[0]
        fp.is_implicit_VR, fp.is_little_endian = bool(implicit), True  # as instance.encode writes it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                write(fp, ds)
            except (TypeError, ValueError, NotImplementedError):
                if write is pydicom_write_dataset:
                    return None
                raise
        out.append(fp.getvalue())
    return out[0], out[1]


def _read(path: Path) -> pydicom.Dataset | None:
    try:
        ds = pydicom.dcmread(path)
    except Exception:  # noqa: BLE001 - sample files that pydicom itself cannot read are not ours to write
        return None
    return ds if ds.original_encoding[1] else None  # big endian goes to pydicom anyway


def test_there_are_enough_samples_to_mean_something():
    assert len(SAMPLES) > 150


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_same_bytes_as_pydicom_as_read_and_after_deidentification(path):
    compared = 0
    for deidentify in (False, True):
        pair = _both(path, deidentify)
        if pair is not None:
            assert pair[1] == pair[0]
            compared += 1
    if not compared:
        pytest.skip("not a file pydicom reads and writes in little endian")
