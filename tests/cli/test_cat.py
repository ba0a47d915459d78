"""``gcsstream cat`` against real loopback servers: every byte asked for, and only those.

Each test compares what ``cat`` wrote with the object (sha256) and checks the exit code and
stderr: gzip members, answers to ranged reads, missing fields, closed descriptors, a closed or
full standard output, retries of the first requests.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import assert_stored, unstamped
from tests.gcs_test_server import QUANTUM, Fault, GcsTestServer
from tests.wrong_server import Behaviour, Reply, WrongServer, gzip_member

BUCKET = "gcsstream-test"
FAST = "--retry-initial-delay 0.05"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


def env_for(url: str, gcsstream_exe: str, state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": url,
        "GCSSTREAM_STATE_DIR": str(state_dir),
        "PATH": f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}",
    }


@pytest.fixture
def env(server, gcsstream_exe, state_dir):
    return env_for(server.url, gcsstream_exe, state_dir)


def bash(command: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=timeout)


def cat(args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return bash(f"gcsstream cat {FAST} {args}", env, timeout)


def one_error_line(stderr: bytes, *needles: str) -> str:
    """stderr is exactly one error line (no traceback, no 'internal error') containing ``needles``."""
    err = unstamped(stderr.decode())
    assert err.count("\n") == 1 and err.startswith("gcsstream: error: "), err
    assert "internal error" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# -- 3: every gzip member ------------------------------------------------------------------------


def members(*parts: bytes) -> bytes:
    return b"".join(gzip_member(p) for p in parts)


def test_cat_writes_every_member_of_a_multi_member_gzip_object(server, env):
    # Incompressible members of 1.5 MiB: they end and start inside the 1 MiB pieces read.
    parts = [os.urandom(3 * QUANTUM * 2), b"second member\n" * 1000, os.urandom(5 * QUANTUM)]
    stored = members(*parts) + b"\0" * 16  # zero padding after the last member, as gzip(1) allows
    server.put_object(BUCKET, "multi.gz", stored, contentEncoding="gzip")
    r = cat(f"gs://{BUCKET}/multi.gz", env)
    assert r.returncode == 0, r.stderr
    assert sha(r.stdout) == sha(b"".join(parts))
    assert b"(verified)" in r.stderr and r.stderr.count(b"\n") == 1
    raw = cat(f"--raw gs://{BUCKET}/multi.gz", env)
    assert raw.returncode == 0 and sha(raw.stdout) == sha(stored)


def test_cat_refuses_trailing_garbage_after_a_gzip_member(server, env):
    parts = [b"first\n" * 5000, b"second\n" * 5000]
    server.put_object(BUCKET, "junk.gz", members(*parts) + b"garbage", contentEncoding="gzip")
    r = cat(f"gs://{BUCKET}/junk.gz", env)
    assert r.returncode == 3
    one_error_line(r.stderr, "not valid gzip after gzip member 2")
    assert sha(r.stdout) == sha(b"".join(parts))  # the members before the garbage, nothing else


# -- 4: an answer to a ranged read carries exactly the bytes asked ---------------------------------


class IgnoresRange(Behaviour):
    """A server (or proxy) that answers every media read with the whole object, 200."""

    def media_get(self, request, bucket, name):
        data, resource = self.server.objects[(bucket, name)]
        return Reply(200, {"X-Goog-Generation": resource["generation"]}, data)


class ShiftedContentRange(Behaviour):
    """A 206 for another range than the one asked."""

    def media_get(self, request, bucket, name):
        data, _ = self.server.objects[(bucket, name)]
        return Reply(206, {"Content-Range": f"bytes 0-99/{len(data)}"}, data[:100])


class LongerThanAsked(Behaviour):
    """The asked Content-Range, but a body (and Content-Length) 50 bytes longer."""

    def media_get(self, request, bucket, name):
        reply = super().media_get(request, bucket, name)
        data, _ = self.server.objects[(bucket, name)]
        first = int(reply.headers["Content-Range"].split()[1].split("-")[0])
        reply.body = data[first : first + len(reply.body) + 50]
        return reply


class LongerThanAskedUnsized(Behaviour):
    """The asked Content-Range, and 50 bytes more in a body without Content-Length."""

    def media_get(self, request, bucket, name):
        reply = super().media_get(request, bucket, name)
        data, _ = self.server.objects[(bucket, name)]
        first = int(reply.headers["Content-Range"].split()[1].split("-")[0])
        reply.body = iter([data[first : first + len(reply.body) + 50]])
        return reply


@pytest.fixture
def wrong(gcsstream_exe, state_dir, request):
    """A wrong server holding one object ``o``; yields (server, env, data)."""
    data = os.urandom(3 * QUANTUM + 7)
    with WrongServer(request.param()) as srv:
        srv.put_object(BUCKET, "o", data)
        yield srv, env_for(srv.url, gcsstream_exe, state_dir), data


@pytest.mark.parametrize("wrong", [IgnoresRange, ShiftedContentRange, LongerThanAsked], indirect=True)
def test_cat_range_refuses_an_answer_that_is_not_the_range(wrong):
    _, env, data = wrong
    r = cat(f"--range 10-99 gs://{BUCKET}/o", env)
    assert r.returncode == 1
    one_error_line(r.stderr, "bytes=10-99")
    assert r.stdout == b""  # nothing that is not the range was written


@pytest.mark.parametrize("wrong", [LongerThanAskedUnsized], indirect=True)
def test_cat_range_never_writes_more_than_asked(wrong):
    _, env, data = wrong
    r = cat(f"--range 10-99 gs://{BUCKET}/o", env)
    assert r.returncode == 1
    one_error_line(r.stderr, "more than the 90 bytes asked")
    assert sha(r.stdout) == sha(data[10:100])


@pytest.mark.parametrize("wrong", [IgnoresRange], indirect=True)
def test_cat_accepts_a_200_that_is_the_whole_object(wrong):
    _, env, data = wrong
    r = cat(f"gs://{BUCKET}/o", env)
    assert r.returncode == 0, r.stderr
    assert sha(r.stdout) == sha(data) and b"(verified)" in r.stderr


class BreaksThenIgnoresRange(Behaviour):
    """The first media read breaks off after 100000 bytes; the resumed one gets the whole object."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def media_get(self, request, bucket, name):
        self.reads += 1
        data, _ = self.server.objects[(bucket, name)]
        if self.reads > 1:
            return Reply(200, {}, data)

        def broken():
            yield data[:100000]
            raise OSError("connection broken")  # the handler closes the connection

        return Reply(
            206,
            {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}", "Content-Length": str(len(data))},
            broken(),
        )


