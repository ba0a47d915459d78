"""Every fault the test server can inject, survived by the real ``gcsstream put`` (or reported
with its documented exit code), and nothing secret in the output, ``--debug`` included."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import assert_stored, hold_a_file_upload, stall_a_file_upload, unstamped
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
    """Run ``SRC | gcsstream put ARGS - gs://faults/obj`` (``from_file``: ``put SRC``, which
    streams the file in one request) and return (process, data sent)."""

    def run(args: str = "", size: int = 3 * CHUNK + 1000, name: str = "obj", env_extra=None, from_file=False):
        data = os.urandom(size)
        src = tmp_path / f"src-{name}"
        src.write_bytes(data)
        env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url, **(env_extra or {})}
        cmd = f"cat {src} | {gcsstream_exe} put {FAST} {args} - gs://{BUCKET}/{name}"
        if from_file:
            cmd = f"{gcsstream_exe} put {FAST} {args} {src} gs://{BUCKET}/{name}"
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


def survives(server, put, fault, **how) -> None:
    server.faults.add(fault)
    proc, data = put(**how)
    assert proc.returncode == 0, proc.stderr.decode()
    assert server.faults.applied(fault.kind), "the fault never fired"
    assert_stored(server, BUCKET, "obj", data)


@pytest.mark.parametrize("fault", SURVIVABLE)
def test_fault_is_survived(server, put, fault):
    survives(server, put, fault)


STREAMED_SIZE = 16 * CHUNK + 1000  # 8 MiB: one streamed request of 8 MiB, then a final 1000 bytes
STREAMED = [
    pytest.param(Fault("status", status=503, on="chunk", nth=1), id="status-503"),
    pytest.param(Fault("status", status=503, on="final"), id="status-503-on-final"),
    # Most of the file went out but little was kept: its first buffers are long gone, and the
    # resend reads them from the file again.
    pytest.param(
        Fault("reset", on="chunk", nth=1, after_bytes=6 * CHUNK, persist=QUANTUM), id="reset-reread"
    ),
    pytest.param(Fault("reset", on="chunk", nth=1, after_bytes=6 * CHUNK), id="reset-kept-all"),
    pytest.param(Fault("partial", on="chunk", nth=1, persist=3 * CHUNK), id="partial"),
    pytest.param(Fault("partial", on="chunk", nth=1, persist=0), id="partial-nothing"),
    pytest.param(Fault("reset", on="final", after_bytes=10), id="reset-mid-final"),
    pytest.param(Fault("trickle", on="chunk", nth=1, rate=8 * 1024 * 1024, seconds=0.3), id="trickle"),
]


@pytest.mark.parametrize("fault", STREAMED)
def test_fault_is_survived_by_a_file_streamed_in_one_request(server, put, fault):
    survives(server, put, fault, size=STREAMED_SIZE, from_file=True)
    first = next(r for r in server.requests if r.kind in ("chunk", "final"))
    assert first.content_length == (STREAMED_SIZE - 1) // QUANTUM * QUANTUM  # one request for it all


def test_401_during_a_streamed_request_sends_all_of_it_again(server, put, service_account):
    """google-auth resends the request after refreshing: the streamed body starts over (from the
    file where its buffers are gone)."""
    key, tokens = service_account
    server.faults.add(Fault("unauthorized", on="chunk", nth=1))
    proc, data = put(f"--credentials {key}", size=STREAMED_SIZE, from_file=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(tokens.tokens) == 2, "the 401 should have made gcsstream fetch a second token"
    assert_stored(server, BUCKET, "obj", data)


@pytest.mark.parametrize("from_file", [True, False], ids=["file", "pipe"])
def test_401_before_the_body_is_read_resends_all_of_it(server, put, service_account, from_file):
    """The server answers 401 at once and drops the body: the resend after refreshing starts the
    body afresh (it used to go on from where the first sending had stopped, as if from byte 0)."""
    key, tokens = service_account
    server.faults.add(Fault("unauthorized", on="chunk", nth=1, read_body=False))
    proc, data = put(f"--credentials {key}", size=64 * CHUNK + 1000, from_file=from_file)
    assert proc.returncode == 0, proc.stderr.decode()
    assert server.faults.applied("unauthorized") and len(tokens.tokens) == 2
    assert_stored(server, BUCKET, "obj", data)


@pytest.mark.parametrize("seconds", [1, 1.5])
def test_429_retry_after_is_honoured(server, put, seconds):
    """The next request comes no sooner than Retry-After says (the backoff alone waits ~0.05 s)."""
    fault = server.faults.add(Fault("status", status=429, retry_after=seconds, on="chunk", nth=2))
    proc, data = put()
    assert proc.returncode == 0, proc.stderr.decode()
    requests = server.requests
    (faulted,) = [r for r in requests if r.fault]
    assert faulted.status == 429 and server.faults.applied("status") == [fault]
    following = requests[requests.index(faulted) + 1]
    waited = following.started - faulted.finished
    assert waited >= seconds - 0.05, f"the next request came {waited:.3f} s after a Retry-After of {seconds}"
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
    err = unstamped(proc.stderr.decode())
    assert err.startswith("gcsstream: error: access to gs://faults/obj denied (403)")


def test_401_without_refreshable_credentials_is_auth_error(server, put):
    server.faults.add(Fault("unauthorized", on="chunk", nth=1))
    proc, _ = put()
    assert proc.returncode == 4, proc.stderr.decode()
    assert unstamped(proc.stderr.decode()).startswith("gcsstream: error: "), proc.stderr.decode()
    assert server.faults.applied("unauthorized")
    assert server.object_resource(BUCKET, "obj") is None


def test_no_clobber_on_existing_object_is_precondition_failed(server, put):
    first, data = put()
    assert first.returncode == 0, first.stderr.decode()
    generation = assert_stored(server, BUCKET, "obj", data)["generation"]
    proc, _ = put("--no-clobber")
    assert proc.returncode == 6, proc.stderr.decode()
    assert b"already exists" in proc.stderr
    # The first upload's object is untouched: same generation, same bytes and checksums.
    assert assert_stored(server, BUCKET, "obj", data)["generation"] == generation


def test_retry_deadline_gives_75_and_leaves_session_open(server, put):
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    proc, _ = put("--retry-deadline 1")
    err = proc.stderr.decode()
    assert proc.returncode == 75, err
    assert unstamped(err).strip().splitlines()[-1].startswith("gcsstream: error: gave up after")
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


def leaks(text: str, tokens: list[str], upload_ids: list[str]) -> list[str]:
    """What in ``text`` gives away a credential: any 8 characters in a row of a token or an upload
    id, an unredacted ``ya29.`` token or ``upload_id=``, an Authorization header."""
    found = [
        piece
        for secret in [*tokens, *upload_ids]
        for piece in {secret[i : i + 8] for i in range(len(secret) - 7)}
        if piece in text
    ]
    found += re.findall(r"ya29\.(?!REDACTED\b)\S{0,12}", text)
    found += re.findall(r"upload_id=(?!REDACTED\b)\S{0,12}", text, flags=re.IGNORECASE)
    found += [word for word in ("Bearer ", "Authorization") if word in text]
    return found


def test_no_secret_in_any_output(server, put, service_account, tmp_path):
    """Tokens, Authorization headers and session ids never reach stdout, stderr or --debug logs."""
    key, tokens = service_account
    outputs = []
    server.faults.add(Fault("unauthorized", on="chunk", nth=1))
    server.faults.add(Fault("reset", on="chunk", nth=2, after_bytes=1000))
    ok, data = put(f"--credentials {key} --debug --json", name="ok")
    outputs.append(ok)
    server.faults.add(Fault("status", status=503, on="chunk", nth=1, times=10_000))
    failed, _ = put(f"--credentials {key} --debug --retry-deadline 0.5", name="failed")
    outputs.append(failed)
    server.faults = FaultPlan([Fault("expire", on="chunk", nth=1)])
    outputs.append(put(f"--credentials {key} --debug", name="expired")[0])
    assert [p.returncode for p in outputs] == [0, 75, 5]
    resource = assert_stored(server, BUCKET, "ok", data)
    assert json.loads(ok.stdout)["crc32c"] == resource["crc32c"]
    upload_ids = [s.upload_id for s in server.sessions()]
    assert len(upload_ids) == 3 and len(tokens.tokens) >= 2
    for proc in outputs:
        text = (proc.stdout + proc.stderr).decode()
        assert "debug:" in text  # the debug log really was on
        assert not leaks(text, tokens.tokens, upload_ids), f"leaked: {leaks(text, tokens.tokens, upload_ids)}"


def test_leak_check_finds_truncated_secrets():
    """The check above is only as good as ``leaks``: it must see a secret cut short."""
    token, upload_id = "ya29.test-token-1-SECRET", "ADPycdvSECRETsessionid0123456789"
    assert not leaks("upload_id=REDACTED ya29.REDACTED Bearer-free", [token], [upload_id])
    for text in [
        f"token {token[:-3]}",
        "ya29.xyz",
        f"...{upload_id[5:14]}...",
        "?upload_id=ADPy",
        "upload_id=%41",
        "Authorization: x",
    ]:
        assert leaks(text, [token], [upload_id]), text


def run_gcs(gcsstream_exe: str, args: str, env: dict[str, str], stdin: Path | None = None):
    """``gcsstream ARGS`` with ``stdin`` from a file (else nothing); the finished process."""
    with open(stdin or os.devnull, "rb") as feed:
        return subprocess.run(
            [gcsstream_exe, *args.split()], stdin=feed, env=env, capture_output=True, timeout=120
        )


def test_no_secret_from_session_commands_or_an_interrupt(server, gcsstream_exe, service_account, tmp_path):
    """SIGINT of `put --debug`, then `sessions`, `status`, `resume --debug` and `abort` by session
    URI: the URI is a credential that only the journal file may hold."""
    key, tokens = service_account
    env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url}
    src = tmp_path / "src.bin"
    data = os.urandom(3 * CHUNK + 1000)
    src.write_bytes(data)
    outputs = {}
    # SIGINT while the server holds up the request after the first chunk (stdin is a file: it goes
    # out in one streamed request, of which the server keeps a chunk).
    stall_a_file_upload(server, CHUNK, seconds=30)
    with open(src, "rb") as feed:
        proc = subprocess.Popen(
            [gcsstream_exe, *f"put {FAST} --credentials {key} --debug - gs://{BUCKET}/sig".split()],
            stdin=feed,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            server.wait_for_request(lambda r: r.fault == "stall", 60)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err.decode()
    assert b"debug:" in err and b"interrupted; " in err, err.decode()
    outputs["put --debug, SIGINT"] = out + err
    listed = run_gcs(gcsstream_exe, "sessions", env)
    outputs["sessions"] = listed.stdout + listed.stderr
    listed_json = run_gcs(gcsstream_exe, "sessions --json", env)
    outputs["sessions --json"] = listed_json.stdout + listed_json.stderr
    assert listed.returncode == listed_json.returncode == 0
    (entry,) = json.loads(listed_json.stdout)
    assert entry["id"] in listed.stdout.decode() and entry["held"] == CHUNK
    journal = Path(os.environ["GCSSTREAM_STATE_DIR"]) / f"{entry['id']}.json"
    uri = json.loads(journal.read_text())["session_uri"]
    status = run_gcs(gcsstream_exe, f"status {uri} --json --credentials {key} --debug", env)
    outputs["status URI"] = status.stdout + status.stderr
    assert status.returncode == 0 and json.loads(status.stdout)["held"] == CHUNK, status.stderr.decode()
    server.faults = FaultPlan()
    resumed = run_gcs(gcsstream_exe, f"resume {uri} - --credentials {key} --debug {FAST}", env, src)
    outputs["resume URI --debug"] = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and b"debug:" in resumed.stderr, resumed.stderr.decode()
    assert_stored(server, BUCKET, "sig", data)
    # resumed by its URI, the upload's journal was found, used and forgotten
    assert json.loads(run_gcs(gcsstream_exe, "sessions --json", env).stdout) == []
    # An upload that gives up, aborted by its session URI; then status and abort of the dead session.
    hold_a_file_upload(server, CHUNK)
    gave_up = run_gcs(gcsstream_exe, f"put {FAST} --retry-deadline 0.5 - gs://{BUCKET}/ab", env, src)
    assert gave_up.returncode == 75, gave_up.stderr.decode()
    server.faults = FaultPlan()
    listed = json.loads(run_gcs(gcsstream_exe, "sessions --json", env).stdout)
    (entry,) = listed
    uri = json.loads((journal.parent / f"{entry['id']}.json").read_text())["session_uri"]
    aborted = run_gcs(gcsstream_exe, f"abort {uri} --credentials {key} --debug", env)
    outputs["abort URI"] = aborted.stdout + aborted.stderr
    assert aborted.returncode == 0 and b"aborted" in aborted.stderr, aborted.stderr.decode()
    assert server.session(uri).cancelled and server.object_resource(BUCKET, "ab") is None
    for command in ("status", "abort"):
        dead = run_gcs(gcsstream_exe, f"{command} {uri} --credentials {key} --debug", env)
        outputs[f"{command} of a cancelled session URI"] = dead.stdout + dead.stderr
    assert b"Traceback" in outputs["status of a cancelled session URI"]  # the debug path really ran
    upload_ids = [s.upload_id for s in server.sessions()]
    assert len(upload_ids) == 2 and tokens.tokens
    for what, output in outputs.items():
        found = leaks(output.decode(), tokens.tokens, upload_ids)
        assert not found, f"{what} leaked {found}"


@pytest.mark.parametrize("command", ["status", "abort"])
def test_session_commands_take_debug(server, put, gcsstream_exe, command):
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    proc, _ = put("--retry-deadline 0.5")
    assert proc.returncode == 75, proc.stderr.decode()
    (session,) = server.sessions()
    uri = f"{server.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&upload_id={session.upload_id}"
    env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url}
    done = run_gcs(gcsstream_exe, f"{command} {uri} --debug", env)
    text = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and "debug:" in text, text
    assert not leaks(text, [], [session.upload_id]), leaks(text, [], [session.upload_id])
