"""The fault proxy the outage tests rely on: forwards, refuses, cuts, swallows, and forwards again."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionError:  # the proxy reset it: expected in these tests
            pass


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FaultProxy("127.0.0.1", server.server_address[1]) as running:
            yield running
    finally:
        server.shutdown()
        server.server_close()


def echo(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        return sock.recv(65536)


def test_forwards_both_ways(proxy: FaultProxy) -> None:
    assert echo(proxy.port) == b"ping"
    big = bytes(range(256)) * 4096  # 1 MB, in many reads
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(big)
        received = b""
        while len(received) < len(big):
            received += sock.recv(1 << 20)
    assert received == big


def test_an_outage_refuses_new_connections_and_resets_open_ones(proxy: FaultProxy) -> None:
    open_one = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    open_one.sendall(b"before")
    assert open_one.recv(100) == b"before"
    with proxy.outage():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        try:
            cut = open_one.recv(100) == b""
        except ConnectionResetError:
            cut = True
        assert cut
    open_one.close()
    assert echo(proxy.port, b"after") == b"after"  # the same port forwards again


def test_a_blackhole_answers_nothing(proxy: FaultProxy) -> None:
    proxy.blackhole()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.settimeout(0.2)
        sock.sendall(b"anyone?")
        with pytest.raises(TimeoutError):
            sock.recv(100)
    proxy.accept()
    assert echo(proxy.port) == b"ping"
