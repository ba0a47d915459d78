"""Scripting gcsstream: ``--json`` on success and failure of every command, ``stat``, ``status`` of
a finished upload, ``cat -o FILE`` (renamed only once verified, resumable), and the exact words
of the first things a new user types (bare ``gcsstream``, ``--checksum sha256``, ``--chunk-size 1MB``).

Every test runs the installed ``gcsstream`` in a real subprocess against the loopback test
server; uploads are read back and compared.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import assert_stored, crc32c_b64, hold_a_file_upload, unstamped
from tests.gcs_test_server import QUANTUM, Fault, FaultPlan, GcsTestServer
from tests.wrong_server import gzip_member

BUCKET = "scripts"
CHUNK = 1 << 20
FAST = "--retry-deadline 0.5 --retry-initial-delay 0.05"


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def env(server, gcsstream_exe, state_dir):
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": server.url,
        "GCSSTREAM_STATE_DIR": str(state_dir),
        "PATH": f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}",
    }


def sh(command: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=timeout)


def one_json(stdout: str) -> dict:
    """stdout is exactly one JSON object on one line."""
    assert stdout.count("\n") == 1 and stdout.endswith("\n"), stdout
    value = json.loads(stdout)
    assert isinstance(value, dict), stdout
    return value


def error_line(stderr: str) -> str:
    """The message of the last stderr line, which must be gcsstream's error line."""
    last = unstamped(stderr).splitlines()[-1]
    assert last.startswith("gcsstream: error: "), stderr
    return last.removeprefix("gcsstream: error: ")


# -- 1: --json on failure ------------------------------------------------------------------------


def test_a_failed_upload_prints_its_id_held_bytes_and_resume_command_as_json(server, env, tmp_path):
    src = tmp_path / "src"
    data = os.urandom(3 * CHUNK + 123)
    src.write_bytes(data)
    hold_a_file_upload(server, CHUNK)
    r = sh(f"gcsstream put --json --chunk-size 1MiB {FAST} - gs://{BUCKET}/s < {src}", env)
    assert r.returncode == 75, r.stderr
    failure = one_json(r.stdout)
    (listed,) = json.loads(sh("gcsstream sessions --json", env).stdout)
    assert failure == {
        "error": error_line(r.stderr),
        "exit_code": 75,
        "upload": listed["id"],
        "held": listed["held"],
        "resume": f"... | gcsstream resume {listed['id']} -",
    }
    assert failure["held"] == CHUNK == server.sessions()[0].persisted
    assert "upload_id" not in r.stdout and "http" not in r.stdout  # never the session URI

    server.faults = FaultPlan()
    command = failure["resume"].replace("...", f"cat {src}") + " --json"
    done = sh(command, env)
    assert done.returncode == 0, done.stderr
    summary = one_json(done.stdout)
    resource = assert_stored(server, BUCKET, "s", data)
    assert summary["upload"] == listed["id"] and summary["generation"] == int(resource["generation"])
    assert summary["crc32c"] == crc32c_b64(data) and summary["bytes"] == len(data)


def failing_commands(tmp_path: Path) -> dict[str, tuple[str, int]]:
    """One failing run of each command, with the exit code it must end with."""
    return {
        "put": (f"gcsstream put --json {tmp_path}/no-such-file gs://{BUCKET}/o", 2),
        "put (parse)": (f"gcsstream put --json --bogus - gs://{BUCKET}/o", 2),
        "resume": ("gcsstream resume --json 0123abcd", 5),
        "cat": (f"gcsstream cat --json -o {tmp_path}/out gs://{BUCKET}/missing", 5),
        "stat": (f"gcsstream stat --json gs://{BUCKET}/missing", 5),
        "sessions": ("gcsstream sessions --json", 2),  # the state directory is writable by others
        "status": ("gcsstream status --json 0123abcd", 5),
        "abort": ("gcsstream abort --json 0123abcd", 5),
    }


