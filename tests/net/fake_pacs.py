"""An in-process PACS for tests that need one without Orthanc: a pynetdicom SCP on a free loopback
port that holds Part 10 files, answers C-FIND over them (studies by date or UID; a study's series;
a series' images), performs C-MOVE by C-STORE-ing a study's files (or the images asked for) to the
move destination (looked up in its own modality table) and C-GET by C-STORE-ing them back over the
asking association.

Faults are injected per study: ``fail_study(uid, status)`` makes every C-MOVE/C-GET of that study
end with ``status`` before any object is sent (0xC000 looks transient to pacsflow, as Orthanc's
answer for a study it cannot read), until ``repair_study(uid)``.

    with FakePacs() as pacs:
        pacs.add_files(paths)
        pacs.add_destination("PACSFLOW", receiver_port)
        ... PACSFLOW_PACS__PORT=pacs.port, PACSFLOW_PACS__CALLED_AE=pacs.ae_title ...
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.helpers import free_port

PENDING = 0xFF00
CANCELLED = 0xFE00
UNABLE_TO_PROCESS = 0xC000


@dataclass
class HeldStudy:
    uid: str
    date: str
    patient_id: str = ""
    files: list[Path] = field(default_factory=list)
    series: set[str] = field(default_factory=set)
    objects: dict[Path, tuple[str, str]] = field(default_factory=dict)  # file -> (series UID, SOP UID)
    modalities: set[str] = field(default_factory=set)
    contexts: set[tuple[str, str]] = field(default_factory=set)  # (SOP class, transfer syntax)


class FakePacs:
    """A PACS in this process; see the module docstring."""

    def __init__(self, ae_title: str = "FAKEPACS") -> None:
        self.ae_title = ae_title
        self.port = 0
        self.studies: dict[str, HeldStudy] = {}
        self.destinations: dict[str, tuple[str, int]] = {}
        self.failing: dict[str, int] = {}
        self.failures_left: dict[str, int] = {}
        self.retrieves: list[str] = []  # study UIDs asked for by whole-study C-MOVE or C-GET, in order
        self.object_retrieves: list[str] = []  # study UIDs of retrieves of some of a study's images
        self._lock = threading.Lock()
        self._server = None

    # -- what it holds ----------------------------------------------------------------------
    def add_files(self, paths: Iterable[Path]) -> None:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.StudyInstanceUID)
            study = self.studies.setdefault(uid, HeldStudy(uid, str(ds.get("StudyDate", "")),
                                                           str(ds.get("PatientID", ""))))
            study.files.append(Path(path))
            study.series.add(str(ds.SeriesInstanceUID))
            study.objects[Path(path)] = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            study.modalities.add(str(ds.get("Modality", "")))
            study.contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))

    def add_destination(self, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        self.destinations[ae_title] = (host, port)

    def fail_study(self, study_uid: str, status: int = UNABLE_TO_PROCESS, times: int | None = None) -> None:
        """Answer retrieves of the study with ``status``: until repaired, or until ``times`` whole-study
        retrieves have been refused (retrieves of some of its objects are refused meanwhile too)."""
        self.failing[study_uid] = status
        if times is not None:
            self.failures_left[study_uid] = times

    def repair_study(self, study_uid: str) -> None:
        self.failing.pop(study_uid, None)

    def retrieve_count(self, study_uid: str) -> int:
        """Whole-study retrieves of ``study_uid`` (one per attempt of pacsflow's)."""
        with self._lock:
            return self.retrieves.count(study_uid)

    # -- the server -------------------------------------------------------------------------
    def start(self, attempts: int = 3) -> "FakePacs":
        handlers = [(evt.EVT_C_FIND, self._on_find), (evt.EVT_C_MOVE, self._on_move), (evt.EVT_C_GET, self._on_get)]
        for attempt in range(attempts):
            port = free_port()
            try:
                self._server = self._ae().start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
            except OSError:  # another process took the port between free_port() and bind
                if attempt == attempts - 1:
                    raise
                continue
            self.port = port
            return self
        raise RuntimeError("unreachable")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "FakePacs":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = 16
        for sop_class in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                          StudyRootQueryRetrieveInformationModelGet, Verification):
            ae.add_supported_context(sop_class)
        # C-GET: the asking side offers storage contexts in the SCP role; we take the SCU role.
        for cx in StoragePresentationContexts[:120]:
            ae.add_supported_context(cx.abstract_syntax, scu_role=False, scp_role=True)
        return ae

    # -- services ---------------------------------------------------------------------------
    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = str(query.get("QueryRetrieveLevel", ""))
        if level in ("SERIES", "IMAGE"):
            yield from _lower_level_answers(self.studies.get(str(query.get("StudyInstanceUID", ""))), query)
            return
        if level != "STUDY":
            yield 0xA900, None  # identifier does not match SOP class
            return
        wanted_uid = str(query.get("StudyInstanceUID", "") or "")
        dates = str(query.get("StudyDate", "") or "")
        for study in sorted(self.studies.values(), key=lambda s: s.uid):
            if event.is_cancelled:
                yield CANCELLED, None
                return
            if (wanted_uid and study.uid != wanted_uid) or not _date_matches(study.date, dates):
                continue
            yield PENDING, _study_answer(study)

    def _on_move(self, event: evt.Event) -> Iterator:
        destination = self.destinations.get(str(event.move_destination).strip())
        if destination is None:
            yield None, None  # pynetdicom answers 0xA801: move destination unknown
            return
        study = self._asked_for(event.identifier)
        contexts = [build_context(sop, ts) for sop, ts in sorted(study.contexts)] if study else []
        yield destination[0], destination[1], {"contexts": contexts or [build_context(Verification)]}
        yield from self._send(event, study)

    def _on_get(self, event: evt.Event) -> Iterator:
        yield from self._send(event, self._asked_for(event.identifier))

    def _asked_for(self, identifier: Dataset) -> HeldStudy | None:
        uid = str(identifier.get("StudyInstanceUID", "") or "")
        with self._lock:
            whole = str(identifier.get("QueryRetrieveLevel", "")) == "STUDY"
            (self.retrieves if whole else self.object_retrieves).append(uid)
        return self.studies.get(uid)

    def _send(self, event: evt.Event, study: HeldStudy | None) -> Iterator:
        files = sorted(study.files) if study else []
        wanted = _multi(event.identifier.get("SOPInstanceUID"))
        if study and wanted:
            files = [f for f in files if study.objects[f][1] in wanted]
        yield len(files)
        status = self.failing.get(study.uid) if study else None
        if status is not None:
            with self._lock:
                whole = str(event.identifier.get("QueryRetrieveLevel", "")) == "STUDY"
                if study and whole and study.uid in self.failures_left:
                    self.failures_left[study.uid] -= 1
                    if self.failures_left[study.uid] <= 0:
                        del self.failures_left[study.uid]
                        self.failing.pop(study.uid, None)
            yield status, None
            return
        for path in files:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, pydicom.dcmread(path)


