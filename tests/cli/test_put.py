"""The installed ``gcsstream put`` in real shell pipelines against local emulators."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BUCKET, assert_stored, crc32c_b64, emulator_messages


def sh(script: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    """Run a bash pipeline with pipefail, as a cron job should."""
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, timeout=300, **kwargs
    )


@pytest.fixture
def env(emulator, gcsstream_exe):
    """The environment a user of the emulator has: STORAGE_EMULATOR_HOST and gcsstream on PATH."""
    path = f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}"
    return {**os.environ, "STORAGE_EMULATOR_HOST": emulator.url, "PATH": path}


@pytest.mark.parametrize("size", [0, 1, 3 * 256 * 1024, 5 * 1024 * 1024 + 3], ids=lambda n: f"{n}B")
def test_pipe_from_head_urandom(emulator, env, object_name, tmp_path, size):
    copy = tmp_path / "sent"
    r = sh(
        f"head -c {size} /dev/urandom | tee {copy} | gcsstream put --chunk-size 1MiB - 'gs://{BUCKET}/{object_name}'",
        env,
    )
    assert r.returncode == 0, r.stderr
    data = copy.read_bytes()
    assert_stored(emulator, BUCKET, object_name, data)
    summary = emulator_messages(r.stderr, emulator).strip()
    assert summary.startswith(f"gcsstream: uploaded gs://{BUCKET}/{object_name} generation ")
    assert f"{size} bytes" in summary and f"crc32c {crc32c_b64(data)}" in summary
    assert re.search(r", [\d.]+ (B|KiB|MiB|GiB)/s$", summary), summary
    assert r.stdout == b""


def test_tar_pipeline_round_trip(emulator, env, object_name, tmp_path):
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    for i in range(20):
        (site / "sub" / f"f{i}.bin").write_bytes(os.urandom(50_000 * i))
    sent = tmp_path / "sent.tar"
    r = sh(f"tar -C {tmp_path} -c site | tee {sent} | gcsstream put - 'gs://{BUCKET}/{object_name}'", env)
    assert r.returncode == 0, r.stderr
    assert_stored(emulator, BUCKET, object_name, sent.read_bytes())  # the stream's sha256 and crc32c
    out = tmp_path / "out"
    out.mkdir()
    stored = emulator.read_object(BUCKET, object_name)
    subprocess.run(["tar", "-C", str(out), "-x"], input=stored, check=True)
    for f in (site / "sub").iterdir():
        assert (out / "site" / "sub" / f.name).read_bytes() == f.read_bytes()


def test_file_source_and_folder_destination(emulator, env, tmp_path):
    src = tmp_path / "db.dump"
    src.write_bytes(os.urandom(700_000))
    r = sh(f"gcsstream put --chunk-size 256KiB {src} gs://{BUCKET}/dumps/", env)
    assert r.returncode == 0, r.stderr
    resource = assert_stored(emulator, BUCKET, "dumps/db.dump", src.read_bytes())
    assert resource["contentType"] == "application/octet-stream"


def test_json_summary_on_stdout(emulator, env, object_name):
    data = os.urandom(1000)
    r = sh(f"gcsstream put --json --checksum both - 'gs://{BUCKET}/{object_name}'", env, input=data)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    resource = assert_stored(emulator, BUCKET, object_name, data)
    assert summary["object"] == f"gs://{BUCKET}/{object_name}"
    assert summary["bytes"] == 1000 and summary["generation"] == int(resource["generation"])
    assert summary["crc32c"] == crc32c_b64(data) and summary["md5"] == resource["md5Hash"]
    assert emulator_messages(r.stderr, emulator) == ""


def test_metadata_options(emulator, env, object_name):
    r = sh(
        f"echo hi | gcsstream put -q --content-type text/plain --cache-control no-cache "
        f"--metadata a=1 -m b=2=3 - 'gs://{BUCKET}/{object_name}'",
        env,
    )
    assert r.returncode == 0 and r.stderr == b""
    resource = assert_stored(emulator, BUCKET, object_name, b"hi\n")
    assert resource["contentType"] == "text/plain" and resource["cacheControl"] == "no-cache"
    assert resource["metadata"] == {"a": "1", "b": "2=3"}


def test_version_and_help_list_exit_codes(env):
    r = sh("gcsstream --version && gcsstream put --help", env)
    out = r.stdout.decode()
    assert r.returncode == 0 and out.startswith("gcsstream 0.")
    assert "Exit codes:" in out and "75 transient" in out and "Examples:" in out


def test_exec_uploads_the_producers_output(emulator, env, object_name, tmp_path):
    data = os.urandom(1_000_000)
    (tmp_path / "src").write_bytes(data)
    r = sh(
        f"gcsstream put --chunk-size 256KiB --exec 'cat {tmp_path}/src' 'gs://{BUCKET}/{object_name}'", env
    )
    assert r.returncode == 0, r.stderr
    assert_stored(emulator, BUCKET, object_name, data)


@pytest.mark.parametrize(
    ("producer", "message"),
    [
        ("head -c 1000000 /dev/urandom; exit 3", "exited with status 3"),
        ("head -c 600000 /dev/urandom; kill -9 $$", "was killed by SIGKILL"),
        ("exit 1", "exited with status 1"),
    ],
)
def test_failed_producer_leaves_no_object(emulator, env, object_name, producer, message):
    r = sh(f"gcsstream put --chunk-size 256KiB --exec '{producer}' 'gs://{BUCKET}/{object_name}'", env)
    err = emulator_messages(r.stderr, emulator)
    assert r.returncode == 1, err
    assert message in err and "no object was created" in err and err.count("\n") == 1
    assert not emulator.has_object(BUCKET, object_name)


@pytest.mark.parametrize(
    ("sent", "declared", "ok"), [(1000, 1000, True), (1000, 999, False), (1000, 1001, False)]
)
def test_size_finalizes_only_on_exact_length(emulator, env, object_name, sent, declared, ok):
    r = sh(f"head -c {sent} /dev/zero | gcsstream put --size {declared} - 'gs://{BUCKET}/{object_name}'", env)
    assert (r.returncode == 0) == ok, r.stderr
    assert emulator.has_object(BUCKET, object_name) == ok
    if ok:
        assert_stored(emulator, BUCKET, object_name, bytes(sent))
    else:
        assert r.returncode == 1 and b"no object was created" in r.stderr
