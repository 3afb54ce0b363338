"""The counting proxy of the association-cap test counts connections open at once as the client
made them: one closed right before the next opens is not counted twice, three open are three."""

from __future__ import annotations

import socket
import threading
import time

from tests.net.counting_proxy import CountingProxy


def _echo_server() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def _ask(conn: socket.socket) -> bytes:
    conn.sendall(b"ping")
    return conn.recv(4096)


def test_a_connection_closed_before_the_next_opens_is_not_counted_with_it():
    listener, port = _echo_server()
    with listener, CountingProxy(port, latency_s=0.02) as proxy:
        held = socket.create_connection(("127.0.0.1", proxy.port))
        assert _ask(held) == b"ping"
        for _ in range(50):  # one after another beside ``held``: never three at once
            with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
                assert _ask(conn) == b"ping"
        assert (proxy.most_at_once, proxy.connections) == (2, 51)

        extra = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
        for conn in extra:
            assert _ask(conn) == b"ping"
        assert proxy.most_at_once == 3 and len(proxy.overlaps(3)) >= 1
        for conn in [held, *extra]:
            conn.close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", proxy.port)) as conn:  # the others are gone by now
            assert _ask(conn) == b"ping"
        assert len(proxy.overlaps(1)[-1]) == 1
