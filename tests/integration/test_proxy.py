"""Proxies from the environment, end to end: the installed ``gcsstream`` uploads through a real
loopback proxy (absolute-form requests to an http:// endpoint, a CONNECT tunnel to an https://
one, basic proxy credentials), fails at once when the proxy refuses, and bypasses it for
``NO_PROXY`` hosts. The objects land byte-identical in a ``GcsTestServer``."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli import test_faults
from tests.cli.test_hostile_server import clean_network_env, error_line
from tests.conftest import assert_stored
from tests.gcs_test_server import QUANTUM, GcsTestServer
from tests.tls import self_signed_context

BUCKET = "proxied"
CHUNK = 2 * QUANTUM  # 512 KiB: an upload of a few chunks is several requests on one connection
SIZE = 3 * CHUNK + 1000
FAST = ["--retry-initial-delay", "0.05", "--no-progress", "--chunk-size", "512KiB"]
IO_TIMEOUT = 10  # every socket the proxy and the terminator hold: no wait is unbounded
service_account = test_faults.service_account  # the fixture: a key whose tokens come from loopback
#: Headers for one hop only: a proxy neither forwards them nor relays them back.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "date", "server", "content-length",
}  # fmt: skip


@dataclass
class Seen:
    """A request as the proxy received it: its method, request target and headers (lower-case)."""

    method: str
    target: str
    headers: dict[str, str]


class _Relay(http.server.BaseHTTPRequestHandler):
    """A forwarding proxy's (or a TLS terminator's) side of one client connection.

    As a proxy (``server.backend`` None) it takes absolute-form targets to any http:// origin and
    CONNECT to any host:port; as a terminator it sends every request to ``server.backend``, and
    turns the session URI's ``http://`` into ``https://`` (the test server names its own scheme).
    """

    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT  # each read and write on the client's connection

    server: Relay

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _record(self) -> bool:
        """Note the request; False when the server is to refuse it (it has been answered)."""
        self.server.seen.append(
            Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        )
        if self.server.refuse is None:
            return True
        self.close_connection = True
        status = self.server.refuse
        self._answer(status, {"Proxy-Authenticate": 'Basic realm="test"'} if status == 407 else None)
        return False

    def _forward(self) -> None:
        if not self._record():
            return
        if self.server.backend is None:  # a proxy: the target names the origin
            parts = urllib.parse.urlsplit(self.path)
            if parts.scheme != "http" or not parts.hostname:
                self.close_connection = True
                return self._answer(400)
            host, port = parts.hostname, parts.port or 80
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        else:
            (host, port), target = self.server.backend, self.path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(host, port, timeout=IO_TIMEOUT)
        try:
            upstream.request(self.command, target, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException):
            self.close_connection = True
            return self._answer(502)
        finally:
            upstream.close()
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() in HOP_BY_HOP:
                continue
            if name.lower() == "location" and self.server.tls is not None:
                value = value.replace("http://", "https://", 1)
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

    def do_CONNECT(self) -> None:  # noqa: N802 - http.server's naming
        self.close_connection = True
        if not self._record():
            return
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT)
        except (OSError, ValueError):
            return self._answer(502)
        self.server.track(upstream, True)
        try:
            self.send_response(200, "Connection established")
            self.end_headers()
            ends = [self.connection, upstream]
            # Bytes both ways until either side closes (or both are silent for IO_TIMEOUT).
            while readable := select.select(ends, [], [], IO_TIMEOUT)[0]:
                for end in readable:
                    piece = end.recv(65536)
                    if not piece:
                        return
                    (upstream if end is self.connection else self.connection).sendall(piece)
        except OSError:
            pass
        finally:
            self.server.track(upstream, False)
            upstream.close()


class Relay(http.server.ThreadingHTTPServer):
    """A loopback HTTP proxy (``backend`` None), or a TLS terminator in front of ``backend``
    (``tls``: the server context); ``refuse``: answer every request, CONNECT too, with that
    status. ``seen`` lists the requests; ``accepted`` counts connections."""

    daemon_threads = False  # stop() joins the handlers, each bounded by IO_TIMEOUT
    block_on_close = True

    def __init__(
        self,
        *,
        backend: tuple[str, int] | None = None,
        tls: ssl.SSLContext | None = None,
        refuse: int | None = None,
    ) -> None:
        self.backend, self.tls, self.refuse = backend, tls, refuse
        self.seen: list[Seen] = []
        self.accepted = 0
        self.errors: list[BaseException | None] = []
        self._live: set[socket.socket] = set()
        self._live_lock = threading.Lock()
        self._stopped = False
        super().__init__(("127.0.0.1", 0), _Relay)
        self.port = self.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        self.accepted += 1
        if self.tls is not None:  # the handshake is the handler's (its thread, its timeout)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: object, client_address: object) -> None:
        self.errors.append(sys.exc_info()[1])  # kept for the test (a refused handshake), not printed

    def track(self, sock: socket.socket, live: bool) -> None:
        with self._live_lock:
            (self._live.add if live else self._live.discard)(sock)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.shutdown()
        with self._live_lock:
            live = list(self._live)
        for sock in live:  # a handler blocked on a read sees the end at once
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()  # joins the handler threads
        self._thread.join(5)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def targets(self, method: str | None = None) -> list[str]:
        return [s.target for s in self.seen if method is None or s.method == method]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def with_credentials(url: str, user: str = "user", password: str = "secret") -> str:
    return url.replace("http://", f"http://{user}:{password}@", 1)


@pytest.fixture
def gcs(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as server:
        yield server


@pytest.fixture
def https_endpoint(gcs, tmp_path):
    """An https:// endpoint: a TLS terminator in front of ``gcs``; its certificate's file."""
    context = self_signed_context(tmp_path)
    with Relay(backend=("127.0.0.1", gcs.port), tls=context) as terminator:
        yield terminator, tmp_path / "cert.pem"


