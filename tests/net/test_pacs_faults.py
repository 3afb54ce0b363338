"""Fault injection with in-process pynetdicom SCPs: statuses a real Orthanc will not produce.

The same client code is exercised against real Orthanc in tests/integration and tests/flows.
"""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsflow.tasks.core.errors import PacsConfigurationError, PacsStatusError, PacsUnavailable, is_transient
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.settings import load_settings
from tests.helpers import free_port


@pytest.fixture
def fake_pacs():
    servers = []

    def start(handlers):
        ae = AE(ae_title="FAKEPACS")
        ae.require_called_aet = True
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return load_settings(pacs={"port": port, "called_ae": "FAKEPACS", "timeout_s": 5})

    yield start
    for s in servers:
        s.shutdown()


def test_move_destination_unknown_is_permanent(fake_pacs):
    def on_move(event):
        yield (None, None)  # pynetdicom answers 0xA801

    settings = fake_pacs([(evt.EVT_C_MOVE, on_move)])
    with pytest.raises(PacsConfigurationError) as exc:
        PacsClient(settings).move_study("1.2.3", "NOWHERE", "2.25.1")
    assert "0xA801" in str(exc.value) and not is_transient(exc.value)
    assert "1.2.3" not in str(exc.value)  # errors name the pseudonymous UID only


def test_find_failure_status_is_transient(fake_pacs):
    def on_find(event):
        yield (0xA700, None)  # out of resources

    settings = fake_pacs([(evt.EVT_C_FIND, on_find)])
    with pytest.raises(PacsStatusError) as exc:
        PacsClient(settings).find_studies("20260101")
    assert is_transient(exc.value)


def test_abort_mid_query_is_transient_unavailability(fake_pacs):
    def on_find(event):
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = "1.2.3"
        yield (0xFF00, ident)
        # Abort once the first answer has reached the client (an abort before any answer is how
        # Orthanc refuses an unknown calling AE: a configuration error, tested elsewhere).
        threading.Timer(0.3, event.assoc.abort).start()
        time.sleep(1.0)
        yield (0xFF00, ident)

    settings = fake_pacs([(evt.EVT_C_FIND, on_find)])
    with pytest.raises(PacsUnavailable):
        PacsClient(settings).find_studies("20260101")


def test_capped_answer_is_marked(fake_pacs):
    def on_find(event):
        for i in range(3):
            ident = Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = f"1.2.{i}"
            ident.StudyDate = "20260101"
            yield (0xFF00, ident)
        yield (0xFE00, None)  # what Orthanc sends past LimitFindResults

    settings = fake_pacs([(evt.EVT_C_FIND, on_find)])
    answer = PacsClient(settings).find_studies("20260101")
    assert len(answer) == 3 and answer.capped


def test_no_pacs_listening_is_transient():
    settings = load_settings(pacs={"port": free_port(), "timeout_s": 2})
    with pytest.raises(PacsUnavailable) as exc:
        PacsClient(settings).echo()
    assert is_transient(exc.value)


def test_rejected_calling_ae_is_permanent(fake_pacs):
    settings = fake_pacs([])
    settings = load_settings(pacs={**settings.pacs.model_dump(), "called_ae": "WRONGAE"})
    with pytest.raises(PacsConfigurationError) as exc:
        PacsClient(settings).echo()
    assert "rejected association permanently" in str(exc.value) and not is_transient(exc.value)