def _date_matches(value: str, query: str) -> bool:
    """DICOM range matching on a DA: empty (any), one day, ``A-B``, ``A-`` or ``-B``."""
    if not query:
        return True
    if "-" not in query:
        return value == query
    lo, hi = query.split("-", 1)
    return bool(value) and (not lo or value >= lo) and (not hi or value <= hi)


def _multi(value: object) -> set[str]:
    if not value:
        return set()
    return {str(value)} if isinstance(value, str) else {str(v) for v in value}  # type: ignore[attr-defined]


def _lower_level_answers(study: HeldStudy | None, query: Dataset) -> Iterator[tuple[int, Dataset | None]]:
    """A study's series (SERIES level), or one series' images (IMAGE level)."""
    if study is None:
        return
    level = str(query.QueryRetrieveLevel)
    series_uid = str(query.get("SeriesInstanceUID", "") or "")
    seen: set[str] = set()
    for series, sop in sorted(study.objects.values()):
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        ds.StudyInstanceUID = study.uid
        ds.SeriesInstanceUID = series
        if level == "SERIES" and series not in seen:
            seen.add(series)
            yield PENDING, ds
        elif level == "IMAGE" and (not series_uid or series == series_uid):
            ds.SOPInstanceUID = sop
            yield PENDING, ds


def _study_answer(study: HeldStudy) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    ds.PatientID = study.patient_id
    ds.NumberOfStudyRelatedInstances = str(len(study.files))
    ds.NumberOfStudyRelatedSeries = str(len(study.series))
    ds.ModalitiesInStudy = sorted(study.modalities)
    return ds


def held_files(folder: Path) -> list[Path]:
    """Every Part 10 file under ``folder`` (what ``sampledata.generate`` wrote)."""
    return sorted(Path(folder).rglob("*.dcm"))
