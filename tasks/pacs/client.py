"""The one network boundary to the PACS (pynetdicom): C-ECHO, C-FIND, C-MOVE, C-GET.

Associations are opened and closed by a context manager that always releases or aborts.
Every DIMSE status becomes success, or a typed error (:mod:`.status`) that decides whether
Prefect retries. Identifiers are never logged: pynetdicom's identifier logging is
switched off by ``quiet_pynetdicom()``.
"""

from __future__ import annotations

import logging
import queue
import socket
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Self

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts

from pacsflow.tasks.core.errors import PacsConfigurationError, PacsflowError, PacsStatusError, PacsUnavailable
from pacsflow.tasks.core.values import int_or_none
from pacsflow.tasks.pacs.models import FindResult, Objects, PacsPeer, StudyInfo, SubOps
from pacsflow.tasks.pacs.status import is_pending, is_success, raise_for_status, status_code
from pacsflow.tasks.pacs.tls import client_context, handshake_error, server_name
from pacsflow.tasks.settings import Settings

log = logging.getLogger(__name__)

CANCELLED = 0xFE00  # "matching terminated due to cancel": how a capped C-FIND ends


def quiet_pynetdicom() -> None:
    """No identifiers (PHI) in pynetdicom's logs, and only its warnings."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle. Without it every small PDU waits ~40 ms."""
    try:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


NODELAY_HANDLER: evt.EventHandlerType = (evt.EVT_CONN_OPEN, set_nodelay)


def timed_ae(ae_title: str, timeout_s: float) -> AE:
    """An AE calling as ``ae_title`` with ``timeout_s`` for network, ACSE and DIMSE; at most 10 s to connect."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10)
    return ae


@contextmanager
def held(assoc: Association) -> Iterator[Association]:
    """An established association, released at the end, aborted when the block raises."""
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    else:
        if assoc.is_established:
            assoc.release()


def abstract_syntaxes(contexts: list[PresentationContext]) -> list[str]:
    """The SOP class UIDs of pynetdicom's ready-made presentation contexts (each has one)."""
    return [str(cx.abstract_syntax) for cx in contexts if cx.abstract_syntax is not None]