def test_every_command_prints_one_json_object_when_it_fails(server, env, tmp_path, state_dir):
    state_dir.mkdir(mode=0o700)
    for what, (command, code) in failing_commands(tmp_path).items():
        if what == "sessions":
            state_dir.chmod(0o777)
        r = sh(command, env)
        assert r.returncode == code, (what, r.stderr)
        assert one_json(r.stdout) == {"error": error_line(r.stderr), "exit_code": code}, what
        state_dir.chmod(0o700)


def test_sessions_json_is_an_array_as_its_help_says(server, env, tmp_path):
    help_text = " ".join(sh("gcsstream sessions --help", env).stdout.split())
    assert "one JSON array" in help_text and "one JSON object" not in help_text
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2 * CHUNK + 1))
    hold_a_file_upload(server, CHUNK)
    assert sh(f"gcsstream put --chunk-size 1MiB {FAST} {src} gs://{BUCKET}/a", env).returncode == 75
    listed = json.loads(sh("gcsstream sessions --json", env).stdout)
    assert isinstance(listed, list) and [e["held"] for e in listed] == [CHUNK]


# -- 2: stat, and status of a finished upload ------------------------------------------------------


def test_stat_prints_one_line_and_the_whole_resource_with_json(server, env):
    data = os.urandom(3 * QUANTUM + 1)
    server.put_object(BUCKET, "dir/o.txt", data, contentType="text/plain", storageClass="NEARLINE")
    resource = server.object_resource(BUCKET, "dir/o.txt")
    r = sh(f"gcsstream stat gs://{BUCKET}/dir/o.txt", env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        f"gs://{BUCKET}/dir/o.txt: {len(data)} bytes (768.0 KiB), generation {resource['generation']}, "
        f"crc32c {crc32c_b64(data)}, md5 {resource['md5Hash']}, text/plain, NEARLINE, "
        f"updated {resource['updated']}\n"
    )
    j = sh(f"gcsstream stat --json gs://{BUCKET}/dir/o.txt", env)
    assert j.returncode == 0 and one_json(j.stdout) == resource


def test_stat_of_a_missing_object_says_whether_the_bucket_is_missing(server, env):
    r = sh(f"gcsstream stat gs://{BUCKET}/nope", env)
    assert r.returncode == 5 and r.stdout == ""
    assert (
        unstamped(r.stderr)
        == f"gcsstream: error: object gs://{BUCKET}/nope not found (the bucket gs://{BUCKET} exists)\n"
    )
    r = sh("gcsstream stat gs://no-such-bucket/nope", env)
    assert r.returncode == 5
    assert unstamped(r.stderr) == "gcsstream: error: bucket gs://no-such-bucket not found\n"


