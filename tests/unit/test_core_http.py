"""What the HTTP clients share (pacsflow.tasks.core.http): backoff, Retry-After, TLS settings."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacsflow.tasks.core.errors import XdsConfigurationError
from pacsflow.tasks.core.http import backoff_delay, retry_after_s, session_options, tls_context


@dataclass
class _Section:
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout_s: float = 3.0
    max_retries: int = 2
    retry_backoff_s: float = 0.5
    retry_max_delay_s: float = 8.0


def test_backoff_doubles_with_jitter_and_is_capped():
    for attempt, base in enumerate([1.0, 2.0, 4.0]):
        assert 0.5 * base <= backoff_delay(attempt, 1.0, 100.0) <= 1.5 * base
    assert backoff_delay(10, 1.0, 7.0) == 7.0
    assert backoff_delay(0, 1.0, 7.0, retry_after=3.0) == 3.0
    assert backoff_delay(0, 1.0, 7.0, retry_after=30.0) == 7.0


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_s("12") == 12.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (retry_after_s(later) or 0) <= 61
    assert retry_after_s(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0


def test_no_tls_files_means_the_system_cas():
    assert tls_context(_Section(), "xdsi", XdsConfigurationError) is True


def test_unusable_files_name_the_setting(tmp_path):
    with pytest.raises(XdsConfigurationError, match=r"^xdsi\.ca_bundle: cannot load"):
        tls_context(_Section(ca_bundle=tmp_path / "none.pem"), "xdsi", XdsConfigurationError)
    with pytest.raises(XdsConfigurationError, match=r"^xdsi\.client_cert / xdsi\.client_key: cannot load"):
        tls_context(_Section(client_cert=tmp_path / "none.pem"), "xdsi", XdsConfigurationError)


def test_session_options():
    assert session_options(_Section(), "xdsi", XdsConfigurationError) == {
        "verify": True, "timeout_s": 3.0, "max_retries": 2, "backoff_s": 0.5, "max_delay_s": 8.0}
