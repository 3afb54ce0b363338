"""A small real lake for the DICOMweb tests: sample studies de-identified by the ingest steps'
plain functions (no Prefect), written under ``storage_root`` and committed to the catalog."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file

from pacsflow.catalog.store import CatalogStore
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.lake.storage import LakeStorage
from pacsflow.tasks.lake.study import process_study, read_rows
from pacsflow.tasks.settings import Settings, load_settings
from pacsflow.tasks.web.tokens import Scope, TokenStore

KEY = b"dicomweb-test-key-0123456789"


@dataclass
class WebLake:
    settings: Settings
    token: str
    writer_token: str

    @property
    def storage(self) -> Path:
        return Path(self.settings.storage_root)

    @property
    def catalog(self) -> Path:
        return self.settings.catalog_root


def build_lake(root: Path, *, studies: int = 3, modalities: tuple[str, ...] = ("CT", "MR", "MG"),
               seed: int = 11, extra: tuple[str, ...] = (), **serve: object) -> WebLake:
    """``studies`` sample studies (and each of pydicom's test files named in ``extra`` as a study
    of its own), de-identified into ``root/lake`` and cataloged; a read and a write token."""
    settings = load_settings(storage_root=str(root / "lake" / "dicom"), catalog_root=root / "lake" / "catalog",
                             state_root=root / "state", serve=serve)
    summaries = sampledata.generate(root / "originals", studies=studies, seed=seed, modalities=modalities,
                                    series_per_study=(2, 3), instances_per_series=(2, 4), rows=32, cols=32)
    deid, storage = Deidentifier(KEY), LakeStorage(settings.storage_root)
    rows_dirs = []
    sources = {s.study_uid: list(s.path.rglob("*.dcm")) for s in summaries}
    for name in extra:
        path = Path(str(get_testdata_file(name)))
        sources.setdefault(str(dcmread(path, stop_before_pixels=True).StudyInstanceUID), []).append(path)
    for study_uid, files in sources.items():
        staged = root / "staged" / study_uid
        staged.mkdir(parents=True)
        for f in files:
            shutil.copy(f, staged / f.name)
        pseudo = deid.uid(study_uid)
        outcome = process_study(staged, pseudo, deid, storage, root / "quarantine", root / "rows" / pseudo)
        rows_dirs.append(str(outcome.rows_dir))
    CatalogStore(settings.catalog_root).commit(read_rows(rows_dirs))
    tokens = TokenStore(settings.tokens_path)
    return WebLake(settings, tokens.add("viewer", {Scope.READ}), tokens.add("writer", {Scope.WRITE}))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def parse_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body: (headers with lower-case names, bytes)."""
    boundary = re.search(r"boundary=\"?([^\";]+)", content_type)
    assert boundary, content_type
    delimiter = b"--" + boundary.group(1).encode()
    pieces = body.split(b"\r\n" + delimiter)
    assert pieces[0].startswith(delimiter) and pieces[-1].startswith(b"--"), "not a closed multipart body"
    parts = []
    for piece in [pieces[0][len(delimiter):]] + pieces[1:-1]:
        head, _, data = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, data))
    return parts
