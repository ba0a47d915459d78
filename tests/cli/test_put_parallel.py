"""The installed ``gcsstream put --parallel`` in real pipelines against the test server: from a
pipe, a file and --exec, read back and compared; stopped by SIGINT/SIGTERM with nothing left
behind; the options a composed object cannot honour, and a bucket that could not clean up,
refused before anything is sent."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import assert_stored, crc32c_b64, unstamped
from tests.gcs_test_server import QUANTUM, Fault, GcsTestServer

BUCKET = "parcli"
PARALLEL = "--parallel 4 --part-size 256KiB --chunk-size 256KiB --retry-initial-delay 0.05"


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def env(server, gcsstream_exe, state_dir):
    path = f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}"
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": server.url,
        "PATH": path,
        "GCSSTREAM_STATE_DIR": str(state_dir),
    }


def sh(script: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, timeout=120, **kwargs
    )


def journal_entries(state_dir: Path) -> list[Path]:
    return [p for p in state_dir.rglob("*.json") if p.is_file()] if state_dir.exists() else []


def test_from_a_pipe(server, env, tmp_path, state_dir):
    copy = tmp_path / "sent"
    size = 13 * QUANTUM + 77
    r = sh(
        f"head -c {size} /dev/urandom | tee {copy} | gcsstream put {PARALLEL} - 'gs://{BUCKET}/pipe d/o'", env
    )
    assert r.returncode == 0, r.stderr
    data = copy.read_bytes()
    resource = assert_stored(server, BUCKET, "pipe d/o", data)
    assert resource["componentCount"] == 14
    assert server.list_objects(BUCKET) == ["pipe d/o"]
    summary = unstamped(r.stderr.decode()).strip()
    assert summary.startswith(
        f"gcsstream: uploaded gs://{BUCKET}/pipe d/o generation {resource['generation']}: "
    )
    assert (
        f"{size} bytes" in summary
        and f"crc32c {crc32c_b64(data)} (verified), composed of 14 parts" in summary
    )
    # Journaled while it ran (resumable); once done, only the record `gcsstream status ID` reads.
    assert [p.parent.name for p in journal_entries(state_dir)] == ["finished"]


def test_from_a_file_with_json_summary(server, env, tmp_path):
    src = tmp_path / "db.dump"
    src.write_bytes(os.urandom(40 * QUANTUM + 1))  # 41 parts: a compose tree
    r = sh(
        f"gcsstream put {PARALLEL} --json --content-type text/x-dump -m k=v {src} gs://{BUCKET}/dumps/", env
    )
    assert r.returncode == 0, r.stderr
    resource = assert_stored(server, BUCKET, "dumps/db.dump", src.read_bytes())
    assert resource["contentType"] == "text/x-dump" and resource["metadata"] == {"k": "v"}
    summary = json.loads(r.stdout)
    assert summary["parts"] == 41 and summary["bytes"] == src.stat().st_size
    assert summary["crc32c"] == resource["crc32c"] and summary["generation"] == int(resource["generation"])
    assert summary["verified"] == ["crc32c"] and summary["md5"] is None
    assert server.list_objects(BUCKET) == ["dumps/db.dump"]


def test_gzip_compresses_the_stream_before_it_is_cut_into_parts(server, env, tmp_path):
    src = tmp_path / "log"
    src.write_bytes(b"".join(b"line %d of a compressible log\n" % i for i in range(200_000)))
    r = sh(f"gcsstream put {PARALLEL} --gzip {src} gs://{BUCKET}/log.gz", env)
    assert r.returncode == 0, r.stderr
    stored = server.read_object(BUCKET, "log.gz")
    assert gzip.decompress(stored) == src.read_bytes()
    resource = assert_stored(server, BUCKET, "log.gz", stored)
    assert resource["contentEncoding"] == "gzip" and resource["componentCount"] > 1
    assert server.list_objects(BUCKET) == ["log.gz"]


def test_from_exec_and_a_failing_producer(server, env, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(5 * QUANTUM))
    r = sh(f"gcsstream put {PARALLEL} --exec 'cat {src}' gs://{BUCKET}/exec", env)
    assert r.returncode == 0, r.stderr
    assert_stored(server, BUCKET, "exec", src.read_bytes())
    r = sh(f"gcsstream put {PARALLEL} --exec 'cat {src}; exit 3' gs://{BUCKET}/failed", env)
    assert r.returncode == 1, r.stderr
    assert "exited with status 3; no object was created" in r.stderr.decode()
    assert server.list_objects(BUCKET) == ["exec"]


def _signalled_mid_upload(server, env, tmp_path, name: str, sig: int, *, timeout: float) -> tuple[int, bytes]:
    """A parallel put of 12 x 256 KiB from a pipe, sent ``sig`` once a part is stored and the third
    part's final request is held up by the server (until the test ends): its exit code, stderr."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(12 * QUANTUM))
    server.faults.add(Fault("stall", on="final", nth=3, seconds=300))
    proc = subprocess.Popen(
        ["gcsstream", "put", *PARALLEL.split(), "-", f"gs://{BUCKET}/{name}"],
        env=env,
        stdin=src.open("rb"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        server.wait_for_request(lambda r: r.kind == "final" and r.fault == "stall", 60)
        server.wait_for_request(lambda r: r.kind == "final" and r.status == 200, 60)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("mode", ["md5", "both"])
def test_checksum_md5_is_refused(server, env, mode):
    r = sh(f"echo hi | gcsstream put --parallel 2 --checksum {mode} - gs://{BUCKET}/md5", env)
    assert r.returncode == 2, r.stderr
    assert unstamped(r.stderr.decode()) == (
        f"gcsstream: error: --checksum {mode} cannot be used with --parallel: a composed object has no MD5 "
        "(its CRC32C is verified end to end instead)\n"
    )
    assert server.requests == []


@pytest.mark.parametrize("bad", ["100KiB", "0", "1MB"])
def test_a_part_size_that_is_not_a_multiple_of_256kib_is_refused(server, env, bad):
    r = sh(f"echo hi | gcsstream put --parallel 2 --part-size {bad} - gs://{BUCKET}/p", env)
    assert r.returncode == 2, r.stderr
    assert "part size" in r.stderr.decode() and server.requests == []


def test_a_bucket_with_a_retention_policy_is_refused(server, env):
    server.create_bucket("retained", retentionPolicy={"retentionPeriod": "86400"})
    r = sh(f"head -c 1000000 /dev/urandom | gcsstream put {PARALLEL} - gs://retained/o", env)
    assert r.returncode == 2, r.stderr
    assert unstamped(r.stderr.decode()) == (
        "gcsstream: error: gs://retained has a retention policy: the temporary objects of --parallel "
        "could not be deleted; upload it as one stream (without --parallel)\n"
    )
    assert [r.kind for r in server.requests] == ["bucket"] and server.list_objects("retained") == []
    r = sh("head -c 1000000 /dev/urandom | gcsstream put - gs://retained/o", env)  # one stream is fine
    assert r.returncode == 0, r.stderr


def test_progress_lines_show_the_total_and_the_parts_in_flight(server, env, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * QUANTUM))
    server.faults.add(Fault("stall", on="final", nth=2, seconds=1.0))  # a moment with parts in flight
    r = sh(f"gcsstream put {PARALLEL} --progress-interval 0.05 {src} gs://{BUCKET}/prog", env)
    assert r.returncode == 0, r.stderr
    assert_stored(server, BUCKET, "prog", src.read_bytes())
    lines = unstamped(r.stderr.decode()).splitlines()
    status = [line for line in lines if line.startswith(f"gcsstream: gs://{BUCKET}/prog: ")]
    assert status, lines
    pattern = re.compile(r"of 2\.0 MiB \(\d+%\) stored, rate .*, \d+ s, parts: (\d) in flight, (\d) stored$")
    matches = [pattern.search(line) for line in status]
    assert all(matches), status
    assert any(int(m.group(1)) >= 1 for m in matches if m)


def test_a_signal_ends_the_run_promptly_when_a_part_is_stuck(server, env, tmp_path, state_dir):
    # Found in review: the cleanup after SIGTERM waited on each cancel and each round of deletes
    # for a whole I/O timeout (120 s) and more: a stuck server kept the run alive for > 6 minutes.
    # Now a signal keeps the parts for `resume` and cleans nothing up: the stuck part's worker is
    # given a moment (2 s), not waited for, and no request is made after the signal.
    server.faults.add(Fault("stall", on="cancel", times=100, seconds=300))
    server.faults.add(Fault("stall", on="delete", times=100, seconds=300))
    returncode, err = _signalled_mid_upload(server, env, tmp_path, "stuck", signal.SIGTERM, timeout=30)
    assert returncode == 143, err
    text = unstamped(err.decode()).splitlines()[-1]
    assert re.fullmatch(
        r"gcsstream: error: terminated; \d+ parts? \(.+\) (is|are) stored; continue with: "
        r"\.\.\. \| gcsstream resume [0-9a-f]{16} -",
        text,
    ), text
    assert not any(r.kind in ("cancel", "delete") for r in server.requests)
    assert len([p for p in journal_entries(state_dir) if p.parent == state_dir]) == 1
