"""Files: atomic writes (temp file + rename), owner-only PHI files and folders, retention, zones.

Every writer in pacsflow goes through :func:`write_atomic`, so a crash or a full disk leaves either
the old file or the new one, never half of one, and no temp file behind.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, BinaryIO

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def _temp_name(path: Path) -> Path:
    # Unique per writer: two threads or processes writing the same target never share a temp file.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], object], *, private: bool = False,
                 mkdir: bool = True) -> Path:
    """Write ``data`` (bytes, or a function that writes to the open file) to ``path`` through a temp
    file in the same folder and a rename. ``private``: owner-only (0600) file in a 0700 folder.
    The temp file is removed on every failure path."""
    path = Path(path)
    if mkdir and private:
        _make_private_dirs(path.parent)
    elif mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    mode = PRIVATE_FILE_MODE if private else 0o666
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            if private:
                os.fchmod(fh.fileno(), PRIVATE_FILE_MODE)
            if callable(data):
                data(fh)
            else:
                fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_private_file(path: Path, text: str) -> None:
    """Write a PHI file with owner-only permissions (0600), through a temp file and a rename."""
    write_atomic(Path(path), text.encode("utf-8"), private=True)


def ensure_private_dir(path: Path) -> Path:
    """A folder of the PHI zone: created if needed, owner-only (0700) whatever the umask."""
    _make_private_dirs(path)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def _make_private_dirs(path: Path) -> None:
    # mkdir(parents=True) gives only the last folder the mode: every folder we create must be owner-only.
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)


def describe_os_error(exc: OSError) -> str:
    """``No space left on device`` rather than a traceback; the errno name when there is no text."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return type(exc).__name__


def free_megabytes(path: Path) -> float:
    """Free space (MiB) of the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


def low_space(zones: dict[str, Path], floor_mb: float) -> list[str]:
    """``setting: path has N MiB free`` for each zone (by setting name) below ``floor_mb``."""
    free = {name: free_megabytes(path) for name, path in zones.items()}
    return [f"{name}: {zones[name]} has {mb:.0f} MiB free" for name, mb in free.items() if mb < floor_mb]


def is_inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or lies below it (after resolving links)."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
        return True
    except ValueError:
        return False


def remove_tree(folder: Path) -> None:
    """Remove a folder and what it holds; a folder that is already gone is fine."""
    shutil.rmtree(folder, ignore_errors=True)


def purge_older_than(root: Path | str, days: int, now: float | None = None) -> int:
    """Retention of a PHI zone (staging, quarantine): delete entries of ``root`` whose newest
    file is older than ``days``; returns how many top-level entries were removed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    limit = (now if now is not None else time.time()) - days * 86400
    removed = 0
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            mtimes = [p.stat().st_mtime for p in entry.rglob("*") if p.is_file()] or [entry.stat().st_mtime]
            if max(mtimes) < limit:
                shutil.rmtree(entry)
                removed += 1
        elif entry.stat().st_mtime < limit:
            entry.unlink()
            removed += 1
    return removed
