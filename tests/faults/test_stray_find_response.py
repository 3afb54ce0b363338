"""Issue 15 item 8: a late C-FIND response from an earlier (capped) query is never read as the
answer to the next query on the same association, and the next query does not wait for it.

A real PACS will not misbehave on demand, so the peer is an in-process pynetdicom SCP that sends,
after a capped answer's final Cancel, one more Pending (a study of the earlier day) and a second
final: both carry the earlier query's message id, and both land while the next query is in flight.
"""

from __future__ import annotations

import queue
import threading
import time
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from pacsflow.tasks.pacs.client import FindResponses, PacsClient
from pacsflow.tasks.settings import load_settings
from tests.helpers import free_port

PENDING, SUCCESS, CANCELLED = 0xFF00, 0x0000, 0xFE00
TIMEOUT_S = 4.0
CAPPED_DAY, NEXT_DAY, LAST_DAY = "20260101", "20260102", "20260103"
# What each day holds; the capped day answers two and stops with Cancel.
HELD = {CAPPED_DAY: ["1.2.1.1", "1.2.1.2"], NEXT_DAY: ["1.2.2.1"], LAST_DAY: ["1.2.3.1", "1.2.3.2"]}
STRAY_UID = "1.2.1.9"  # a study of the capped day, sent after that answer ended


def _answer(uid: str, day: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    ds.StudyDate = day
    ds.NumberOfStudyRelatedInstances = "1"
    return ds


def _response(msg_id: int, status: int) -> C_FIND:
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    rsp.Status = status
    return rsp


def _send_late(event: evt.Event, delay_s: float) -> None:
    """After ``delay_s``: a Pending and a Success answering the request of ``event`` once more."""
    time.sleep(delay_s)
    ts = event.context.transfer_syntax
    for status, ident in ((PENDING, _answer(STRAY_UID, CAPPED_DAY)), (SUCCESS, None)):
        rsp = _response(event.request.MessageID, status)
        if ident is not None:
            rsp.Identifier = BytesIO(encode(ident, ts.is_implicit_VR, ts.is_little_endian))
        event.assoc.dimse.send_msg(rsp, event.context.context_id)


class StrayingPacs:
    """Capped day: two answers, final Cancel, then a late Pending + Success 0.1 s later. The next
    query is answered 0.4 s after it arrives, so the late responses reach the client while it waits."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def on_find(self, event: evt.Event):
        day = str(event.identifier.get("StudyDate", ""))
        if day == NEXT_DAY:
            time.sleep(0.4)
        for uid in HELD.get(day, []):
            yield PENDING, _answer(uid, day)
        if day == CAPPED_DAY:
            late = threading.Thread(target=_send_late, args=(event, 0.1), daemon=True)
            self.threads.append(late)
            late.start()
            yield CANCELLED, None
        else:
            yield SUCCESS, None


@pytest.fixture
def straying_pacs():
    pacs = StrayingPacs()
    ae = AE(ae_title="STRAYPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, pacs.on_find)])
    yield load_settings(pacs={"port": port, "called_ae": "STRAYPACS", "timeout_s": TIMEOUT_S})
    server.shutdown()
    for t in pacs.threads:
        t.join(timeout=5)


def _uids(answer) -> list[str]:
    return sorted(s.study_uid for s in answer)


def test_a_late_response_is_not_the_next_querys_answer(straying_pacs, caplog):
    client = PacsClient(straying_pacs)
    with client.query_session():
        capped = client.find_studies(CAPPED_DAY)
        started = time.monotonic()
        following = client.find_studies(NEXT_DAY)
        waited = time.monotonic() - started
        last = client.find_studies(LAST_DAY)
    assert capped.capped and _uids(capped) == HELD[CAPPED_DAY]
    assert _uids(following) == HELD[NEXT_DAY] and not following.capped
    assert waited < TIMEOUT_S / 2  # its own answer (0.4 s away), not a DIMSE timeout
    assert _uids(last) == HELD[LAST_DAY]
    assert "ignored 2 late response(s)" in caplog.text  # the Pending and the second final


def test_a_late_response_between_queries_is_dropped(straying_pacs):
    client = PacsClient(straying_pacs)
    with client.query_session():
        client.find_studies(CAPPED_DAY)
        time.sleep(0.5)  # the late responses arrive while no query is in flight
        started = time.monotonic()
        last = client.find_studies(LAST_DAY)
        waited = time.monotonic() - started
    assert _uids(last) == HELD[LAST_DAY] and waited < TIMEOUT_S / 2


def test_pynetdicoms_idle_loop_cannot_take_the_answer_of_a_query_in_flight():
    # pynetdicom's idle loop polls the message queue without blocking; when it wins the race
    # against a query just sent it used to swallow that query's final response, and the query
    # waited out the DIMSE timeout. Timing-dependent over a socket, so shown on the queue itself.
    responses = FindResponses()
    responses.expect(7)
    responses.put((1, _response(6, SUCCESS)))  # a late answer to the previous query
    responses.put((1, _response(7, SUCCESS)))
    with pytest.raises(queue.Empty):
        responses.get(block=False)  # what the idle loop does
    context_id, answer = responses.get(block=True, timeout=1)  # what the waiting query does
    assert answer.MessageIDBeingRespondedTo == 7 and answer.Status == SUCCESS
    assert responses.expect(None) == 1  # the late one, dropped and counted
    responses.put((1, _response(7, PENDING)))  # after the final: nothing more reaches anyone
    assert responses.empty()
