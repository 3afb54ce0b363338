"""WADO-RS (PS3.18 10.4): studies, series and instances streamed from the lake as stored, their
metadata from the catalog, and frames of uncompressed and JPEG-family instances.

Instances go out byte for byte as the lake holds them: nothing is transcoded. A request whose
``transfer-syntax`` names a syntax other than the files' (and not ``*``) gets 406; without the
parameter the stored syntax is sent and named in each part's Content-Type. Frames: uncompressed
pixel data as ``application/octet-stream`` (Explicit VR Little Endian), compressed frames as their
image media type (``image/jpeg``, ``image/jls``, ``image/jp2``, ``image/jpx``) or as
``application/octet-stream; transfer-syntax=<stored>`` when the client accepts any syntax
(``transfer-syntax=*``, as OHIF asks).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
from typing import Any, BinaryIO, Iterator

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from starlette import types as asgi

from pacsflow.tasks.web import multipart, zerocopy
from pacsflow.tasks.web.accept import MediaRange, accepts_json, parse_accept
from pacsflow.tasks.web.app import Reader
from pacsflow.tasks.web.index import InstanceFile
from pacsflow.tasks.web.lakefiles import COMPRESSED_MEDIA, EXPLICIT_LE, NATIVE, FrameError, LakeFiles, OutsideStorage
from pacsflow.tasks.web.services import DicomWebServices, Services, uids
from pacsflow.tasks.web.xdsi import export_audit
from pacsflow.tasks.xdsi.audit import Transaction

log = logging.getLogger("pacsflow.serve")

READ_AHEAD = 4  # files read into the page cache ahead of the one being sent
DICOM, OCTET = "application/dicom", "application/octet-stream"
MULTIPART = "multipart/related"
MAX_FRAMES = 10000
# The transfer syntax a media type means when the request names none (PS3.18 table 8.7.3-2).
DEFAULT_SYNTAX = {OCTET: EXPLICIT_LE, "image/jpeg": "1.2.840.10008.1.2.4.50", "image/jls": "1.2.840.10008.1.2.4.80",
                  "image/jp2": "1.2.840.10008.1.2.4.90", "image/jpx": "1.2.840.10008.1.2.4.92"}
TAG_PIXEL_DATA, TAG_AVAILABLE_SYNTAX = "7FE00010", "00083002"

router = APIRouter(tags=["WADO-RS"])


def _part_type(accepted: MediaRange, native: str) -> str | None:
    """The part media type a range asks for: its ``type``, or ``native`` for ``*/*`` and
    ``multipart/*``; None for a single-part range (not offered)."""
    if accepted.media_type == MULTIPART:
        part = accepted.part_type or native
        return native if part in ("*/*", native.split("/")[0] + "/*") else part
    return native if accepted.matches(MULTIPART) else None


def choose_instances(ranges: list[MediaRange], syntaxes: set[str]) -> bool:
    """Whether some acceptable range admits the files as stored (``application/dicom`` parts)."""
    for accepted in ranges:
        syntax = accepted.transfer_syntax
        if _part_type(accepted, DICOM) == DICOM and (syntax in (None, "*") or syntaxes == {syntax}):
            return True
    return False


def choose_frames(ranges: list[MediaRange], stored: str) -> tuple[str, str] | None:
    """(part media type, transfer syntax) for frames of a file in ``stored``, best acceptable first."""
    native = OCTET if stored in NATIVE else COMPRESSED_MEDIA[stored]
    served = EXPLICIT_LE if stored in NATIVE else stored
    for accepted in ranges:
        part, syntax = _part_type(accepted, native), accepted.transfer_syntax
        if part == native and (syntax in ("*", served) or (syntax is None and DEFAULT_SYNTAX[part] == served)):
            return native, served
        if part == OCTET and stored not in NATIVE and syntax in ("*", stored):
            return OCTET, stored
    return None


def _files(svc: DicomWebServices, study: str, series: str | None = None,
           instance: str | None = None) -> list[InstanceFile]:
    uids(study, series, instance)
    found = svc.index.instance_files(study, series, instance)
    if not found:
        raise HTTPException(404, "no such study, series or instance in the catalog")
    try:  # every path is checked before the first byte goes out
        for f in found:
            svc.files.resolve(f.file_path)
    except OutsideStorage:
        log.error("a catalog row of study %s names a file outside storage_root", study)
        raise HTTPException(400, "the catalog names a file outside the storage root") from None
    return found


def _stream_instances(request: Request, svc: DicomWebServices, found: list[InstanceFile]) -> StreamingResponse:
    syntaxes = {f.transfer_syntax_uid or EXPLICIT_LE for f in found}
    if not choose_instances(parse_accept(request.headers.get("accept")), syntaxes):
        raise HTTPException(406, "instances are sent as stored: multipart/related; type=\"application/dicom\" "
                                 "with the files' transfer syntax or *")
    response = InstancesResponse(svc.files, found)
    response.background = export_audit(request, svc, Transaction.WADO_RS_RETRIEVE, found)  # with xdsi.audit_url
    return response


class InstancesResponse(StreamingResponse):
    """Instances as ``multipart/related; type="application/dicom"``, one part per file as stored.
    Where the server offers zero-copy sending (:mod:`.zerocopy`) and the lake is a local folder,
    each file goes from the page cache to the socket without passing through Python; otherwise
    its bytes are read and streamed."""

    def __init__(self, files: LakeFiles, found: list[InstanceFile]) -> None:
        self.files, self.found, self.zero_copy = files, found, False
        self.boundary = multipart.new_boundary()
        parts = (multipart.Part(self._type(f), files.chunks(f.file_path), f.file_size) for f in found)
        super().__init__(multipart.stream(parts, self.boundary), media_type=multipart.content_type(DICOM, self.boundary))

    @staticmethod
    def _type(f: InstanceFile) -> str:
        return f"{DICOM}; transfer-syntax={f.transfer_syntax_uid or EXPLICIT_LE}"

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        self.zero_copy = self.files.local and zerocopy.EXTENSION in (scope.get("extensions") or {})
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: asgi.Send) -> None:
        if not self.zero_copy:
            await super().stream_response(send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pending = b""
        with _read_ahead(self.files.resolve(f.file_path) for f in self.found) as handles:
            for f, handle in zip(self.found, handles):
                size = os.fstat(handle.fileno()).st_size  # the part says what goes out, whatever the row says
                head = multipart.part_head(multipart.Part(self._type(f), (), size), self.boundary)
                await send({"type": zerocopy.EXTENSION, "head": pending + head, "file": handle, "count": size,
                            "more_body": True})
                pending = b"\r\n"
        await send({"type": "http.response.body", "body": pending + multipart.closing(self.boundary),
                    "more_body": False})


@contextlib.contextmanager
def _read_ahead(paths: Iterator[str]) -> Iterator[Iterator[BinaryIO]]:
    """The files opened in order, each handed out while the next ``READ_AHEAD`` are already being
    read into the page cache (``POSIX_FADV_WILLNEED`` starts the read and returns): ``sendfile``
    reads a file that is not cached while the event loop waits, so without this a cold lake is
    read one file at a time."""
    opened: collections.deque[BinaryIO] = collections.deque()

    def handles() -> Iterator[BinaryIO]:
        for path in itertools.chain(paths, [None] * READ_AHEAD):
            if path is not None:
                handle = open(path, "rb")
                opened.append(handle)
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            if len(opened) > READ_AHEAD or (path is None and opened):
                yield opened[0]
                opened.popleft().close()

    try:
        yield handles()
    finally:
        for handle in opened:
            handle.close()


@router.get("/studies/{study}", summary="Retrieve a study's instances")
def retrieve_study(study: str, request: Request, svc: Services, who: Reader) -> StreamingResponse:
    return _stream_instances(request, svc, _files(svc, study))


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series' instances")
def retrieve_series(study: str, series: str, request: Request, svc: Services, who: Reader) -> StreamingResponse:
    return _stream_instances(request, svc, _files(svc, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
def retrieve_instance(study: str, series: str, instance: str, request: Request, svc: Services,
                      who: Reader) -> StreamingResponse:
    return _stream_instances(request, svc, _files(svc, study, series, instance))


def _metadata(request: Request, svc: DicomWebServices, study: str, series: str | None = None,
              instance: str | None = None) -> Response:
    uids(study, series, instance)
    if not accepts_json(request.headers.get("accept")):
        raise HTTPException(406, "metadata is application/dicom+json")
    found = svc.index.instance_json(study, series, instance)
    if not found:
        raise HTTPException(404, "no such study, series or instance in the catalog")
    base = svc.base_url(request)
    return StreamingResponse(_json_array(_with_bulkdata(row, base) for row in found),
                             media_type="application/dicom+json")


def _with_bulkdata(row: dict[str, Any], base: str) -> dict[str, Any]:
    """An instance's DICOM JSON with what viewers need beyond it: the stored transfer syntax and
    a BulkDataURI for the pixel data (the frames route)."""
    element: dict[str, Any] = json.loads(row["dicom_json"] or "{}")
    syntax = row["transfer_syntax_uid"] or EXPLICIT_LE
    element[TAG_AVAILABLE_SYNTAX] = {"vr": "UI", "Value": [syntax]}
    if "00280010" in element:  # Rows: the instance has pixel data
        frames = ",".join(str(n) for n in range(1, (row["number_of_frames"] or 1) + 1))
        url = (f"{base}/dicom-web/studies/{row['study_uid']}/series/{row['series_uid']}"
               f"/instances/{row['sop_instance_uid']}/frames/{frames}")
        bits = (element.get("00280100", {}).get("Value") or [16])[0]
        element[TAG_PIXEL_DATA] = {"vr": "OW" if syntax in NATIVE and bits > 8 else "OB", "BulkDataURI": url}
    return dict(sorted(element.items()))


def _json_array(items: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    yield b"["
    for n, item in enumerate(items):
        yield (b"," if n else b"") + json.dumps(item, separators=(",", ":")).encode("utf-8")
    yield b"]"


@router.get("/studies/{study}/metadata", summary="A study's metadata")
def study_metadata(study: str, request: Request, svc: Services, who: Reader) -> Response:
    return _metadata(request, svc, study)


@router.get("/studies/{study}/series/{series}/metadata", summary="A series' metadata")
def series_metadata(study: str, series: str, request: Request, svc: Services, who: Reader) -> Response:
    return _metadata(request, svc, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata", summary="An instance's metadata")
def instance_metadata(study: str, series: str, instance: str, request: Request, svc: Services,
                      who: Reader) -> Response:
    return _metadata(request, svc, study, series, instance)


def frame_numbers(text: str) -> list[int]:
    """``1,3,5`` as numbers (1-based, at most :data:`MAX_FRAMES`); 400 when malformed."""
    pieces = text.split(",")
    if len(pieces) > MAX_FRAMES or not all(p.strip().isdigit() and int(p) > 0 for p in pieces):
        raise HTTPException(400, "frame numbers are positive integers separated by commas")
    return [int(p) for p in pieces]


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", summary="Frames of an instance")
def retrieve_frames(study: str, series: str, instance: str, frames: str, request: Request, svc: Services,
                    who: Reader) -> Response:
    numbers = frame_numbers(frames)
    [found] = _files(svc, study, series, instance)
    stored = found.transfer_syntax_uid or EXPLICIT_LE
    if stored not in NATIVE and stored not in COMPRESSED_MEDIA:
        raise HTTPException(406, "frames are served for uncompressed and JPEG-family transfer syntaxes only")
    chosen = choose_frames(parse_accept(request.headers.get("accept")), stored)
    if chosen is None:
        raise HTTPException(406, "no acceptable media type for these frames; the stored transfer syntax is "
                                 f"{stored}")
    part_type, syntax = chosen
    try:
        _stored, pixels = svc.files.frames(found.file_path, numbers)
    except FrameError as exc:
        raise HTTPException(400 if "frame numbers" in str(exc) else 406, str(exc)) from None
    boundary = multipart.new_boundary()
    parts = [multipart.Part(f"{part_type}; transfer-syntax={syntax}", [data], len(data)) for data in pixels]
    body = b"".join(multipart.stream(parts, boundary))
    return Response(body, media_type=multipart.content_type(part_type, boundary, syntax))


# Mounted after every other /dicom-web route: a GET that matched none of them.
guard = APIRouter(include_in_schema=False)


@guard.get("/{rest:path}")
def unmatched(rest: str, who: Reader) -> Response:
    """400 for a path that tries to climb out (``..``, encoded slashes in a UID), 404 otherwise."""
    if ".." in rest.split("/") or "\\" in rest:
        raise HTTPException(400, "malformed DICOMweb path")
    raise HTTPException(404, "no such DICOMweb resource")
