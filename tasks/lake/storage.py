"""The de-identified object store: a local folder by default, any fsspec URL otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pacsflow.tasks.core.errors import LakeWriteError
from pacsflow.tasks.core.files import describe_os_error, write_atomic


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
        try:
            if self.local:
                write_atomic(Path(full), data)  # removes its temp file on failure: nothing half-written
            else:
                # Object stores replace an object whole on put: already atomic.
                self.fs.pipe_file(full, data)
        except OSError as exc:
            # The root, not the object's path: the operator needs the place and the setting, one line.
            raise LakeWriteError(f"storage_root: cannot write under {self.fs.unstrip_protocol(self.root)} "
                                 f"({describe_os_error(exc)})") from None
        return self.url(rel)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))
