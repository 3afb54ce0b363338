"""An incremental ``multipart/related`` reader (RFC 2046 / 2387, as STOW-RS bodies use it).

Neither Starlette nor FastAPI parse multipart bodies without ``python-multipart``, which reads
``multipart/form-data`` only. This reader is fed the request body chunk by chunk and yields each
part's headers, then its bytes as they come, then its end: a body is never held whole, only a
window of one delimiter's length across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

MAX_HEADER_BYTES = 16 * 1024


class MalformedMultipart(ValueError):
    """The body does not follow the multipart syntax; the message names no content."""


@dataclass(frozen=True)
class PartHeaders:
    headers: dict[str, str]  # names in lower case


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = Union[PartHeaders, PartData, PartEnd]

_PREAMBLE, _DELIMITER_LINE, _HEADERS, _BODY, _DONE = range(5)


class MultipartReader:
    """Feed it chunks with :meth:`feed`; call :meth:`close` once the body ended."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 70:
            raise MalformedMultipart("the multipart boundary is missing or longer than 70 characters")
        # A CRLF is put in front of the body, so the first delimiter looks like every other one.
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self.parts = 0

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buffer += chunk
        while True:
            events = self._step()
            if events is None:
                return
            yield from events

    def close(self) -> None:
        if self._state != _DONE:
            raise MalformedMultipart("the body ended before its closing boundary")

    def _step(self) -> list[Event] | None:
        """One move of the state machine: its events (perhaps none), or None when it needs more
        bytes."""
        buf = self._buffer
        if self._state == _PREAMBLE:
            at = buf.find(self._delimiter)
            if at < 0:
                del buf[:max(0, len(buf) - len(self._delimiter))]
                return None
            del buf[:at + len(self._delimiter)]
            self._state = _DELIMITER_LINE
            return []
        if self._state == _DELIMITER_LINE:
            return self._delimiter_line()
        if self._state == _HEADERS:
            return self._headers()
        if self._state == _BODY:
            return self._body()
        buf.clear()  # the epilogue is ignored
        return None

    def _delimiter_line(self) -> list[Event] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        if buf[:2] == b"--":
            self._state = _DONE
            return []
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > 256:
                raise MalformedMultipart("a boundary line is not followed by a line break")
            return None
        if buf[:end].strip(b" \t"):
            raise MalformedMultipart("text follows a boundary on its line")
        del buf[:end + 2]
        self._state = _HEADERS
        return []

    def _headers(self) -> list[Event] | None:
        buf = self._buffer
        if buf[:2] == b"\r\n":
            block, rest = b"", 2
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MalformedMultipart("a part's headers are longer than 16 KiB")
                return None
            block, rest = bytes(buf[:end]), end + 4
        headers: dict[str, str] = {}
        for line in block.decode("latin-1").split("\r\n") if block else []:
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise MalformedMultipart("a part header line has no name")
            headers[name.strip().lower()] = value.strip()
        del buf[:rest]
        self._state = _BODY
        self.parts += 1
        return [PartHeaders(headers)]

    def _body(self) -> list[Event] | None:
        buf = self._buffer
        at = buf.find(self._delimiter)
        if at >= 0:
            data = bytes(buf[:at])
            del buf[:at + len(self._delimiter)]
            self._state = _DELIMITER_LINE
            return [PartData(data), PartEnd()] if data else [PartEnd()]
        keep = len(self._delimiter) - 1  # a delimiter may straddle two chunks
        if len(buf) <= keep:
            return None
        data = bytes(buf[:len(buf) - keep])
        del buf[:len(buf) - keep]
        return [PartData(data)]
