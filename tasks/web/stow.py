"""STOW-RS (PS3.18 10.5): instances posted as ``multipart/related; type="application/dicom"`` go
into the listener's ingest path (hand-off folder, ``pacsflow.study.stable``, the ``ingest-study``
flow), so they reach the lake, the catalog and FHIR as pushed studies do.

The body is read as it arrives (:mod:`.multipart_reader`); each part is written to a private spool
in the listener's PHI zone under a temporary name and renamed when complete. Once the body ended,
each part is checked as the listener's receiver checks a C-STORE (a PS3.10 file whose header
decodes, with StudyInstanceUID and SOPInstanceUID; under ``/studies/{study}`` of that study); the
accepted parts of each study are renamed into one hand-off folder, under a generation of their own
(:class:`StowGenerations`), and the event goes out.

The answer names what the lake will hold: the pseudonymous UIDs the de-identification gives the
instances (and their RetrieveURL), never the posted ones; the posting client knows its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, Callable, Iterable

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom import dcmread
from starlette.concurrency import run_in_threadpool

from pacsflow.tasks.core.files import PRIVATE_FILE_MODE, ensure_private_dir, purge_older_than, remove_tree
from pacsflow.tasks.core.sqlite import open_sqlite, sqlite_tx
from pacsflow.tasks.ingest.handoff import handoff_dir, handoff_root
from pacsflow.tasks.settings import Settings
from pacsflow.tasks.web.app import Writer, context
from pacsflow.tasks.web.multipart_reader import MalformedMultipart, MultipartReader, PartData, PartEnd, PartHeaders
from pacsflow.tasks.web.services import uids

log = logging.getLogger("pacsflow.serve")

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
#: STOW generations start above this, so they never meet the listener's (1, 2, ... per study).
STOW_GENERATION_BASE = 1_000_000_000

# FailureReason values (PS3.4 Annex B, PS3.18 10.5.3): processing failure, out of resources,
# study UID does not match the target resource, cannot understand.
PROCESSING_FAILURE, OUT_OF_RESOURCES, WRONG_STUDY, CANNOT_UNDERSTAND = 0x0110, 0xA700, 0xA900, 0xC000

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS stow_generations (
    study_ref   TEXT PRIMARY KEY,   -- the keyed pseudonym
    generation  INTEGER NOT NULL    -- the last one handed off
)
"""

router = APIRouter(tags=["STOW-RS"])


