"""Every bad input gets one clear line on stderr and its documented exit code, never a traceback.

The cases here are the README's "Bad input" table: ``test_readme_table_matches_the_tests``
fails when the two disagree.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BUCKET
from tests.gcs_test_server import Fault, GcsTestServer

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
    ("metadata without =", f"--metadata novalue - gs://{BUCKET}/o", 2, "metadata must be KEY=VALUE"),
    ("unknown option", f"--bogus - gs://{BUCKET}/o", 2, "No such option"),
    ("missing destination", "-", 2, "missing the destination"),
    ("missing credentials file", f"--credentials /no/key.json - gs://{BUCKET}/o", 2, "no such file"),
    ("unknown bucket", "- gs://no-such-bucket-x/o", 5, "bucket gs://no-such-bucket-x not found"),
]
# Cases that need a setup of their own; each test below checks its row.
SPECIAL = {
    "unreadable file": (2, "Permission denied"),
    "read error in the middle of a file": (1, "the upload was cancelled and no object was created"),
    "stdin is a terminal": (2, "standard input is a terminal"),
    "permission denied by the service (403)": (4, "denied (403)"),
    "no credentials found": (4, "no Google credentials found"),
    "broken credentials file": (4, "is not usable"),
    "unreachable endpoint": (75, "gave up after"),
    "unwritable state directory": (2, "is not writable"),
}


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


def put(args: str, env: dict[str, str], stdin: str = "echo data |", **kwargs) -> tuple[int, str]:
    proc = subprocess.run(
        ["bash", "-c", f"{stdin} gcsstream put {args}"], env=env, capture_output=True, timeout=60, **kwargs
    )
    return proc.returncode, proc.stderr.decode()


def assert_one_line(code: int, err: str, expected_code: int, message: str) -> None:
    assert code == expected_code, err
    assert err.startswith("gcsstream: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("label", "args", "code", "message"), SIMPLE, ids=[c[0] for c in SIMPLE])
def test_bad_input(env, label, args, code, message):
    assert_one_line(*put(args, env), code, message)


def test_unreadable_file(env, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x")
    secret.chmod(0)
    tmp_path.chmod(0o755)
    if os.geteuid() == 0:  # root reads anything: run as nobody
        code, err = put(
            f"{secret} gs://{BUCKET}/o", env, stdin="setpriv --reuid=65534 --regid=65534 --clear-groups"
        )
    else:
        code, err = put(f"{secret} gs://{BUCKET}/o", env)
    assert_one_line(code, err, *SPECIAL["unreadable file"])


def test_read_error_mid_file_cancels_the_session(env, server):
    # Reading one's own /proc/self/mem at offset 0 fails with EIO: a file that breaks when read.
    before = len(server.sessions())
    code, err = put(f"/proc/self/mem gs://{BUCKET}/mem", env)
    assert_one_line(code, err, *SPECIAL["read error in the middle of a file"])
    assert "Input/output error" in err
    new = server.sessions()[before:]
    assert new and all(s.cancelled for s in new) and server.object_resource(BUCKET, "mem") is None


def test_stdin_terminal_is_refused(env):
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
    assert_one_line(proc.returncode, proc.stderr.decode(), *SPECIAL["stdin is a terminal"])


def test_permission_denied_by_the_service(env, server):
    server.faults.add(Fault("status", status=403, on="initiate"))
    assert_one_line(*put(f"- gs://{BUCKET}/o", env), *SPECIAL["permission denied by the service (403)"])


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


def test_no_credentials_found(env, tmp_path):
    # An https endpoint is not an emulator, so credentials are required; it is never contacted.
    code, err = put(f"--endpoint https://127.0.0.1:9 - gs://{BUCKET}/o", no_google_env(env, tmp_path))
    assert_one_line(code, err, *SPECIAL["no credentials found"])


def test_broken_credentials_file(env, tmp_path):
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account", "private_key": "not a key"')
    code, err = put(f"--credentials {key} - gs://{BUCKET}/o", env)
    assert_one_line(code, err, *SPECIAL["broken credentials file"])


def test_unreachable_endpoint(env):
    code, err = put(
        f"--endpoint http://127.0.0.1:9 --retry-deadline 2 --retry-initial-delay 0.1 - gs://{BUCKET}/o", env
    )
    assert code == 75, err
    lines = err.strip().splitlines()
    assert lines[:-1] and all(
        "gcsstream: gs://gcsstream-test/o: connection refused, retrying in" in line for line in lines[:-1]
    ), err
    assert_one_line(code, lines[-1] + "\n", *SPECIAL["unreachable endpoint"])


def test_unwritable_state_directory(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = put(f"- gs://{BUCKET}/o", {**env, "GCSSTREAM_STATE_DIR": str(blocker / "state")})
    assert_one_line(code, err, *SPECIAL["unwritable state directory"])


def test_readme_table_matches_the_tests():
    text = README.read_text()
    section = text[text.index("## Bad input") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| (.+?) \| (\d+) \| `(.+?)` \|$", section, flags=re.M)
    documented = {(label, int(code), message) for label, code, message in rows}
    tested = {(label, code, message) for label, _, code, message in SIMPLE}
    tested |= {(label, code, message) for label, (code, message) in SPECIAL.items()}
    assert documented == tested, (
        f"in the README only: {sorted(documented - tested)}; in the tests only: {sorted(tested - documented)}"
    )
