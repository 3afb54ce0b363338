"""The synthetic-study generator: deterministic, valid Part 10 files, realistic headers."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pacsflow.deployments.local import sampledata
from pacsflow.deployments.local.sampledata import SOP_CLASSES, StudySummary, add_series, generate

END = date(2025, 3, 14)
PARAMS = dict(studies=10, series_per_study=(2, 3), instances_per_series=(2, 4), days=5, end_date=END, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[StudySummary]]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(out, **PARAMS)


@pytest.fixture(scope="module")
def datasets(corpus: tuple[Path, list[StudySummary]]) -> dict[Path, Dataset]:
    out, _ = corpus
    return {p: dcmread(p) for p in sorted(out.rglob("*.dcm"))}


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.dcm"))}


def test_deterministic_given_seed(tmp_path: Path, corpus: tuple[Path, list[StudySummary]]) -> None:
    out, summaries = corpus
    again = generate(tmp_path / "a", **PARAMS)
    assert [(s.study_uid, s.n_series, s.n_instances) for s in again] == [
        (s.study_uid, s.n_series, s.n_instances) for s in summaries
    ]
    assert _digest_tree(tmp_path / "a") == _digest_tree(out)  # byte for byte

    other = generate(tmp_path / "b", **{**PARAMS, "seed": 8})
    assert not {s.study_uid for s in other} & {s.study_uid for s in summaries}


def test_counts_and_layout(corpus: tuple[Path, list[StudySummary]], datasets: dict[Path, Dataset]) -> None:
    out, summaries = corpus
    assert len(summaries) == PARAMS["studies"]
    assert sorted(p.name for p in out.iterdir()) == sorted(s.study_uid for s in summaries)
    for s in summaries:
        series_dirs = sorted(p for p in s.path.iterdir() if p.is_dir())
        assert len(series_dirs) == s.n_series == len(s.series_uids)
        assert 2 <= s.n_series <= 3
        assert sorted(d.name for d in series_dirs) == sorted(s.series_uids)
        for d in series_dirs:
            assert 2 <= len(list(d.glob("*.dcm"))) <= 4
        assert len(list(s.path.rglob("*.dcm"))) == s.n_instances
    assert len(datasets) == sum(s.n_instances for s in summaries)
    assert not list(out.rglob("*.tmp"))
    # file path mirrors the UIDs
    for path, ds in datasets.items():
        assert path.stem == ds.SOPInstanceUID
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.parent.parent.name == ds.StudyInstanceUID


def test_patients_days_modalities_spread(corpus: tuple[Path, list[StudySummary]]) -> None:
    _, summaries = corpus
    per_patient = Counter(s.patient_id for s in summaries)
    assert 1 < len(per_patient) < len(summaries)
    assert max(per_patient.values()) >= 2  # several studies per patient
    dates = {s.study_date for s in summaries}
    assert len(dates) == PARAMS["days"]  # spread evenly over the window
    assert all(END - timedelta(days=PARAMS["days"] - 1) <= d <= END for d in dates)
    assert {s.modality for s in summaries} == set(SOP_CLASSES)


REQUIRED = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "ContentDate", "ContentTime", "AcquisitionDateTime",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "StationName", "DeviceSerialNumber", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName", "SeriesNumber", "InstanceNumber",
    "RequestAttributesSequence", "ProcedureCodeSequence", "ReferencedPerformedProcedureStepSequence",
    "SpecificCharacterSet", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
]


def test_headers_valid_per_modality(datasets: dict[Path, Dataset]) -> None:
    burned = Counter()
    for path, ds in datasets.items():
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == SOP_CLASSES[ds.Modality]
        missing = [kw for kw in REQUIRED if kw not in ds]
        assert not missing, f"{path.name}: missing {missing}"
        assert ds.PatientAge.endswith("Y") and len(ds.PatientAge) == 4
        arr = ds.pixel_array
        assert arr.shape == (64, 64)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        if ds.Modality == "US":
            assert ds.BitsAllocated == 8 and arr.dtype.itemsize == 1
            burned[ds.BurnedInAnnotation] += 1
            assert "FrameOfReferenceUID" not in ds
        else:
            assert ds.BitsAllocated == 16 and int(arr.max()) < 2 ** ds.BitsStored
        if ds.Modality in ("CT", "MR"):
            for kw in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                       "SliceThickness"):
                assert kw in ds, kw
            assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
        if ds.Modality == "MG":
            assert ds.ImageLaterality in ("L", "R") and ds.Laterality == ds.ImageLaterality
            assert ds.ViewPosition in ("CC", "MLO")
            assert ds.PresentationIntentType == "FOR PRESENTATION"
        # nested two deep
        item = ds.RequestAttributesSequence[0]
        assert item.ScheduledProtocolCodeSequence[0].CodingSchemeDesignator
        assert ds.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPClassUID == sampledata.MPPS_SOP_CLASS
    assert burned["YES"] >= 1


def test_series_and_study_consistency(datasets: dict[Path, Dataset]) -> None:
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    by_study: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets.values():
        by_series[ds.SeriesInstanceUID].append(ds)
        by_study[ds.StudyInstanceUID].append(ds)
    for items in by_series.values():
        assert sorted(int(d.InstanceNumber) for d in items) == list(range(1, len(items) + 1))
        assert len({d.SeriesNumber for d in items}) == 1
    for items in by_study.values():
        for kw in ("PatientID", "PatientName", "AccessionNumber", "StudyDate", "Modality"):
            assert len({str(d.get(kw)) for d in items}) == 1, kw
        assert len({d.SeriesNumber for d in items}) == len({d.SeriesInstanceUID for d in items})
        if items[0].Modality in ("CT", "MR"):
            assert len({d.FrameOfReferenceUID for d in items}) == 1


def test_references_point_to_existing_instances(datasets: dict[Path, Dataset]) -> None:
    by_study: dict[str, dict[str, str]] = defaultdict(dict)
    for ds in datasets.values():
        by_study[ds.StudyInstanceUID][ds.SOPInstanceUID] = ds.SOPClassUID
    n_refs = 0
    kinds = Counter()
    for ds in datasets.values():
        for kw in ("ReferencedImageSequence", "SourceImageSequence"):
            for item in ds.get(kw, []):
                sops = by_study[ds.StudyInstanceUID]
                assert item.ReferencedSOPInstanceUID in sops
                assert item.ReferencedSOPInstanceUID != ds.SOPInstanceUID
                assert item.ReferencedSOPClassUID == sops[item.ReferencedSOPInstanceUID]
                n_refs += 1
                kinds[kw] += 1
    n_files, n_studies = len(datasets), len(by_study)
    assert n_refs >= n_files - n_studies  # every instance but one per study references another
    assert kinds["SourceImageSequence"] >= 1


def test_private_block_holds_patient_name(datasets: dict[Path, Dataset]) -> None:
    for ds in datasets.values():
        block = ds.private_block(sampledata.PRIVATE_GROUP, sampledata.PRIVATE_CREATOR)
        assert str(block[0x02].value) == str(ds.PatientName)
        assert block[0x02].VR == "PN"
        assert ds[0x00090010].value == "ACME 1.0"


def test_non_ascii_names_encoded_and_decodable(datasets: dict[Path, Dataset]) -> None:
    seen: set[str] = set()
    for path, ds in datasets.items():
        name = str(ds.PatientName)
        if name.isascii():
            continue
        charset = ds.SpecificCharacterSet
        seen.add(charset)
        codec = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}[charset]
        raw = path.read_bytes()
        assert name.encode(codec) in raw  # encoded on disk in the declared character set
        assert dcmread(path, stop_before_pixels=True).PatientName == ds.PatientName
    assert seen == {"ISO_IR 100", "ISO_IR 192"}


def test_dcmtk_parses_every_file(corpus: tuple[Path, list[StudySummary]]) -> None:
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmdump not installed")
    out, _ = corpus
    files = [str(p) for p in sorted(out.rglob("*.dcm"))]
    proc = subprocess.run(["dcmdump", "-q", "+E", *files], capture_output=True, text=True, errors="replace")
    assert proc.returncode == 0
    assert "E:" not in proc.stderr and "W:" not in proc.stderr


def test_add_series_to_existing_study(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    summaries = generate(root, studies=2, series_per_study=(2, 2), instances_per_series=(2, 2), end_date=END, seed=3)
    old = summaries[0]
    new = add_series(old, root, instances=3, series_date=END + timedelta(days=30))
    assert new.study_uid == old.study_uid and new.patient_id == old.patient_id
    assert new.series_uid not in old.series_uids
    assert new.n_instances == 3 and len(list(new.path.glob("*.dcm"))) == 3
    study_files = {p.stem: dcmread(p, stop_before_pixels=True) for p in old.path.rglob("*.dcm")}
    old_sops = {uid for uid, ds in study_files.items() if ds.SeriesInstanceUID != new.series_uid}
    first_old = next(iter(study_files.values()))
    for sop in new.sop_uids:
        ds = study_files[sop]
        assert ds.StudyInstanceUID == old.study_uid
        assert ds.PatientName == first_old.PatientName and ds.PatientID == old.patient_id
        assert ds.SeriesNumber == old.n_series + 1
        assert ds.SeriesDate == (END + timedelta(days=30)).strftime("%Y%m%d")
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID in old_sops
    # a second call adds yet another series
    third = add_series(old, root, instances=1)
    assert third.series_uid != new.series_uid
    assert dcmread(next(third.path.glob("*.dcm")), stop_before_pixels=True).SeriesNumber == old.n_series + 2


def test_add_series_is_deterministic(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", studies=1, series_per_study=(2, 2), instances_per_series=(2, 2), end_date=END)
    b = generate(tmp_path / "b", studies=1, series_per_study=(2, 2), instances_per_series=(2, 2), end_date=END)
    new_a = add_series(a[0].path, tmp_path / "a", instances=2, seed=4)
    new_b = add_series(b[0], tmp_path / "b-new", instances=2, seed=4)  # may write elsewhere
    assert (new_a.series_uid, new_a.sop_uids) == (new_b.series_uid, new_b.sop_uids)
    assert _digest_tree(new_a.path) == _digest_tree(new_b.path)


def test_cli_generate(tmp_path: Path) -> None:
    rc = sampledata.main(["generate", str(tmp_path), "--studies", "3", "--series", "1", "1", "--instances", "2", "2",
                          "--end-date", "2025-01-02", "--modalities", "CT,US", "--seed", "5"])
    assert rc == 0
    files = list(tmp_path.rglob("*.dcm"))
    assert len(files) == 6
    assert {dcmread(f, stop_before_pixels=True).Modality for f in files} == {"CT", "US"}


def test_fast_enough(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    summaries = generate(tmp_path, studies=5, series_per_study=(2, 2), instances_per_series=(50, 50), seed=1)
    dt = time.perf_counter() - t0
    assert sum(s.n_instances for s in summaries) == 500
    assert dt < 15, f"500 instances took {dt:.1f} s"  # ~1.2 ms each on the 2-core CI box


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, studies=1, modalities=("XA",))
    with pytest.raises(ValueError):
        generate(tmp_path, studies=1, instances_per_series=(3, 2))
