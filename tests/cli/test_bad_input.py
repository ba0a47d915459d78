"""Every bad input gets one clear line on stderr and its documented exit code, never a traceback.

The cases here are the README's "Bad input" table: ``test_readme_table_matches_the_tests``
fails when the table's rows differ from the rows the tests check (``SIMPLE``, and the tests
marked ``@covers``).
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import BUCKET, assert_stored, unstamped
from tests.gcs_test_server import QUANTUM, Fault, GcsTestServer

README = Path(__file__).resolve().parents[2] / "README.md"
LONG_NAME = "x" * 1025

# (what is wrong, the arguments after `gcsstream put`, exit code, what the line says)
SIMPLE = [
    ("URL without //", "- gs:/x", 2, "not a gs:// URL"),
    ("URL without bucket", "- gs://", 2, "no bucket in"),
    ("URL without object", f"- gs://{BUCKET}", 2, "no object name in"),
    ("not a gs:// URL", "- s3://b/o", 2, "not a gs:// URL"),
    ("invalid bucket name", "- gs://Bad_Bucket/o", 2, "not a valid bucket name"),
    (
        "object name with a newline",
        f"- $'gs://{BUCKET}/a\\nb'",
        2,
        "cannot contain carriage returns or newlines",
    ),
    ("object name over 1024 bytes", f"- gs://{BUCKET}/{LONG_NAME}", 2, "the limit is 1024"),
    ("missing file", f"/no/such/file gs://{BUCKET}/o", 2, "no such file"),
    ("a directory", f"/tmp gs://{BUCKET}/o", 2, "is a directory"),
    (
        "chunk size not a multiple of 256 KiB",
        f"--chunk-size 1000000 - gs://{BUCKET}/o",
        2,
        "multiple of 256 KiB",
    ),
    ("chunk size not a size", f"--chunk-size lots - gs://{BUCKET}/o", 2, "not a size"),
    (
        "unknown checksum",
        f"--checksum sha256 - gs://{BUCKET}/o",
        2,
        "the checksum must be crc32c, md5, both or none",
    ),
    ("metadata without =", f"--metadata novalue - gs://{BUCKET}/o", 2, "metadata must be KEY=VALUE"),
    ("unknown option", f"--bogus - gs://{BUCKET}/o", 2, "No such option"),
    ("missing destination", "-", 2, "missing the destination"),
    ("missing credentials file", f"--credentials /no/key.json - gs://{BUCKET}/o", 2, "no such file"),
    ("unknown bucket", "- gs://no-such-bucket-x/o", 5, "bucket gs://no-such-bucket-x not found"),
]


class Row(NamedTuple):
    """One row of the README's table: what is wrong, the exit code, what the error line says."""

    label: str
    code: int
    message: str


#: The rows checked by tests with a setup of their own, filled at import by ``@covers``.
COVERED: dict[str, Row] = {}


def covers(label: str, code: int, message: str):
    """Make a test the check of one README row: it is recorded in ``COVERED`` and the test gets
    the row as its ``row`` argument (so the code and message it asserts are the row's)."""
    row = Row(label, code, message)

    def register(test):
        assert test.__name__.startswith("test_"), f"{test.__name__} would not be collected"
        assert label not in COVERED, f"two tests cover {label!r}"
        COVERED[label] = row
        return pytest.mark.parametrize("row", [row], ids=[label])(test)

    return register


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with GcsTestServer(data_dir=tmp_path_factory.mktemp("bad"), buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def env(server, gcsstream_exe):
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": server.url,
        "PATH": f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}",
    }


def put(args: str, env: dict[str, str], stdin: str = "echo data |", runner: str = "") -> tuple[int, str]:
    """``STDIN gcsstream put ARGS`` in bash (``runner`` goes before ``gcsstream``): (exit code, stderr)."""
    proc = subprocess.run(
        ["bash", "-c", f"{stdin} {runner} gcsstream put {args}"], env=env, capture_output=True, timeout=60
    )
    return proc.returncode, unstamped(proc.stderr.decode())


