"""The transport against hostile or broken servers on loopback, spoken to with raw sockets: an
answer cut off mid-body, status lines and headers trickled or ``100 Continue`` sent forever,
compressed answers and bombs, an early 401 over TLS, unusable CA bundles, and token endpoints
that hang, redirect, flood or sit behind a dead proxy. Every wait is bounded; every server is
stopped by its test."""

from __future__ import annotations

import errno
import gzip
import json
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.auth import exceptions as auth_exceptions

from gcsstream import retry
from gcsstream.errors import GcsstreamError, ServiceError, UsageError
from gcsstream.transport import Transport, _token_request
from tests.integration.test_transport import RotatingCredentials
from tests.tls import self_signed_context

HANDLER_TIMEOUT = 10  # every socket a test server holds: no server-side wait is unbounded
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture(autouse=True)
def clean_network_env(monkeypatch):
    """No proxy or CA bundle from the environment changes what is tested."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name.lower() in ("requests_ca_bundle", "curl_ca_bundle"):
            monkeypatch.delenv(name)


# -- a scripted server ---------------------------------------------------------------------------


class Scripted:
    """A raw-socket server on 127.0.0.1: each connection is handed to ``handler(conn, index,
    server)`` on its own thread (``index`` counts from 1), over TLS when ``tls`` is a server
    context. ``stop`` (or leaving the ``with``) closes the listener and every connection."""

    def __init__(self, handler: Callable[[Any, int, Scripted], None], tls: ssl.SSLContext | None = None):
        self.handler = handler
        self.tls = tls
        self.stopping = threading.Event()
        self.accepted = 0
        self.seen: list[Any] = []  # what handlers record
        self.errors: list[BaseException] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)  # the accept loop looks at ``stopping`` this often
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(HANDLER_TIMEOUT)
            # An answer goes out when it is sent: a close right after it (with a request unread,
            # which is a reset) must not find it still held back by Nagle's algorithm.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                thread = threading.Thread(target=self._run, args=(conn, self.accepted), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket, index: int) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.handler(conn, index, self)
        except (OSError, ValueError) as exc:  # the client went away, or the test stopped us
            self.errors.append(exc)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop at once (Linux)
        except OSError:
            pass
        self._acceptor.join(5)
        self.sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv or send
            except OSError:
                pass
            conn.close()
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_head(conn: Any) -> tuple[str, dict[str, str], bytes]:
    """A request's line and headers (lower-case names), and what came after them."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            raise ConnectionError("the client closed before its request's headers")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, rest


def read_request(conn: Any) -> tuple[str, dict[str, str], bytes] | None:
    """One whole request (its Content-Length body too), or None when the client closed."""
    try:
        line, headers, body = read_head(conn)
    except ConnectionError:
        return None
    length = int(headers.get("content-length", 0))
    received = bytearray(body)
    while len(received) < length:
        piece = conn.recv(min(1 << 20, length - len(received)))
        if not piece:
            break
        received += piece
    return line, headers, bytes(received)


def serve_ok(conn: Any, server: Scripted) -> None:
    """Answer every request on the connection 200 ``{}``, recording each."""
    while (request := read_request(conn)) is not None:
        server.seen.append(request)
        conn.sendall(OK)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Outcome:
    """What a call run on a thread did: its result or exception, and how long it took."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.elapsed: float | None = None


def within(limit: float, call: Callable[[], Any], server: Scripted) -> Outcome:
    """Run ``call`` on a thread for at most ``limit`` seconds. If it is still running then, the
    server is stopped (its connections closed), which ends the call, and the outcome says it
    did not finish in time (``done`` unset)."""
    outcome = Outcome()
    finished = threading.Event()

    def run() -> None:
        started = time.monotonic()
        try:
            outcome.result = call()
        except BaseException as exc:
            outcome.error = exc
        finally:
            outcome.elapsed = time.monotonic() - started
            finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if finished.wait(limit):
        outcome.done.set()
    else:
        server.stop()
        thread.join(15)
    return outcome


# -- TLS: a self-signed certificate for 127.0.0.1 -----------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 (its file, to trust) and a server context."""
    directory = tmp_path_factory.mktemp("tls")
    context = self_signed_context(directory)
    return directory / "cert.pem", context


# -- 1: a network failure while an answer's body is read -----------------------------------------