class StowGenerations:
    """The STOW generations of each study, persistent in the PHI zone: ``STOW_GENERATION_BASE + n``
    for the n-th STOW request that carried the study. The listener numbers its hand-offs of a
    study 1, 2, ... in its tracker; a separate range keeps the two from naming the same hand-off
    folder or event id without the two processes sharing a counter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        open_sqlite(path, _SCHEMA)

    def next(self, study_ref: str) -> int:
        with sqlite_tx(self.path) as con:
            con.execute("INSERT INTO stow_generations (study_ref, generation) VALUES (?, ?) ON CONFLICT(study_ref) "
                        "DO UPDATE SET generation = generation + 1", (study_ref, STOW_GENERATION_BASE + 1))
            row = con.execute("SELECT generation FROM stow_generations WHERE study_ref = ?", (study_ref,)).fetchone()
        return int(row[0])


@dataclass(frozen=True)
class StowIngest:
    """What STOW needs from outside the web layer (wired by ``pacsflow.flows.serve``): the lake's
    UID of an original UID, a study's ref (its keyed pseudonym), and ``announce(study_ref,
    generation, objects, modalities)``, which emits ``pacsflow.study.stable``."""

    lake_uid: Callable[[str], str]
    study_ref: Callable[[str], str]
    announce: Callable[[str, int, int, list[str]], None]


def enable_stow(app: Any, ingest: StowIngest | None, reason: str = "") -> None:
    """Turn STOW-RS on with ``ingest``, or leave it answering 503 with ``reason``."""
    app.state.stow = ingest
    app.state.stow_off_reason = reason or "STOW-RS is not configured in this process"
    if ingest is not None:
        # Spools of requests a crash cut short (a live request's spool is minutes old at most).
        purge_older_than(spool_root(app.state.ctx.settings), 1)


def spool_root(settings: Settings) -> Path:
    return settings.listener_dir / "stow" / "spool"


@dataclass
class PartOutcome:
    """One posted part after the checks: stored when ``failure`` is None."""

    sop_class: str = ""
    lake_sop: str = ""
    lake_study: str = ""
    lake_series: str = ""
    failure: int | None = None


@dataclass
class _Part:
    path: Path
    media_type: str
    complete: bool = False


@dataclass
class StowSpool:
    """One request's parts, spooled in ``folder`` (private) until they are handed off."""

    settings: Settings
    ingest: StowIngest
    study: str | None
    folder: Path = field(init=False)
    parts: list[_Part] = field(default_factory=list)
    _handle: Any = None

    def __post_init__(self) -> None:
        self.folder = ensure_private_dir(spool_root(self.settings) / uuid.uuid4().hex)

    def on_event(self, event: PartHeaders | PartData | PartEnd) -> None:
        if isinstance(event, PartHeaders):
            path = self.folder / f"part-{len(self.parts) + 1}.partial"
            media_type = event.headers.get("content-type", DICOM).split(";")[0].strip().lower()
            self.parts.append(_Part(path, media_type))
            self._handle = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE), "wb")
        elif isinstance(event, PartData):
            self._handle.write(event.data)
        else:
            self._handle.close()
            self._handle = None
            part = self.parts[-1]
            done = part.path.with_suffix(".dcm")
            os.replace(part.path, done)  # a part counts once it is whole
            part.path, part.complete = done, True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        remove_tree(self.folder)

    def finish(self) -> list[PartOutcome]:
        """Check every part, hand the accepted ones off per study, and say what became of each."""
        outcomes: list[PartOutcome] = []
        studies: dict[str, list[tuple[PartOutcome, str]]] = defaultdict(list)
        for part in self.parts:
            outcome, ref, modality = self._check(part)
            outcomes.append(outcome)
            if outcome.failure is None:
                studies[ref].append((outcome, modality))
        for ref, accepted in studies.items():
            self._hand_off(ref, accepted)
        return outcomes

    def _check(self, part: _Part) -> tuple[PartOutcome, str, str]:
        if part.media_type != DICOM:
            return PartOutcome(failure=CANNOT_UNDERSTAND), "", ""
        try:
            header = dcmread(part.path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            study_uid, sop_uid = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - any decode failure is the client's malformed object
            return PartOutcome(failure=CANNOT_UNDERSTAND), "", ""
        lake = self.ingest.lake_uid
        series_uid = str(header.get("SeriesInstanceUID", "") or "")
        outcome = PartOutcome(str(header.get("SOPClassUID", "") or ""), lake(sop_uid), lake(study_uid),
                              lake(series_uid) if series_uid else "")
        if self.study is not None and study_uid != self.study:
            outcome.failure = WRONG_STUDY
            return outcome, "", ""
        ref = self.ingest.study_ref(study_uid)
        target = ensure_private_dir(self.folder / ref) / _object_name(sop_uid)
        os.replace(part.path, target)
        return outcome, ref, str(header.get("Modality", "") or "")

    def _hand_off(self, ref: str, accepted: list[tuple[PartOutcome, str]]) -> None:
        folder = self.folder / ref
        objects = sum(1 for _ in folder.iterdir())  # a SOP Instance UID posted twice is one object
        try:
            generation = StowGenerations(self.settings.listener_dir / "stow" / "generations.sqlite").next(ref)
            ensure_private_dir(handoff_root(self.settings))
            os.rename(folder, handoff_dir(self.settings, ref, generation))
        except OSError as exc:
            log.error("STOW-RS: study %s could not be handed off: %s", ref, type(exc).__name__)
            for outcome, _ in accepted:
                outcome.failure = OUT_OF_RESOURCES
            return
        self.ingest.announce(ref, generation, objects, sorted({m for _, m in accepted if m}))
        log.info("STOW-RS: study %s handed off as generation %d (%d objects)", ref, generation, objects)


def _object_name(sop_uid: str) -> str:
    """An object's file name in the hand-off folder: a hash of its SOP Instance UID, as the
    listener names it (no identifier in paths; a part posted twice is one file)."""
    return hashlib.sha256(sop_uid.encode()).hexdigest()[:32] + ".dcm"


def store_response(outcomes: Iterable[PartOutcome], base_url: str) -> tuple[int, dict[str, Any]]:
    """The PS3.18 store response (DICOM JSON) and its status: 200 all stored, 202 some failed,
    409 none stored."""
    stored, failed = [], []
    studies = set()
    for o in outcomes:
        item: dict[str, Any] = {}
        if o.sop_class:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class]}
        if o.lake_sop:
            item["00081155"] = {"vr": "UI", "Value": [o.lake_sop]}
        if o.failure is not None:
            failed.append({**item, "00081197": {"vr": "US", "Value": [o.failure]}})
            continue
        studies.add(o.lake_study)
        if o.lake_series:
            url = f"{base_url}/studies/{o.lake_study}/series/{o.lake_series}/instances/{o.lake_sop}"
            item["00081190"] = {"vr": "UR", "Value": [url]}
        stored.append(item)
    answer: dict[str, Any] = {}
    if len(studies) == 1:
        answer["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{next(iter(studies))}"]}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        answer["00081199"] = {"vr": "SQ", "Value": stored}
    return (200 if not failed else 202 if stored else 409), answer