def assert_one_line(code: int, err: str, expected_code: int, message: str) -> None:
    assert code == expected_code, err
    assert err.startswith("gcsstream: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


def assert_row(code: int, err: str, row: Row) -> None:
    assert_one_line(code, unstamped(err), row.code, row.message)


@pytest.mark.parametrize(("label", "args", "code", "message"), SIMPLE, ids=[c[0] for c in SIMPLE])
def test_bad_input(env, label, args, code, message):
    assert_one_line(*put(args, env), code, message)


@pytest.fixture
def reachable_dir():
    """A directory outside pytest's private (0700) base directory, so that ``nobody`` reaches it."""
    directory = Path(tempfile.mkdtemp(prefix="gcsstream-bad-input-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory)


def unprivileged(env: dict[str, str], directory: Path) -> tuple[str, dict[str, str]]:
    """How to run gcsstream as a user that file permissions apply to (root reads anything: as
    ``nobody`` then), with a state directory that user can write."""
    state = directory / "state"
    state.mkdir(mode=0o700)
    if os.geteuid() == 0:  # the state directory must be that user's own
        os.chown(state, 65534, 65534)
    runner = "setpriv --reuid=65534 --regid=65534 --clear-groups" if os.geteuid() == 0 else ""
    return runner, {**env, "GCSSTREAM_STATE_DIR": str(state)}


@covers("unreadable file", 2, "Permission denied")
def test_unreadable_file(env, server, reachable_dir, row):
    runner, env = unprivileged(env, reachable_dir)
    secret = reachable_dir / "secret.bin"
    secret.write_bytes(b"x")
    secret.chmod(0)
    code, err = put(f"{secret} gs://{BUCKET}/unreadable", env, stdin="", runner=runner)
    assert_row(code, err, row)
    assert f"{secret}: Permission denied" in err, err
    assert server.object_resource(BUCKET, "unreadable") is None
    # The control: the same user, directory and state directory upload a file it may read.
    readable = reachable_dir / "readable.bin"
    data = os.urandom(1000)
    readable.write_bytes(data)
    readable.chmod(0o644)
    code, err = put(f"{readable} gs://{BUCKET}/readable", env, stdin="", runner=runner)
    assert code == 0, err
    assert_stored(server, BUCKET, "readable", data)


@covers("read error in the middle of a file", 1, "the upload was cancelled and no object was created")
def test_read_error_mid_file_cancels_the_session(env, server, tmp_path, row):
    """strace makes the file's third read(2) fail with EIO. The reader keeps at most two chunks
    that have not gone out, so that read waits until the first chunk has been sent."""
    assert shutil.which("strace"), "this test needs strace (apt-get install strace)"
    src = tmp_path / "mid.bin"
    src.write_bytes(os.urandom(6 * QUANTUM))
    sessions_before, requests_before = len(server.sessions()), len(server.requests)
    inject = f"strace -f -qq -o /dev/null -P {src} -e trace=read -e inject=read:error=EIO:when=3+"
    code, err = put(f"--chunk-size 256KiB {src} gs://{BUCKET}/mid", env, stdin="", runner=inject)
    assert_row(code, err, row)
    assert f"reading {src} failed: Input/output error" in err, err
    (session,) = server.sessions()[sessions_before:]
    assert session.cancelled and not session.finalized and server.object_resource(BUCKET, "mid") is None
    requests = server.requests[requests_before:]
    cancel = next(r for r in requests if r.kind == "cancel")
    assert cancel.status == 499
    # A file goes out in one streamed request: the failed read cut it short, midway through its body.
    streamed = [r for r in requests if r.kind == "chunk" and r.seq < cancel.seq]
    assert streamed and streamed[0].content_length == 5 * QUANTUM, requests
    assert QUANTUM <= streamed[0].bytes_received < 5 * QUANTUM and streamed[0].status != 308, requests
    assert not [r for r in requests if r.kind == "final"]
    listed = subprocess.run(["gcsstream", "sessions", "--json"], env=env, capture_output=True, timeout=60)
    assert json.loads(listed.stdout) == [], "the journal kept the cancelled upload"


def test_read_error_on_the_first_read_cancels_the_session(env, server):
    # Reading one's own /proc/self/mem at offset 0 fails with EIO: a file that breaks when read.
    before = len(server.sessions())
    code, err = put(f"/proc/self/mem gs://{BUCKET}/mem", env)
    assert_one_line(code, err, 1, "the upload was cancelled and no object was created")
    assert "reading /proc/self/mem failed: Input/output error" in err
    new = server.sessions()[before:]
    assert new and all(s.cancelled for s in new) and server.object_resource(BUCKET, "mem") is None


@covers("stdin is a terminal", 2, "standard input is a terminal")
def test_stdin_terminal_is_refused(env, row):
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            ["gcsstream", "put", "-", f"gs://{BUCKET}/o"],
            stdin=terminal,
            env=env,
            capture_output=True,
            timeout=30,
        )
    finally:
        os.close(controller)
        os.close(terminal)
    assert_row(proc.returncode, proc.stderr.decode(), row)


@covers("permission denied by the service (403)", 4, "denied (403)")
def test_permission_denied_by_the_service(env, server, row):
    server.faults.add(Fault("status", status=403, on="initiate"))
    assert_row(*put(f"- gs://{BUCKET}/o", env), row)


def no_google_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """No credentials anywhere, and google-auth kept off the network (no metadata-server probe)."""
    clean = {
        k: v for k, v in env.items() if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")
    }
    return {
        **clean,
        "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }


@covers("no credentials found", 4, "no Google credentials found")
def test_no_credentials_found(env, tmp_path, row):
    # An https endpoint is not an emulator, so credentials are required; it is never contacted.
    code, err = put(f"--endpoint https://127.0.0.1:9 - gs://{BUCKET}/o", no_google_env(env, tmp_path))
    assert_row(code, err, row)


@covers("broken credentials file", 4, "is not usable")
def test_broken_credentials_file(env, tmp_path, row):
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account", "private_key": "not a key"')
    code, err = put(f"--credentials {key} - gs://{BUCKET}/o", env)
    assert_row(code, err, row)


@covers("unreachable endpoint", 75, "gave up after")
def test_unreachable_endpoint(env, row):
    code, err = put(
        f"--endpoint http://127.0.0.1:9 --retry-deadline 2 --retry-initial-delay 0.1 - gs://{BUCKET}/o", env
    )
    assert code == 75, err
    lines = err.strip().splitlines()
    assert lines[:-1] and all(
        f"gcsstream: gs://{BUCKET}/o: connection refused, retrying in" in line for line in lines[:-1]
    ), err
    assert_row(code, lines[-1] + "\n", row)


@covers("unwritable state directory", 2, "is not writable")
def test_unwritable_state_directory(env, tmp_path, row):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = put(f"- gs://{BUCKET}/o", {**env, "GCSSTREAM_STATE_DIR": str(blocker / "state")})
    assert_row(code, err, row)


@covers("state directory others may write", 2, "is writable by other users")
def test_state_directory_others_may_write(env, tmp_path, row):
    shared = tmp_path / "shared-state"
    shared.mkdir()
    shared.chmod(0o777)
    code, err = put(f"- gs://{BUCKET}/o", {**env, "GCSSTREAM_STATE_DIR": str(shared)})
    assert_row(code, err, row)
    assert f"chmod 700 {shared}" in err, err


@covers("standard input closed", 2, "standard input is closed")
def test_standard_input_closed(env, server, row):
    code, err = put(f"- gs://{BUCKET}/closed-stdin", env, stdin="", runner="exec 0<&-;")
    assert_row(code, err, row)
    assert server.object_resource(BUCKET, "closed-stdin") is None


def test_readme_table_matches_the_tests():
    text = README.read_text()
    section = text[text.index("## Bad input") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| (.+?) \| (\d+) \| `(.+?)` \|$", section, flags=re.M)
    documented = {Row(label, int(code), message) for label, code, message in rows}
    assert len(documented) == len(rows), "a row appears twice in the README"
    simple = {Row(label, code, message) for label, _, code, message in SIMPLE}
    assert len(simple) == len(SIMPLE) and not {r.label for r in simple} & COVERED.keys()
    tested = simple | set(COVERED.values())
    assert documented == tested, (
        f"in the README only: {sorted(documented - tested)}; in the tests only: {sorted(tested - documented)}"
    )