def cut_by_reset(conn: Any, index: int, server: Scripted) -> None:
    """The first answer promises 1000 bytes, sends 10, and is reset (SO_LINGER 0); later
    connections are served."""
    if index > 1:
        return serve_ok(conn, server)
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{  ")
    conn.sendall(b'"a": 1, ')
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST, not FIN


def cut_by_tls_garbage(conn: Any, index: int, server: Scripted) -> None:
    """Over TLS: the first answer's headers and 10 bytes of its body come in TLS records, then
    bytes that are no TLS record at all (a broken middlebox); later connections are served."""
    if index > 1:
        return serve_ok(conn, server)
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{  ")
    conn.sendall(b'"a": 1, ')
    os.write(conn.fileno(), b"this is not a TLS record\r\n" * 20)  # beneath the TLS layer
    server.stopping.wait(HANDLER_TIMEOUT)  # held open until the test stops the server


def cut_by_unreachable(conn: Any, index: int, server: Scripted) -> None:
    """The first answer promises 1000 bytes and sends 10; the client's next read of it fails
    with EHOSTUNREACH (an ICMP unreachable on an established connection, injected on the client's
    socket by the test). Later connections are served."""
    if index > 1:
        return serve_ok(conn, server)
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{  ")
    conn.sendall(b'"a": 1, ')
    server.stopping.wait(HANDLER_TIMEOUT)  # held open until the test stops the server


CUTS = {"reset": cut_by_reset, "tls-garbage": cut_by_tls_garbage, "unreachable": cut_by_unreachable}


@pytest.mark.parametrize("stream", [False, True], ids=["metadata", "media"])
@pytest.mark.parametrize("cut", list(CUTS))
def test_a_body_broken_mid_way_is_retryable_and_its_connection_is_not_reused(
    cut, stream, certificate, monkeypatch
):
    cert_file, server_context = certificate
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
    tls = server_context if cut == "tls-garbage" else None
    with Scripted(CUTS[cut], tls) as server, Transport(server.url, None, io_timeout=5) as transport:
        armed = threading.Event()  # set once the answer's headers are in: the next read fails
        recv_into = socket.socket.recv_into

        def unreachable(sock: socket.socket, *args: Any, **kwargs: Any) -> int:
            if armed.is_set() and sock.getsockname()[1] != server.port:  # the client's side
                armed.clear()
                raise OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))
            return recv_into(sock, *args, **kwargs)

        if cut == "unreachable":
            monkeypatch.setattr(socket.socket, "recv_into", unreachable)
        headers_seen: list[int] = []

        def on_headers(response: Any) -> None:
            headers_seen.append(response.status_code)
            if cut == "unreachable" and len(headers_seen) == 1:
                armed.set()

        transport.add_response_hook(on_headers)
        with pytest.raises(Exception) as raised:
            response = transport.request("GET", f"{server.url}/o", stream=stream)
            try:
                while response.read1(64 * 1024):
                    pass
            finally:
                response.close()
        assert isinstance(raised.value, retry.RETRYABLE_EXCEPTIONS), repr(raised.value)
        assert "this is not a TLS record" not in str(raised.value)
        assert headers_seen == [200], "the failure was meant to come after the answer's headers"
        after = transport.request("GET", f"{server.url}/o")
        assert after.status_code == 200 and after.json() == {}
        assert server.accepted == 2, "the broken connection was used again"


def test_a_url_that_cannot_be_sent_is_a_usage_error_not_retried_and_not_repeated():
    """A session URI with a space in it (pasted wrongly): http.client refuses to send it. That is
    no network failure to retry, and the message must not carry the URI (a credential)."""
    with Scripted(lambda conn, index, server: serve_ok(conn, server)) as server:
        with Transport(server.url, None, io_timeout=5) as transport:
            with pytest.raises(UsageError) as raised:
                retry.exchange(
                    transport, "PUT", f"{server.url}/upload?upload_id=ABCsecret tail", what="the upload"
                )
            after = transport.request("GET", f"{server.url}/o")
        seen = list(server.seen)
    assert "secret" not in str(raised.value) and "upload_id" not in str(raised.value), str(raised.value)
    assert after.status_code == 200
    assert [line for line, _, _ in seen] == ["GET /o HTTP/1.1"], "the bad URL went out"


# -- 2: status line and headers held to one deadline ---------------------------------------------


def trickle_status_and_headers(conn: Any, index: int, server: Scripted) -> None:
    """An answer whose status line and headers come one byte every 0.2 s, without end."""
    read_head(conn)
    answer = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: y\r\n" * 1000  # over half an hour of it at this pace
    for i in range(len(answer)):
        conn.sendall(answer[i : i + 1])
        if server.stopping.wait(0.2):
            return


def endless_continue(conn: Any, index: int, server: Scripted) -> None:
    """``100 Continue`` after ``100 Continue``, several a second, and never an answer."""
    read_head(conn)
    while not server.stopping.wait(0.05):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")


@pytest.mark.parametrize("handler", [trickle_status_and_headers, endless_continue], ids=["trickle", "100"])
def test_an_answer_whose_headers_never_end_times_out(handler):
    with Scripted(handler) as server, Transport(server.url, None, io_timeout=1) as transport:
        outcome = within(2.5, lambda: transport.request("GET", f"{server.url}/o"), server)
    assert outcome.done.is_set(), (
        f"the request was still waiting 2.5 s after it began (io timeout 1 s); "
        f"stopping the server ended it with {outcome.error!r}"
    )
    assert isinstance(outcome.error, TimeoutError), repr(outcome.error)
    assert isinstance(outcome.error, retry.RETRYABLE_EXCEPTIONS)
    assert outcome.elapsed is not None and outcome.elapsed < 2.5


# -- 3: compressed metadata answers --------------------------------------------------------------

RESOURCE = {"name": "o", "bucket": "b", "size": "3", "crc32c": "AAAAAA=="}


def compressed(encoding: str, data: bytes) -> bytes:
    return gzip.compress(data) if "gzip" in encoding else zlib.compress(data)


def answer_with(body: bytes, encoding: str) -> Callable[[Any, int, Scripted], None]:
    def handler(conn: Any, index: int, server: Scripted) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\n"
            b"Content-Length: %d\r\n\r\n" % (encoding.encode(), len(body)) + body
        )
        server.stopping.wait(HANDLER_TIMEOUT)

    return handler


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
def test_a_compressed_json_answer_is_decoded(encoding):
    body = compressed(encoding, json.dumps(RESOURCE).encode())
    with Scripted(answer_with(body, encoding)) as server, Transport(server.url, None, io_timeout=5) as t:
        response = t.request("GET", f"{server.url}/storage/v1/b/b/o/o")
    assert response.status_code == 200
    assert response.json() == RESOURCE


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_answer_that_inflates_past_the_cap_is_refused(encoding):
    bomb = compressed(encoding, b" " * (16 << 20))  # 16 MiB of spaces in a few KiB
    assert len(bomb) < 100_000
    with Scripted(answer_with(bomb, encoding)) as server, Transport(server.url, None, io_timeout=5) as t:
        started = time.monotonic()
        with pytest.raises(ServiceError, match=r"larger than 1 MiB"):
            t.request("GET", f"{server.url}/storage/v1/b/b/o/o")
    assert time.monotonic() - started < 5


