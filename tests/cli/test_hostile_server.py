"""A hostile or broken server meets the real ``gcsstream``: credentials and data go only to the
endpoint's origin, answers are bounded in size and time, a stalled send times out, and failures
no retry can cure (a refused certificate, an unusable proxy) end at once."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.cli import test_faults
from tests.conftest import crc32c_b64, unstamped
from tests.tls import self_signed_context
from tests.wrong_server import Behaviour, Reply, Request, Session, WrongServer

BUCKET = "gcsstream-test"
leaks = test_faults.leaks
service_account = test_faults.service_account  # the fixture: a key whose tokens come from loopback
FAST = ["--retry-initial-delay", "0.05", "--no-progress"]


def gcsstream(
    exe: str, *args: str, data: bytes = b"", env: dict[str, str] | None = None, timeout: float = 60
):
    """``gcsstream ARGS`` with ``data`` on standard input; the finished process."""
    return subprocess.run(
        [exe, *args], input=data, env={**os.environ, **(env or {})}, capture_output=True, timeout=timeout
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line gcsstream printed on failure (asserting it is the only one)."""
    lines = unstamped(proc.stderr.decode()).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gcsstream: error: "), lines
    return lines[0]


# -- 8: credentials and data only to the endpoint's origin ---------------------------------------


class LocationElsewhere(Behaviour):
    """The initiate answer's session URI is on another origin (a second server)."""

    def __init__(self, other: WrongServer) -> None:
        super().__init__()
        self.other = other

    def initiate(self, request: Request, bucket: str) -> Reply:
        session_id = self.other.new_session(bucket, json.loads(request.body or b"{}"))
        return Reply(200, {"Location": self.other.session_url(session_id)})


class RedirectInitiate(Behaviour):
    """Initiate answered with a redirect to the same path on another server."""

    def __init__(self, other: WrongServer, status: int) -> None:
        super().__init__()
        self.other, self.status = other, status

    def initiate(self, request: Request, bucket: str) -> Reply:
        return Reply(
            self.status, {"Location": f"{self.other.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable"}
        )


class RedirectingChunk(Behaviour):
    """A chunk (or a status query) answered 308 with a Range and a Location on another server."""

    def __init__(self, other: WrongServer) -> None:
        super().__init__()
        self.other = other

    def incomplete(self, request: Request, session: Session) -> Reply:
        reply = super().incomplete(request, session)
        session_id = self.other.new_session(session.bucket, session.resource)
        return Reply(308, {**reply.headers, "Location": self.other.session_url(session_id)})


def assert_nothing_reached(other: WrongServer, proc, tokens) -> None:
    assert other.requests == [], [(r.method, r.path, sorted(r.headers)) for r in other.requests]
    assert not leaks((proc.stdout + proc.stderr).decode(), tokens, [])


def test_location_on_another_origin_gets_no_credentials_and_no_data(gcsstream_exe, service_account):
    key, tokens = service_account
    with WrongServer() as other, WrongServer(LocationElsewhere(other)) as server:
        proc = gcsstream(
            gcsstream_exe, "put", *FAST, "--credentials", str(key), "--endpoint", server.url,
            "-", f"gs://{BUCKET}/o", data=os.urandom(300 * 1024),
        )  # fmt: skip
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert f"pointed gcsstream at {other.url}, not the endpoint's origin {server.url}; " in line
        assert line.endswith("refusing to send credentials or data there"), line
        assert server.requests_with_auth(), "no Authorization header was sent at all: the test proves nothing"
        assert_nothing_reached(other, proc, tokens.tokens)
        assert not server.objects and not other.objects
    listed = gcsstream(gcsstream_exe, "sessions", "--json")
    assert json.loads(listed.stdout) == [], "the refused session must not be journaled"