def test_status_of_an_upload_that_finished_here_names_the_object(server, env, tmp_path):
    src = tmp_path / "src"
    data = os.urandom(2 * CHUNK + 5)
    src.write_bytes(data)
    hold_a_file_upload(server, CHUNK)
    failed = sh(f"gcsstream put --json --chunk-size 1MiB {FAST} {src} gs://{BUCKET}/f", env)
    assert failed.returncode == 75, failed.stderr
    upload = one_json(failed.stdout)["upload"]
    server.faults = FaultPlan()
    assert sh(f"gcsstream resume {upload}", env).returncode == 0
    resource = assert_stored(server, BUCKET, "f", data)
    before = len(server.requests)

    r = sh(f"gcsstream status {upload}", env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{upload} gs://{BUCKET}/f: finished ")
    assert r.stdout.endswith(f" ago, generation {resource['generation']}, {len(data)} bytes\n")
    j = sh(f"gcsstream status --json {upload}", env)
    assert one_json(j.stdout) == {
        "upload": upload,
        "destination": f"gs://{BUCKET}/f",
        "finished": True,
        "generation": int(resource["generation"]),
        "bytes": len(data),
        "crc32c": crc32c_b64(data),
    }
    again = sh(f"gcsstream resume {upload}", env)
    assert again.returncode == 5
    assert error_line(again.stderr) == (
        f"upload {upload} has finished: it created gs://{BUCKET}/f generation {resource['generation']} "
        f"(see `gcsstream status {upload}`)"
    )
    assert len(server.requests) == before  # answered from the state directory's record
    record = Path(env["GCSSTREAM_STATE_DIR"]) / "finished" / f"{upload}.json"
    assert oct(record.stat().st_mode & 0o777) == "0o600" and "http" not in record.read_text()


# -- 3: cat -o FILE ------------------------------------------------------------------------------


def partial_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.gcsstream-partial")


def test_cat_output_is_renamed_only_once_verified(server, env, tmp_path):
    data = os.urandom(6 * QUANTUM + 7)
    server.put_object(BUCKET, "o", data)
    out = tmp_path / "out.bin"
    server.faults.add(Fault("corrupt_download", on="download"))
    r = sh(f"gcsstream cat -o {out} gs://{BUCKET}/o", env)
    assert r.returncode == 3, r.stderr
    assert "do not match its crc32c" in r.stderr and f"{partial_of(out)} was removed" in r.stderr
    assert not out.exists() and not partial_of(out).exists()

    out.write_bytes(b"the previous version")
    j = sh(f"gcsstream cat --json -o {out} gs://{BUCKET}/o", env)
    assert j.returncode == 0, j.stderr
    assert out.read_bytes() == data and not partial_of(out).exists()
    summary = one_json(j.stdout)
    assert summary["output"] == str(out) and summary["bytes"] == len(data) and summary["resumed"] == 0
    assert summary["crc32c"] == crc32c_b64(data) and summary["verified"] == ["crc32c"]


def broken_download(server, env, out: Path, name: str) -> subprocess.CompletedProcess:
    """``cat -o`` broken after 5 * 256 KiB and then refused until retries run out: exit 75."""
    server.faults.add(Fault("reset", on="download", after_bytes=5 * QUANTUM, flush=True))
    server.faults.add(Fault("status", on="download", status=503, times=10_000))
    r = sh(f"gcsstream cat {FAST} -o {out} gs://{BUCKET}/{name}", env)
    server.faults = FaultPlan()
    return r


def test_cat_output_continues_from_the_partial_file(server, env, tmp_path):
    data = os.urandom(12 * QUANTUM + 3)
    server.put_object(BUCKET, "big", data)
    out = tmp_path / "big.bin"
    r = broken_download(server, env, out, "big")
    assert r.returncode == 75, r.stderr
    assert not out.exists() and partial_of(out).read_bytes() == data[: 5 * QUANTUM]

    server.clear_requests()
    r = sh(f"gcsstream cat -o {out} gs://{BUCKET}/big", env)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data and not partial_of(out).exists()
    media = [q for q in server.requests if q.kind == "download"]
    assert [q.range_header for q in media] == [f"bytes={5 * QUANTUM}-{len(data) - 1}"]
    assert f"continuing the {5 * QUANTUM} bytes already in its partial file" in r.stderr


def test_cat_output_checks_the_bytes_already_in_the_partial_file(server, env, tmp_path):
    data = os.urandom(12 * QUANTUM + 3)
    server.put_object(BUCKET, "big", data)
    out = tmp_path / "big.bin"
    assert broken_download(server, env, out, "big").returncode == 75
    damaged = bytearray(partial_of(out).read_bytes())
    damaged[100] ^= 1
    partial_of(out).write_bytes(bytes(damaged))
    r = sh(f"gcsstream cat -o {out} gs://{BUCKET}/big", env)
    assert r.returncode == 3 and "do not match its crc32c" in r.stderr, r.stderr
    assert not out.exists() and not partial_of(out).exists()
    r = sh(f"gcsstream cat -o {out} gs://{BUCKET}/big", env)  # starts over, and succeeds
    assert r.returncode == 0 and out.read_bytes() == data, r.stderr


def test_cat_output_of_a_decompressed_object_starts_over(server, env, tmp_path):
    plain = os.urandom(5 * QUANTUM) + b"text\n" * 50_000
    server.put_object(BUCKET, "z.gz", gzip_member(plain), contentEncoding="gzip")
    out = tmp_path / "z"
    partial_of(out).write_bytes(plain[:1000])  # decompressed bytes cannot be checked: not kept
    server.clear_requests()
    r = sh(f"gcsstream cat --json -o {out} gs://{BUCKET}/z.gz", env)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == plain and not partial_of(out).exists()
    summary = one_json(r.stdout)
    assert (summary["bytes"], summary["written"]) == (len(gzip_member(plain)), len(plain))
    media = [q for q in server.requests if q.kind == "download"]
    assert media and media[0].range_header.startswith("bytes=0-")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--range 0-9 -o {out}", "--range cannot be used with -o: a byte range has no checksum"),
        ("--checksum none -o {out}", "--checksum none cannot be used with -o"),
        ("--json", "--json needs -o FILE: standard output carries the object's bytes"),
    ],
    ids=["range", "no-checksum", "json-to-stdout"],
)
def test_cat_refuses_what_it_cannot_verify_or_would_mix(server, env, tmp_path, args, message):
    server.put_object(BUCKET, "o", b"data")
    out = tmp_path / "out"
    r = sh(f"gcsstream cat {args.format(out=out)} gs://{BUCKET}/o > {tmp_path}/stdout", env)
    assert r.returncode == 2 and message in error_line(r.stderr), r.stderr
    assert not out.exists() and not partial_of(out).exists()
    assert [q for q in server.requests if q.kind == "download"] == []


