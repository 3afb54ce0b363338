"""The MLLP server with real sockets on loopback: framing, several messages per connection, size cap,
allow-list, TLS, a clean stop."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
import time

import pytest

from pacsflow.tasks.hl7.mllp import (
    Hl7ConfigurationError,
    MllpServer,
    MllpThread,
    frame,
    is_allowed,
    peer_networks,
    server_tls_context,
)

MSG = b"MSH|^~\\&|SND|FAC|PACSFLOW|FAC|20260101120000||ADT^A08|CTRL%d|P|2.5\rPID|1||123^^^HOSP||Doe^Jane\r"


class Recorder:
    """A handler that keeps what it got and answers ``ACK:<n>``; ``delay`` holds each message."""

    def __init__(self, delay: float = 0.0) -> None:
        self.got: list[bytes] = []
        self.delay = delay
        self.started = threading.Event()

    def __call__(self, raw: bytes) -> bytes:
        self.started.set()
        time.sleep(self.delay)
        self.got.append(raw)
        return b"ACK:%d" % len(self.got)


def _read_frame(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    assert data.startswith(b"\x0b")
    return data[1:-2]


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def serve():
    running = []

    def start(handler, **options):
        thread = MllpThread(MllpServer(handler, host="127.0.0.1", port=0, **options))
        port = thread.start()
        running.append(thread)
        return port

    yield start
    for thread in running:
        thread.stop()


def test_several_messages_on_one_connection_in_order_even_split_across_packets(serve):
    handler = Recorder()
    port = serve(handler)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(frame(MSG % 1))
        assert _read_frame(sock) == b"ACK:1"
        data = frame(MSG % 2) + b"\r\n" + frame(MSG % 3)  # a newline between frames is tolerated
        for i in range(0, len(data), 7):
            sock.sendall(data[i:i + 7])
        assert [_read_frame(sock), _read_frame(sock)] == [b"ACK:2", b"ACK:3"]
    assert handler.got == [MSG % 1, MSG % 2, MSG % 3]


def test_an_oversize_message_gets_the_refusal_and_the_connection_closes(serve, caplog):
    handler = Recorder()
    refused = []

    def refuse(head: bytes, reason: str) -> bytes:
        refused.append((head[:40], reason))
        return b"AR"

    port = serve(handler, max_message_bytes=1024, refuse=refuse)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(frame(MSG % 1 + b"NTE|1||" + b"x" * 5000 + b"\r"))
        assert _read_frame(sock) == b"AR"
        assert _closed(sock)
    assert handler.got == []
    assert refused == [((MSG % 1)[:40], "message larger than hl7.max_message_kb")]
    with socket.create_connection(("127.0.0.1", port)) as sock:  # the server still serves
        sock.sendall(frame(MSG % 2))
        assert _read_frame(sock) == b"ACK:1"


def test_bytes_outside_a_frame_close_the_connection(serve):
    handler = Recorder()
    port = serve(handler)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(MSG % 1 + b"\x1c\r")  # no start block
        assert _closed(sock)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"\x0bMSH|partial\x0b" + frame(MSG % 2))  # a start block inside a frame
        assert _closed(sock)
    assert handler.got == []


def test_a_peer_outside_the_allow_list_is_closed_before_anything_is_read(serve, caplog):
    handler = Recorder()
    port = serve(handler, allowed_peers=["10.0.0.0/8"])
    with caplog.at_level(logging.WARNING, logger="pacsflow.hl7.mllp"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(frame(MSG % 1))
            assert _closed(sock)
    assert handler.got == []
    assert "127.0.0.1 refused: not in hl7.allowed_peers" in caplog.text and "Doe" not in caplog.text


def test_the_allow_list_rules():
    assert peer_networks([]) == peer_networks(["127.0.0.0/8", "::1"])
    nets = peer_networks(["192.168.1.0/24", "2001:db8::1"])
    assert is_allowed("192.168.1.20", nets) and is_allowed("::ffff:192.168.1.20", nets)
    assert is_allowed("2001:db8::1", nets)
    assert not is_allowed("192.168.2.1", nets) and not is_allowed("127.0.0.1", nets)
    assert not is_allowed("not-an-ip", nets)


def test_stop_lets_a_message_being_handled_answer(serve):
    handler = Recorder(delay=0.5)
    thread = MllpThread(MllpServer(handler, host="127.0.0.1", port=0))
    port = thread.start()
    with socket.create_connection(("127.0.0.1", port)) as busy, \
            socket.create_connection(("127.0.0.1", port)) as idle:
        busy.sendall(frame(MSG % 1))
        assert handler.started.wait(5)
        thread.stop()
        assert _read_frame(busy) == b"ACK:1"
        assert _closed(busy) and _closed(idle)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_tls(serve, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    handler = Recorder()
    port = serve(handler, ssl_context=server_tls_context(cert, key))
    client = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            client.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(frame(MSG % 1))
        assert _read_frame(sock) == b"ACK:1"
    assert handler.got == [MSG % 1]
    with socket.create_connection(("127.0.0.1", port)) as plain:  # plain MLLP on a TLS port goes nowhere
        plain.sendall(frame(MSG % 2))
        assert _closed(plain)
    assert handler.got == [MSG % 1]
    with pytest.raises(Hl7ConfigurationError, match="hl7.tls_key: cannot load"):
        server_tls_context(cert, tmp_path / "missing.pem")


def test_a_port_in_use_is_raised_by_start(serve):
    port = serve(Recorder())
    with pytest.raises(OSError):
        MllpThread(MllpServer(Recorder(), host="127.0.0.1", port=port)).start()
