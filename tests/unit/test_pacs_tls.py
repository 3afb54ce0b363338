"""The TLS contexts of our PACS client and Storage SCP, built from settings (no sockets), and what a
failed handshake becomes. Certificates come from a private CA made with the openssl command line."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from pacsflow.tasks.core.errors import PacsConfigurationError, is_transient
from pacsflow.tasks.pacs.tls import check_tls_files, client_context, handshake_error, receiver_context, server_name
from pacsflow.tasks.settings import SettingsError, load_settings
from tests.faults.pki import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _pacs(**tls):
    return load_settings(pacs={"host": "10.0.0.5", "tls": {"enabled": True, **tls}}).pacs


def _receiver(**tls):
    return load_settings(receiver={"tls": tls}).receiver


def test_client_context_trusts_the_bundle_and_insists_on_tls_1_2(pki):
    context = client_context(_pacs(ca_bundle=pki / "ca.pem", client_cert=pki / "client.pem",
                                   client_key=pki / "client.key"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", f"pacsflow test CA {pki.name}"),),)]
    assert client_context(_pacs(check_hostname=False)).check_hostname is False
    assert client_context(_pacs()).failure is None  # a new context per association: no failure yet


def test_the_name_checked_is_server_name_else_host():
    assert server_name(_pacs()) == "10.0.0.5"
    assert server_name(_pacs(server_name="pacs.example.org")) == "pacs.example.org"


@pytest.mark.parametrize(
    "tls, setting",
    [
        ({"ca_bundle": "missing.pem"}, "pacs.tls.ca_bundle"),
        ({"client_cert": "client.pem"}, "pacs.tls.client_cert"),  # the key is not in the certificate's file
        ({"client_cert": "client.pem", "client_key": "server.key"}, "pacs.tls.client_key"),  # not its key
        ({"client_cert": "ca.pem", "client_key": "missing.key"}, "pacs.tls.client_key"),
    ],
)
def test_unusable_client_files_name_the_setting(pki, tls, setting):
    with pytest.raises(PacsConfigurationError) as err:
        client_context(_pacs(**{k: pki / v for k, v in tls.items()}))
    assert str(err.value).startswith(f"{setting}: cannot load ") and "\n" not in str(err.value)


def test_receiver_context_verifies_peers_when_it_has_their_ca(pki):
    assert receiver_context(_receiver()) is None
    cert = {"cert": pki / "server.pem", "key": pki / "server.key"}
    assert receiver_context(_receiver(**cert)).verify_mode == ssl.CERT_NONE
    required = receiver_context(_receiver(**cert, ca_bundle=pki / "ca.pem"))
    assert required.verify_mode == ssl.CERT_REQUIRED and required.minimum_version == ssl.TLSVersion.TLSv1_2
    optional = receiver_context(_receiver(**cert, ca_bundle=pki / "ca.pem", require_client_cert=False))
    assert optional.verify_mode == ssl.CERT_OPTIONAL


def test_unusable_receiver_files_name_the_setting(pki, tmp_path):
    with pytest.raises(PacsConfigurationError, match=r"^receiver\.tls\.cert: cannot load .*No such file"):
        receiver_context(_receiver(cert=tmp_path / "missing.pem"))
    with pytest.raises(PacsConfigurationError, match=r"^receiver\.tls\.key: cannot load"):
        receiver_context(_receiver(cert=pki / "server.pem", key=pki / "client.key"))


def test_run_start_check_loads_only_what_is_configured(pki, tmp_path):
    # TLS off: its files are not looked at, even when named
    check_tls_files(load_settings(pacs={"tls": {"ca_bundle": tmp_path / "missing.pem"}}))
    with pytest.raises(PacsConfigurationError, match=r"^pacs\.tls\.ca_bundle"):
        check_tls_files(load_settings(pacs={"tls": {"enabled": True, "ca_bundle": tmp_path / "missing.pem"}}))


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"pacs": {"tls": {"client_key": "k.pem"}}}, "pacs.tls: Value error, client_key is set without client_cert"),
        ({"receiver": {"tls": {"ca_bundle": "ca.pem"}}}, "receiver.tls: Value error, cert is required"),
        ({"receiver": {"tls": {"cert": "c.pem", "require_client_cert": True}}}, "require_client_cert needs ca_bundle"),
    ],
)
def test_inconsistent_tls_settings_are_refused(settings, words):
    with pytest.raises(SettingsError, match=words):
        load_settings(**settings)


def test_tls_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("PACSFLOW_PACS__TLS__ENABLED", "true")
    monkeypatch.setenv("PACSFLOW_RECEIVER__TLS__CERT", "/etc/pacsflow/receiver.pem")
    s = load_settings()
    assert s.pacs.tls.enabled and s.receiver.tls.enabled and not s.receiver.tls.verifies_peers


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code, exc.verify_message = code, message
    return exc


@pytest.mark.parametrize(
    "exc, words",
    [
        (_verify_error(19, "self-signed certificate in certificate chain"),
         "not trusted (self-signed certificate in certificate chain); check pacs.tls.ca_bundle"),
        (_verify_error(64, "IP address mismatch"),
         "does not name '10.0.0.5' (IP address mismatch); set pacs.tls.server_name"),
        (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]"), "TLS handshake failed"),
    ],
)
def test_handshake_errors_name_what_to_fix(exc, words):
    error = handshake_error(exc, _pacs())
    assert isinstance(error, PacsConfigurationError) and not is_transient(error)  # never retried
    assert str(error).startswith("PACS ORTHANC@10.0.0.5:4242: ") and words in str(error)