class PacsClient:
    """A short-lived client: each operation runs in its own association."""

    def __init__(self, settings: Settings | PacsPeer) -> None:
        self.settings = settings
        quiet_pynetdicom()

    def _ae(self) -> AE:
        return timed_ae(self.settings.calling_ae, self.settings.pacs.timeout_s)

    @contextmanager
    def association(
        self,
        ae: AE,
        ext_neg: list | None = None,
        handlers: list | None = None,
    ) -> Iterator[Association]:
        pacs = self.settings.pacs
        tls = client_context(pacs) if pacs.tls.enabled else None
        try:
            assoc = ae.associate(
                pacs.host,
                pacs.port,
                ae_title=pacs.called_ae,
                ext_neg=ext_neg,
                evt_handlers=[NODELAY_HANDLER, *(handlers or [])],
                tls_args=(tls, server_name(pacs)) if tls is not None else None,
            )
        except (OSError, RuntimeError) as exc:  # socket-level failure before any DICOM
            raise PacsUnavailable(f"cannot reach PACS at {pacs.host}:{pacs.port}: {type(exc).__name__}") from None
        if tls is not None and tls.failure is not None and not assoc.is_established:
            raise handshake_error(tls.failure, pacs)
        if assoc.is_rejected:
            result = getattr(assoc.acceptor, "primitive", None)
            # Rejected-permanent (result 1) for a bad called/calling AE is a configuration error.
            if result is not None and getattr(result, "result", None) == 0x01:
                raise PacsConfigurationError(
                    f"PACS {pacs.called_ae}@{pacs.host}:{pacs.port} rejected association permanently "
                    f"(reason 0x{int(getattr(result, 'reason_diagnostic', 0) or 0):02X}); check AE titles "
                    "(pacs.called_ae, calling_ae)"
                )
            raise PacsUnavailable(f"PACS {pacs.called_ae}@{pacs.host}:{pacs.port} rejected association (transient)")
        if not assoc.is_established:
            over_tls = " over TLS (is pacs.port its TLS port?)" if tls is not None else " (check pacs.host and pacs.port)"
            raise PacsUnavailable(f"no association with PACS {pacs.called_ae}@{pacs.host}:{pacs.port}{over_tls}")
        with held(assoc):
            yield assoc

    # -- C-ECHO ---------------------------------------------------------------------------
    def echo(self) -> None:
        ae = self._ae()
        ae.add_requested_context(Verification)
        with self.association(ae) as assoc:
            status = assoc.send_c_echo()
            code = status_code(status)
            if code is None or not is_success(code):
                raise PacsUnavailable("C-ECHO failed")

    # -- C-FIND ---------------------------------------------------------------------------
    @contextmanager
    def query_session(self) -> Iterator["PacsClient"]:
        """Run many C-FINDs over one association (discovery asks once per day)."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        with self.association(ae) as assoc:
            self._find_assoc: Association | None = assoc
            try:
                yield self
            finally:
                self._find_assoc = None

    def find(self, query: Dataset, what: str = "C-FIND") -> "FindResult":
        assoc = getattr(self, "_find_assoc", None)
        if assoc is not None:
            return self._find_on(assoc, query, what)
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        with self.association(ae) as assoc:
            return self._find_on(assoc, query, what)

    def _no_answer(self, started: float, what: str, answered: bool, *, query: bool = False) -> PacsflowError:
        """Why a request got no (more) response: the PACS dropped the association before answering at
        all, long before the timeout (as Orthanc does for a calling AE it does not know), or the
        exchange broke off or timed out. Only a query refused that way is a configuration error: a
        retrieve stays transient, so a PACS that restarts mid-run costs no study."""
        pacs = self.settings.pacs
        waited = time.monotonic() - started
        if not answered and waited < pacs.timeout_s / 2:
            kind = PacsConfigurationError if query else PacsUnavailable
            return kind(
                f"{what}: PACS {pacs.called_ae}@{pacs.host}:{pacs.port} dropped the association after "
                f"{waited:.1f} s without an answer; it may not accept our calling AE "
                f"'{self.settings.calling_ae}' (check calling_ae and the PACS's list of modalities)")
        return PacsUnavailable(f"{what}: no answer from PACS {pacs.called_ae}@{pacs.host}:{pacs.port} within "
                               f"{waited:.0f} s (pacs.timeout_s={pacs.timeout_s:g})")

    def _find_on(self, assoc: Association, query: Dataset, what: str) -> "FindResult":
        started = time.monotonic()
        results = FindResult()
        final: int | None = None
        self._msg_id = getattr(self, "_msg_id", 0) % 65535 + 1
        responses = FindResponses.installed_on(assoc)
        responses.expect(self._msg_id)
        try:
            # Exhaust the generator (no break): pynetdicom finishes its bookkeeping after the final
            # response, and a later C-FIND on the same association depends on it.
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind, msg_id=self._msg_id
            ):
                code = status_code(status)
                if code is None:
                    raise self._no_answer(started, what, final is not None or bool(results), query=True)
                if is_pending(code):
                    if identifier is not None:
                        results.append(identifier)
                else:
                    final = code
        finally:
            strays = responses.expect(None)
        if strays:
            log.warning("%s: ignored %d late response(s) to an earlier query on this association", what, strays)
        if final is None:
            raise PacsUnavailable(f"{what}: no final status")
        if final == CANCELLED and results:
            # Orthanc (LimitFindResults) and others end a capped answer with Cancel.
            results.capped = True
        else:
            raise_for_status(final, what, "query")
        return results

    def find_studies(self, date_range: str, time_range: str | None = None) -> list[StudyInfo]:
        """Study-level C-FIND over a StudyDate range ``YYYYMMDD-YYYYMMDD`` (or one day)."""
        return self._study_find(date_range=date_range, time_range=time_range or "")

    def find_study(self, study_uid: str) -> list[StudyInfo]:
        """Study-level C-FIND for one UID: empty when the PACS no longer has it."""
        return self._study_find(study_uid=study_uid)

    def _study_find(self, study_uid: str = "", date_range: str = "", time_range: str = "") -> "FindResult":
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid
        q.StudyDate = date_range
        q.StudyTime = time_range
        q.NumberOfStudyRelatedInstances = ""
        q.NumberOfStudyRelatedSeries = ""
        q.ModalitiesInStudy = ""
        q.PatientID = ""  # only to name runs by the date as de-identified (shifted per patient)
        answer = self.find(q, "study C-FIND")
        out = FindResult()
        out.capped = answer.capped
        for ident in answer:
            uid = str(ident.get("StudyInstanceUID", "") or "")
            if not uid:
                continue
            out.append(
                StudyInfo(
                    study_uid=uid,
                    study_date=str(ident.get("StudyDate", "") or ""),
                    n_instances=int_or_none(ident.get("NumberOfStudyRelatedInstances")),
                    n_series=int_or_none(ident.get("NumberOfStudyRelatedSeries")),
                    modalities=tuple(_multi(ident.get("ModalitiesInStudy"))),
                    patient_id=str(ident.PatientID or "") if "PatientID" in ident else None,
                )
            )
        return out

    def count_instances(self, study_uid: str) -> int:
        """Series-level C-FIND, summing NumberOfSeriesRelatedInstances: for PACSs that do not
        return NumberOfStudyRelatedInstances."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.NumberOfSeriesRelatedInstances = ""
        total = 0
        for ident in self.find(q, "series C-FIND"):
            n = int_or_none(ident.get("NumberOfSeriesRelatedInstances"))
            if n is None:
                pacs = self.settings.pacs
                raise PacsConfigurationError(
                    f"PACS {pacs.called_ae}@{pacs.host}:{pacs.port} returns no NumberOfSeriesRelatedInstances at "
                    "series level, so completeness cannot be checked; check the PACS's C-FIND return keys")
            total += n
        return total

    def find_series(self, study_uid: str) -> list[tuple[str, str, int | None]]:
        """Series-level C-FIND: (SeriesInstanceUID, Modality, NumberOfSeriesRelatedInstances or None)
        per series of the study, as the PACS lists them (originals: PHI zone)."""
        query = _level_query("SERIES", study_uid, SeriesInstanceUID="", Modality="", NumberOfSeriesRelatedInstances="")
        return [(str(i.get("SeriesInstanceUID", "") or ""), str(i.get("Modality", "") or ""),
                 int_or_none(i.get("NumberOfSeriesRelatedInstances"))) for i in self.find(query, "series C-FIND")]

    def find_instances(self, study_uid: str) -> dict[str, str] | None:
        """The study's objects as the PACS lists them: SOP Instance UID -> Series Instance UID,
        asked level by level (series, then each series' images: what a strictly hierarchical
        PACS answers). None when the PACS will not list them or caps the answer: the caller then
        checks counts only."""
        try:
            with self.query_session():
                series = self.find(_level_query("SERIES", study_uid, SeriesInstanceUID=""), "series C-FIND")
                found: dict[str, str] = {}
                for ident in [] if series.capped else series:
                    series_uid = str(ident.get("SeriesInstanceUID", "") or "")
                    images = self.find(_level_query("IMAGE", study_uid, SeriesInstanceUID=series_uid,
                                                    SOPInstanceUID=""), "instance C-FIND")
                    if images.capped:
                        return None
                    found.update((str(i.get("SOPInstanceUID", "") or ""), series_uid) for i in images)
        except (PacsConfigurationError, PacsStatusError) as exc:  # e.g. 0xA900: no image-level queries here
            log.warning("the PACS does not list a study's instances (%s); completeness is checked by count only",
                        exc)
            return None
        found.pop("", None)
        return found or None

    # -- C-MOVE and C-GET -----------------------------------------------------------------
    def move(self, study_uid: str, objects: Objects | None, destination_ae: str, what: str) -> tuple[int, SubOps]:
        """C-MOVE a study, or ``objects`` of one of its series, to ``destination_ae``: the final
        status and sub-operation counts. A Failure or Warning status is returned, not raised: the
        caller decides what a partial retrieve means."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        with self.association(ae) as assoc:
            return self._retrieve_outcome(assoc.send_c_move(
                _identifier(study_uid, objects), destination_ae, StudyRootQueryRetrieveInformationModelMove), what)

    def get(self, study_uid: str, objects: Objects | None, on_store: Callable[[evt.Event], int],
            what: str) -> tuple[int, SubOps]:
        """C-GET a study or some of its objects, each handed to ``on_store``; see :meth:`move`."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        # C-GET carries the store sub-operations on the same association: offer storage
        # contexts with the SCP role. pynetdicom caps requested contexts at 128.
        roles = []
        for uid in abstract_syntaxes(StoragePresentationContexts[: 128 - 1]):
            ae.add_requested_context(uid)
            roles.append(build_role(uid, scp_role=True))
        with self.association(ae, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            return self._retrieve_outcome(assoc.send_c_get(
                _identifier(study_uid, objects), StudyRootQueryRetrieveInformationModelGet), what)

    def _retrieve_outcome(self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str) -> tuple[int, SubOps]:
        started = time.monotonic()
        final: tuple[int, SubOps] | None = None
        last_pending = SubOps()
        answered = False
        for status, _identifier in responses:
            code = status_code(status)
            if code is None:
                raise self._no_answer(started, what, answered)
            if is_pending(code):
                answered, last_pending = True, _subops(status)
                continue
            final = (code, _subops(status))
        if final is None:
            raise PacsUnavailable(f"{what}: no final status")
        code, ops = final
        return code, (ops if (ops.completed or ops.failed) else last_pending)

    def move_study(self, study_uid: str, destination_ae: str, study_ref: str) -> SubOps:
        """C-MOVE a whole study; any status but Success raises. ``study_ref`` (a pseudonymous
        UID) names the study in errors."""
        code, ops = self.move(study_uid, None, destination_ae, f"C-MOVE for study {study_ref}")
        raise_for_status(code, "C-MOVE", study_ref)
        return ops

    def get_study(self, study_uid: str, on_store: Callable[[evt.Event], int], study_ref: str) -> SubOps:
        code, ops = self.get(study_uid, None, on_store, f"C-GET for study {study_ref}")
        raise_for_status(code, "C-GET", study_ref)
        return ops


class ReservedResponses(queue.Queue):
    """An association's incoming DIMSE messages, where a response of the ``reserved`` kind reaches
    only the request that waits for it.

    pynetdicom's idle loop polls this queue without blocking, for requests from the peer; it can
    win the race against a request just sent and swallow its response ("Received unexpected
    C-FIND service message", or C-STORE), leaving the request to wait out the DIMSE timeout. So a
    non-blocking read never takes a response of that kind: only the blocking read of the request
    waiting for it does.
    """

    reserved: type = C_FIND

    @classmethod
    def installed_on(cls, assoc: Association) -> Self:
        """The association's message queue, replaced by this filter on first use (keeping any
        message already queued, such as the sentinel of an abort)."""
        current = assoc.dimse.msg_queue
        if isinstance(current, cls):
            return current
        responses = cls()
        with current.mutex:
            responses.queue.extend(current.queue)
        assoc.dimse.msg_queue = responses
        return responses

    def get(self, block: bool = True, timeout: float | None = None):
        if block:
            return super().get(block, timeout)
        with self.mutex:  # the idle loop: anything but a reserved response
            for i, item in enumerate(self.queue):
                if not isinstance(item[1], self.reserved):
                    del self.queue[i]
                    return item
        raise queue.Empty


class FindResponses(ReservedResponses):
    """C-FIND responses reach only the query they answer.

    pynetdicom reads the next C-FIND response as the answer to whatever query waits. A response
    arriving late (after a capped or cancelled answer's final status) would end the next query
    with the earlier day's studies and shift every answer after it (discovery asks once per day
    over one association). So responses to any other message id are dropped as they arrive
    (``expect`` also drops those that came in between two queries); the idle loop takes none
    (:class:`ReservedResponses`).
    """

    reserved = C_FIND

    def __init__(self) -> None:
        super().__init__()
        self._expected: int | None = None
        self._strays = 0

    def expect(self, msg_id: int | None) -> int:
        """Keep responses to ``msg_id`` only (None: to none); returns the strays dropped so far,
        and restarts the count."""
        with self.mutex:
            self._expected = msg_id
            kept = [item for item in self.queue if not self._stray(item)]
            self._strays += len(self.queue) - len(kept)
            self.queue.clear()
            self.queue.extend(kept)
            strays, self._strays = self._strays, 0
        return strays

    def _stray(self, item) -> bool:
        msg = item[1]
        return isinstance(msg, C_FIND) and msg.MessageIDBeingRespondedTo not in (None, self._expected)

    def _put(self, item) -> None:  # queue.Queue calls it holding the mutex
        if self._stray(item):
            self._strays += 1
        else:
            super()._put(item)


def _level_query(level: str, study_uid: str, **keys: str | list[str]) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.StudyInstanceUID = study_uid
    for keyword, value in keys.items():
        setattr(q, keyword, value)
    return q


def _identifier(study_uid: str, objects: Objects | None) -> Dataset:
    """A retrieve identifier: the whole study, or some images of one series (the unique keys of
    every level above, as hierarchical retrieval asks)."""
    if objects is None:
        return _level_query("STUDY", study_uid)
    series_uid, sop_uids = objects
    return _level_query("IMAGE", study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=list(sop_uids))


def _subops(status: Dataset) -> SubOps:
    return SubOps(
        completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
    )


def _multi(value) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    return [str(v) for v in value if v]