# -- 4: an early 401 over TLS, before a large body was read --------------------------------------

BIG = bytes(range(256)) * (128 << 10)  # 32 MiB


def early_401_then_ok(conn: Any, index: int, server: Scripted) -> None:
    """The first connection: the request's headers are read, 401 is answered and the connection
    closed with the body unread. Later ones: the whole request is read and recorded, then 200."""
    if index == 1:
        line, headers, _ = read_head(conn)
        server.seen.append((index, headers.get("authorization"), None))
        conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return  # closed by _run, the body unread
    request = read_request(conn)
    assert request is not None
    _, headers, body = request
    server.seen.append((index, headers.get("authorization"), body))
    conn.sendall(OK)
    read_request(conn)  # until the client closes


def test_an_early_401_over_tls_refreshes_once_and_resends_the_whole_body(certificate, monkeypatch):
    cert_file, server_context = certificate
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
    credentials = RotatingCredentials()
    with Scripted(early_401_then_ok, server_context) as server:
        with Transport(server.url, credentials, io_timeout=10) as transport:
            outcome = within(
                30,
                lambda: transport.request(
                    "PUT",
                    f"{server.url}/upload?upload_id=x",
                    data=BIG,
                    headers={"content-range": "bytes 0-*/*"},
                ),
                server,
            )
        seen = list(server.seen)
    assert outcome.done.is_set() and outcome.error is None, repr(outcome.error)
    assert outcome.result.status_code == 200
    assert credentials.refreshes == 1
    assert [(index, auth) for index, auth, _ in seen] == [(1, "Bearer token-0"), (2, "Bearer token-1")]
    resent = seen[1][2]
    assert len(resent) == len(BIG) and resent == BIG


