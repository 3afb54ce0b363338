"""Storage Commitment against real peers: Orthanc (which reports on an association of its own to the
AE it has registered for us) and pynetdicom SCPs that never report or report on the same association."""

from __future__ import annotations

import datetime as dt
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.pacs.commitment import CommitmentReportSCP
from pacsflow.tasks.pacs.sender import StoreSender
from pacsflow.tasks.route.forwarder import Forwarder
from pacsflow.tasks.route.outbox import Backoff, DeliveryState, Outbox
from pacsflow.tasks.route.rules import Destination, RoutingRules
from pacsflow.tasks.settings import load_settings
from tests.helpers import free_port

pytestmark = pytest.mark.integration
CALLING_AE = "PACSFLOW"
COMMITMENT = "1.2.840.10008.1.20.1"


def Dest(name: str, ae_title: str, host: str, port: int) -> Destination:
    return Destination(name=name, ae_title=ae_title, host=host, port=port, max_associations=1,
                       storage_commitment=True)


def _samples(tmp_path: Path, seed: int = 7) -> dict[str, Path]:
    """SOP Instance UID -> file of one small sample study."""
    sampledata.generate(tmp_path / "in", studies=1, series_per_study=(1, 1), instances_per_series=(3, 3), days=1,
                        end_date=dt.date.today(), seed=seed, rows=16, cols=16)
    return {str(read_file_meta_info(p).MediaStorageSOPInstanceUID): p for p in sorted((tmp_path / "in").rglob("*.dcm"))}


def _queued(tmp_path: Path, destination: str) -> tuple[Outbox, dict[str, Path]]:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    files = _samples(tmp_path)
    for sop, path in files.items():
        outbox.enqueue(destination, sop, "ref-a", path)
    return outbox, files


def _wait(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def committing_orthanc(orthanc_factory):
    """An Orthanc that commits for PACSFLOW and sends its reports to PACSFLOW at a port of ours."""
    port = free_port()
    us = {"AET": CALLING_AE, "Host": "127.0.0.1", "Port": port, "AllowStore": True, "AllowEcho": True,
          "AllowStorageCommitment": True}
    server = orthanc_factory(extra={"DicomModalities": {CALLING_AE: us}})
    version = server.client.get("/system").json()["Version"]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 6), version  # Storage Commitment SCP since 1.6
    return server, port


def test_orthanc_reports_on_its_own_association_and_only_then_rows_are_delivered(committing_orthanc, tmp_path):
    server, port = committing_orthanc
    outbox, files = _queued(tmp_path, "main")
    forwarder = Forwarder(outbox, {"main": Dest("main", server.aet, "127.0.0.1", server.dicom_port)}, CALLING_AE,
                          Backoff(1, 10, 3), timeout_s=30)
    seen: list[tuple[int, int]] = []  # (rows committing, rows delivered) when each report arrived

    def on_report(report):
        depth = outbox.depth()["main"]
        seen.append((depth[DeliveryState.COMMITTING], depth[DeliveryState.DELIVERED]))
        forwarder.on_commitment_report(report)

    with CommitmentReportSCP(CALLING_AE, "127.0.0.1", port, [server.aet], on_report):
        assert forwarder.deliver_due() == 0  # stored is not delivered yet
        _wait(lambda: outbox.depth()["main"][DeliveryState.DELIVERED] == len(files))
    assert seen == [(len(files), 0)]
    assert server.instance_count() == len(files)
    assert {r.transaction_uid for r in outbox.rows("main")} and all(r.last_error is None for r in outbox.rows("main"))
    assert forwarder.totals[("main", "committing")] == len(files) == forwarder.totals[("main", "delivered")]


def test_an_object_orthanc_does_not_hold_is_reported_failed_and_dead(committing_orthanc, tmp_path):
    server, port = committing_orthanc
    outbox = Outbox(tmp_path / "outbox.sqlite")
    files = _samples(tmp_path)
    (kept_sop, kept), (missing_sop, missing) = list(files.items())[:2]
    dest = Dest("main", server.aet, "127.0.0.1", server.dicom_port)
    sender = StoreSender(CALLING_AE, dest.ae_title, dest.host, dest.port, 30)
    assert [r.delivered for r in sender.send([kept])] == [True]  # the other one never reaches Orthanc
    outbox.enqueue("main", kept_sop, "ref-a", kept)
    outbox.enqueue("main", missing_sop, "ref-a", missing)
    rows = {r.sop_uid: r for r in outbox.claim("main", 10)}
    outbox.committing({r.id: sop for sop, r in rows.items()}, "2.25.4242", time.time() + 600)
    forwarder = Forwarder(outbox, {"main": dest}, CALLING_AE, Backoff(1, 10, 3), timeout_s=30)
    with CommitmentReportSCP(CALLING_AE, "127.0.0.1", port, [server.aet], forwarder.on_commitment_report):
        sender.request_commitment("2.25.4242", [(str(read_file_meta_info(p).MediaStorageSOPClassUID), sop)
                                                for sop, p in ((kept_sop, kept), (missing_sop, missing))])
        _wait(lambda: not outbox.awaiting("2.25.4242"))
    after = {r.sop_uid: r for r in outbox.rows("main")}
    assert after[kept_sop].state is DeliveryState.DELIVERED
    assert after[missing_sop].state is DeliveryState.DEAD  # 0x0112 no such object: permanent
    assert "0x0112" in after[missing_sop].last_error and missing_sop not in after[missing_sop].last_error


