"""The native receive engine's own parts: the A-ASSOCIATE-RQ header it reads without consuming,
the A-ASSOCIATE-RJ it answers strangers with, UIDs masked in storescp's messages, the engine
choice, and a connection that never asks for an association. The whole engine against real
DCMTK peers is in tests/faults/test_receiver_strangers.py (both engines) and every flow test."""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import pytest

from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver, chosen_engine
from pacsflow.tasks.pacs.storescp import NativeReceiver, associate_reject, association_aes, masked
from pacsflow.tasks.settings import ReceiverEngine, SettingsError, load_settings
from tests.helpers import free_port


def _request(called: str, calling: str) -> bytes:
    return bytes([0x01, 0x00]) + (200).to_bytes(4, "big") + b"\x00\x01\x00\x00" + \
        called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32


def test_the_ae_titles_are_read_from_the_request_header():
    assert association_aes(_request("PACSFLOW", "ORTHANC")) == ("PACSFLOW", "ORTHANC")
    assert association_aes(_request("PACSFLOW", "ORTHANC")[:41]) is None  # not all there yet
    assert association_aes(b"\x04" + _request("A", "B")[1:]) is None  # a P-DATA-TF is no request
    assert association_aes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b" " * 20) is None


def test_the_reject_pdu_is_the_standard_one():
    # PS3.8 9.3.4: type 03, length 4, result 1 (permanent), source 1 (service user), reason
    assert associate_reject(3) == bytes.fromhex("03000000000400010103")


def test_uids_are_masked_in_storescp_messages():
    line = b"E: cannot create file: /x/incoming/a00000001/CT.1.2.826.0.1.3680043.8.498.1234"
    assert masked(line) == "E: cannot create file: /x/incoming/a00000001/CT.<uid>"


def test_auto_takes_dcmtk_when_installed_and_tls_is_off(tmp_path):
    settings = load_settings(state_root=tmp_path)
    expected = ReceiverEngine.DCMTK if shutil.which("storescp") else ReceiverEngine.PYNETDICOM
    assert chosen_engine(settings.receiver) is expected
    tls = load_settings(state_root=tmp_path, receiver={"tls": {"cert": str(tmp_path / "c.pem")}})
    assert chosen_engine(tls.receiver) is ReceiverEngine.PYNETDICOM
    with pytest.raises(SettingsError, match="engine dcmtk does not take receiver.tls"):
        load_settings(receiver={"engine": "dcmtk", "tls": {"cert": str(tmp_path / "c.pem")}})


@pytest.mark.skipif(shutil.which("storescp") is None, reason="DCMTK storescp not installed")
def test_a_connection_that_asks_for_no_association_is_closed_and_starts_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pacsflow")
    settings = load_settings(state_root=tmp_path, receiver={"port": free_port(), "engine": "dcmtk"})
    writer = StagingWriter(tmp_path / "staging", lambda uid: "s" + uid[-8:])
    receiver = StorageReceiver.for_run(settings, writer)
    assert isinstance(receiver, NativeReceiver)
    with receiver:
        with socket.create_connection(("127.0.0.1", settings.receiver.port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: pacsflow\r\n\r\n" + b" " * 64)
            try:
                answer = conn.recv(64)
            except ConnectionResetError:  # closed with our bytes unread: the kernel resets
                answer = b""
            assert answer == b""  # no answer, no association
        deadline = time.monotonic() + 5
        while "sent no A-ASSOCIATE-RQ" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.drain(1) and list((tmp_path / "incoming").iterdir()) == []
    assert "sent no A-ASSOCIATE-RQ" in caplog.text
    assert not (tmp_path / "incoming").exists()  # removed at stop


def test_a_study_the_writer_forgot_is_refused_at_the_staging_boundary(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    writer = StagingWriter(tmp_path / "staging", lambda uid: "s" + uid[-8:])
    writer.expect([study])
    writer.announce(study, [sop])
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    shutil.copy(source, first)
    shutil.copy(source, second)
    assert writer.take_file(first) and writer.staged(study, [sop]) == {sop} and not first.exists()
    writer.forget(study)  # its retrieval ended
    assert not writer.take_file(second) and not second.exists()
    assert writer.refused == {"unexpected_study": 1}
