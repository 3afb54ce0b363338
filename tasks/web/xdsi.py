"""The Imaging Document Source in ``pacsflow serve`` (README "Sharing through XDS-I.b"): RAD-69 at
``POST /xdsi/rad69``, and the ATNA export audit of each RAD-69 and WADO-RS retrieve response.

RAD-69 (request and response in :mod:`pacsflow.tasks.xdsi.rad69`): the request's UIDs are checked
before any lookup; each instance is found through the catalog index as WADO-RS finds it, confined
to the storage root, and sent as stored, one ``application/dicom`` MTOM part each, read in chunks
while the response streams. A malformed request gets a one-line SOAP Fault (400; 413 when larger
than :data:`MAX_REQUEST_BYTES`) that does not quote it. Like every route, it needs a read token.

Audit (only with ``xdsi.audit_url``): after the response's last byte, the event is handed to the
audit log's worker thread, which names the patient pseudonyms and the studies' SOP classes from
the catalog and sends it. Studies are named only when the catalog has them (so a UID a client
made up is never audited as ours). Frames and metadata requests are not audited: a viewer asks for
them by the thousand, and the instance retrievals that hand out whole files are.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, BinaryIO, Callable, Sequence, cast

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from pacsflow.tasks.web.app import Reader, context
from pacsflow.tasks.web.index import CatalogIndex, InstanceFile, study_month
from pacsflow.tasks.web.lakefiles import EXPLICIT_LE, OutsideStorage
from pacsflow.tasks.web.services import DicomWebServices, QueryError, Services, check_uid
from pacsflow.tasks.xdsi import audit, mtom, rad69

log = logging.getLogger("pacsflow.serve")

MAX_REQUEST_BYTES = 8 << 20  # a request naming rad69.MAX_DOCUMENTS instances stays well below this
SOAP_XML = "application/soap+xml"
OUTCOMES = {rad69.Status.SUCCESS: audit.Outcome.SUCCESS, rad69.Status.PARTIAL_SUCCESS: audit.Outcome.MINOR_FAILURE,
            rad69.Status.FAILURE: audit.Outcome.SERIOUS_FAILURE}
_PATIENT = "SELECT patient_pseudo_id FROM studies WHERE study_uid = ?"
_SOP_CLASSES = ("SELECT sop_class_uid, count(*) FROM instances WHERE study_uid = ? AND study_month IS NOT DISTINCT "
                "FROM ? AND list_contains(?, sop_instance_uid) GROUP BY sop_class_uid ORDER BY sop_class_uid")
_lock = threading.Lock()

router = APIRouter(tags=["XDS-I.b"])


class _TooLarge(Exception):
    pass


def _fault(status: int, reason: str) -> Response:
    return Response(mtom.fault("Sender", reason), status_code=status, media_type=SOAP_XML)


async def _capped_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise _TooLarge
    return bytes(body)


@router.post("/xdsi/rad69", summary="RAD-69 Retrieve Imaging Document Set (SOAP 1.2, MTOM)")
async def retrieve_imaging_document_set(request: Request, svc: Services, who: Reader) -> Response:
    try:
        parsed = rad69.parse_request(request.headers.get("content-type", ""), await _capped_body(request))
        for uid in parsed.uids():
            check_uid(uid)
    except _TooLarge:
        return _fault(413, f"the request is larger than {MAX_REQUEST_BYTES} bytes")
    except (mtom.MtomError, rad69.Rad69Error, QueryError) as exc:
        return _fault(400, str(exc))
    xdsi = context(request).settings.xdsi
    served, files, not_served = await run_in_threadpool(_look_up, svc, parsed, xdsi.source_oid)
    envelope = rad69.response_envelope(served, not_served, relates_to=parsed.message_id)
    parts = [mtom.Attachment(s.content_id, rad69.DICOM, path=f.file_path, opener=_opener(svc)) for s, f in
             zip(served, files)]
    content_type, chunks = mtom.package(envelope, parts, action=rad69.RESPONSE_ACTION)
    response = StreamingResponse(chunks, media_type=content_type)
    outcome = OUTCOMES[rad69.status_of(len(served), len(not_served))]
    endpoint = xdsi.rad69_url or f"{svc.base_url(request)}/xdsi/rad69"
    requested = list(dict.fromkeys(d.study_uid for d in parsed.documents))
    response.background = export_audit(request, svc, audit.Transaction.RETRIEVE_IMAGING_DOCUMENT_SET, files,
                                       outcome=outcome, endpoint_url=endpoint, studies=requested)
    return response


def _opener(svc: DicomWebServices) -> Callable[[str], BinaryIO]:
    """Opens a catalog ``file_path`` in the lake (confined to the storage root again)."""
    return lambda file_path: cast(BinaryIO, svc.files.open(file_path))


def _look_up(svc: DicomWebServices, request: rad69.RetrieveRequest, source_oid: str | None,
             ) -> tuple[list[rad69.Served], list[InstanceFile], list[rad69.NotServed]]:
    """Each requested instance served (with its catalog row) or not (with the reason), in request
    order; one catalog query per study."""
    served: list[rad69.Served] = []
    files: list[InstanceFile] = []
    not_served: list[rad69.NotServed] = []
    studies: dict[str, dict[str, InstanceFile]] = {}
    tag = uuid.uuid4().hex
    for n, doc in enumerate(request.documents):
        if source_oid is None or doc.repository_unique_id != source_oid:
            not_served.append(rad69.missing(doc, source_oid))
            continue
        if doc.study_uid not in studies:
            studies[doc.study_uid] = {f.sop_instance_uid: f for f in svc.index.instance_files(doc.study_uid)}
        found = studies[doc.study_uid].get(doc.document_unique_id)
        if found is None or found.series_uid != doc.series_uid:
            not_served.append(rad69.missing(doc, source_oid))
            continue
        stored = found.transfer_syntax_uid or EXPLICIT_LE
        if stored not in request.transfer_syntaxes:
            not_served.append(rad69.not_in_syntax(doc, stored))
            continue
        try:
            svc.files.resolve(found.file_path)
        except OutsideStorage:
            log.error("a catalog row of study %s names a file outside storage_root", doc.study_uid)
            not_served.append(rad69.missing(doc, source_oid))
            continue
        served.append(rad69.Served(doc, f"{n}.{tag}@pacsflow"))
        files.append(found)
    return served, files, not_served


# -- the export audit of RAD-69 and WADO-RS ------------------------------------------------------


def audit_log(request: Request) -> audit.AuditLog | None:
    """The app's audit log (made on first use), or None while ``xdsi.audit_url`` is unset."""
    state = request.app.state
    with _lock:
        if not hasattr(state, "audit_log"):
            state.audit_log = audit.AuditLog.from_settings(context(request).settings.xdsi)
    found: audit.AuditLog | None = state.audit_log
    return found


