"""The transport against a real HTTP server on loopback: what goes on the wire."""

from __future__ import annotations

import http.server
import threading

import pytest
from google.auth import credentials as auth_credentials

from gcsstream.transport import Transport


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
