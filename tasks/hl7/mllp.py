"""The MLLP server: HL7 v2 messages over TCP (or TLS), framed as 0x0B message 0x1C 0x0D.

A connection may carry many messages; each is handed to ``handle(raw) -> ack`` (run in a worker
thread: it commits to SQLite) and its answer is framed back before the next message is read, so a
sender's messages are handled in the order it sent them. Peers outside ``hl7.allowed_peers`` (by
default loopback only) are closed before a byte is read; a message larger than
``hl7.max_message_kb`` gets the answer of ``refuse(head, reason)`` (an AR built from the header, when
given) and the connection is closed; bytes outside a frame close the connection.

Logs name peers by address, and messages by nothing at all: the handler logs control ids and types.
Stopping (:meth:`MllpServer.close`) stops accepting, lets the messages being handled finish and
answer, and closes idle connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

from pacsflow.tasks.core.errors import PermanentError
from pacsflow.tasks.pacs.tls import tls_reason

log = logging.getLogger("pacsflow.hl7.mllp")

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_HEAD_BYTES = 2048  # enough of an oversize message for its MSH (what an AR copies)

Handler = Callable[[bytes], bytes]
Refuse = Callable[[bytes, str], bytes]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IpNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class Hl7ConfigurationError(PermanentError):
    reason = "hl7-configuration"


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


def peer_networks(allowed: Sequence[str]) -> tuple[IpNetwork, ...]:
    """``hl7.allowed_peers`` as networks; empty means loopback only."""
    return tuple(ipaddress.ip_network(p, strict=False) for p in allowed) or LOOPBACK


def is_allowed(address: str, networks: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def server_tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The TLS context of ``hl7.tls_cert`` / ``hl7.tls_key``; None (plain TCP) without a certificate."""
    if cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        setting = "hl7.tls_key" if key else "hl7.tls_cert"
        raise Hl7ConfigurationError(f"{setting}: cannot load {key or cert} ({tls_reason(exc)})") from None
    return context


class _FramingError(Exception):
    """Bytes outside a frame: the stream cannot be trusted any more."""


class MllpServer:
    """One listening socket on an asyncio loop; use :class:`MllpThread` to run it beside other work."""

    def __init__(self, handle: Handler, *, host: str = "127.0.0.1", port: int = 2575,
                 allowed_peers: Sequence[str] = (), max_message_bytes: int = 1 << 20,
                 ssl_context: ssl.SSLContext | None = None, refuse: Refuse | None = None) -> None:
        self.handle = handle
        self.host, self.port = host, port
        self.networks = peer_networks(allowed_peers)
        self.max_message_bytes = max_message_bytes
        self.ssl_context = ssl_context
        self.refuse = refuse
        self._server: asyncio.Server | None = None
        self._idle: set[asyncio.Task[object]] = set()
        self._connections: set[asyncio.Task[object]] = set()
        self._closing = False

    async def start(self) -> int:
        """Bind and accept; returns the bound port (``port=0``: one the OS picked)."""
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, ssl=self.ssl_context,
            limit=self.max_message_bytes + len(END_BLOCK) + 1)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("MLLP server on %s:%d (%s)", self.host, self.port, "TLS" if self.ssl_context else "TCP")
        return self.port

    async def close(self) -> None:
        """Stop accepting; messages being handled finish and are answered; idle connections close."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._idle):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername") or ("?", 0)
        if not is_allowed(str(peer[0]), self.networks):
            log.warning("MLLP connection from %s refused: not in hl7.allowed_peers", peer[0])
            await _close(writer)
            return
        self._connections.add(task)
        try:
            await self._messages(reader, writer, str(peer[0]))
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception as exc:  # noqa: BLE001 - a handler's bug ends this connection, not the server
            log.error("MLLP connection from %s closed: %s", peer[0], type(exc).__name__)
        finally:
            self._connections.discard(task)
            self._idle.discard(task)
            await _close(writer)

    async def _messages(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._closing:
            self._idle.add(task)
            try:
                raw = await self._read_frame(reader)
            except _FramingError:
                log.warning("MLLP connection from %s closed: bytes outside a frame", peer)
                return
            except asyncio.LimitOverrunError:
                await self._refuse_oversize(reader, writer, peer)
                return
            finally:
                self._idle.discard(task)
            if raw is None:  # the peer closed between messages
                return
            answer = await asyncio.get_running_loop().run_in_executor(None, self.handle, raw)
            writer.write(frame(answer))
            await writer.drain()

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next message, None at a clean end of stream (between frames)."""
        while True:
            byte = await reader.read(1)
            if not byte:
                return None
            if byte == START_BLOCK:
                break
            if byte not in b"\r\n \t":  # some senders put a newline between frames
                raise _FramingError
        data = await reader.readuntil(END_BLOCK)
        body = data[: -len(END_BLOCK)]
        if len(body) > self.max_message_bytes:
            raise asyncio.LimitOverrunError("message too large", len(body))
        if START_BLOCK in body:
            raise _FramingError
        return body

    async def _refuse_oversize(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        log.warning("MLLP message from %s refused: larger than hl7.max_message_kb; connection closed", peer)
        if self.refuse is None:
            return
        head = await reader.read(_HEAD_BYTES)
        writer.write(frame(self.refuse(head, "message larger than hl7.max_message_kb")))
        await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError, OSError):
        pass


class MllpThread:
    """An :class:`MllpServer` on its own event loop in a daemon thread: ``start()`` returns once it
    listens (or raises what binding raised); ``stop()`` returns once it has stopped."""

    def __init__(self, server: MllpServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="mllp", daemon=True)
        self._started: Future[int] = Future()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._started.set_result(self._loop.run_until_complete(self.server.start()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of start()
            self._started.set_exception(exc)
            return
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.close())
        self._loop.close()

    def start(self) -> int:
        self._thread.start()
        return self._started.result()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> "MllpThread":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
