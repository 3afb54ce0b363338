"""File bodies without copying them through Python: the ASGI *Zero Copy Send* extension
(``http.response.zerocopysend``), offered by :class:`ZeroCopyApp` when uvicorn serves it.

uvicorn does not implement the extension. Without it a WADO-RS retrieval reads every file into
Python and hands the bytes to ``socket.send``, which copies them into the kernel: about 1 s of
CPU per GB of the 1.6 s the server spent (README, "DICOMweb"). Under uvicorn's h11 protocol on
plain TCP the connection's transport is at hand, and asyncio's ``loop.sendfile`` moves a file's
bytes from the page cache to the socket with ``sendfile(2)``. The body must be chunked (a
response without Content-Length to an HTTP/1.1 client, which is how h11 frames it), so each file
goes out as one chunk: its size line, the file, the line end; h11 never sees those bytes and
closes the body with its own last chunk as usual.

Each send is a system call, and on loopback also the receiver's work, so a file costs one write
and one ``sendfile``: a message may carry ``head``, bytes that go out in the same chunk before the
file (a multipart part's head; a pacsflow addition to the extension's message), and a chunk's line
end waits to go out with whatever is written next.

Anything else (TLS, HTTP/1.0, another server, the test client) gets no extension, and the
response falls back to reading the file (:class:`pacsflow.tasks.web.multipart.FilePartsResponse`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any, BinaryIO

from starlette import types as asgi

EXTENSION = "http.response.zerocopysend"
SEND_BUFFER = 4 << 20


class ZeroCopyUnavailable(RuntimeError):
    """A zero-copy body was sent on a response it cannot frame (one with a Content-Length)."""


def _connection(send: asgi.Send) -> tuple[Any, asyncio.Transport] | None:
    """uvicorn's h11 request cycle behind ``send`` and its transport, when a file can go out of
    it with ``sendfile(2)``: plain TCP (TLS encrypts in user space) and an HTTP/1.1 client."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    conn = getattr(cycle, "conn", None)
    if transport is None or conn is None or not hasattr(cycle, "flow"):
        return None
    if getattr(conn, "their_http_version", None) != b"1.1":
        return None
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("socket") is None:
        return None
    return cycle, transport


class ZeroCopyApp:
    """Wraps an ASGI app: requests that arrive through a connection able to send files with
    ``sendfile(2)`` carry the extension in ``scope["extensions"]``."""

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        found = _connection(send) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        cycle, transport = found
        _widen_send_buffer(transport)
        chunked, line_end = False, b""

        async def sending(message: asgi.Message) -> None:
            nonlocal chunked, line_end
            if message["type"] == "http.response.start":
                chunked = not any(name.lower() == b"content-length" for name, _ in message.get("headers", ()))
            if message["type"] != EXTENSION:
                if line_end:
                    transport.write(line_end)
                    line_end = b""
                await send(message)
                return
            if not chunked:
                raise ZeroCopyUnavailable("a zero-copy body needs a response without Content-Length")
            sent = await _send_chunk(cycle, transport, line_end, message.get("head", b""), message["file"],
                                     message.get("offset"), message.get("count"))
            line_end = b"\r\n" if sent else b""
            if not message.get("more_body", False):
                await sending({"type": "http.response.body", "body": b"", "more_body": False})

        extensions = {**(scope.get("extensions") or {}), EXTENSION: {}}
        await self.app({**scope, "extensions": extensions}, receive, sending)


def _widen_send_buffer(transport: asyncio.Transport) -> None:
    """A send buffer that takes a whole file of a few MiB in one ``sendfile(2)``: Linux's own
    sizing starts at 16 KiB and grows only as the connection goes on."""
    sock = transport.get_extra_info("socket")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER // 2)


async def _send_chunk(cycle: Any, transport: asyncio.Transport, line_end: bytes, head: bytes, file: BinaryIO,
                      offset: int | None, count: int | None) -> bool:
    """``head`` and then ``count`` bytes of ``file`` from ``offset`` (default: the rest of it) as
    one chunk, after ``line_end`` (the last chunk's). True when a chunk went out, whose own line
    end the caller writes next."""
    offset = offset or 0
    if count is None:
        count = os.fstat(file.fileno()).st_size - offset
    count = max(count, 0)
    if cycle.disconnected:
        raise ConnectionResetError("the client went away")
    await cycle.flow.drain()  # as uvicorn's own send: wait while the client reads slower than we write
    if not head and not count:  # an empty chunk would end the body
        if line_end:
            transport.write(line_end)
        return False
    transport.write(line_end + b"%x\r\n" % (len(head) + count) + head)
    if count:
        sent = _sendfile_now(transport, file, offset, count)
        if sent < count:
            sent += await asyncio.get_running_loop().sendfile(transport, file, offset + sent, count - sent)
        if sent != count:  # the file shrank under us: the chunk's size line promised more
            transport.close()
            raise ConnectionAbortedError(f"sent {sent} of {count} bytes of a file that changed while it was sent")
    return True


def _sendfile_now(transport: asyncio.Transport, file: BinaryIO, offset: int, count: int) -> int:
    """What ``sendfile(2)`` puts into the socket's buffer right away (0 while the transport still
    holds bytes of its own). ``loop.sendfile`` waits for the socket to be writable again even
    after a call that sent everything: one more round of the event loop per file. Only what
    does not fit in the buffer now is left to it."""
    if transport.get_write_buffer_size():
        return 0
    fd, sent = transport.get_extra_info("socket").fileno(), 0
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sent < count and (n := os.sendfile(fd, file.fileno(), offset + sent, count - sent)):
            sent += n
    return sent
