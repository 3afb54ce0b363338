"""Issue 15, item 6 (the PACS part): a PACS that will not talk to us is named in one line that says
which setting to check, and "refused us" is not reported as "timed out". Against a real Orthanc."""

from __future__ import annotations

import time

import pytest

from pacsflow.tasks.core.errors import PacsConfigurationError, PacsUnavailable
from pacsflow.tasks.pacs.client import PacsClient
from pacsflow.tasks.settings import PacsSettings, load_settings
from tests.helpers import free_port

pytestmark = pytest.mark.integration

TIMEOUT_S = 20


@pytest.fixture(scope="module")
def orthanc(orthanc_factory):
    return orthanc_factory()


def _client(port: int, calling_ae: str = "PACSFLOW", called_ae: str = "ORTHANC") -> PacsClient:
    return PacsClient(load_settings(calling_ae=calling_ae,
                                    pacs=PacsSettings(port=port, called_ae=called_ae, timeout_s=TIMEOUT_S)))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 300
    return text


def test_an_unknown_calling_ae_is_named_and_not_a_timeout(orthanc):
    started = time.monotonic()
    with pytest.raises(PacsConfigurationError) as err:
        _client(orthanc.dicom_port, calling_ae="STRANGER").find_studies("20260101-20261231")
    assert time.monotonic() - started < TIMEOUT_S / 2
    text = _one_line(err.value)
    assert "calling AE 'STRANGER'" in text and "calling_ae" in text and "timed out" not in text


def test_a_wrong_called_ae_names_the_ae_titles(orthanc):
    with pytest.raises(PacsConfigurationError) as err:
        _client(orthanc.dicom_port, called_ae="NOTTHEPACS").find_studies("20260101-20261231")
    assert "NOTTHEPACS" in _one_line(err.value) and "AE titles" in str(err.value)


def test_a_wrong_port_names_host_and_port():
    port = free_port()
    with pytest.raises(PacsUnavailable) as err:
        _client(port).echo()
    assert f"127.0.0.1:{port}" in _one_line(err.value)
