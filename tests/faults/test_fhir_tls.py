"""Issue 15, item 10 (FHIR part): the FHIR client over TLS with a private CA and a client certificate,
against the real HAPI server behind an in-process TLS front (HAPI itself serves plain HTTP here).
Trust and certificate problems are configuration errors in one line naming the setting, never retried."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from pacsflow.tasks.core.errors import FhirConfigurationError
from pacsflow.tasks.fhir.client import FhirClient
from pacsflow.tasks.settings import FhirSettings
from tests.faults.pki import make_pki
from tests.helpers import free_port
from tests.integration.test_fhir_sync import FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_front(hapi, pki):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED  # the server insists on our client certificate
    proxy = FaultProxy(hapi.base_url, free_port(), tls=context).start()
    try:
        yield proxy
    finally:
        proxy.close()


def _metadata(settings: FhirSettings) -> dict:
    with FhirClient.from_settings(settings, max_retries=2, backoff_s=0) as client:
        return client.metadata()


def test_fhir_over_tls_with_a_private_ca_and_a_client_certificate(tls_front, pki):
    settings = FhirSettings(base_url=tls_front.base_url, ca_bundle=pki / "ca.pem", client_cert=pki / "client.pem",
                            client_key=pki / "client.key")
    assert _metadata(settings)["resourceType"] == "CapabilityStatement"
    assert len(tls_front.requests) == 1


def test_an_untrusted_server_certificate_names_ca_bundle(tls_front, pki):
    settings = FhirSettings(base_url=tls_front.base_url, client_cert=pki / "client.pem", client_key=pki / "client.key")
    with pytest.raises(FhirConfigurationError, match="not trusted.*fhir.ca_bundle") as err:
        _metadata(settings)
    assert "\n" not in str(err.value) and tls_front.requests == []  # refused, not retried


def test_a_missing_client_certificate_names_client_cert(tls_front, pki):
    settings = FhirSettings(base_url=tls_front.base_url, ca_bundle=pki / "ca.pem")
    with pytest.raises(FhirConfigurationError, match="fhir.client_cert") as err:
        _metadata(settings)
    assert "\n" not in str(err.value)


def test_an_unreadable_ca_bundle_names_the_setting(tmp_path):
    settings = FhirSettings(base_url="https://127.0.0.1:9/fhir", ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(FhirConfigurationError, match="fhir.ca_bundle: cannot load"):
        FhirClient.from_settings(settings)
