"""Every fault the test server can inject, survived by the real ``gcsstream put`` (or reported
with its documented exit code), and nothing secret in the output, ``--debug`` included."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import assert_stored
from tests.gcs_test_server import QUANTUM, Fault, FaultPlan, GcsTestServer

BUCKET = "faults"
CHUNK = 2 * QUANTUM
FAST = "--retry-initial-delay 0.05 --retry-deadline 20 --chunk-size 512KiB"


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def put(server, gcsstream_exe, tmp_path):
    """Run ``SRC | gcsstream put ARGS - gs://faults/obj`` and return (process, data sent)."""

    def run(args: str = "", size: int = 3 * CHUNK + 1000, name: str = "obj", env_extra=None):
        data = os.urandom(size)
        src = tmp_path / f"src-{name}"
        src.write_bytes(data)
        env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url, **(env_extra or {})}
        cmd = f"cat {src} | {gcsstream_exe} put {FAST} {args} - gs://{BUCKET}/{name}"
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", cmd], env=env, capture_output=True, timeout=120
        )
        return proc, data

    return run


def kinds(server) -> list[str]:
    return [r.kind for r in server.requests]


SURVIVABLE = [
    pytest.param(Fault("status", status=status, on="chunk", nth=2), id=f"status-{status}")
    for status in (408, 500, 502, 503, 504)
] + [
    pytest.param(Fault("status", status=429, retry_after=1, on="chunk", nth=2), id="status-429-retry-after"),
    pytest.param(Fault("status", status=503, on="final"), id="status-503-on-final"),
    pytest.param(Fault("status", status=503, on="initiate"), id="status-503-on-initiate"),
    pytest.param(Fault("reset", on="chunk", nth=2, after_bytes=300_000), id="reset-mid-body"),
    pytest.param(Fault("reset", on="final", after_bytes=10), id="reset-mid-final"),
    pytest.param(Fault("partial", on="chunk", nth=1, persist=QUANTUM), id="partial-half"),
    pytest.param(Fault("partial", on="chunk", nth=2, persist=0), id="partial-nothing-308-without-range"),
    pytest.param(Fault("partial", on="final", persist=0), id="partial-on-final"),
    pytest.param(Fault("trickle", on="chunk", nth=1, rate=2 * 1024 * 1024, seconds=0.3), id="trickle"),
]


@pytest.mark.parametrize("fault", SURVIVABLE)
def test_fault_is_survived(server, put, fault):
    server.faults.add(fault)
    proc, data = put()
    assert proc.returncode == 0, proc.stderr.decode()
    assert server.faults.applied(fault.kind), "the fault never fired"
    assert_stored(server, BUCKET, "obj", data)


@pytest.mark.parametrize("kind", ["status", "reset"])
def test_resend_is_preceded_by_a_status_query(server, put, kind):
    server.faults.add(Fault(kind, on="chunk", nth=2, status=503, after_bytes=100_000))
    proc, data = put()
    assert proc.returncode == 0, proc.stderr.decode()
    sequence = kinds(server)
    failed = next(i for i, r in enumerate(server.requests) if r.fault)
    assert sequence[failed + 1] == "status", sequence
    assert_stored(server, BUCKET, "obj", data)


def test_stall_longer_than_timeout_is_retried(server, put):
    server.faults.add(Fault("stall", on="chunk", nth=2, seconds=4, after_bytes=100_000))
    proc, data = put("--io-timeout 1")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"timed out, retrying" in proc.stderr
    assert_stored(server, BUCKET, "obj", data)


def test_expired_session_is_not_found(server, put):
    server.faults.add(Fault("expire", on="chunk", nth=2))
    proc, _ = put()
    assert proc.returncode == 5, proc.stderr.decode()
    assert b"no longer exists" in proc.stderr
    assert server.object_resource(BUCKET, "obj") is None


def test_forbidden_is_auth_error(server, put):
    server.faults.add(Fault("status", status=403, on="initiate"))
    proc, _ = put()
    assert proc.returncode == 4, proc.stderr.decode()
    assert proc.stderr.decode().startswith("gcsstream: error: access to gs://faults/obj denied (403)")


def test_401_without_refreshable_credentials_is_auth_error(server, put):
    server.faults.add(Fault("unauthorized", on="chunk", nth=1))
    proc, _ = put()
    assert proc.returncode == 4, proc.stderr.decode()


def test_no_clobber_on_existing_object_is_precondition_failed(server, put):
    assert put()[0].returncode == 0
    proc, _ = put("--no-clobber")
    assert proc.returncode == 6, proc.stderr.decode()
    assert b"already exists" in proc.stderr


def test_retry_deadline_gives_75_and_leaves_session_open(server, put):
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    proc, _ = put("--retry-deadline 1")
    err = proc.stderr.decode()
    assert proc.returncode == 75, err
    assert err.strip().splitlines()[-1].startswith("gcsstream: error: gave up after")
    (session,) = server.sessions()
    assert session.persisted == CHUNK and not session.cancelled and not session.finalized


class TokenEndpoint:
    """A loopback OAuth token endpoint: answers each JWT grant with a new access token."""

    def __init__(self) -> None:
        tokens = self.tokens = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers["Content-Length"]))
                token = f"ya29.test-token-{len(tokens) + 1}-SECRET"
                tokens.append(token)
                body = json.dumps(
                    {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def service_account(tmp_path):
    """A service-account key file whose tokens come from a loopback token endpoint."""
    endpoint = TokenEndpoint()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = tmp_path / "key.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test-project",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "uploader@test-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": endpoint.url,
            }
        )
    )
    yield path, endpoint
    endpoint.close()


def test_401_once_refreshes_credentials_and_continues(server, put, service_account):
    key, tokens = service_account
    server.faults.add(Fault("unauthorized", on="chunk", nth=2))
    proc, data = put(f"--credentials {key}")
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(tokens.tokens) == 2, "the 401 should have made gcsstream fetch a second token"
    assert_stored(server, BUCKET, "obj", data)


def test_no_secret_in_any_output(server, put, service_account, tmp_path):
    """Tokens, Authorization headers and session ids never reach stdout, stderr or --debug logs."""
    key, tokens = service_account
    outputs = []
    server.faults.add(Fault("unauthorized", on="chunk", nth=1))
    server.faults.add(Fault("reset", on="chunk", nth=2, after_bytes=1000))
    ok, _ = put(f"--credentials {key} --debug --json", name="ok")
    outputs.append(ok)
    server.faults.add(Fault("status", status=503, on="chunk", nth=1, times=10_000))
    failed, _ = put(f"--credentials {key} --debug --retry-deadline 0.5", name="failed")
    outputs.append(failed)
    server.faults = FaultPlan([Fault("expire", on="chunk", nth=1)])
    outputs.append(put(f"--credentials {key} --debug", name="expired")[0])
    assert [p.returncode for p in outputs] == [0, 75, 5]
    upload_ids = [s.upload_id for s in server.sessions()]
    assert len(upload_ids) == 3 and tokens.tokens
    for proc in outputs:
        text = (proc.stdout + proc.stderr).decode()
        assert "debug:" in text  # the debug log really was on
        for secret in [*tokens.tokens, *upload_ids, "Bearer ", "Authorization"]:
            assert secret not in text, f"{secret!r} leaked"
