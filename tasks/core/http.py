"""What our HTTP clients (FHIR, XDS) share: backoff with jitter, ``Retry-After``, and TLS from
settings. A certificate file that cannot be used, or a failed handshake, is configuration naming
the setting to fix, not an outage: retrying would fail the same way.

Plain ``ssl`` and ``email.utils``: each client owns its httpx session and passes header values and
exceptions here. ``settings`` is any settings section with ``ca_bundle``, ``client_cert`` and
``client_key`` (``fhir``, ``xdsi``); ``prefix`` is its name in messages.
"""

from __future__ import annotations

import email.utils
import random
import ssl
import time
from typing import Any, Self


class ClosingClient:
    """``close()`` and the context manager of a client that owns an httpx session in ``_http``."""

    _http: Any

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def session_options(settings: Any, prefix: str, error: type[Exception]) -> dict[str, Any]:
    """A client's keyword arguments from a settings section: TLS, ``timeout_s``, ``max_retries``,
    ``retry_backoff_s`` and ``retry_max_delay_s``."""
    return {"verify": tls_context(settings, prefix, error), "timeout_s": settings.timeout_s,
            "max_retries": settings.max_retries, "backoff_s": settings.retry_backoff_s,
            "max_delay_s": settings.retry_max_delay_s}


def backoff_delay(attempt: int, backoff_s: float, max_delay_s: float, retry_after: float | None = None) -> float:
    """The wait before retry ``attempt + 1``: the server's Retry-After if given, else exponential
    backoff with jitter (0.5x to 1.5x); capped at ``max_delay_s`` either way."""
    if retry_after is not None:
        return min(retry_after, max_delay_s)
    return min(backoff_s * 2.0 ** attempt * (0.5 + random.random()), max_delay_s)


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds from now; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def tls_reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__)


def tls_context(settings: Any, prefix: str, error: type[Exception]) -> ssl.SSLContext | bool:
    """The TLS context for ``<prefix>.ca_bundle`` / ``client_cert`` / ``client_key``; True (the
    system's CAs, no client certificate) when none is set. Unusable files raise ``error``."""
    if settings.ca_bundle is None and settings.client_cert is None:
        return True
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
    except (OSError, ssl.SSLError) as exc:
        raise error(f"{prefix}.ca_bundle: cannot load {settings.ca_bundle} ({tls_reason(exc)})") from None
    if settings.client_cert is not None:
        try:
            context.load_cert_chain(str(settings.client_cert),
                                    str(settings.client_key) if settings.client_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise error(f"{prefix}.client_cert / {prefix}.client_key: cannot load them ({tls_reason(exc)})") from None
    return context


def raise_for_tls(exc: BaseException, what: str, prefix: str, error: type[Exception]) -> None:
    """Raises ``error`` when a transport failure was TLS (trust, client certificate); returns
    otherwise, so the caller treats it as an outage."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        raise error(f"{what}: the server's TLS certificate is not trusted ({cause.verify_message}); "
                    f"set {prefix}.ca_bundle") from None
    if cause is not None:
        raise error(f"{what}: TLS handshake failed ({tls_reason(cause)}); check {prefix}.client_cert / "
                    f"{prefix}.client_key and the server's TLS settings") from None