def put(exe: str, *args: str, data: bytes, env: dict[str, str], name: str = "obj", timeout: float = 60):
    """``gcsstream put ARGS - gs://proxied/NAME`` with ``data`` on stdin, in a clean network
    environment plus ``env``; the finished process and its run time."""
    started = time.monotonic()
    proc = subprocess.run(
        [exe, "put", *FAST, *args, "-", f"gs://{BUCKET}/{name}"],
        input=data, env={**clean_network_env(), **env}, capture_output=True, timeout=timeout,
    )  # fmt: skip
    return proc, time.monotonic() - started


def put_https(exe: str, terminator: Relay, key: Path, *args: str, proxies: dict[str, str], **kwargs):
    """``put`` to the TLS terminator with the service account ``key``, through ``proxies`` (the
    environment's ``*_PROXY``); ``trust``: the certificate file given as REQUESTS_CA_BUNDLE."""
    trust = kwargs.pop("trust", None)
    env = {**proxies, **({"REQUESTS_CA_BUNDLE": str(trust)} if trust else {})}
    kwargs.setdefault("data", os.urandom(SIZE))
    return put(exe, *args, "--credentials", str(key), "--endpoint", terminator.url, env=env, **kwargs)


@pytest.mark.parametrize("proxy_user", [False, True], ids=["no-proxy-credentials", "proxy-credentials"])
def test_an_http_endpoint_is_reached_through_http_proxy_in_absolute_form(gcsstream_exe, gcs, proxy_user):
    data = os.urandom(SIZE)
    with Relay() as proxy:
        proxy_url = with_credentials(proxy.url) if proxy_user else proxy.url
        proc, _ = put(gcsstream_exe, "--endpoint", gcs.url, data=data, env={"HTTP_PROXY": proxy_url})
        assert proc.returncode == 0, proc.stderr.decode()
        assert_stored(gcs, BUCKET, "obj", data)
        assert len(proxy.seen) >= 4, proxy.seen  # the initiate, then a request a chunk
        assert len(proxy.seen) == len(gcs.requests), "a request went around the proxy"
        assert proxy.targets("CONNECT") == [], "an http:// endpoint is not tunnelled"
        for seen in proxy.seen:
            assert seen.target.startswith(f"{gcs.url}/"), seen.target  # absolute form
            assert seen.headers["host"] == f"127.0.0.1:{gcs.port}", seen.headers
            if proxy_user:
                assert seen.headers.get("proxy-authorization") == basic("user", "secret"), seen.headers
            else:
                assert "proxy-authorization" not in seen.headers, seen.headers
        assert proxy.accepted == 1, f"{proxy.accepted} connections: the proxy's was not kept alive"
        assert "secret" not in (proc.stdout + proc.stderr).decode()


