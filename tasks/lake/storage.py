"""The de-identified object store: a local folder by default, any fsspec URL otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pacsflow.tasks.core.files import write_atomic


class LakeStorage:
    """Writes de-identified Part 10 files under ``root``; every write is atomic and idempotent
    (the same relative path always holds the same object, replaced whole)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = str(root)
        self.fs, path = fsspec.core.url_to_fs(root)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            path = str(Path(path).resolve())
            Path(path).mkdir(parents=True, exist_ok=True)
        self.root = path.rstrip("/")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def url(self, rel: str) -> str:
        """What the catalog records: a plain path for local storage, a URL otherwise."""
        full = self.path(rel)
        return full if self.local else self.fs.unstrip_protocol(full)

    def put(self, rel: str, data: bytes) -> str:
        full = self.path(rel)
        if self.local:
            write_atomic(Path(full), data)
        else:
            # Object stores replace an object whole on put: already atomic.
            self.fs.pipe_file(full, data)
        return self.url(rel)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))