def close_audit_log(app: Any) -> None:
    """Sends what the audit log still holds (a few seconds at most) and closes it."""
    trail: audit.AuditLog | None = getattr(app.state, "audit_log", None)
    if trail is not None:
        trail.close()


def export_audit(request: Request, svc: DicomWebServices, transaction: audit.Transaction,
                 files: Sequence[InstanceFile], *, outcome: audit.Outcome = audit.Outcome.SUCCESS,
                 endpoint_url: str | None = None, studies: Sequence[str] = ()) -> BackgroundTask | None:
    """A response's background task that queues its Export audit event (None without an audit
    log). ``studies``: the study UIDs asked for, when some may have had nothing served."""
    trail = audit_log(request)
    if trail is None:
        return None
    xdsi = context(request).settings.xdsi
    endpoint = endpoint_url or f"{svc.base_url(request)}{request.url.path}"
    client_host = request.client.host if request.client else None
    user = getattr(request.state, "principal", None)
    study_uids = list(dict.fromkeys([*studies, *(f.study_uid for f in files)]))
    sops = [(f.study_uid, f.sop_instance_uid) for f in files]

    def build() -> audit.AuditEvent:
        patients, named = exported(svc.index, study_uids, sops, xdsi.pseudonym_oid)
        return audit.retrieve_event(transaction, outcome=outcome, endpoint_url=endpoint,
                                    audit_source_id=audit.audit_source_id(xdsi), client_host=client_host,
                                    client_user=user, patients=patients, studies=named)

    return BackgroundTask(trail.record_later, build)


def exported(index: CatalogIndex, study_uids: Sequence[str], sops: Sequence[tuple[str, str]],
             pseudonym_oid: str | None) -> tuple[tuple[str, ...], tuple[audit.Study, ...]]:
    """The patients (pseudonym CX) and the cataloged studies (with the SOP classes of ``sops``
    served from each) an export names."""
    patients: dict[str, None] = {}
    studies = []
    with index.connection() as con:
        for study in study_uids:
            found, month = study_month(con, study)
            if not found:
                continue
            row = con.execute(_PATIENT, [study]).fetchone()
            if row and row[0]:
                patients[audit.patient_cx(str(row[0]), pseudonym_oid)] = None
            served = [sop for s, sop in sops if s == study]
            classes = con.execute(_SOP_CLASSES, [study, month, served]).fetchall() if served else []
            studies.append(audit.Study(study, tuple((str(uid), int(n)) for uid, n in classes)))
    return tuple(patients), tuple(studies)
