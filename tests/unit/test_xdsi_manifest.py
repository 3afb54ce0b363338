"""The XDS-I.b KOS manifest (pacsflow.tasks.xdsi.manifest) on a catalog built by the real pipeline pieces."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsflow.catalog.views import connect
from pacsflow.tasks.core.errors import PermanentError
from pacsflow.tasks.settings import XdsiSettings
from pacsflow.tasks.xdsi.manifest import (
    IMPLEMENTATION_CLASS_UID,
    KOS_SOP_CLASS_UID,
    InstanceRef,
    ManifestError,
    StudyManifestInput,
    ValueType,
    build_manifest,
    content_hash,
    load_inputs,
    value_type,
)
from tests.helpers import build_catalog

XDSI = XdsiSettings(source_oid="1.2.826.0.1.3680043.10.1234.1", retrieve_url="https://pacsflow.test/dicom-web/",
                    pseudonym_oid="1.2.826.0.1.3680043.10.1234.2")
RETRIEVE_BASE = "https://pacsflow.test/dicom-web"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
ECG_CLASS = "1.2.840.10008.5.1.4.1.1.9.1.1"  # 12-lead ECG Waveform


@dataclasses.dataclass
class Catalog:
    root: Path
    inputs: dict[str, StudyManifestInput]
    instances: dict[str, set[tuple[str, str, str]]]  # study -> (series, class, instance), read independently
    studies: dict[str, dict]
    originals: set[str]  # identifying values of the generated (identified) files


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    """Five studies (CT, MR, MG; a patient with several), through de-identification and the catalog."""
    root = tmp_path_factory.mktemp("xdsi-manifest")
    build_catalog(root, key=b"xdsi-manifest-test-key-0123456789", studies=5, patients=2, days=10,
                  end_date=dt.date(2026, 11, 27), seed=18, instances_per_series=(2, 3),
                  modalities=("CT", "MR", "MG"))
    con = connect(root / "catalog")
    try:
        studies = {r["study_uid"]: r for r in con.sql("SELECT * FROM studies").to_arrow_table().to_pylist()}
        instances: dict[str, set[tuple[str, str, str]]] = {}
        for study, series, cls, sop in con.execute(
                "SELECT study_uid, series_uid, sop_class_uid, sop_instance_uid FROM instances").fetchall():
            instances.setdefault(study, set()).add((series, cls, sop))
        inputs = load_inputs(con, [*studies, "2.25.404"])
    finally:
        con.close()
    assert len(studies) == 5
    return Catalog(root, inputs, instances, studies, _identifying_values(root / "in"))


def _identifying_values(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID", "PatientBirthDate", "StudyID", "InstitutionName"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                found.add(value)
    return found


def _read(part10: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(part10))


def _evidence(ds: pydicom.Dataset) -> set[tuple[str, str, str]]:
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    return {(se.SeriesInstanceUID, ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
            for se in study.ReferencedSeriesSequence for ref in se.ReferencedSOPSequence}


def _strings(ds: pydicom.Dataset) -> set[str]:
    out: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "SQ" or elem.value in (None, ""):
            continue
        out.update(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]))
    return out


# -- the evidence is the catalog ----------------------------------------------------------------------
def test_evidence_and_content_are_exactly_the_catalogs_instances(catalog):
    assert sorted(catalog.inputs) == sorted(catalog.studies)  # the unknown UID is left out
    for uid, inp in catalog.inputs.items():
        ds = _read(build_manifest(inp, XDSI).part10)
        assert ds.StudyInstanceUID == ds.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == uid
        assert _evidence(ds) == catalog.instances[uid]
        content = [(item.RelationshipType, item.ValueType, item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                   for item in ds.ContentSequence]
        assert sorted(c[2] for c in content) == sorted(i[2] for i in catalog.instances[uid])
        assert {c[:2] for c in content} == {("CONTAINS", "IMAGE")}  # the sample studies are all images


def test_each_series_names_our_retrieve_location_and_its_wado_rs_url(catalog):
    for uid, inp in catalog.inputs.items():
        ds = _read(build_manifest(inp, XDSI).part10)
        for series in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
            assert series.RetrieveLocationUID == XDSI.source_oid
            assert series.RetrieveURL == f"{RETRIEVE_BASE}/studies/{uid}/series/{series.SeriesInstanceUID}"


def test_kos_document_patient_and_study_come_from_the_catalog(catalog):
    for uid, inp in catalog.inputs.items():
        st = catalog.studies[uid]
        m = build_manifest(inp, XDSI)
        ds = _read(m.part10)
        assert (ds.SOPClassUID, ds.Modality, ds.SOPInstanceUID, ds.SeriesInstanceUID) == (
            KOS_SOP_CLASS_UID, "KO", m.sop_instance_uid, m.series_instance_uid)
        title = ds.ConceptNameCodeSequence[0]
        assert (ds.ValueType, title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
            "CONTAINER", "113030", "DCM", "Manifest")
        assert (ds.ContentTemplateSequence[0].MappingResource, ds.ContentTemplateSequence[0].TemplateIdentifier) == (
            "DCMR", "2010")
        assert ds.PatientID == st["patient_pseudo_id"] == m.patient_pseudo_id
        assert ds.IssuerOfPatientID == XDSI.pseudonym_oid
        issuer = ds.IssuerOfPatientIDQualifiersSequence[0]
        assert (issuer.UniversalEntityID, issuer.UniversalEntityIDType) == (XDSI.pseudonym_oid, "ISO")
        assert str(ds.PatientName) == "" and ds.PatientBirthDate == "" and ds.PatientSex == ""
        date = st["study_date"].strftime("%Y%m%d")
        assert ds.StudyDate == ds.ContentDate == ds.InstanceCreationDate == date
        assert ds.StudyTime == ds.ContentTime == ds.InstanceCreationTime == st["study_time"]
        assert m.service_start == date + st["study_time"][:6]
        assert m.modalities == tuple(st["modalities"]) and m.accession == st["accession_number"]
        assert m.instance_count == st["number_of_instances"]
        assert "ReferencedRequestSequence" not in ds  # the catalog has no accession (Basic profile: Z)


def test_an_accession_goes_into_the_study_and_the_referenced_request(catalog):
    inp = dataclasses.replace(next(iter(catalog.inputs.values())), accession_number="ACCPSEUDO1")
    m = build_manifest(inp, XDSI)
    ds = _read(m.part10)
    assert ds.AccessionNumber == ds.ReferencedRequestSequence[0].AccessionNumber == m.accession == "ACCPSEUDO1"
    assert ds.ReferencedRequestSequence[0].StudyInstanceUID == inp.study_uid


# -- determinism -------------------------------------------------------------------------------------
def test_same_inputs_give_the_same_bytes_and_a_reread_gives_them_again(catalog):
    con = connect(catalog.root / "catalog")
    try:
        again = load_inputs(con, list(catalog.studies))
    finally:
        con.close()
    for uid, inp in catalog.inputs.items():
        first = build_manifest(inp, XDSI)
        shuffled = dataclasses.replace(inp, instances=tuple(reversed(inp.instances)))
        for other in (build_manifest(inp, XDSI), build_manifest(again[uid], XDSI), build_manifest(shuffled, XDSI)):
            assert other.part10 == first.part10 and other.sop_instance_uid == first.sop_instance_uid
        assert re.fullmatch(r"2\.25\.[1-9][0-9]{0,38}", first.sop_instance_uid)
        assert len(first.sop_instance_uid) <= 64 and first.sop_instance_uid != first.series_instance_uid


def test_the_kos_round_trips_through_pydicom_unchanged(catalog):
    for inp in catalog.inputs.values():
        m = build_manifest(inp, XDSI)
        ds = _read(m.part10)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert ds.file_meta.MediaStorageSOPInstanceUID == m.sop_instance_uid
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        assert out.getvalue() == m.part10


def test_a_new_series_or_other_settings_give_a_new_manifest(catalog):
    inp = next(iter(catalog.inputs.values()))
    before = build_manifest(inp, XDSI)
    extra = (InstanceRef("2.25.77", "1.2.840.10008.5.1.4.1.1.2", "2.25.78", "CT", ValueType.IMAGE),)
    grown = build_manifest(dataclasses.replace(inp, instances=inp.instances + extra), XDSI)
    moved = build_manifest(inp, XDSI.model_copy(update={"retrieve_url": "https://elsewhere.test/dicom-web"}))
    built = (before, grown, moved)
    assert len({m.sop_instance_uid for m in built} | {m.series_instance_uid for m in built}) == 6
    assert len({before.content_hash, grown.content_hash, moved.content_hash}) == 3
    assert ("2.25.77", "1.2.840.10008.5.1.4.1.1.2", "2.25.78") in _evidence(_read(grown.part10))
    assert content_hash(inp, XDSI) == before.content_hash


# -- other objects, bad inputs -----------------------------------------------------------------------
def test_non_images_are_composite_or_waveform_items():
    assert value_type(SR_CLASS, False) is ValueType.COMPOSITE
    assert value_type(ECG_CLASS, False) is ValueType.WAVEFORM
    assert value_type("1.2.840.10008.5.1.4.1.1.66.4", True) is ValueType.IMAGE  # Segmentation: has pixels
    inp = StudyManifestInput("2.25.1", "PSEUDO1", None, dt.date(2026, 1, 2), "0727", (
        InstanceRef("2.25.2", SR_CLASS, "2.25.3", "SR", ValueType.COMPOSITE),
        InstanceRef("2.25.4", ECG_CLASS, "2.25.5", "ECG", ValueType.WAVEFORM)))
    m = build_manifest(inp, XDSI)
    ds = _read(m.part10)
    assert [i.ValueType for i in ds.ContentSequence] == ["COMPOSITE", "WAVEFORM"]
    assert (ds.ContentTime, m.service_start, m.modalities) == ("072700", "20260102072700", ("ECG", "SR"))


@pytest.mark.parametrize("change, setting", [
    ({"source_oid": None}, "xdsi.source_oid"), ({"retrieve_url": None}, "xdsi.retrieve_url"),
    ({"pseudonym_oid": None}, "xdsi.pseudonym_oid")])
def test_an_unset_setting_is_named(change, setting):
    inp = StudyManifestInput("2.25.1", "PSEUDO1", None, dt.date(2026, 1, 2), None,
                             (InstanceRef("2.25.2", SR_CLASS, "2.25.3", "SR", ValueType.COMPOSITE),))
    with pytest.raises(ManifestError, match=re.escape(setting)):
        build_manifest(inp, XDSI.model_copy(update=change))


@pytest.mark.parametrize("change, words", [
    ({"patient_pseudo_id": None}, "pseudonym"), ({"study_date": None}, "StudyDate"), ({"instances": ()}, "instances"),
    ({"instances": (InstanceRef("2.25.2", None, "2.25.3", "SR", ValueType.COMPOSITE),)}, "SOP Class UID")])
def test_a_study_that_cannot_have_a_manifest_is_a_permanent_error(change, words):
    inp = StudyManifestInput("2.25.1", "PSEUDO1", None, dt.date(2026, 1, 2), None,
                             (InstanceRef("2.25.2", SR_CLASS, "2.25.3", "SR", ValueType.COMPOSITE),))
    with pytest.raises(ManifestError, match=words) as err:
        build_manifest(dataclasses.replace(inp, **change), XDSI)
    assert isinstance(err.value, PermanentError) and "2.25.1" in str(err.value)


def test_a_date_without_a_time_starts_the_service_at_the_date():
    inp = StudyManifestInput("2.25.1", "PSEUDO1", None, dt.date(2026, 1, 2), "25:00",
                             (InstanceRef("2.25.2", SR_CLASS, "2.25.3", "SR", ValueType.COMPOSITE),))
    m = build_manifest(inp, XDSI)
    ds = _read(m.part10)
    assert (m.service_start, ds.StudyTime, ds.ContentTime) == ("20260102", "", "000000")


# -- no PHI, independent reader ----------------------------------------------------------------------
def test_the_kos_says_nothing_the_catalog_and_settings_do_not(catalog):
    names = {XDSI.source_oid, XDSI.pseudonym_oid}
    constants = {"ISO", "KO", "pacsflow", "999", "1", "CONTAINER", "113030", "DCM", "Manifest", "SEPARATE", "DCMR",
                 "2010", "CONTAINS", "IMAGE", KOS_SOP_CLASS_UID}
    for uid, inp in catalog.inputs.items():
        m = build_manifest(inp, XDSI)
        ds = _read(m.part10)
        st = catalog.studies[uid]
        catalog_values = ({uid, st["patient_pseudo_id"], st["study_time"], st["study_date"].strftime("%Y%m%d")}
                          | {v for row in catalog.instances[uid] for v in row})
        urls = {f"{RETRIEVE_BASE}/studies/{uid}/series/{row[0]}" for row in catalog.instances[uid]}
        own = {m.sop_instance_uid, m.series_instance_uid}
        assert _strings(ds) <= catalog_values | names | constants | urls | own
        assert not _strings(ds) & catalog.originals
        for original in catalog.originals:  # digits alone may occur inside a long UID by chance
            assert not re.search("[A-Za-z]", original) or original.encode() not in m.part10


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK's dsrdump is not installed")
def test_dcmtk_reads_the_sr_tree(catalog, tmp_path):
    inputs = list(catalog.inputs.values())
    inputs.append(StudyManifestInput("2.25.1", "PSEUDO1", "ACCPSEUDO1", dt.date(2026, 1, 2), "0727", (
        InstanceRef("2.25.2", SR_CLASS, "2.25.3", "SR", ValueType.COMPOSITE),
        InstanceRef("2.25.4", ECG_CLASS, "2.25.5", "ECG", ValueType.WAVEFORM))))
    for inp in inputs:
        path = tmp_path / f"{inp.study_uid}.dcm"
        path.write_bytes(build_manifest(inp, XDSI).part10)
        done = subprocess.run(["dsrdump", "+Pt", "+Psu", "+Pu", "+Pl", str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert not [line for line in done.stderr.splitlines() if line.startswith(("E:", "F:"))], done.stderr
        assert "Key Object Selection Document" in done.stdout and "TID 2010 (DCMR)" in done.stdout
        found = re.findall(r'<contains (IMAGE|COMPOSITE|WAVEFORM):=\("([0-9.]+)","([0-9.]+)"\)>', done.stdout)
        assert sorted((cls, sop) for _vt, cls, sop in found) == sorted(
            (ref.sop_class_uid, ref.sop_instance_uid) for ref in inp.instances)
        assert {vt for vt, _c, _s in found} == {ref.value_type.value for ref in inp.instances}