# -- 9: exact messages -----------------------------------------------------------------------------


def test_bare_gcsstream_prints_a_short_usage_and_exits_2(env):
    r = sh("gcsstream", env)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) <= 4 and lines[0] == "Usage: gcsstream COMMAND [ARGS]...", r.stderr
    assert "error" not in r.stderr and "Exit codes" not in r.stderr
    assert "put, resume, cat, stat, sessions, status, abort" in r.stderr


def test_the_command_list_keeps_every_description_whole(env):
    out = sh("gcsstream --help", env).stdout
    listing = out.split("Commands:\n")[1].split("\n\n")[0]
    assert "..." not in listing
    described = " ".join(listing.split())
    for command in ("put", "resume", "cat", "stat", "sessions", "status", "abort"):
        first = sh(f"gcsstream {command} --help", env).stdout.split("\n\n")[1]
        assert " ".join(first.split()) in described, command


def test_usage_lines_have_no_braces(env):
    for command in ("put", "resume", "cat", "stat", "sessions", "status", "abort"):
        usage = sh(f"gcsstream {command} --help", env).stdout.splitlines()[0]
        assert "{" not in usage and "}" not in usage, usage
    assert sh("gcsstream put --help", env).stdout.startswith(
        "Usage: gcsstream put [OPTIONS] SRC [gs://BUCKET/OBJECT]\n"
    )


def test_a_wrong_checksum_or_chunk_size_is_one_plain_sentence(env, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    r = sh(f"gcsstream put --checksum sha256 {tmp_path}/f gs://{BUCKET}/o", env)
    assert r.returncode == 2
    assert (
        unstamped(r.stderr)
        == "gcsstream: error: the checksum must be crc32c, md5, both or none, not 'sha256'\n"
    )
    r = sh(f"gcsstream cat --checksum sha256 gs://{BUCKET}/o > /dev/null", env)
    assert r.returncode == 2 and "the checksum must be crc32c, md5, both or none" in r.stderr
    r = sh(f"gcsstream put --chunk-size 1MB {tmp_path}/f gs://{BUCKET}/o", env)
    assert r.returncode == 2
    assert unstamped(r.stderr) == (
        "gcsstream: error: chunk size 1000000 is not a positive multiple of 256 KiB (262144 bytes); "
        "try 768KiB or 1MiB\n"
    )
