"""KOS manifests for the XDS-I.b tests: what ``pacsflow.tasks.xdsi.ebxml`` reads of one (its
``ManifestLike``) as a plain dataclass, and a real one from ``pacsflow.tasks.xdsi.manifest``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydicom.uid import generate_uid

from pacsflow.tasks.settings import XdsiSettings
from pacsflow.tasks.xdsi import manifest
from pacsflow.tasks.xdsi.manifest import derived_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
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


def kos_manifest(xdsi: XdsiSettings, pseudonym: str, study_uid: str | None = None, accession: str = "ACC-1",
                 series: tuple[str, ...] = ("CT", "SR")) -> manifest.Manifest:
    """A study's KOS made by pacsflow's manifest builder: one series per modality in ``series``
    (two instances each), dated 2024-01-02 09:30:15."""
    study_uid = study_uid or generate_uid(prefix=None)
    refs = []
    for index, modality in enumerate(series):
        series_uid = derived_uid(study_uid, "series", str(index))
        image = modality != "SR"
        sop_class = CT_IMAGE if image else BASIC_TEXT_SR
        refs += [manifest.InstanceRef(series_uid, sop_class, derived_uid(series_uid, str(n)), modality,
                                      manifest.value_type(sop_class, image)) for n in range(2)]
    study = manifest.StudyManifestInput(study_uid, pseudonym, accession, dt.date(2024, 1, 2), "093015.250",
                                        tuple(refs))
    return manifest.build_manifest(study, xdsi)
