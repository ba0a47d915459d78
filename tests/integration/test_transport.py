"""The transport against a real HTTP server on loopback: what goes on the wire."""

from __future__ import annotations

import http.server
import threading

import pytest
from google.auth import credentials as auth_credentials

from gcsstream.errors import ServiceError
from gcsstream.transport import Transport
from tests.wrong_server import Behaviour, Reply, Request, Session, WrongServer


class RotatingCredentials(auth_credentials.Credentials):
    """A token that changes on every refresh."""

    def __init__(self) -> None:
        super().__init__()
        self.token = "token-0"
        self.refreshes = 0

    def refresh(self, request) -> None:
        self.refreshes += 1
        self.token = f"token-{self.refreshes}"


@pytest.fixture
def server():
    """Answers the first PUT 401 and the rest 200, recording (Authorization, Content-Length, body)."""
    seen: list[tuple[str | None, int, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self):
            length = int(self.headers.get("Content-Length", 0))
            self.connection.settimeout(5)
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                body = b""
            seen.append((self.headers.get("Authorization"), length, body))
            self.send_response(401 if len(seen) == 1 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.parametrize("rate_limit", [None, 64 << 20], ids=["unpaced", "limit-rate"])
def test_a_401_refreshes_the_token_and_resends_the_whole_body(server, rate_limit):
    """google-auth resends the same body after a refresh; a paced body must be whole again."""
    url, seen = server
    body = bytes(range(256)) * 1200  # 300 KiB, several pacing slices
    credentials = RotatingCredentials()
    with Transport(url, credentials, io_timeout=5, rate_limit=rate_limit) as transport:
        response = transport.request("PUT", f"{url}/o", data=body, headers={"content-range": "bytes 0-*/*"})
    assert response.status_code == 200 and credentials.refreshes == 1
    assert [(auth, length) for auth, length, _ in seen] == [
        ("Bearer token-0", len(body)),
        ("Bearer token-1", len(body)),
    ]
    assert all(received == body for _, _, received in seen)


class UnauthorizedThenRedirect(Behaviour):
    """The first chunk is refused 401 (the token "expired"), its resend redirected elsewhere."""

    def __init__(self, other: WrongServer) -> None:
        super().__init__()
        self.other = other

    def session_put(self, request: Request, session: Session) -> Reply:
        if len(self.server.requests) == 1:
            return Reply.json(401, {"error": {"code": 401, "message": "expired"}})
        return Reply(307, {"Location": self.other.session_url("x")})


def test_the_resend_after_a_401_refresh_follows_no_redirect():
    """google-auth resends a request itself after refreshing on 401: that resend is held to the
    same rule, and the other origin sees nothing."""
    with WrongServer() as other, WrongServer(UnauthorizedThenRedirect(other)) as server:
        session_uri = server.session_url(server.new_session("gcsstream-test", {"name": "o"}))
        credentials = RotatingCredentials()
        refused = pytest.raises(ServiceError, match="refusing to send credentials or data there")
        with Transport(server.url, credentials, io_timeout=5) as transport, refused:
            transport.request(
                "PUT", session_uri, data=b"x" * 1000, headers={"content-range": "bytes 0-999/*"}
            )
        assert credentials.refreshes == 1
        assert [r.headers.get("authorization") for r in server.requests] == [
            "Bearer token-0",
            "Bearer token-1",
        ]
        assert other.requests == []


def test_a_session_uri_on_another_origin_is_refused_before_sending():
    with WrongServer() as other, WrongServer() as server:
        refused = pytest.raises(ServiceError, match=f"the upload session is on {other.url}, not the endpoint")
        with Transport(server.url, RotatingCredentials(), io_timeout=5) as transport, refused:
            transport.request(
                "PUT", other.session_url("x"), data=b"x", headers={"content-range": "bytes */*"}
            )
        assert other.requests == [] and server.requests == []
