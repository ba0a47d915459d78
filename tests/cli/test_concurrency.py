"""One process drives an upload at a time: a second ``put`` of the same file, a second
``resume``, ``abort`` and ``sessions --prune`` leave an upload that another process drives alone
(exit 7, naming it), and no run ever deletes the object another one made.

The first process is paused deterministically: a test-server stall holds one of its chunk
requests, and once the stall has taken hold the process is stopped (SIGSTOP) until the second
run has ended; then it is continued (SIGCONT) and completes."""

# ruff: noqa: F811 - the fixtures imported from test_resume are taken as arguments

from __future__ import annotations

import json
import os
import signal
import subprocess

from tests.cli.test_resume import (  # noqa: F401 - fixtures
    BUCKET,
    CHUNK,
    env,
    finish,
    gcs,
    journals,
    last_seq,
    only_session,
    reap_processes,
    server,
    sessions,
    stalls,
)
from tests.conftest import assert_stored
from tests.gcs_test_server import Fault, FaultPlan

#: Long enough that the stalled process is stopped before its stall ends.
PAUSE = 5.0


def interrupted_put(server, env, src, name: str) -> dict:
    """``put FILE`` stopped by retries running out after one chunk: exit 75, a journal entry.
    (A file goes out in one streamed request: the service keeps one chunk of it.)"""
    server.faults.add(Fault("partial", on="chunk", nth=1, persist=CHUNK))
    server.faults.add(Fault("status", status=503, on="put", nth=2, times=10_000))
    code, _, err = finish(gcs(f"put --chunk-size {CHUNK} {FAST} {src} gs://{BUCKET}/{name}", env))
    assert code == 75, err
    server.faults = FaultPlan()
    return only_session(env)


FAST = "--retry-deadline 0.5 --retry-initial-delay 0.05"


def paused(args: str, env, server, stalls) -> subprocess.Popen:
    """Start ``gcsstream ARGS`` and return it stopped, held inside its next chunk request."""
    server.faults.add(Fault("stall", on="chunk", seconds=PAUSE))
    proc = gcs(args, env)
    stalls(1)
    proc.send_signal(signal.SIGSTOP)
    return proc


def test_two_overlapping_puts_of_one_file(server, env, tmp_path, stalls):
    src = tmp_path / "file.bin"
    data = os.urandom(4 * CHUNK + 11)
    src.write_bytes(data)
    entry = interrupted_put(server, env, src, "cron")
    put = f"put --chunk-size {CHUNK} {src} gs://{BUCKET}/cron"
    first = paused(put, env, server, stalls)
    try:
        before = last_seq(server)
        code, _, err = finish(gcs(put, env), timeout=120)
        assert code == 7, err
        assert f"upload {entry['id']} is being driven by process {first.pid}" in err, err
        assert last_seq(server) == before  # the second run sent nothing at all
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0 and f"continuing the unfinished upload {entry['id']}" in err, err
    assert_stored(server, BUCKET, "cron", data)
    assert len(server.sessions()) == 1  # one session, driven by one process at a time
    assert not [r for r in server.requests if r.method == "DELETE"]
    assert journals(env) == [] and not list((tmp_path / "state").glob("*.lock"))


def test_two_resumes_at_once_and_what_others_may_do_meanwhile(server, env, tmp_path, stalls):
    src = tmp_path / "file.bin"
    data = os.urandom(4 * CHUNK + 5)
    src.write_bytes(data)
    entry = interrupted_put(server, env, src, "twice")
    first = paused(f"resume {entry['id']}", env, server, stalls)
    try:
        before = last_seq(server)
        code, _, err = finish(gcs(f"resume {entry['id']}", env), timeout=120)
        assert code == 7, err
        assert f"upload {entry['id']} is being driven by process {first.pid}" in err, err
        # sessions says so; abort refuses; prune keeps it without asking the service
        (listed,) = sessions(env)
        assert listed["driven_by"] == first.pid
        table = subprocess.run(["gcsstream", "sessions"], env=env, capture_output=True, text=True)
        assert f"(being driven by process {first.pid})" in table.stdout, table
        aborted = subprocess.run(["gcsstream", "abort", entry["id"]], env=env, capture_output=True, text=True)
        assert aborted.returncode == 7 and f"process {first.pid}" in aborted.stderr, aborted
        pruned = subprocess.run(["gcsstream", "sessions", "--prune"], env=env, capture_output=True, text=True)
        assert pruned.returncode == 0 and f"kept {entry['id']}" in pruned.stderr, pruned
        assert last_seq(server) == before  # none of them sent anything
        assert journals(env) == [entry["id"]]
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0, err
    assert_stored(server, BUCKET, "twice", data)
    assert [(s.finalized, s.cancelled) for s in server.sessions()] == [(True, False)]
    assert not [r for r in server.requests if r.method == "DELETE"]
    assert journals(env) == []


def test_put_restart_beside_a_driven_upload_starts_its_own_session(server, env, tmp_path, stalls):
    src = tmp_path / "file.bin"
    data = os.urandom(3 * CHUNK + 1)
    src.write_bytes(data)
    entry = interrupted_put(server, env, src, "own")
    put = f"put --chunk-size {CHUNK} {src} gs://{BUCKET}/own"
    first = paused(put, env, server, stalls)
    try:
        code, out, err = finish(gcs(put + " --restart --json", env), timeout=120)
        assert code == 0, err
        assert f"not continuing the unfinished upload {entry['id']}" in err, err
        assert json.loads(out)["bytes"] == len(data)
        assert_stored(server, BUCKET, "own", data)
        # its own new session; the driven one was neither cancelled nor finished by it
        assert [(s.finalized, s.cancelled) for s in server.sessions()] == [(False, False), (True, False)]
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0, err
    assert_stored(server, BUCKET, "own", data)
    assert not [r for r in server.requests if r.method == "DELETE"]
    assert journals(env) == []