def test_a_report_from_an_ae_that_is_not_a_destination_is_refused(committing_orthanc, tmp_path):
    server, port = committing_orthanc
    got = []
    with CommitmentReportSCP(CALLING_AE, "127.0.0.1", port, ["OTHERPACS"], got.append):
        ae = AE(ae_title=server.aet)
        ae.add_requested_context(COMMITMENT)
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLING_AE)
        assert assoc.is_rejected and got == []


@contextmanager
def _commitment_peer(report_on_same_association: bool):
    """A pynetdicom Storage and Storage Commitment SCP (AE ``PEER``) that answers N-ACTION with
    success and then reports on the same association, or never."""
    actions = []
    ae = AE(ae_title="PEER")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(COMMITMENT, scu_role=True, scp_role=True)

    def report_later(assoc, info):
        time.sleep(0.3)  # after the N-ACTION response
        report = info.__class__()
        report.TransactionUID = info.TransactionUID
        report.ReferencedSOPSequence = info.ReferencedSOPSequence
        assoc.send_n_event_report(report, 1, COMMITMENT, "1.2.840.10008.1.20.1.1")

    def on_action(event):
        info = event.action_information
        actions.append((event.request.ActionTypeID, info))
        if report_on_same_association:
            threading.Thread(target=report_later, args=(event.assoc, info), daemon=True).start()
        return 0x0000, None

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000), (evt.EVT_N_ACTION, on_action)])
    try:
        yield port, actions
    finally:
        server.shutdown()


def test_no_report_by_the_deadline_sends_again_under_a_new_transaction(tmp_path):
    outbox, files = _queued(tmp_path, "peer")
    with _commitment_peer(report_on_same_association=False) as (port, actions):
        forwarder = Forwarder(outbox, {"peer": Dest("peer", "PEER", "127.0.0.1", port)}, CALLING_AE,
                              Backoff(30, 60, 3), timeout_s=10, commitment_timeout_s=600)
        t0 = time.time()
        assert forwarder.deliver_due(t0) == 0
        [(action_type, info)] = actions
        assert action_type == 1
        assert {item.ReferencedSOPInstanceUID for item in info.ReferencedSOPSequence} == set(files)
        assert {str(item.ReferencedSOPClassUID) for item in info.ReferencedSOPSequence} == {
            str(read_file_meta_info(p).MediaStorageSOPClassUID) for p in files.values()}
        rows = outbox.rows("peer")
        assert {(r.state, r.transaction_uid, r.commit_by) for r in rows} == {
            (DeliveryState.COMMITTING, str(info.TransactionUID), rows[0].commit_by)}
        assert t0 + 599 <= rows[0].commit_by <= t0 + 601
        forwarder.deliver_due(t0 + 599)
        assert outbox.depth()["peer"][DeliveryState.COMMITTING] == len(files)  # still waiting
        forwarder.deliver_due(t0 + 601)  # overdue: queued again, not due yet
        rows = outbox.rows("peer")
        assert {(r.state, r.attempts) for r in rows} == {(DeliveryState.QUEUED, 1)}
        assert "no storage commitment report" in rows[0].last_error and "PEER@127.0.0.1" in rows[0].last_error
        forwarder.deliver_due(t0 + 700)
        assert len(actions) == 2 and actions[1][1].TransactionUID != info.TransactionUID
        assert outbox.depth()["peer"][DeliveryState.COMMITTING] == len(files)


def test_a_report_on_the_same_association_is_taken(tmp_path):
    outbox, files = _queued(tmp_path, "peer")
    with _commitment_peer(report_on_same_association=True) as (port, actions):
        forwarder = Forwarder(outbox, {"peer": Dest("peer", "PEER", "127.0.0.1", port)}, CALLING_AE,
                              Backoff(30, 60, 3), timeout_s=10)
        forwarder.deliver_due()  # waits on the association until the report came
    assert len(actions) == 1
    assert outbox.depth()["peer"][DeliveryState.DELIVERED] == len(files)


def test_a_destination_that_commits_needs_the_commitment_port(tmp_path):
    from pacsflow.flows.listen import commitment_aes
    from pacsflow.tasks.core.errors import PacsConfigurationError

    rules = RoutingRules.model_validate({"destinations": {
        "archive": {"ae_title": "ARCH", "host": "127.0.0.1", "port": 104, "storage_commitment": True},
        "main": {"ae_title": "MAIN", "host": "127.0.0.1", "port": 105}}})
    with pytest.raises(PacsConfigurationError, match="archive.*listener.commitment_port"):
        commitment_aes(rules, load_settings(state_root=tmp_path))
    assert commitment_aes(rules, load_settings(state_root=tmp_path, listener={"commitment_port": 11115})) == ["ARCH"]
