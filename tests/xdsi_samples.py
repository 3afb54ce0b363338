"""KOS manifests for the XDS-I.b tests: what ``pacsflow.tasks.xdsi.ebxml`` reads of one (its
``ManifestLike``), as a plain dataclass, and a header-only Part-10 KOS written with pydicom."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
# the source and patient domains of the tests (the pseudonym OID is tests.xds_peer.TEST_AUTHORITY)
SOURCE_OID = "2.25.240815122125463532138815542375011357226"
PSEUDONYM_OID = "2.25.300184447563520924736125305104377418712"


@dataclass(frozen=True)
class Manifest:
    sop_instance_uid: str = "2.25.111122223333444455556666777788889999"
    study_uid: str = "2.25.999988887777666655554444333322221111"
    accession: str | None = "ACC-7"
    modalities: tuple[str, ...] = ("SR", "MR", "CT", "KO")
    patient_pseudo_id: str = "PSEUDO&7"
    service_start: str | None = "20240102093015.123"
    part10: bytes = b"\0" * 128 + b"DICM-kos"


def kos_manifest(pseudonym: str, study_uid: str | None = None, accession: str = "ACC-1") -> Manifest:
    """A header-only Key Object Selection document (a repository stores bytes, so that is enough)
    under a new SOP Instance UID."""
    ds = Dataset()
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.PatientID = pseudonym
    ds.AccessionNumber = accession
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return Manifest(sop_instance_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID, accession=accession,
                    modalities=("CT", "SR", "MR"), patient_pseudo_id=pseudonym, service_start="20240102093015",
                    part10=buffer.getvalue())