# -- 5: a CA bundle that cannot be used ----------------------------------------------------------


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
@pytest.mark.parametrize("bundle", ["missing", "no-certificate"])
def test_an_unusable_ca_bundle_is_a_usage_error_at_once(variable, bundle, tmp_path, monkeypatch):
    path = tmp_path / "ca.pem"
    if bundle == "no-certificate":
        path.write_text("this file holds no certificate\n")
    monkeypatch.setenv(variable, str(path))

    def nothing(conn: Any, index: int, server: Scripted) -> None:
        serve_ok(conn, server)

    with Scripted(nothing) as server:
        url = f"https://127.0.0.1:{server.port}"
        started = time.monotonic()
        with pytest.raises(UsageError) as raised, Transport(url, None, io_timeout=5) as transport:
            transport.request("GET", f"{url}/o")
        elapsed = time.monotonic() - started
        accepted = server.accepted
    message = str(raised.value)
    assert variable in message and str(path) in message, message
    assert elapsed < 2 and accepted == 0, "a usage error is told before anything is sent"
    assert not isinstance(raised.value, retry.RETRYABLE_EXCEPTIONS)


# -- 6: token fetches through google-auth's transport interface ----------------------------------

TOKEN_BODY = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=x"
TOKEN_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def fetch_token(url: str, *, timeout: float | None = None, io_timeout: float = 30) -> Any:
    request = _token_request(10, io_timeout)
    return request(url, method="POST", body=TOKEN_BODY, headers=TOKEN_HEADERS, timeout=timeout)


def never_answers(conn: Any, index: int, server: Scripted) -> None:
    server.seen.append(read_request(conn))
    server.stopping.wait(HANDLER_TIMEOUT)


def test_a_token_endpoint_that_never_answers_is_given_google_auths_timeout():
    with Scripted(never_answers) as server:
        outcome = within(3, lambda: fetch_token(f"{server.url}/token", timeout=1, io_timeout=30), server)
    assert outcome.done.is_set(), f"still waiting after 3 s for a 1 s timeout; ended with {outcome.error!r}"
    assert isinstance(outcome.error, auth_exceptions.TransportError), repr(outcome.error)
    assert isinstance(outcome.error, retry.RETRYABLE_EXCEPTIONS)
    assert f"127.0.0.1:{server.port}" in str(outcome.error)


def test_a_redirect_from_the_token_endpoint_is_refused_not_followed():
    with Scripted(lambda conn, index, server: serve_ok(conn, server)) as elsewhere:

        def redirect(conn: Any, index: int, server: Scripted) -> None:
            read_request(conn)
            conn.sendall(
                b"HTTP/1.1 302 Found\r\nLocation: %s/steal\r\nContent-Length: 0\r\n\r\n"
                % elsewhere.url.encode()
            )
            server.stopping.wait(HANDLER_TIMEOUT)

        with Scripted(redirect) as server, pytest.raises(auth_exceptions.RefreshError) as raised:
            fetch_token(f"{server.url}/token", timeout=5)
        assert elsewhere.accepted == 0
    message = str(raised.value)
    assert "302" in message and f"127.0.0.1:{server.port}" in message, message
    assert not isinstance(raised.value, retry.RETRYABLE_EXCEPTIONS)


def test_a_token_answer_over_the_cap_names_the_token_endpoint():
    def huge(conn: Any, index: int, server: Scripted) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n")
        conn.sendall(b" " * 3_000_000)  # the client stops reading at 1 MiB: this may fail
        server.stopping.wait(HANDLER_TIMEOUT)

    refused = pytest.raises((GcsstreamError, auth_exceptions.GoogleAuthError))
    with Scripted(huge) as server, refused as raised:
        fetch_token(f"{server.url}/token", timeout=5)
    message = str(raised.value)
    assert f"the token endpoint 127.0.0.1:{server.port}" in message, message
    assert "the service" not in message and "1 MiB" in message, message


def test_a_dead_proxy_for_the_token_endpoint_is_a_refresh_error_not_retried(monkeypatch):
    proxy = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HTTP_PROXY", proxy)
    with Scripted(never_answers) as server:
        started = time.monotonic()
        with pytest.raises(auth_exceptions.GoogleAuthError) as raised:
            fetch_token(f"{server.url}/token", timeout=5)
        elapsed = time.monotonic() - started
        accepted = server.accepted
    assert isinstance(raised.value, auth_exceptions.RefreshError), repr(raised.value)
    assert not isinstance(raised.value, auth_exceptions.TransportError)
    assert not isinstance(raised.value, retry.RETRYABLE_EXCEPTIONS)
    assert proxy in str(raised.value), str(raised.value)
    assert accepted == 0 and elapsed < 5
