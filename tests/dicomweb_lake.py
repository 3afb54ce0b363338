"""A small real lake for the DICOMweb tests: sample studies de-identified by the ingest steps'
plain functions (no Prefect), written under ``storage_root`` and committed to the catalog."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

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
               seed: int = 11, **serve: object) -> WebLake:
    """``studies`` sample studies, de-identified into ``root/lake`` and cataloged; a read token."""
    settings = load_settings(storage_root=str(root / "lake" / "dicom"), catalog_root=root / "lake" / "catalog",
                             state_root=root / "state", serve=serve)
    summaries = sampledata.generate(root / "originals", studies=studies, seed=seed, modalities=modalities,
                                    series_per_study=(2, 3), instances_per_series=(2, 4), rows=32, cols=32)
    deid, storage = Deidentifier(KEY), LakeStorage(settings.storage_root)
    rows_dirs = []
    for study in summaries:
        staged = root / "staged" / study.study_uid
        staged.mkdir(parents=True)
        for f in study.path.rglob("*.dcm"):
            shutil.copy(f, staged / f.name)
        pseudo = deid.uid(study.study_uid)
        outcome = process_study(staged, pseudo, deid, storage, root / "quarantine", root / "rows" / pseudo)
        rows_dirs.append(str(outcome.rows_dir))
    CatalogStore(settings.catalog_root).commit(read_rows(rows_dirs))
    tokens = TokenStore(settings.tokens_path)
    return WebLake(settings, tokens.add("viewer", {Scope.READ}), tokens.add("writer", {Scope.WRITE}))