def boundary_of(content_type: str | None) -> str:
    """The boundary of a STOW-RS body's Content-Type; HTTPException 415 for another type, 400
    without a boundary."""
    message = Message()
    message["content-type"] = content_type or ""
    part_type = str(message.get_param("type") or DICOM).lower()
    if message.get_content_type() != "multipart/related" or part_type != DICOM:
        raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise HTTPException(400, "the multipart/related Content-Type has no boundary")
    return boundary


async def _store(request: Request, study: str | None) -> JSONResponse:
    ingest: StowIngest | None = getattr(request.app.state, "stow", None)
    if ingest is None:
        raise HTTPException(503, getattr(request.app.state, "stow_off_reason", "STOW-RS is off"))
    try:
        reader = MultipartReader(boundary_of(request.headers.get("content-type")))
    except MalformedMultipart as exc:
        raise HTTPException(400, str(exc)) from None
    settings = context(request).settings
    limit = settings.serve.max_upload_mb * 1024 * 1024
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(413, f"the body is larger than serve.max_upload_mb ({settings.serve.max_upload_mb} MB)")
    spool = StowSpool(settings, ingest, study)
    try:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, f"the body is larger than serve.max_upload_mb "
                                         f"({settings.serve.max_upload_mb} MB)")
            for event in reader.feed(chunk):
                spool.on_event(event)
        reader.close()
        if not spool.parts:
            raise HTTPException(400, "the body holds no part")
        outcomes = await run_in_threadpool(spool.finish)
    except MalformedMultipart as exc:
        raise HTTPException(400, str(exc)) from None
    finally:
        spool.close()
    base = (settings.serve.public_base_url or str(request.base_url)).rstrip("/") + "/dicom-web"
    status, answer = store_response(outcomes, base)
    return JSONResponse(answer, status_code=status, media_type=DICOM_JSON)


@router.post("/studies", summary="STOW-RS: store instances of any studies")
async def store_instances(request: Request, _principal: Writer) -> JSONResponse:
    return await _store(request, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study_instances(study: str, request: Request, _principal: Writer) -> JSONResponse:
    uids(study)
    return await _store(request, study)
