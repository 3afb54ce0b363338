"""A TCP proxy in front of a PACS's DICOM port that counts the connections open through it at once
and keeps the highest count: every association our processes open to the PACS (C-ECHO, C-FIND,
C-MOVE, C-GET) is one connection, so the highest count is the most associations the PACS saw from
us at once. Connections the PACS opens itself (C-MOVE's C-STORE sub-operations to our receivers)
do not pass through it.

Each answer after a request is held back ``latency_s`` (one round trip per request/response
exchange), so that short associations last long enough to overlap and a missing cap shows.

A connection counts from its accept until both of its directions have closed, the longer of the
two views: a cap that holds here holds for the PACS.

    with CountingProxy(orthanc.dicom_port, latency_s=0.04) as proxy:
        ... PACSFLOW_PACS__PORT=proxy.port ...
        assert proxy.most_at_once <= 2
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class CountingProxy:
    def __init__(self, upstream_port: int, latency_s: float = 0.0, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_s = latency_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.open_now = 0
        self.most_at_once = 0
        self.connections = 0  # every connection accepted so far
        self._accepting = threading.Thread(target=self._accept, daemon=True, name="counting-proxy")
        self._accepting.start()

    def __enter__(self) -> "CountingProxy":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the highest count so far (it restarts from the connections open now)."""
        with self._lock:
            self.most_at_once = self.open_now

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()  # the PACS is down: our side sees its connection refused as a reset
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self.open_now += 1
                self.most_at_once = max(self.most_at_once, self.open_now)
            link = _Link(client, upstream, self.latency_s, self._closed)
            threading.Thread(target=link.pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=link.pump, args=(upstream, client, False), daemon=True).start()

    def _closed(self) -> None:
        with self._lock:
            self.open_now -= 1


class _Link:
    """One proxied connection: two pumps; the answer to each request waits ``latency_s``."""

    def __init__(self, client: socket.socket, upstream: socket.socket, latency_s: float, on_closed) -> None:
        self.sockets = (client, upstream)
        self.latency_s = latency_s
        self.asked = False
        self.pumps_left = 2
        self._lock = threading.Lock()
        self._on_closed = on_closed

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
                for s in self.sockets:
                    s.close()
                self._on_closed()
