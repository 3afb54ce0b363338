"""Issue 15, item 10 (DICOM part): our associations with the PACS and our Storage SCP over TLS,
against real peers: DCMTK's TLS tools (``storescu +tls``, ``storescp +tls``) and Orthanc with
DICOM TLS on both sides of a C-MOVE.

Certificates come from a private CA made for the module (``trusted``) and from a second one that
nobody trusts (``rogue``). A trust or certificate problem is a one-line configuration error
naming the setting to fix, never "cannot reach the PACS"; a peer without a trusted certificate
stores nothing.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.deployments.local.orthanc import render_config
from pacsflow.tasks.core.errors import PacsConfigurationError
from pacsflow.tasks.pacs import tls
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver, count_staged
from pacsflow.tasks.settings import Settings, load_settings
from tests.faults.pki import make_pki
from tests.helpers import dcmtk_env, free_port

pytestmark = pytest.mark.integration

PACS_AE = "ORTHANC"
RECEIVER_AE = "PACSFLOW"


@pytest.fixture(scope="module")
def trusted(tmp_path_factory) -> Path:
    if shutil.which("storescp") is None or shutil.which("storescu") is None:
        pytest.skip("DCMTK tools missing")
    return make_pki(tmp_path_factory.mktemp("trusted"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("rogue"))


def _folder_name(study_uid: str) -> str:
    return "s" + hashlib.sha256(study_uid.encode()).hexdigest()[:16]


# -- our Storage SCP, DCMTK storescu as the PACS ------------------------------------------------
class TlsSite:
    """Our receiver with TLS that requires a client certificate of the trusted CA, as a run sets it up."""

    def __init__(self, root: Path, pki: Path) -> None:
        [self.study] = sampledata.generate(root / "in", studies=1, days=1, seed=11, modalities=("CT",))
        self.settings = load_settings(
            pacs={"called_ae": PACS_AE},
            receiver={"ae_title": RECEIVER_AE, "port": free_port(),
                      "tls": {"cert": pki / "server.pem", "key": pki / "server.key", "ca_bundle": pki / "ca.pem"}},
            state_root=root / "state",
        )
        self.writer = StagingWriter(root / "state" / "staging", _folder_name)
        self.writer.expect([self.study.study_uid])
        self.receiver = StorageReceiver.for_run(self.settings, self.writer)

    def files(self) -> list[Path]:
        return sorted(Path(self.study.path).rglob("*.dcm"))

    def staged(self) -> int:
        return count_staged(self.writer.study_dir(self.study.study_uid))

    def storescu(self, *tls_args: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = ["storescu", "-aet", PACS_AE, "-aec", RECEIVER_AE, *map(str, tls_args),
               "127.0.0.1", str(self.settings.receiver.port), *map(str, self.files())]
        return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=60)


def _dcmtk_tls(pki: Path, name: str, ca: Path) -> list[str | Path]:
    return ["+tls", pki / f"{name}.key", pki / f"{name}.pem", "+cf", ca / "ca.pem"]


@pytest.fixture
def tls_site(tmp_path, trusted, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="pacsflow")
    monkeypatch.setattr(tls, "HANDSHAKE_TIMEOUT_S", 1.0)
    site = TlsSite(tmp_path, trusted)
    with site.receiver:
        yield site


def test_dcmtk_stores_over_tls_into_the_receiver(tls_site, trusted):
    sent = tls_site.storescu(*_dcmtk_tls(trusted, "client", trusted))
    assert sent.returncode == 0, sent.stderr[-800:]
    assert tls_site.staged() == tls_site.study.n_instances == len(tls_site.files())


def test_peers_without_tls_or_a_trusted_certificate_stage_nothing(tls_site, trusted, rogue, caplog):
    plain = tls_site.storescu()
    untrusted = tls_site.storescu(*_dcmtk_tls(rogue, "client", trusted))  # trusts us; we do not trust it
    anonymous = tls_site.storescu("+tla", "+cf", trusted / "ca.pem")  # TLS without a client certificate
    assert all(p.returncode != 0 for p in (plain, untrusted, anonymous))
    assert tls_site.staged() == 0 and tls_site.writer.rejected == 0  # refused before any DICOM
    assert caplog.text.count("receiver refused a TLS connection") >= 3
    # ... and the receiver still serves a trusted peer afterwards
    assert tls_site.storescu(*_dcmtk_tls(trusted, "client", trusted)).returncode == 0
    assert tls_site.staged() == tls_site.study.n_instances


def test_a_silent_connection_does_not_hold_up_the_receiver(tls_site, trusted):
    with socket.create_connection(("127.0.0.1", tls_site.settings.receiver.port)):  # says nothing
        time.sleep(0.2)
        started = time.monotonic()
        sent = tls_site.storescu(*_dcmtk_tls(trusted, "client", trusted))
    assert sent.returncode == 0, sent.stderr[-800:]
    assert tls_site.staged() == tls_site.study.n_instances
    assert time.monotonic() - started < 15


# -- our PACS client, DCMTK storescp +tls as the PACS -------------------------------------------
@pytest.fixture
def tls_scp(tmp_path, trusted):
    """DCMTK's storescp with TLS, requiring a client certificate of the trusted CA; it answers C-ECHO."""
    port = free_port()
    out = tmp_path / "scp.log"
    with out.open("w") as log_file:
        proc = subprocess.Popen(
            ["storescp", "-v", "-aet", PACS_AE, "+tls", trusted / "server.key", trusted / "server.pem",
             "+cf", trusted / "ca.pem", "-od", str(tmp_path), str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=dcmtk_env())
    _wait_listening(port, proc)
    try:
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, "storescp exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("storescp did not start listening")


def _client_settings(port: int, **tls_settings) -> Settings:
    return load_settings(pacs={"called_ae": PACS_AE, "port": port, "timeout_s": 10,
                               "tls": {"enabled": True, **tls_settings}})


def test_echo_over_tls_with_a_client_certificate(tls_scp, trusted):
    port, scp_log = tls_scp
    PacsClient(_client_settings(port, ca_bundle=trusted / "ca.pem", client_cert=trusted / "client.pem",
                                client_key=trusted / "client.key")).echo()
    time.sleep(0.3)
    assert "Received Echo Request" in scp_log.read_text()


def _refusal(settings: Settings) -> str:
    started = time.monotonic()
    with pytest.raises(PacsConfigurationError) as err:
        PacsClient(settings).echo()
    assert time.monotonic() - started < 5  # a refusal, not a timeout
    message = str(err.value)
    assert "\n" not in message and "cannot reach" not in message
    return message


def test_an_untrusted_pacs_certificate_names_ca_bundle(tls_scp, trusted, rogue):
    port, scp_log = tls_scp
    message = _refusal(_client_settings(port, ca_bundle=rogue / "ca.pem", client_cert=trusted / "client.pem",
                                        client_key=trusted / "client.key"))
    assert "not trusted" in message and "pacs.tls.ca_bundle" in message
    assert "Received Echo Request" not in scp_log.read_text()


def test_a_certificate_for_another_name_names_server_name(tls_scp, trusted):
    port, _ = tls_scp
    certs = {"ca_bundle": trusted / "ca.pem", "client_cert": trusted / "client.pem",
             "client_key": trusted / "client.key"}
    message = _refusal(_client_settings(port, server_name="pacs.example.org", **certs))
    assert "'pacs.example.org'" in message and "pacs.tls.server_name" in message
    PacsClient(_client_settings(port, server_name="pacs.example.org", check_hostname=False, **certs)).echo()


def test_a_pacs_that_wants_our_certificate_names_client_cert(tls_scp, trusted):
    port, scp_log = tls_scp
    message = _refusal(_client_settings(port, ca_bundle=trusted / "ca.pem"))
    assert "TLS handshake failed" in message and "pacs.tls.client_cert" in message
    assert "Received Echo Request" not in scp_log.read_text()


def test_unusable_certificate_files_name_the_setting_at_run_start(tmp_path, trusted):
    with pytest.raises(PacsConfigurationError, match=r"^pacs\.tls\.client_key: cannot load"):
        tls.check_tls_files(_client_settings(4242, client_cert=trusted / "client.pem",
                                             client_key=trusted / "server.key"))  # not client.pem's key
    with pytest.raises(PacsConfigurationError, match=r"^receiver\.tls\.ca_bundle: cannot load"):
        tls.check_tls_files(load_settings(receiver={"tls": {"cert": trusted / "server.pem",
                                                            "key": trusted / "server.key",
                                                            "ca_bundle": tmp_path / "missing.pem"}}))


# -- end to end: Orthanc with DICOM TLS, C-FIND and C-MOVE into our TLS receiver ----------------
def test_find_and_move_over_tls_with_orthanc(orthanc_factory, tmp_path, trusted):
    receiver_port = free_port()
    server = orthanc_factory(receiver_port=receiver_port, start=False)
    modalities = render_config(server.cfg)["DicomModalities"]
    modalities[RECEIVER_AE]["UseDicomTls"] = True
    server.cfg.extra.update({
        "DicomModalities": modalities,
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(trusted / "server.pem"),
        "DicomTlsPrivateKey": str(trusted / "server.key"),
        "DicomTlsTrustedCertificates": str(trusted / "ca.pem"),
        "DicomTlsRemoteCertificateRequired": True,
    })
    server.start(timeout_s=30)
    [study] = sampledata.generate(tmp_path / "in", studies=1, days=1, seed=13, modalities=("CT",))
    for path in sorted(Path(study.path).rglob("*.dcm")):  # seeded over HTTP: its DICOM port speaks TLS only
        server.client.post("/instances", content=path.read_bytes()).raise_for_status()
    certs = {"ca_bundle": trusted / "ca.pem", "client_cert": trusted / "client.pem", "client_key": trusted / "client.key"}
    settings = load_settings(
        pacs={"port": server.dicom_port, "http_url": server.rest_url, "tls": {"enabled": True, **certs}},
        receiver={"port": receiver_port, "tls": {"cert": trusted / "server.pem", "key": trusted / "server.key",
                                                  "ca_bundle": trusted / "ca.pem"}},
        state_root=tmp_path / "state",
    )
    client = PacsClient(settings)
    [found] = client.find_study(study.study_uid)
    assert found.n_instances == study.n_instances
    writer = StagingWriter(settings.staging_dir, _folder_name)
    writer.expect([study.study_uid])
    with StorageReceiver.for_run(settings, writer):
        ops = client.move_study(study.study_uid, RECEIVER_AE, "ref")
    assert ops.completed == study.n_instances
    assert count_staged(writer.study_dir(study.study_uid)) == study.n_instances
    # the same Orthanc refuses us without our certificate, in one line naming the setting
    no_cert = settings.pacs.model_copy(update={"tls": settings.pacs.tls.model_copy(update={"client_cert": None,
                                                                                          "client_key": None})})
    with pytest.raises(PacsConfigurationError, match="pacs.tls.client_cert"):
        PacsClient(settings.model_copy(update={"pacs": no_cert})).echo()
