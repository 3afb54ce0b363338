"""Delivery through the outbox to real peers: Orthanc, DCMTK storescp, and a pynetdicom SCP that
answers chosen failure statuses."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.pacs.sender import DestinationUnavailable, StoreSender
from pacsflow.tasks.route.forwarder import Forwarder
from pacsflow.tasks.route.outbox import Backoff, DeliveryState, Outbox
from tests.helpers import dcmtk_env, free_port

pytestmark = pytest.mark.integration
CALLING_AE = "PACSFLOW"  # registered at the test Orthancs (modality PACSFLOW at 127.0.0.1)


@dataclass(frozen=True)
class Dest:
    name: str
    ae_title: str
    host: str
    port: int
    max_associations: int = 2
    storage_commitment: bool = False


def _enqueue_samples(outbox: Outbox, destination: str, tmp_path: Path, studies: int = 2) -> dict[str, Path]:
    """Sample studies' files queued for ``destination``: SOP Instance UID -> file."""
    sampledata.generate(tmp_path / "in", studies=studies, series_per_study=(1, 2), instances_per_series=(2, 4),
                        days=1, end_date=dt.date.today(), seed=61, rows=32, cols=32)
    files = {}
    for path in sorted((tmp_path / "in").rglob("*.dcm")):
        sop = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        assert outbox.enqueue(destination, sop, f"ref-{path.parent.parent.name[-6:]}", path)
        files[sop] = path
    return files


def _orthanc_sops(server) -> set[str]:
    return {server.client.get(f"/instances/{iid}/content/0008-0018").text.strip("\0 ")
            for iid in server.client.get("/instances").json()}


def _wait(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_queued_objects_reach_orthanc_exactly_once(orthanc_factory, tmp_path):
    server = orthanc_factory()
    outbox = Outbox(tmp_path / "listener" / "outbox.sqlite")
    files = _enqueue_samples(outbox, "main", tmp_path)
    stuck = outbox.claim("main", 3)  # a previous process died while sending these
    outbox = Outbox(outbox.path)
    dest = Dest("main", server.aet, "127.0.0.1", server.dicom_port)
    forwarder = Forwarder(outbox, {"main": dest}, CALLING_AE, Backoff(1, 10, 3), timeout_s=30, batch=4).start()
    try:
        _wait(lambda: outbox.depth()["main"][DeliveryState.DELIVERED] == len(files))
    finally:
        forwarder.stop()
    assert len(stuck) == 3 and _orthanc_sops(server) == set(files)
    assert server.instance_count() == len(files)
    # A crash and restart: the same objects queued again are not sent again.
    assert not any(outbox.enqueue("main", sop, "ref", path) for sop, path in files.items())
    assert forwarder.deliver_due() == 0
    assert outbox.depth()["main"] == {**dict.fromkeys(DeliveryState, 0), DeliveryState.DELIVERED: len(files)}


def test_a_down_destination_backs_off_dead_letters_then_retry_delivers(orthanc_factory, tmp_path):
    server = orthanc_factory(start=False)  # its port is closed until it starts
    outbox = Outbox(tmp_path / "outbox.sqlite")
    files = _enqueue_samples(outbox, "archive", tmp_path, studies=1)
    dest = Dest("archive", server.aet, "127.0.0.1", server.dicom_port)
    forwarder = Forwarder(outbox, {"archive": dest}, CALLING_AE, Backoff(30, 120, 3), timeout_s=10)
    t0 = time.time()
    assert forwarder.deliver_due(t0) == 0
    rows = outbox.rows("archive")
    assert {(r.state, r.attempts) for r in rows} == {(DeliveryState.QUEUED, 1)}
    assert all(t0 + 22 <= r.next_at <= t0 + 31 for r in rows)  # 30 s, upper-quarter jitter
    assert f"{server.aet}@127.0.0.1:{server.dicom_port}" in rows[0].last_error
    assert "routing rules" in rows[0].last_error
    assert forwarder.deliver_due(t0 + 1) == 0 and outbox.rows("archive")[0].attempts == 1  # not due yet
    forwarder.deliver_due(t0 + 100)
    forwarder.deliver_due(t0 + 1000)
    assert outbox.depth()["archive"][DeliveryState.DEAD] == len(files)
    assert forwarder.deliver_due(t0 + 100_000) == 0  # dead rows wait for the operator

    server.start(timeout_s=30)
    assert outbox.retry("archive") == len(files)
    forwarder.start()
    try:
        _wait(lambda: outbox.depth()["archive"][DeliveryState.DELIVERED] == len(files))
    finally:
        forwarder.stop()
    assert _orthanc_sops(server) == set(files)


COMPRESSED_AND_NOT = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm",
                      "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm"]


@pytest.fixture
def storescp(tmp_path):
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK storescp missing")
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "ARCHIVE2", "-od", str(out), "+xa", "+B", "+uf", str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _echo(port), timeout_s=10)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _echo(port: int) -> bool:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE2")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def _dataset_bytes(path: Path) -> tuple[str, str, bytes]:
    meta, offset = split_dataset(path)
    return str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID), path.read_bytes()[offset:]


def test_storescp_receives_compressed_and_uncompressed_files_byte_identical(storescp, tmp_path):
    port, out = storescp
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sent = [Path(get_testdata_file(name)) for name in COMPRESSED_AND_NOT]
    for path in sent:  # several share a SOP Instance UID (one object, several encodings): keyed by name
        outbox.enqueue("archive2", path.name, "ref-test", path)
    forwarder = Forwarder(outbox, {"archive2": Dest("archive2", "ARCHIVE2", "127.0.0.1", port)}, CALLING_AE,
                          Backoff(1, 10, 3), timeout_s=30)
    assert forwarder.deliver_due() == len(sent)
    received = {(sop, ts): data for sop, ts, data in map(_dataset_bytes, sorted(out.iterdir()))}
    assert len(received) == len(sent)
    for path in sent:
        sop, ts, data = _dataset_bytes(path)
        assert received[(sop, ts)] == data, path.name


