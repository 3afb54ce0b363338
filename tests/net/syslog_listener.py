"""A syslog receiver on loopback for tests: UDP datagrams (RFC 5426) or TCP with octet-counting
framing (RFC 6587), each message kept whole as received, parsed by :func:`parse` (RFC 5424).

    with SyslogListener("tcp") as listener:
        ... audit_url = listener.url ...
        [message] = listener.wait_for(1)
        header, msg = parse(message)
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

_HEADER = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) (?P<timestamp>\S+) (?P<hostname>\S+) "
    rb"(?P<app_name>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|\[.*?\])(?: (?P<msg>.*))?\Z", re.S)
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
                        r"(Z|[+-][0-9]{2}:[0-9]{2})")


@dataclass(frozen=True)
class Header:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str


def parse(message: bytes) -> tuple[Header, bytes]:
    """An RFC 5424 message's header and MSG (BOM included); AssertionError when malformed."""
    match = _HEADER.match(message)
    assert match, "not an RFC 5424 message"
    fields = {k: v.decode("ascii") for k, v in match.groupdict().items() if k != "msg" and v is not None}
    assert _TIMESTAMP.fullmatch(fields["timestamp"]), "not an RFC 3339 timestamp"
    for name in ("hostname", "app_name", "procid", "msgid"):
        assert all(0x21 <= ord(c) <= 0x7E for c in fields[name]), f"{name} is not PRINTUSASCII"
    header = Header(int(fields["pri"]), int(fields["version"]), fields["timestamp"], fields["hostname"],
                    fields["app_name"], fields["procid"], fields["msgid"], fields["sd"])
    return header, match.group("msg") or b""


class SyslogListener:
    """Receives syslog messages on 127.0.0.1 (at ``port``, or a free one) until closed."""

    def __init__(self, transport: str, port: int = 0) -> None:
        assert transport in ("udp", "tcp")
        self.transport = transport
        self.messages: list[bytes] = []
        self.frame_errors: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self._sock = socket.socket(socket.AF_INET, kind)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a test may reopen a closed port
        self._sock.bind(("127.0.0.1", port))
        self._sock.settimeout(0.1)
        if transport == "tcp":
            self._sock.listen()
        self.port = self._sock.getsockname()[1]
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"syslog+{self.transport}://127.0.0.1:{self.port}"

    def _keep(self, message: bytes) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.transport == "udp":
                    self._keep(self._sock.recv(65535))
                    continue
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            thread = threading.Thread(target=self._read_frames, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read_frames(self, conn: socket.socket) -> None:
        """Octet-counted frames: ``MSG-LEN SP SYSLOG-MSG``; anything else is recorded as an error."""
        conn.settimeout(0.1)
        buffer = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:
                    if buffer:
                        self.frame_errors.append("connection closed inside a frame")
                    return
                buffer += chunk
                buffer = self._frames(buffer)

    def _frames(self, buffer: bytes) -> bytes:
        while buffer:
            length, space, rest = buffer.partition(b" ")
            if not space:
                return buffer
            if not length.isdigit() or length.startswith(b"0"):
                self.frame_errors.append("a frame does not start with MSG-LEN SP")
                return b""
            if len(rest) < int(length):
                return buffer
            self._keep(rest[:int(length)])
            buffer = rest[int(length):]
        return buffer

    def wait_for(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """The messages once ``count`` have arrived (then a short wait for unexpected extras)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
        time.sleep(0.2)
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(timeout=2)  # the accepting thread first: then no reader is added
        for thread in self._threads[1:]:
            thread.join(timeout=2)
        self._sock.close()

    def __enter__(self) -> SyslogListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
