"""Self-test of tests/bench/latency_proxy.py: bytes intact, latency and pacing applied."""

from __future__ import annotations

import hashlib
import os
import socket
import socketserver
import threading
import time

import pytest

from tests.bench.latency_proxy import LatencyProxy, _rate


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = sock.recv(min(65536, n - got))
        assert part, "the proxy closed the connection early"
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def test_bytes_arrive_intact_after_the_round_trip_and_at_the_paced_rate(echo):
    rtt, rate = 0.2, 8e6
    data = os.urandom(2 * 1024 * 1024 + 17)
    with LatencyProxy(echo, rtt=rtt, rate=rate) as proxy, socket.create_connection(proxy.address) as s:
        started = time.monotonic()
        s.sendall(b"x")
        assert _recv_exactly(s, 1) == b"x"
        round_trip = time.monotonic() - started  # the event: the echo of one byte arrived
        sender = threading.Thread(target=s.sendall, args=(data,))
        started = time.monotonic()
        sender.start()
        back = _recv_exactly(s, len(data))
        transfer = time.monotonic() - started
        sender.join(10)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    # Lower bounds only: the proxy never delivers early, however loaded the machine is.
    assert round_trip >= rtt * 0.95  # half the round trip each way, to the echo server and back
    assert transfer >= len(data) / rate * 0.95


def test_a_closing_client_ends_both_directions(echo):
    with LatencyProxy(echo, rtt=0.01, rate=1e9) as proxy, socket.create_connection(proxy.address) as s:
        s.sendall(b"hello")
        assert _recv_exactly(s, 5) == b"hello"
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        assert s.recv(10) == b""  # EOF relayed to the echo server, whose close comes back


def test_rate_parsing():
    assert _rate("50MB") == 50e6 and _rate("10MiB/s") == 10 * 2**20 and _rate("1000") == 1000
