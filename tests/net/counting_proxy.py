"""A TCP proxy in front of a PACS's DICOM port that counts our connections open at once and keeps
the highest count: every association our processes open to the PACS (C-ECHO, C-FIND, C-MOVE,
C-GET) is one connection, so the highest count is the most associations of ours at once.
Connections the PACS opens itself (C-MOVE's C-STORE sub-operations to our receivers) do not pass
through it.

Each answer after a request is held back ``latency_s`` (one round trip per request/response
exchange), so that short associations last long enough to overlap and a missing cap shows.

A connection is open from its accept until our side closes it, as the kernel saw it: when a
connection is accepted, the others are counted by peeking at their sockets, not by what the pump
threads have got round to, so a process that closes one association and opens the next at once
is never counted twice (the close reached the proxy's socket before the next connect).

    with CountingProxy(orthanc.dicom_port, latency_s=0.04) as proxy:
        ... PACSFLOW_PACS__PORT=proxy.port ...
        assert proxy.most_at_once <= 2
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self


class CountingProxy:
    def __init__(self, upstream_port: int, latency_s: float = 0.0, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_s = latency_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self.most_at_once = 0
        self.connections = 0  # every connection accepted so far
        self.spans: list[list[float]] = []  # per connection [opened, closed], monotonic; closed 0 while open
        threading.Thread(target=self._accept, daemon=True, name="counting-proxy").start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._listener.close()

    def overlaps(self, at_least: int) -> list[list[tuple[float, float]]]:
        """Each accept that found ``at_least`` connections open, itself included: their (opened,
        closed) times in seconds from the first connection (for a failure's message)."""
        with self._lock:
            spans = [(a, b or time.monotonic()) for a, b in self.spans]
        t0 = spans[0][0] if spans else 0.0
        found = [[(round(x - t0, 3), round(y - t0, 3)) for x, y in spans if x <= a < y] for a, _ in spans]
        return [f for f in found if len(f) >= at_least]

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener was closed
            while True:
                self._serve(self._listener.accept()[0])

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()  # the PACS is down: our side sees the connection reset
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream, self.latency_s, self._gone)
        with self._lock:
            for other in list(self._links):
                other.see_close()
            self._links.add(link)
            self.connections += 1
            self.spans.append(link.span)
            self.most_at_once = max(self.most_at_once, sum(1 for x in self._links if not x.span[1]))
        link.start()

    def _gone(self, link: _Link) -> None:
        with self._lock:  # under the lock: a socket of a link being looked at is not closed meanwhile
            link.see_close()
            self._links.discard(link)
            for s in link.sockets:
                s.close()


class _Link:
    """One proxied connection: two pumps; the answer to each request waits ``latency_s``."""

    def __init__(self, client: socket.socket, upstream: socket.socket, latency_s: float, gone) -> None:
        self.sockets = (client, upstream)
        self.latency_s = latency_s
        self.span = [time.monotonic(), 0.0]
        self.asked = False
        self.pumps_left = 2
        self._lock = threading.Lock()
        self._gone = gone

    def start(self) -> None:
        client, upstream = self.sockets
        threading.Thread(target=self.pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self.pump, args=(upstream, client, False), daemon=True).start()

    def see_close(self) -> None:
        """Mark the link closed if our side has closed it: an end of stream (or a reset) waiting on
        its socket. Nothing else can wait there: our side closes only after the release's answer,
        so the pump has read all it sent."""
        if self.span[1]:
            return
        try:
            ended = self.sockets[0].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            ended = False
        except OSError:
            ended = True
        if ended:
            self.span[1] = time.monotonic()

    def pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while data := src.recv(65536):
                if request:
                    self.asked = True
                elif self.asked:
                    self.asked = False
                    time.sleep(self.latency_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in self.sockets:  # one side gone: the other goes too
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self.pumps_left -= 1
                last = self.pumps_left == 0
            if last:
                self._gone(self)
