"""Staged originals → de-identified Part 10 files in the lake + catalog rows, for one study.

Plain functions (no Prefect, no sockets). Each instance is parsed once: the same in-memory
Dataset is de-identified, encoded, stored and then read for the catalog row. A run's studies go
through one :class:`StudyProcessor` (one Deidentifier per run, and per worker process).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pacsflow.tasks.core.errors import BadDicom, DeidentificationError
from pacsflow.tasks.core.files import write_atomic
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier

# pyarrow, fsspec and the object codec are imported where they are used: a run imports this module
# (its outcomes, its processor) on its way to the first C-FIND, and needs them only once a study is in.
if TYPE_CHECKING:
    import pyarrow as pa

    from pacsflow.tasks.lake.rows import StudyExtractor
    from pacsflow.tasks.lake.storage import LakeStorage
    from pacsflow.tasks.settings import StorageSettings

log = logging.getLogger(__name__)

TABLES = ("studies", "series", "instances")
SPLIT_ABOVE = 256  # objects: a larger study is de-identified in batches, by every worker at once
# Small studies that wait together go to one de-identification task (Prefect's cost is per task
# run, mostly on its server): at most this many studies and objects in one.
GROUP_STUDIES = 8
GROUP_OBJECTS = 2 * SPLIT_ABOVE


@dataclass
class StudyOutcome:
    pseudo_uid: str
    written: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    actions: dict[str, int] = field(default_factory=dict)
    rows_dir: str | None = None
    bytes_written: int = 0
    # The catalog's StudyInstanceUID(s) of what was written: pseudonyms, or under Retain UIDs the
    # originals (so not always ``pseudo_uid``); what the FHIR sync of the run is given.
    study_uids: list[str] = field(default_factory=list)


def _quarantine(src: Path, quarantine_dir: Path, pseudo_uid: str) -> str:
    dest = quarantine_dir / pseudo_uid
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.move(str(src), dest / src.name)
    return src.name


def staged_files(staged: Path) -> list[Path]:
    """A study's staged objects, in a stable order."""
    return sorted(p for p in staged.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))


def process_files(paths: list[Path], pseudo_uid: str, deid: Deidentifier, storage: LakeStorage,
                  quarantine_dir: Path) -> tuple[StudyOutcome, StudyExtractor]:
    """De-identify, store and extract some (or all) staged objects of one study.

    Objects that cannot be read or de-identified are moved to quarantine with a reason; the
    rest goes on. The rows stay in the returned extractor (:func:`write_rows` writes them)."""
    from pacsflow.tasks.deid.instance import deidentify_file, encode
    from pacsflow.tasks.lake.rows import StudyExtractor

    outcome = StudyOutcome(pseudo_uid)
    report = DeidReport()
    extractor = StudyExtractor()
    for path in paths:
        try:
            ds, originals = deidentify_file(path, deid, report)
            data = encode(ds, originals)
        except (BadDicom, DeidentificationError) as exc:
            outcome.quarantined.append((_quarantine(path, quarantine_dir, pseudo_uid), str(exc)))
            continue
        rel = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        url = storage.put(rel, data)
        extractor.add(ds, file_path=url, file_size=len(data), sha256=hashlib.sha256(data).hexdigest())
        outcome.written += 1
        outcome.bytes_written += len(data)
    outcome.actions = dict(report.actions)
    return outcome, extractor


def merge_parts(pseudo_uid: str, parts: list[tuple[StudyOutcome, StudyExtractor]]) -> tuple[StudyOutcome,
                                                                                             StudyExtractor]:
    """One study's outcome and rows from those of its batches of objects."""
    from pacsflow.tasks.lake.rows import StudyExtractor

    outcome, extractor = StudyOutcome(pseudo_uid), StudyExtractor()
    actions: Counter[str] = Counter()
    for part, rows in parts:
        outcome.written += part.written
        outcome.bytes_written += part.bytes_written
        outcome.quarantined += part.quarantined
        actions.update(part.actions)
        extractor.merge(rows)
    outcome.actions = dict(actions)
    return outcome, extractor


def write_rows(outcome: StudyOutcome, extractor: StudyExtractor, rows_dir: Path) -> StudyOutcome:
    """The study's row tables into ``rows_dir`` for the catalog commit (nothing when no object went in)."""
    import pyarrow.parquet as pq

    if outcome.written:
        tables = extractor.tables()
        for name in TABLES:
            write_atomic(rows_dir / f"{name}.parquet", partial(pq.write_table, tables[name]), private=True)
        outcome.rows_dir = str(rows_dir)
        outcome.study_uids = [str(u) for u in tables["studies"].column("study_uid").to_pylist() if u]
    return outcome


def process_study(
    staged: Path,
    pseudo_uid: str,
    deid: Deidentifier,
    storage: LakeStorage,
    quarantine_dir: Path,
    rows_dir: Path,
) -> StudyOutcome:
    """De-identify, store and extract every staged object of one study, in this process; the row
    tables go to ``rows_dir`` for the catalog commit."""
    outcome, extractor = process_files(staged_files(staged), pseudo_uid, deid, storage, quarantine_dir)
    return write_rows(outcome, extractor, rows_dir)


