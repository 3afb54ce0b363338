"""Reading the lake's files for WADO-RS: confined to ``storage_root``, streamed in chunks, and the
frames of an instance read without loading the rest of its pixel data.

A catalog row's ``file_path`` is trusted no further than the storage root: it is resolved (symbolic
links and ``..`` included, for a local root) and refused unless it lies under the root, so a
tampered or stale row cannot make the service read another file.
"""

from __future__ import annotations

import functools
import os
import posixpath
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydicom import dcmread
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError

from pacsflow.tasks.lake.storage import open_root
from pacsflow.tasks.settings import StorageSettings

CHUNK_BYTES = 1 << 20
PIXEL_DATA = 0x7FE00010
IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
NATIVE = {IMPLICIT_LE, EXPLICIT_LE}  # pixel bytes as they are in the file, little endian
# Compressed transfer syntaxes whose frames are served as they are stored, with their media type.
COMPRESSED_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
}


class OutsideStorage(PermissionError):
    """A catalog row names a file outside ``storage_root`` (refused; says nothing of the path)."""


class FrameError(ValueError):
    """The frames asked for are not in the instance, or its pixel data cannot be cut into frames."""


class LakeFiles:
    """The files under ``storage_root`` (a local path or any fsspec URL), read-only."""

    def __init__(self, storage_root: str, storage: StorageSettings | None = None) -> None:
        self.fs, root = open_root(storage_root, storage)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.realpath(root) if self.local else root.rstrip("/")

    def resolve(self, file_path: str) -> str:
        """The file system path of a catalog ``file_path``, when it lies under the root."""
        if self.local:
            path = file_path.removeprefix("file://")
            full = _real_file(path if os.path.isabs(path) else os.path.join(self.root, path))
            inside = full.startswith(self.root.rstrip(os.sep) + os.sep)
        else:
            protocol, _ = fsspec.core.split_protocol(file_path)
            protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
            stripped = fsspec.core.strip_protocol(file_path)
            full = posixpath.normpath(stripped)
            inside = (protocol is None or protocol in protocols) and full.startswith(self.root + "/") \
                and ".." not in stripped.split("/")
        if not inside:
            raise OutsideStorage("a catalog row names a file outside storage_root")
        return full

    def open(self, file_path: str) -> IO[bytes]:
        handle: IO[bytes] = self.fs.open(self.resolve(file_path), "rb")
        return handle

    def chunks(self, file_path: str, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The file's bytes as stored, ``size`` at a time (opened when the first chunk is wanted)."""
        with self.open(file_path) as handle:
            while chunk := handle.read(size):
                yield chunk

    def frames(self, file_path: str, numbers: list[int]) -> tuple[str, list[bytes]]:
        """The transfer syntax and the pixel data of frames ``numbers`` (1-based), as stored."""
        with self.open(file_path) as handle:
            try:
                ds = dcmread(handle, defer_size=256)
                syntax = str(ds.file_meta.TransferSyntaxUID)
                element = ds.get_item(PIXEL_DATA)
            except (InvalidDicomError, AttributeError, KeyError, ValueError):
                raise FrameError("the instance has no readable pixel data") from None
            if element is None or element.file_tell is None:
                raise FrameError("the instance has no pixel data")
            count = int(ds.get("NumberOfFrames") or 1)
            if any(n < 1 or n > count for n in numbers):
                raise FrameError(f"frame numbers run from 1 to {count}")
            if syntax in NATIVE:
                return syntax, _native_frames(handle, ds, element.file_tell, numbers)
            if syntax in COMPRESSED_MEDIA:
                return syntax, [_encapsulated_frame(handle, element.file_tell, n - 1, count) for n in numbers]
            raise FrameError("frames are served for uncompressed and JPEG-family transfer syntaxes only")


def _real_file(path: str) -> str:
    """``os.path.realpath(path)`` at one ``lstat`` per file: a series' files share a folder, whose
    real path is looked up once (the lake's folders are only ever added, never swapped)."""
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    full = os.path.join(_real_folder(folder), name)
    return os.path.realpath(full) if os.path.islink(full) else full


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _native_frames(handle: IO[bytes], ds: object, start: int, numbers: list[int]) -> list[bytes]:
    bits = int(getattr(ds, "BitsAllocated", 0) or 0)
    if bits % 8:
        raise FrameError("frames of 1-bit pixel data are not served")
    size = int(getattr(ds, "Rows")) * int(getattr(ds, "Columns")) * int(getattr(ds, "SamplesPerPixel", 1)) * bits // 8
    out = []
    for n in numbers:
        handle.seek(start + (n - 1) * size)
        out.append(handle.read(size))
    return out


def _encapsulated_frame(handle: IO[bytes], start: int, index: int, count: int) -> bytes:
    handle.seek(start)
    try:
        return get_frame(handle, index, number_of_frames=count)
    except ValueError:
        raise FrameError("the encapsulated pixel data does not hold that frame") from None

