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

Anything else (TLS, HTTP/1.0, another server, the test client) gets no extension, and the
response falls back to reading the file (:class:`pacsflow.tasks.web.multipart.FilePartsResponse`).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, BinaryIO

from starlette import types as asgi

EXTENSION = "http.response.zerocopysend"


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
        chunked = False

        async def sending(message: asgi.Message) -> None:
            nonlocal chunked
            if message["type"] == "http.response.start":
                chunked = not any(name.lower() == b"content-length" for name, _ in message.get("headers", ()))
            if message["type"] != EXTENSION:
                await send(message)
                return
            if not chunked:
                raise ZeroCopyUnavailable("a zero-copy body needs a response without Content-Length")
            await _send_chunk(cycle, transport, message["file"], message.get("offset"), message.get("count"))
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        extensions = {**(scope.get("extensions") or {}), EXTENSION: {}}
        await self.app({**scope, "extensions": extensions}, receive, sending)


async def _send_chunk(cycle: Any, transport: asyncio.Transport, file: BinaryIO, offset: int | None,
                      count: int | None) -> None:
    """``count`` bytes of ``file`` from ``offset`` (default: the rest of it) as one chunk."""
    offset = offset or 0
    if count is None:
        count = os.fstat(file.fileno()).st_size - offset
    if count <= 0:
        return
    if cycle.disconnected:
        raise ConnectionResetError("the client went away")
    await cycle.flow.drain()  # as uvicorn's own send: wait while the client reads slower than we write
    transport.write(b"%x\r\n" % count)
    sent = await asyncio.get_running_loop().sendfile(transport, file, offset, count)
    if sent != count:  # the file shrank under us: the chunk's size line promised more
        transport.close()
        raise ConnectionAbortedError(f"sent {sent} of {count} bytes of a file that changed while it was sent")
    transport.write(b"\r\n")
