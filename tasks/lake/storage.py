"""The de-identified object store: a local folder by default, any fsspec URL otherwise.

On S3 (``s3://``) the store's endpoint and keys come from ``StorageSettings`` (:func:`open_root`), and
every object is written with one conditional PUT (``If-None-Match: *``): a key that already holds the
same bytes is left alone, and a different object under the key is replaced only in the version that was
compared (``If-Match`` on its ETag), with a warning. README "Storage on S3" says why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pacsflow.tasks.core.errors import LakeWriteError
from pacsflow.tasks.core.files import describe_os_error, write_atomic

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from pacsflow.tasks.settings import StorageSettings

log = logging.getLogger(__name__)

S3_PROTOCOLS = ("s3", "s3a")
# One PUT for every object below S3's 5 GiB limit: atomic, and the only request that carries the
# conditions (a multipart upload would put them on its last request only).
SINGLE_PUT_CHUNK = 5 * 2**30


def open_root(root: str | os.PathLike[str], storage: StorageSettings | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec file system of ``root`` and the path within it; an ``s3://`` root gets the
    endpoint and keys of ``storage`` (other protocols fsspec's own configuration)."""
    root = str(root)
    protocol, _ = fsspec.core.split_protocol(root)
    options = storage.fsspec_options() if storage is not None and protocol in S3_PROTOCOLS else {}
    fs, path = fsspec.core.url_to_fs(root, **options)
    return fs, path


def _is_s3(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in S3_PROTOCOLS for p in protocols)


def _store_errors(fs: AbstractFileSystem) -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, and botocore's own errors for S3 (a connection refused
    or reset, a timeout) which s3fs lets through after its retries."""
    if _is_s3(fs):
        from botocore.exceptions import BotoCoreError

        return OSError, BotoCoreError
    return (OSError,)


def _describe(exc: BaseException) -> str:
    return describe_os_error(exc) if isinstance(exc, OSError) else type(exc).__name__


class LakeStorage:
    """Writes de-identified Part 10 files under ``root``; every write is atomic and idempotent
    (the same relative path always holds the same object, replaced whole)."""

    def __init__(self, root: str | os.PathLike[str], storage: StorageSettings | None = None) -> None:
        self.fs, path = open_root(root, storage)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            path = str(Path(path).resolve())
            Path(path).mkdir(parents=True, exist_ok=True)
        self.root = path.rstrip("/")
        self.conditional = _is_s3(self.fs) and (storage is None or storage.conditional_writes)
        self._errors = _store_errors(self.fs)

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
            elif self.conditional:
                self._put_conditional(rel, full, data)
            else:
                # Object stores replace an object whole on put: already atomic.
                self.fs.pipe_file(full, data)
        except self._errors as exc:
            # The root, not the object's path: the operator needs the place and the setting, one line.
            raise LakeWriteError(f"storage_root: cannot write under {self.fs.unstrip_protocol(self.root)} "
                                 f"({_describe(exc)})") from None
        return self.url(rel)

    def _put_conditional(self, rel: str, full: str, data: bytes) -> None:
        """Create the object; when the key exists, keep it if it holds ``data`` already, else replace
        exactly the version compared (a concurrent writer's change fails the PUT: retried later)."""
        try:
            self.fs.pipe_file(full, data, mode="create", chunksize=SINGLE_PUT_CHUNK)
            return
        except FileExistsError:
            pass
        info: dict[str, Any] = self.fs.info(full, refresh=True)
        if int(info["size"]) == len(data) and self.fs.cat_file(full) == data:
            return  # an identical re-put (a retried or re-run study): nothing to write
        log.warning("lake object %s differs from the one being written: replacing it", rel)
        self.fs.pipe_file(full, data, IfMatch=info["ETag"], chunksize=SINGLE_PUT_CHUNK)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))