@pytest.mark.parametrize("with_key", [False, True], ids=["anonymous", "service-account"])
def test_a_netrc_entry_for_the_endpoint_never_becomes_an_authorization(
    gcsstream_exe, service_account, tmp_path, with_key
):
    """Only google-auth authorizes requests: a ~/.netrc (or $NETRC) entry for the endpoint's host
    neither adds basic auth to an anonymous upload nor replaces a service account's token."""
    key, tokens = service_account
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-secret\n")
    netrc.chmod(0o600)
    data = os.urandom(300 * 1024)
    with WrongServer() as server:
        creds = ["--credentials", str(key)] if with_key else []
        proc = gcsstream(
            gcsstream_exe, "put", *FAST, *creds, "--endpoint", server.url, "-", f"gs://{BUCKET}/o",
            data=data, env={"NETRC": str(netrc), "HOME": str(tmp_path)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        sent = [r.headers.get("authorization", "") for r in server.requests]
        assert not any(value.lower().startswith("basic") for value in sent), sent
        if with_key:
            assert all(value.startswith("Bearer ") for value in sent), sent
        else:
            assert not any(sent), sent
        stored, resource = server.objects[(BUCKET, "o")]
        assert stored == data and resource["crc32c"] == crc32c_b64(data)


@pytest.mark.parametrize("status", [301, 302, 307])
def test_redirect_on_initiate_is_not_followed(gcsstream_exe, service_account, status):
    key, tokens = service_account
    with WrongServer() as other, WrongServer(RedirectInitiate(other, status)) as server:
        proc = gcsstream(
            gcsstream_exe, "put", *FAST, "--credentials", str(key), "--endpoint", server.url,
            "-", f"gs://{BUCKET}/o", data=os.urandom(300 * 1024),
        )  # fmt: skip
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert "refusing to send credentials or data there" in line
        assert [r.method for r in server.requests] == ["POST"] and server.requests_with_auth()
        assert_nothing_reached(other, proc, tokens.tokens)
        assert not server.objects and not other.objects


def test_308_with_location_on_a_chunk_is_a_redirect_not_an_answer(gcsstream_exe, service_account):
    key, tokens = service_account
    with WrongServer() as other, WrongServer(RedirectingChunk(other)) as server:
        proc = gcsstream(
            gcsstream_exe, "put", *FAST, "--credentials", str(key), "--endpoint", server.url,
            "--chunk-size", "256KiB", "-", f"gs://{BUCKET}/o", data=os.urandom(600 * 1024),
        )  # fmt: skip
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert "refusing to send credentials or data there" in line
        assert [r.method for r in server.requests] == ["POST", "PUT"]
        assert_nothing_reached(other, proc, tokens.tokens)
        assert not server.objects and not other.objects
        # `status` of that session by its URI: its 308 names the other origin too.
        (session_id,) = server.sessions
        uri = server.session_url(session_id)
        status = gcsstream(gcsstream_exe, "status", uri, "--credentials", str(key))
        assert status.returncode == 1 and "refusing to send" in error_line(status)
        assert_nothing_reached(other, status, tokens.tokens)


# -- 13: answers bounded in size and time; a stalled send times out ------------------------------


class HugeInitiateAnswer(Behaviour):
    """The initiate answer carries a 64 MiB body, sent 1 MiB at a time."""

    PIECES = 64

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.done = threading.Event()

    def initiate(self, request: Request, bucket: str) -> Reply:
        reply = super().initiate(request, bucket)

        def body():
            try:
                for _ in range(self.PIECES):
                    yield b"{" * (1 << 20)
                    self.sent += 1
            finally:
                self.done.set()

        return Reply(200, reply.headers, body())


class TricklingInitiateAnswer(Behaviour):
    """The initiate answer's body comes one byte a second, for much longer than any timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.stop = threading.Event()

    def initiate(self, request: Request, bucket: str) -> Reply:
        reply = super().initiate(request, bucket)

        def body():
            while not self.stop.wait(1.0):  # the trickle's pace, not a synchronization
                yield b" "

        return Reply(200, {**reply.headers, "Content-Length": "100000"}, body())


def test_huge_initiate_answer_is_cut_at_the_cap(gcsstream_exe):
    behaviour = HugeInitiateAnswer()
    with WrongServer(behaviour) as server:
        proc = gcsstream(
            gcsstream_exe, "put", *FAST, "--endpoint", server.url, "-", f"gs://{BUCKET}/o",
            data=os.urandom(1000),
        )  # fmt: skip
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert "larger than 1 MiB; stopped reading it" in line
        assert behaviour.done.wait(30), "the server is still sending: the connection was not dropped"
        assert behaviour.sent < behaviour.PIECES, "gcsstream read the whole 64 MiB answer"
        assert [r.method for r in server.requests] == ["POST"] and not server.objects


def test_trickling_answer_is_cut_at_the_io_timeout_and_retried(gcsstream_exe):
    behaviour = TricklingInitiateAnswer()
    with WrongServer(behaviour) as server:
        try:
            proc = gcsstream(
                gcsstream_exe, "put", *FAST, "--io-timeout", "2", "--retry-deadline", "3",
                "--endpoint", server.url, "-", f"gs://{BUCKET}/o", data=os.urandom(1000), timeout=45,
            )  # fmt: skip
        finally:
            behaviour.stop.set()
    err = proc.stderr.decode()
    assert proc.returncode == 75, err
    assert "timed out (the answer was still arriving 2 s after it began), retrying" in err
    assert unstamped(err).strip().splitlines()[-1].startswith("gcsstream: error: gave up after"), err
    assert [r.method for r in server.requests].count("POST") >= 2 and not server.objects


class SilentReader:
    """A raw HTTP server that answers an initiate, then stops reading: the next request's body
    is never read (its receive buffer is kept small, so the sender blocks soon)."""

    def __init__(self, trickle: threading.Event | None = None) -> None:
        self.trickle = trickle  # if given: read 4 KiB of the body each time it is set, no more
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stalled = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.sock:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.connections.append(conn)
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        except OSError:  # close() closed the connection under this thread: the test is over
            pass

    def _converse(self, conn: socket.socket) -> None:
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                more = conn.recv(4096)
                if not more:
                    return
                buffered += more
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            if head.startswith(b"PUT"):
                self.stalled.set()
                while self.trickle is not None and self.trickle.wait() and conn.recv(4096):
                    self.trickle.clear()
                return  # read no more: the body stays unread, the connection open
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(buffered) < length:
                buffered += conn.recv(4096)
            buffered = buffered[length:]
            location = f"{self.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&upload_id=s1"
            conn.sendall(f"HTTP/1.1 200 OK\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode())

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


def test_a_server_that_stops_reading_is_noticed_after_the_io_timeout(gcsstream_exe):
    """The send times out after --io-timeout (2 s), not after the 20 s connect timeout."""
    server = SilentReader()
    try:
        proc = gcsstream(
            gcsstream_exe, "put", *FAST, "--io-timeout", "2", "--retry-deadline", "0",
            "--chunk-size", "16MiB", "--endpoint", server.url, "-", f"gs://{BUCKET}/o",
            data=os.urandom((16 << 20) + 1), timeout=15,
        )  # fmt: skip
    finally:
        server.close()
    assert server.stalled.is_set(), "the chunk never reached the server"
    err = proc.stderr.decode()
    assert proc.returncode == 75, err
    assert "timed out" in err.strip().splitlines()[-1], err


def test_a_stalled_send_ends_about_one_io_timeout_after_the_server_stopped_reading(gcsstream_exe, tmp_path):
    """--io-timeout bounds a stalled send, not twice that: what the kernel took into its buffers
    (megabytes on loopback) when the server stopped reading is no reason to wait another timeout."""
    io_timeout = 3.0
    src = tmp_path / "src"
    src.write_bytes(os.urandom((16 << 20) + 1))
    server = SilentReader()
    proc = subprocess.Popen(
        [gcsstream_exe, "put", *FAST, "--io-timeout", f"{io_timeout:g}", "--retry-deadline", "0",
         "--chunk-size", "16MiB", "--endpoint", server.url, str(src), f"gs://{BUCKET}/o"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stalled.wait(15), "the chunk never reached the server"
        stalled = time.monotonic()
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - stalled
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 75, err.decode()
    assert "timed out" in err.decode().strip().splitlines()[-1], err.decode()
    assert took < 1.5 * io_timeout, f"the stalled send ended {took:.1f} s after the stall"


def test_a_server_that_trickles_a_large_chunk_in_is_noticed_after_the_io_timeout(gcsstream_exe):
    """A 16 MiB chunk is written in one blocking write; a server that keeps taking a little of
    it (far less than 1 MiB per io timeout) still ends the request after about the io timeout."""
    tick = threading.Event()
    server = SilentReader(trickle=tick)
    ticking = threading.Event()

    def ticker() -> None:
        while not ticking.wait(0.05):  # the server's pace, not a synchronization
            tick.set()

    threading.Thread(target=ticker, daemon=True).start()
    try:
        proc = gcsstream(
            gcsstream_exe, "put", *FAST, "--io-timeout", "2", "--retry-deadline", "0",
            "--chunk-size", "16MiB", "--endpoint", server.url, "-", f"gs://{BUCKET}/o",
            data=os.urandom((16 << 20) + 1), timeout=15,
        )  # fmt: skip
    finally:
        ticking.set()
        server.close()
    assert server.stalled.is_set(), "the chunk never reached the server"
    err = proc.stderr.decode()
    assert proc.returncode == 75, err
    assert "timed out" in err.strip().splitlines()[-1], err


# -- 15: failures no retry can cure, and a token host that cannot be reached ----------------------


class TLSServer:
    """An https server on loopback with a self-signed certificate; counts accepted connections."""

    def __init__(self, directory: Path) -> None:
        self.context = self_signed_context(directory)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.sock:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.accepted += 1
                with conn:
                    conn.settimeout(5)
                    try:
                        self.context.wrap_socket(conn, server_side=True).close()
                    except (ssl.SSLError, OSError):
                        pass  # the client refused the certificate

    def close(self) -> None:
        self.sock.close()


def clean_network_env() -> dict[str, str]:
    """The environment without proxies or CA bundles that would change what is tested."""
    names = {"https_proxy", "http_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle"}
    return {k: v for k, v in os.environ.items() if k.lower() not in names and k != "STORAGE_EMULATOR_HOST"}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_clean(exe: str, *args: str, env_extra: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [exe, *args], input=b"x" * 1000, env={**clean_network_env(), **(env_extra or {})},
        capture_output=True, timeout=timeout,
    )  # fmt: skip


def test_a_refused_certificate_fails_at_once(gcsstream_exe, service_account, tmp_path):
    key, tokens = service_account
    server = TLSServer(tmp_path)
    try:
        proc = run_clean(
            gcsstream_exe, "put", *FAST, "--retry-deadline", "30", "--credentials", str(key),
            "--endpoint", server.url, "-", f"gs://{BUCKET}/o",
        )  # fmt: skip
    finally:
        server.close()
    line = error_line(proc)
    assert proc.returncode == 1, line
    assert f"cannot reach {server.url}: its TLS certificate was refused (self-signed certificate" in line
    assert server.accepted == 1, f"{server.accepted} connections: the certificate was retried"
    assert not leaks((proc.stdout + proc.stderr).decode(), tokens.tokens, [])


def test_an_unreachable_proxy_fails_at_once(gcsstream_exe, service_account, tmp_path):
    key, tokens = service_account
    proxy = f"http://127.0.0.1:{closed_port()}"
    proc = run_clean(
        gcsstream_exe, "put", *FAST, "--retry-deadline", "30", "--credentials", str(key),
        "--endpoint", "https://127.0.0.1:9", "-", f"gs://{BUCKET}/o",
        env_extra={"HTTPS_PROXY": proxy},
    )  # fmt: skip
    line = error_line(proc)
    assert proc.returncode == 1, line
    assert f"cannot reach https://127.0.0.1:9: the proxy {proxy} failed: connection refused" in line


def test_an_unreachable_token_host_is_retried_within_the_deadline_and_announced(
    gcsstream_exe, service_account, tmp_path
):
    key, _ = service_account
    unreachable = json.loads(key.read_text())
    unreachable["token_uri"] = f"http://127.0.0.1:{closed_port()}/token"
    key = tmp_path / "unreachable-key.json"
    key.write_text(json.dumps(unreachable))
    with WrongServer() as server:
        proc = run_clean(
            gcsstream_exe, "put", *FAST, "--retry-deadline", "2", "--credentials", str(key),
            "--endpoint", server.url, "-", f"gs://{BUCKET}/o", timeout=45,
        )  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 75, err
    host = unreachable["token_uri"].split("/")[2]
    assert f"fetching credentials from {host}: connection refused, retrying in" in err
    last = unstamped(err).strip().splitlines()[-1]
    assert last.startswith("gcsstream: error: gave up after") and "fetching credentials" in last, err
    assert server.requests == [], "no request may go out without its credentials"


class HugeDownloadError(HugeInitiateAnswer):
    """A 403 to the media GET whose body is 64 MiB: an error answer is metadata, capped too."""

    def media_get(self, request: Request, bucket: str, name: str) -> Reply:
        def body():
            try:
                for _ in range(self.PIECES):
                    yield b"x" * (1 << 20)
                    self.sent += 1
            finally:
                self.done.set()

        return Reply(403, {"Content-Type": "text/plain"}, body())


def test_a_huge_error_answer_to_a_download_is_cut_at_the_cap(gcsstream_exe):
    behaviour = HugeDownloadError()
    with WrongServer(behaviour) as server:
        server.put_object(BUCKET, "o", b"data")
        proc = gcsstream(gcsstream_exe, "cat", "--endpoint", server.url, f"gs://{BUCKET}/o", data=b"")
        line = error_line(proc)
        assert proc.returncode == 1, line
        assert "larger than 1 MiB; stopped reading it" in line
        assert behaviour.done.wait(30), "the server is still sending: the connection was not dropped"
        assert behaviour.sent < behaviour.PIECES and proc.stdout == b""
