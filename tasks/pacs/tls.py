"""TLS for DICOM associations: the ``ssl`` contexts of our PACS client and of our Storage SCP,
built from ``pacs.tls`` and ``receiver.tls`` (TLS 1.2 or later), and the one-line errors a
failed handshake becomes.

Plain ``ssl`` only: the client and the receiver hand these contexts to pynetdicom. A file that
cannot be used, or a handshake that fails, is a configuration error naming the setting to fix:
retrying would fail the same way.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any, Callable

from pacsflow.tasks.core.errors import PacsConfigurationError
from pacsflow.tasks.settings import PacsSettings, ReceiverSettings, Settings

log = logging.getLogger(__name__)

# A peer that opens a connection and never completes the handshake must not hold up the next one:
# pynetdicom wraps accepted sockets in its accept loop.
HANDSHAKE_TIMEOUT_S = 10.0

# OpenSSL's verify codes for a certificate that does not name the host (or IP address) we dialled.
_NAME_MISMATCH = {62, 64}


class _WatchedSocket(ssl.SSLSocket):
    """Keeps the connection's first TLS error on its context. pynetdicom logs a failed handshake and
    reports only "no association"; this is how the client tells a trust problem from an outage."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            self._note(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # TLS 1.3 servers refuse a client certificate after our side of the handshake is done: the
        # alert arrives with the first read.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._note(exc)
            raise

    def _note(self, exc: ssl.SSLError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.failure is None:
            context.failure = exc


class ClientContext(ssl.SSLContext):
    """A client context for one association; ``failure`` is the TLS error that ended it, if any."""

    sslsocket_class = _WatchedSocket
    failure: ssl.SSLError | None = None


class ReceiverContext(ssl.SSLContext):
    """A server context whose handshakes time out, and whose refusals are logged (not raised
    silently inside pynetdicom's accept loop)."""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        previous = sock.gettimeout()
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except (ssl.SSLError, OSError) as exc:
            log.warning("receiver refused a TLS connection: %s", tls_reason(exc))
            sock.close()
            raise
        wrapped.settimeout(previous)
        return wrapped


def tls_reason(exc: BaseException) -> str:
    """OpenSSL's short reason (e.g. CERTIFICATE_VERIFY_FAILED), never a path or a certificate's subject."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__)


def _load(setting: str, path: Path | None, load: Callable[..., None], *args: Any) -> None:
    try:
        load(*args)
    except (OSError, ssl.SSLError) as exc:
        raise PacsConfigurationError(f"{setting}: cannot load {path} ({tls_reason(exc)})") from None


def client_context(pacs: PacsSettings) -> ClientContext:
    """A new context for one association with the PACS (``pacs.tls``)."""
    tls = pacs.tls
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.ca_bundle is not None:
        _load("pacs.tls.ca_bundle", tls.ca_bundle, context.load_verify_locations, str(tls.ca_bundle))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.client_cert is not None:
        key = str(tls.client_key) if tls.client_key else None
        setting = "pacs.tls.client_key" if tls.client_key else "pacs.tls.client_cert"
        _load(setting, tls.client_key or tls.client_cert, context.load_cert_chain, str(tls.client_cert), key)
    return context


def server_name(pacs: PacsSettings) -> str:
    """The name the PACS's certificate must carry (``pacs.tls.server_name``, else ``pacs.host``)."""
    return pacs.tls.server_name or pacs.host


def receiver_context(receiver: ReceiverSettings) -> ReceiverContext | None:
    """The context of our Storage SCP (``receiver.tls``); None when TLS is off."""
    tls = receiver.tls
    if tls.cert is None:
        return None
    context = ReceiverContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    setting = "receiver.tls.key" if tls.key else "receiver.tls.cert"
    _load(setting, tls.key or tls.cert, context.load_cert_chain, str(tls.cert), str(tls.key) if tls.key else None)
    if tls.ca_bundle is not None:
        _load("receiver.tls.ca_bundle", tls.ca_bundle, context.load_verify_locations, str(tls.ca_bundle))
        context.verify_mode = ssl.CERT_REQUIRED if tls.verifies_peers else ssl.CERT_OPTIONAL
    return context


def check_tls_files(settings: Settings) -> None:
    """At run start: every configured certificate, key and CA file loads (or a one-line error
    naming the setting), before any association or listening socket depends on it."""
    if settings.pacs.tls.enabled:
        client_context(settings.pacs)
    receiver_context(settings.receiver)


def handshake_error(exc: ssl.SSLError, pacs: PacsSettings) -> PacsConfigurationError:
    """What a failed handshake with the PACS means, naming the setting to look at."""
    peer = f"PACS {pacs.called_ae}@{pacs.host}:{pacs.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCH:
            return PacsConfigurationError(
                f"{peer}: its TLS certificate does not name {server_name(pacs)!r} ({tls_reason(exc)}); "
                "set pacs.tls.server_name to the name it carries (or pacs.tls.check_hostname)")
        return PacsConfigurationError(
            f"{peer}: its TLS certificate is not trusted ({tls_reason(exc)}); check pacs.tls.ca_bundle")
    return PacsConfigurationError(
        f"{peer}: TLS handshake failed ({tls_reason(exc)}); check pacs.tls.client_cert / pacs.tls.client_key "
        "and that pacs.port is the PACS's TLS port")