def read_rows(rows_dirs: list[str]) -> dict[str, pa.Table]:
    """Concatenate the per-study row files written by ``process_study``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: dict[str, pa.Table] = {}
    for name in TABLES:
        parts = [pq.read_table(Path(d) / f"{name}.parquet") for d in rows_dirs]
        out[name] = pa.concat_tables(parts) if parts else None
    return out


# A worker process's share of its run: set once, when the pool starts the process.
_worker: tuple[Deidentifier, LakeStorage, Path] | None = None


PARENT_CHECK_S = 1.0


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose run was killed (SIGKILL, OOM) is reparented: it ends itself then, instead
    of living on with the run's key. Polling the parent pid works on every POSIX system and for
    any thread of the parent that started the worker (PR_SET_PDEATHSIG follows the thread)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _start_worker(deid: Deidentifier, storage_root: str, quarantine_dir: Path, parent_pid: int,
                  storage: StorageSettings | None = None) -> None:
    global _worker
    # Ctrl-C reaches the whole process group: the run decides what happens to its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    from pacsflow.tasks.lake.storage import LakeStorage

    _worker = (deid, LakeStorage(storage_root, storage), quarantine_dir)


def _process_in_worker(paths: list[Path], pseudo_uid: str) -> tuple[StudyOutcome, StudyExtractor]:
    if _worker is None:
        raise RuntimeError("worker process was not started by a StudyProcessor")
    deid, storage, quarantine_dir = _worker
    return process_files(paths, pseudo_uid, deid, storage, quarantine_dir)


def group_size(objects: Sequence[int], max_studies: int = GROUP_STUDIES, max_objects: int = GROUP_OBJECTS) -> int:
    """How many of the waiting studies (their object counts, in order) go to the next
    de-identification task: the first always; then the next ones while they are small (at most
    ``SPLIT_ABOVE`` objects, so never one that is split across the workers) and the task stays
    within ``max_studies`` and ``max_objects``."""
    if not objects:
        return 0
    taken, total = 1, objects[0]
    if total > SPLIT_ABOVE:
        return 1
    for n in objects[1:max_studies]:
        if n > SPLIT_ABOVE or total + n > max_objects:
            break
        taken, total = taken + 1, total + n
    return taken


def batches(paths: list[Path], workers: int) -> list[list[Path]]:
    """A study's objects in batches for the workers: one batch up to ``SPLIT_ABOVE`` objects,
    else one per worker (at least ``SPLIT_ABOVE // 2`` objects each), so that a large study
    keeps every worker busy instead of one."""
    if len(paths) <= SPLIT_ABOVE or workers < 2:
        return [paths]
    n = min(workers, max(1, len(paths) // (SPLIT_ABOVE // 2)))
    size = -(-len(paths) // n)
    return [paths[i : i + size] for i in range(0, len(paths), size)]


class StudyProcessor:
    """``process_study`` for every study of a run, with the run's one Deidentifier.

    With ``workers`` > 0 the studies go to a ``spawn`` process pool (no thread of this process is
    forked): parsing and re-encoding is CPU work that would otherwise share one GIL with the
    Storage SCP receiving the next studies. Each worker process builds the Deidentifier once, when
    it starts. With 0, studies are processed in the calling thread.
    """

    def __init__(self, deid: Deidentifier, storage_root: str, quarantine_dir: Path, workers: int,
                 storage: StorageSettings | None = None) -> None:
        self.deid = deid
        self.workers = workers
        self.quarantine_dir = Path(quarantine_dir)
        self._pool: ProcessPoolExecutor | None = None
        self._storage: LakeStorage | None = None
        if workers > 0:
            self._pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(deid, str(storage_root), self.quarantine_dir, os.getpid(), storage),
            )
        else:
            from pacsflow.tasks.lake.storage import LakeStorage

            self._storage = LakeStorage(storage_root, storage)

    def process(self, staged: Path, pseudo_uid: str, rows_dir: Path) -> StudyOutcome:
        """One study; in the workers, a large one in batches at once (:func:`batches`)."""
        [outcome] = self.process_many([(Path(staged), pseudo_uid, Path(rows_dir))])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def process_many(self, studies: Sequence[tuple[Path, str, Path]]) -> list[StudyOutcome | Exception]:
        """Several studies (staged folder, pseudonymous UID, rows folder), all handed to the workers
        at once; each study's outcome, or the exception that ended that study (and no other)."""
        if self._pool is None and self._storage is None:
            raise RuntimeError("this StudyProcessor is closed")
        submitted = [self._submit(staged, pseudo_uid) for staged, pseudo_uid, _ in studies]
        results: list[StudyOutcome | Exception] = []
        for (staged, pseudo_uid, rows_dir), futures in zip(studies, submitted):
            try:
                results.append(self._collect(staged, pseudo_uid, rows_dir, futures))
            except Exception as exc:  # noqa: BLE001 - the study's own failure, judged by the caller
                results.append(exc)
        return results

    def _submit(self, staged: Path, pseudo_uid: str) -> list[Future] | Exception | None:
        """A study's objects handed to the workers (:func:`batches`), or why they could not be;
        None without workers."""
        if self._pool is None:
            return None
        try:
            return [self._pool.submit(_process_in_worker, batch, pseudo_uid)
                    for batch in batches(staged_files(staged), self.workers)]
        except Exception as exc:  # noqa: BLE001 - this study's folder, or a broken pool: the study's failure
            return exc

    def _collect(self, staged: Path, pseudo_uid: str, rows_dir: Path,
                 futures: list[Future] | Exception | None) -> StudyOutcome:
        if isinstance(futures, Exception):
            raise futures
        if futures is not None:
            return write_rows(*merge_parts(pseudo_uid, [f.result() for f in futures]), rows_dir)
        if self._storage is None:
            raise RuntimeError("this StudyProcessor is closed")
        return process_study(staged, pseudo_uid, self.deid, self._storage, self.quarantine_dir, rows_dir)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def stop(self) -> None:
        """Stop now (the run is interrupted): studies in the workers are abandoned, the workers end."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no public way to end busy workers before Python 3.14.
        workers = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()
        for process in workers:
            process.join(timeout=5)

    def __enter__(self) -> "StudyProcessor":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):  # Ctrl-C, SIGTERM, exit
            self.stop()
        else:
            self.close()