@pytest.mark.parametrize("wrong", [BreaksThenIgnoresRange], indirect=True)
def test_cat_resumed_read_answered_with_the_whole_object_is_refused(wrong):
    _, env, data = wrong
    r = cat(f"gs://{BUCKET}/o", env)
    assert r.returncode == 1
    first, last = r.stderr.splitlines(keepends=True)  # the retry after the break, then the error
    assert b"retrying in" in first
    one_error_line(last, "bytes=100000-", "200, not 206")
    assert sha(r.stdout) == sha(data[:100000])  # what arrived before the break, never repeated


# -- 6: missing fields ---------------------------------------------------------------------------


class NoSize(Behaviour):
    """An object resource without ``size`` (storage-testbench does this for empty objects)."""

    def object_get(self, request, bucket, name):
        _, resource = self.server.objects[(bucket, name)]
        return Reply.json(200, {k: v for k, v in resource.items() if k != "size"})


class BadGeneration(Behaviour):
    def object_get(self, request, bucket, name):
        _, resource = self.server.objects[(bucket, name)]
        return Reply.json(200, {**resource, "generation": "latest"})


def test_cat_of_an_empty_object_without_size(gcsstream_exe, state_dir):
    with WrongServer(NoSize()) as srv:
        srv.put_object(BUCKET, "empty", b"")
        srv.put_object(BUCKET, "full", b"x" * 1000)
        env = env_for(srv.url, gcsstream_exe, state_dir)
        r = cat(f"gs://{BUCKET}/empty", env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"" and b"0 bytes" in r.stderr and b"(verified)" in r.stderr
        full = cat(f"gs://{BUCKET}/full", env)
        assert full.returncode == 1
        one_error_line(full.stderr, "has no size")
        assert len(full.stdout) <= 1  # at most the one byte that showed the object is not empty


def test_cat_with_a_malformed_generation_is_a_clear_error(gcsstream_exe, state_dir):
    with WrongServer(BadGeneration()) as srv:
        srv.put_object(BUCKET, "o", b"data")
        r = cat(f"gs://{BUCKET}/o", env_for(srv.url, gcsstream_exe, state_dir))
    assert r.returncode == 1
    one_error_line(r.stderr, "no valid generation")
    assert r.stdout == b""


# -- 7: messages never go to stdout, whatever descriptors are missing -------------------------------


def test_cat_with_stderr_closed_writes_only_the_data(server, env):
    data = os.urandom(2 * QUANTUM + 3)
    server.put_object(BUCKET, "o", data)
    r = bash(f"gcsstream cat gs://{BUCKET}/o 2>&-", env)
    assert r.returncode == 0 and r.stderr == b""
    assert sha(r.stdout) == sha(data)
    closed = bash(f"gcsstream cat gs://{BUCKET}/o >&-", env)
    assert closed.returncode == 1 and closed.stdout == b""
    one_error_line(closed.stderr, "writing standard output: it is closed")


def test_put_with_stderr_or_stdout_closed(server, env, tmp_path):
    data = os.urandom(QUANTUM + 11)
    (tmp_path / "src").write_bytes(data)
    r = bash(f"gcsstream put {tmp_path}/src gs://{BUCKET}/a 2>&-", env)
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b""
    assert_stored(server, BUCKET, "a", data)
    j = bash(f"gcsstream put --json {tmp_path}/src gs://{BUCKET}/b >&-", env)
    assert j.returncode == 0 and j.stdout == b"" and j.stderr == b""
    assert_stored(server, BUCKET, "b", data)
    s = bash(f"gcsstream put - gs://{BUCKET}/c <&-", env)
    assert s.returncode == 2 and server.object_resource(BUCKET, "c") is None
    one_error_line(s.stderr, "standard input is closed")


# -- 14: a closed or full standard output ----------------------------------------------------------


def test_cat_into_a_closed_pipe_stops_at_once_with_141(server, env):
    data = os.urandom(48 * QUANTUM)  # 12 MiB: far more than a pipe holds
    server.put_object(BUCKET, "big", data)
    proc = subprocess.Popen(
        ["gcsstream", "cat", f"gs://{BUCKET}/big"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = proc.stdout.read(10)
    proc.stdout.close()  # as `head -c 10` does
    try:
        code = proc.wait(timeout=30)  # generous: the old code retried for --retry-deadline (600 s)
    finally:
        proc.kill()
    err = proc.stderr.read()
    proc.stderr.close()
    assert head == data[:10]
    assert code == 141, err
    assert err == b""


def test_cat_head_pipeline_status(server, env):
    data = os.urandom(48 * QUANTUM)
    server.put_object(BUCKET, "big", data)
    r = bash(
        f'gcsstream cat gs://{BUCKET}/big | head -c 10 | sha256sum; echo "${{PIPESTATUS[0]}}" >&2',
        env,
        timeout=60,
    )
    assert r.stdout.split()[0].decode() == sha(data[:10])
    assert r.stderr == b"141\n"


def test_cat_into_a_full_disk_is_one_line(server, env):
    server.put_object(BUCKET, "o", os.urandom(2 * QUANTUM))
    r = bash(f"gcsstream cat gs://{BUCKET}/o > /dev/full", env, timeout=60)
    assert r.returncode == 1
    assert unstamped(r.stderr) == b"gcsstream: error: writing standard output: No space left on device\n"


# -- 17: the first requests are retried ------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", on="object", status=503),
        Fault("status", on="object", status=429, retry_after=0.2),
        Fault("reset", on="object"),
        Fault("status", on="download", status=503),
        Fault("reset", on="download", after_bytes=0),
        Fault("reset", on="download", after_bytes=5 * QUANTUM, flush=True),
    ],
    ids=["object-503", "object-429", "object-reset", "download-503", "download-reset", "download-broken"],
)
def test_cat_retries_its_first_requests(server, env, fault):
    data = os.urandom(8 * QUANTUM + 5)
    server.put_object(BUCKET, "o", data)
    server.faults.add(fault)
    r = cat(f"gs://{BUCKET}/o", env)
    assert r.returncode == 0, r.stderr
    assert sha(r.stdout) == sha(data)
    assert fault.done
    lines = r.stderr.decode().splitlines()
    assert "retrying in" in lines[0] and "(verified)" in lines[-1], lines
    assert not any("error" in line for line in lines), lines


class BrokenResource(Behaviour):
    """The first answer to the metadata GET breaks off in the middle of its JSON body."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def object_get(self, request, bucket, name):
        self.reads += 1
        reply = super().object_get(request, bucket, name)
        if self.reads > 1:
            return reply
        body = reply.body

        def broken():
            yield body[: len(body) // 2]
            raise OSError("connection broken")

        return Reply(200, {**reply.headers, "Content-Length": str(len(body))}, broken())


def test_cat_retries_a_broken_metadata_answer(gcsstream_exe, state_dir):
    data = os.urandom(QUANTUM)
    with WrongServer(BrokenResource()) as srv:
        srv.put_object(BUCKET, "o", data)
        r = cat(f"gs://{BUCKET}/o", env_for(srv.url, gcsstream_exe, state_dir))
    assert r.returncode == 0, r.stderr
    assert sha(r.stdout) == sha(data) and b"(verified)" in r.stderr