@contextmanager
def _scp(contexts, on_store, handlers=()):
    """An in-process pynetdicom Storage SCP (AE ``PEER``) on a free port."""
    ae = AE(ae_title="PEER")
    ae.supported_contexts = contexts
    ae.maximum_associations = 20
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), *handlers])
    try:
        yield port
    finally:
        server.shutdown()


@pytest.fixture
def faulty_scp():
    """A Storage SCP answering each object with the status its SOP Instance UID's last digit picks."""
    statuses = {"1": 0xA700, "2": 0xC000, "3": 0xA900, "4": 0xB000, "5": 0x0000}
    seen: list[str] = []
    lock = threading.Lock()

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock:
            seen.append(uid)
        return statuses[uid[-1]]

    with _scp(AllStoragePresentationContexts, on_store) as port:
        yield port, seen


def _copies_with_uids(tmp_path: Path, endings) -> dict[str, Path]:
    out = {}
    for end in endings:
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1{end}"
        path = tmp_path / f"{end}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[ds.SOPInstanceUID] = path
    return out


def test_store_failures_are_transient_or_permanent_per_object(faulty_scp, tmp_path):
    port, seen = faulty_scp
    outbox = Outbox(tmp_path / "outbox.sqlite")
    files = _copies_with_uids(tmp_path, "12345")
    broken = tmp_path / "6.dcm"
    broken.write_bytes(b"not DICOM at all")
    for sop, path in [*files.items(), ("1.2.6", broken)]:
        outbox.enqueue("faulty", sop, "ref-f", path)
    forwarder = Forwarder(outbox, {"faulty": Dest("faulty", "PEER", "127.0.0.1", port)}, CALLING_AE,
                          Backoff(60, 600, 5), timeout_s=30)
    assert forwarder.deliver_due() == 2  # success and warning
    assert sorted(seen) == sorted(files)
    by_end = {r.sop_uid[-1]: r for r in outbox.rows("faulty")}
    assert {end: (r.state, r.attempts) for end, r in by_end.items()} == {
        "1": (DeliveryState.QUEUED, 1),  # out of resources: later
        "2": (DeliveryState.DEAD, 1),  # cannot understand
        "3": (DeliveryState.DEAD, 1),  # data set does not match SOP class
        "4": (DeliveryState.DELIVERED, 0),
        "5": (DeliveryState.DELIVERED, 0),
        "6": (DeliveryState.DEAD, 1),  # no DICOM file: never sent, alone refused
    }
    assert "0xA700" in by_end["1"].last_error and "PEER@127.0.0.1" in by_end["1"].last_error
    assert "0xC000" in by_end["2"].last_error
    assert all(sop not in (r.last_error or "") for r in by_end.values() for sop in files)


def test_an_uncompressed_file_goes_in_the_syntax_the_peer_accepts_a_compressed_one_is_refused(tmp_path):
    received = []

    def on_store(event):
        received.append((str(event.context.transfer_syntax), event.dataset.PixelData))
        return 0x0000

    ct, jpeg = Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    implicit_only = [build_context(CTImageStorage, ImplicitVRLittleEndian),
                     build_context(SecondaryCaptureImageStorage, ImplicitVRLittleEndian)]
    with _scp(implicit_only, on_store) as port:
        first, second = StoreSender(CALLING_AE, "PEER", "127.0.0.1", port, 30).send([ct, jpeg])
    assert first.delivered and first.status == 0
    assert received == [(ImplicitVRLittleEndian, dcmread(ct).PixelData)]
    assert second.permanent and second.status is None
    assert "SOP class 1.2.840.10008.5.1.4.1.1.7 in transfer syntax 1.2.840.10008.1.2.4.50" in str(second.error)


def test_workers_keep_to_the_destinations_association_limit(tmp_path):
    lock = threading.Lock()
    open_now, peak, stored = [0], [0], []

    def opened(event):
        with lock:
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])

    def closed(event):
        with lock:
            open_now[0] -= 1

    def on_store(event):
        time.sleep(0.02)
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    outbox = Outbox(tmp_path / "outbox.sqlite")
    files = _copies_with_uids(tmp_path, [f"{i:02d}5" for i in range(40)])
    for sop, path in files.items():
        outbox.enqueue("peer", sop, "ref-p", path)
    handlers = [(evt.EVT_ACCEPTED, opened), (evt.EVT_RELEASED, closed), (evt.EVT_ABORTED, closed)]
    with _scp(AllStoragePresentationContexts, on_store, handlers) as port:
        dest = Dest("peer", "PEER", "127.0.0.1", port, max_associations=3)
        forwarder = Forwarder(outbox, {"peer": dest}, CALLING_AE, Backoff(1, 10, 3), timeout_s=30, batch=4).start()
        try:
            _wait(lambda: outbox.depth()["peer"][DeliveryState.DELIVERED] == len(files))
        finally:
            forwarder.stop()
    assert sorted(stored) == sorted(files)  # each exactly once
    assert 1 < peak[0] <= 3  # concurrent, never beyond max_associations


def test_an_unreachable_destination_raises_naming_it(tmp_path):
    port = free_port()
    sender = StoreSender(CALLING_AE, "NOBODY", "127.0.0.1", port, 5)
    with pytest.raises(DestinationUnavailable, match=f"NOBODY@127.0.0.1:{port}.*listener.ae_title"):
        sender.send([Path(get_testdata_file("CT_small.dcm"))])