@pytest.mark.parametrize("proxy_user", [False, True], ids=["no-proxy-credentials", "proxy-credentials"])
def test_an_https_endpoint_is_reached_through_a_connect_tunnel(
    gcsstream_exe, gcs, https_endpoint, service_account, proxy_user
):
    """HTTPS_PROXY only: the uploads go through one CONNECT tunnel; the token endpoint, plain
    http:// on loopback, is reached directly (no HTTP_PROXY names a proxy for it)."""
    terminator, cert = https_endpoint
    key, tokens = service_account
    data = os.urandom(SIZE)
    with Relay() as proxy:
        proxy_url = with_credentials(proxy.url) if proxy_user else proxy.url
        proc, _ = put_https(
            gcsstream_exe, terminator, key, data=data, proxies={"HTTPS_PROXY": proxy_url}, trust=cert
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert_stored(gcs, BUCKET, "obj", data)
        assert [(s.method, s.target) for s in proxy.seen] == [("CONNECT", f"127.0.0.1:{terminator.port}")]
        (connect,) = proxy.seen
        if proxy_user:
            assert connect.headers.get("proxy-authorization") == basic("user", "secret"), connect.headers
        else:
            assert "proxy-authorization" not in connect.headers, connect.headers
        assert terminator.accepted == 1, "every request came through the one tunnel"
        assert len(terminator.seen) == len(gcs.requests) >= 4
        assert all(s.target.startswith("/") for s in terminator.seen), "origin form inside the tunnel"
        assert all(s.headers.get("authorization", "").startswith("Bearer ") for s in terminator.seen)
        assert len(tokens.tokens) == 1, "the token was fetched directly, once"
        assert "secret" not in (proc.stdout + proc.stderr).decode()


def test_the_token_fetch_goes_through_http_proxy(gcsstream_exe, gcs, https_endpoint, service_account):
    """HTTP_PROXY as well: the token POST to the http:// token endpoint goes to the proxy in
    absolute form, with the proxy's credentials; the uploads still go through the tunnel."""
    terminator, cert = https_endpoint
    key, tokens = service_account
    data = os.urandom(SIZE)
    token_url = json.loads(key.read_text())["token_uri"]
    with Relay() as proxy:
        proxy_url = with_credentials(proxy.url)
        proc, _ = put_https(
            gcsstream_exe, terminator, key, data=data,
            proxies={"HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url}, trust=cert,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        assert_stored(gcs, BUCKET, "obj", data)
        assert sorted((s.method, s.target) for s in proxy.seen) == [
            ("CONNECT", f"127.0.0.1:{terminator.port}"),
            ("POST", token_url),
        ]
        assert all(s.headers.get("proxy-authorization") == basic("user", "secret") for s in proxy.seen)
        assert len(tokens.tokens) == 1


def test_a_proxy_that_asks_for_credentials_fails_the_upload_at_once(
    gcsstream_exe, gcs, https_endpoint, service_account
):
    """A 407 to CONNECT: exit 1 at once (no retry, one CONNECT), naming the proxy without its
    credentials."""
    terminator, cert = https_endpoint
    key, _ = service_account
    with Relay(refuse=407) as proxy:
        proc, elapsed = put_https(
            gcsstream_exe, terminator, key, "--retry-deadline", "30",
            proxies={"HTTPS_PROXY": with_credentials(proxy.url)}, trust=cert,
        )  # fmt: skip
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert f"cannot reach {terminator.url}: the proxy {proxy.url} failed: " in line, line
        assert "407" in line, line
        output = (proc.stdout + proc.stderr).decode()
        assert "secret" not in output and "user:" not in output, output
        assert [(s.method, s.target) for s in proxy.seen] == [("CONNECT", f"127.0.0.1:{terminator.port}")]
        assert proxy.seen[0].headers.get("proxy-authorization") == basic("user", "secret")
        assert terminator.accepted == 0 and gcs.requests == []
        assert elapsed < 20, f"{elapsed:.1f} s: the 407 was retried"


def test_a_refused_certificate_inside_the_tunnel_is_the_certificate_not_the_proxy(
    gcsstream_exe, gcs, https_endpoint, service_account
):
    """No CA bundle for the terminator's certificate: the tunnel opened, so the failure is the
    certificate's, at once (one CONNECT), and not blamed on the proxy."""
    terminator, _ = https_endpoint
    key, _ = service_account
    with Relay() as proxy:
        proc, _ = put_https(
            gcsstream_exe, terminator, key, "--retry-deadline", "30", proxies={"HTTPS_PROXY": proxy.url}
        )
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert f"cannot reach {terminator.url}: its TLS certificate was refused (self-signed" in line
        assert "proxy" not in line, line
        assert proxy.targets() == [f"127.0.0.1:{terminator.port}"]
        assert terminator.accepted == 1 and gcs.requests == []
    terminator.stop()  # joins its handler, which has then seen the handshake end (a 2nd stop: no-op)
    assert [type(e) for e in terminator.errors] == [ssl.SSLError], terminator.errors


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "example.com, 127.0.0.1"])
def test_no_proxy_bypasses_the_proxy(gcsstream_exe, gcs, no_proxy):
    data = os.urandom(SIZE)
    with Relay(refuse=403) as proxy:
        proc, _ = put(
            gcsstream_exe, "--endpoint", gcs.url, data=data,
            env={"HTTP_PROXY": proxy.url, "NO_PROXY": no_proxy},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        assert_stored(gcs, BUCKET, "obj", data)
        assert proxy.accepted == 0 and proxy.seen == []


def test_the_refusing_proxy_does_refuse(gcsstream_exe, gcs):
    """The counter-test of the NO_PROXY one: without NO_PROXY the same proxy fails the upload."""
    with Relay(refuse=403) as proxy:
        proc, _ = put(
            gcsstream_exe, "--endpoint", gcs.url, data=os.urandom(SIZE), env={"HTTP_PROXY": proxy.url}
        )
        assert proc.returncode != 0, proc.stderr.decode()
        assert proxy.seen, "the proxy was not asked"
        assert gcs.requests == []


def test_a_407_from_the_proxy_of_an_http_endpoint_names_the_proxy(gcsstream_exe, gcs):
    """Through a proxy in absolute form, a 407 is the proxy's refusal, not the service's: one
    line naming the proxy (without its credentials), at once."""
    with Relay(refuse=407) as proxy:
        proc, elapsed = put(
            gcsstream_exe, "--retry-deadline", "30", "--endpoint", gcs.url, data=os.urandom(SIZE),
            env={"HTTP_PROXY": with_credentials(proxy.url)},
        )  # fmt: skip
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert f"cannot reach {gcs.url}: the proxy {proxy.url} failed: 407" in line, line
        assert "secret" not in (proc.stdout + proc.stderr).decode()
        assert len(proxy.seen) == 1 and gcs.requests == []
        assert elapsed < 20, f"{elapsed:.1f} s: the 407 was retried"


def test_a_busy_proxy_is_retried_not_given_up_on(gcsstream_exe, gcs, https_endpoint, service_account):
    """A 503 to CONNECT is the proxy being busy, not refusing: retried like the service's 503,
    until --retry-deadline (exit 75), each retry announced; a 407 or 403 stays final."""
    terminator, cert = https_endpoint
    key, _ = service_account
    with Relay(refuse=503) as proxy:
        proc, _ = put_https(
            gcsstream_exe,
            terminator,
            key,
            "--retry-deadline",
            "1",
            proxies={"HTTPS_PROXY": proxy.url},
            trust=cert,
        )
        err = proc.stderr.decode()
        assert proc.returncode == 75, err
        last = err.strip().splitlines()[-1]
        assert "gave up" in last and f"the proxy {proxy.url} answered 503 to CONNECT" in last, err
        assert "answered 503 to CONNECT, retrying in" in err, "each retry is announced"
        assert len(proxy.targets("CONNECT")) > 1, "the busy proxy was not asked again"
        assert terminator.accepted == 0 and gcs.requests == []
