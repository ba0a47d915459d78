"""Interrupted uploads continue where the service stopped: SIGKILL, SIGINT, SIGTERM, retries
exhausted; from a file or a re-fed stream; wrong inputs refused with the session intact."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import time
from pathlib import Path

import google_crc32c
import pytest

from gcsstream.options import parse_size
from tests.conftest import crc32c_b64
from tests.gcs_test_server import Fault, FaultPlan, GcsTestServer

BUCKET = "resume"
CHUNK = 1 << 20
#: The SIGKILL test's input and chunk sizes; the README's measurement uses 1GiB and 16MiB.
KILL_SIZE = parse_size(os.environ.get("GCSSTREAM_KILL_SIZE", "24MiB"))
KILL_CHUNK = parse_size(os.environ.get("GCSSTREAM_KILL_CHUNK", "1MiB"))


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def env(server, gcsstream_exe, state_dir):
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": server.url,
        "PATH": f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}",
        "GCSSTREAM_STATE_DIR": str(state_dir),
    }


def gcs(args: str, env: dict[str, str], stdin_file: Path | None = None) -> subprocess.Popen:
    """Start ``gcsstream ARGS`` with its stdin a pipe fed from ``stdin_file`` by cat."""
    feeder = subprocess.Popen(["cat", str(stdin_file)], stdout=subprocess.PIPE) if stdin_file else None
    proc = subprocess.Popen(
        ["gcsstream", *args.split()],
        stdin=feeder.stdout if feeder else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    if feeder:
        feeder.stdout.close()  # gcsstream holds the read end; cat gets SIGPIPE if it dies
        proc.feeder = feeder
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    if getattr(proc, "feeder", None):
        proc.feeder.wait(timeout=60)
    return proc.returncode, out.decode(), err.decode()


def only_session(env) -> dict:
    out = subprocess.run(["gcsstream", "sessions", "--json"], env=env, capture_output=True, check=True).stdout
    (entry,) = json.loads(out)
    return entry


def chunk_bytes(server) -> int:
    return sum(r.bytes_received for r in server.requests if r.kind in ("chunk", "final"))


def assert_object(server, name: str, data_path: Path) -> None:
    stored = server.object_path(BUCKET, name).read_bytes()
    data = data_path.read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    assert server.object_resource(BUCKET, name)["crc32c"] == crc32c_b64(data)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_three_points_then_resume_each_time(server, env, tmp_path, seed):
    src = tmp_path / "src.bin"
    with open(src, "wb") as f:  # random, but cheap: 1 MiB of urandom repeated with a counter
        block = os.urandom(KILL_CHUNK)
        for i in range(KILL_SIZE // KILL_CHUNK):
            f.write(i.to_bytes(8, "big") + block[8:])
    rng = random.Random(seed)
    # Each process is killed after it has made 1 to (a quarter of the chunks) chunk requests.
    kill_after = [rng.randint(1, max(1, KILL_SIZE // KILL_CHUNK // 4)) for _ in range(3)]
    proc = gcs(f"put --chunk-size {KILL_CHUNK} - gs://{BUCKET}/killed", env, src)
    for n in kill_after:
        target = chunk_requests(server) + n
        server.wait_for_request(lambda r, t=target: r.kind == "chunk" and chunk_requests(server) >= t, 300)
        proc.kill()
        code, _, _ = finish(proc)
        assert code == -signal.SIGKILL
        entry = only_session(env)
        assert entry["destination"] == f"gs://{BUCKET}/killed"
        proc = gcs(f"resume {entry['id']} - --chunk-size {KILL_CHUNK}", env, src)
    code, _, err = finish(proc)
    assert code == 0, err
    assert_object(server, "killed", src)
    resent = chunk_bytes(server) - KILL_SIZE
    print(f"\nsigkill: {KILL_SIZE} bytes, kills after {kill_after} chunk requests, {resent} bytes re-sent")
    assert resent <= 3 * KILL_CHUNK, "resent more than one chunk per interruption"
    assert (
        json.loads(subprocess.run(["gcsstream", "sessions", "--json"], env=env, capture_output=True).stdout)
        == []
    )


def chunk_requests(server) -> int:
    return sum(1 for r in server.requests if r.kind == "chunk")


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_prints_the_resume_command(server, env, tmp_path, sig, code, word):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(6 * CHUNK))
    server.faults.add(Fault("stall", on="chunk", nth=3, seconds=30))
    proc = gcs(f"put --chunk-size {CHUNK} - gs://{BUCKET}/sig", env, src)
    server.wait_for_request(lambda r: r.kind == "chunk" and r.fault is not None, 60)
    proc.send_signal(sig)
    rc, _, err = finish(proc, timeout=60)
    entry = only_session(env)
    assert rc == code, err
    assert err == (
        f"gcsstream: error: {word}; {2 * CHUNK} bytes (2.0 MiB) are stored; "
        f"continue with: ... | gcsstream resume {entry['id']} -\n"
    )
    server.faults = FaultPlan()
    rc, _, err = finish(gcs(f"resume {entry['id']} -", env, src))
    assert rc == 0, err
    assert_object(server, "sig", src)


def test_retries_exhausted_prints_the_resume_command_and_file_resumes_by_id(server, env, tmp_path):
    src = tmp_path / "file.bin"
    src.write_bytes(os.urandom(4 * CHUNK + 3))
    server.faults.add(Fault("status", status=503, on="chunk", nth=3, times=10_000))
    rc, _, err = finish(
        gcs(
            f"put --chunk-size {CHUNK} --retry-deadline 1 --retry-initial-delay 0.05 {src} gs://{BUCKET}/f",
            env,
        )
    )
    entry = only_session(env)
    assert rc == 75, err
    assert err.strip().splitlines()[-1].endswith(f"are stored; continue with: gcsstream resume {entry['id']}")
    assert entry["held"] == 2 * CHUNK and entry["source"]["path"] == str(src)
    server.faults = FaultPlan()
    rc, _, err = finish(gcs(f"resume {entry['id']}", env))
    assert rc == 0, err
    assert_object(server, "f", src)


def test_put_of_the_same_file_continues_and_restart_starts_afresh(server, env, tmp_path):
    src = tmp_path / "file.bin"
    src.write_bytes(os.urandom(4 * CHUNK))
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    put = (
        f"put --chunk-size {CHUNK} --retry-deadline 0.5 --retry-initial-delay 0.05 {src} gs://{BUCKET}/again"
    )
    assert finish(gcs(put, env))[0] == 75
    first = only_session(env)
    server.faults = FaultPlan()
    rc, _, err = finish(gcs(put, env))
    assert rc == 0 and f"continuing the unfinished upload {first['id']}" in err, err
    assert_object(server, "again", src)
    # --restart: a fresh session, the old one cancelled
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    assert finish(gcs(put, env))[0] == 75
    old = only_session(env)
    server.faults = FaultPlan()
    rc, _, err = finish(gcs(put + " --restart", env))
    sessions = subprocess.run(["gcsstream", "sessions", "--json"], env=env, capture_output=True).stdout
    assert old["id"] not in sessions.decode() and json.loads(sessions) == []
    assert rc == 0 and "continuing" not in err, err
    assert [s.cancelled for s in server.sessions()] == [False, True, False]  # the abandoned 2nd one


@pytest.mark.parametrize(
    "change",
    ["different stream", "truncated stream", "modified file"],
)
def test_wrong_input_is_refused_and_the_session_is_intact(server, env, tmp_path, change):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 * CHUNK))
    server.faults.add(Fault("status", status=503, on="chunk", nth=3, times=10_000))
    target = f"{src}" if change == "modified file" else "-"
    stdin = None if change == "modified file" else src
    rc, _, _ = finish(
        gcs(
            f"put --chunk-size {CHUNK} --retry-deadline 0.5 --retry-initial-delay 0.05 {target} gs://{BUCKET}/w",
            env,
            stdin,
        )
    )
    assert rc == 75
    entry = only_session(env)
    server.faults = FaultPlan()
    data = bytearray(src.read_bytes())
    if change == "different stream":
        data[100] ^= 1
    elif change == "truncated stream":
        data = data[: CHUNK + 5]
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(data))
    if change == "modified file":
        with open(src, "r+b") as f:
            f.write(b"X")
        rc, _, err = finish(gcs(f"resume {entry['id']}", env))
    else:
        rc, _, err = finish(gcs(f"resume {entry['id']} -", env, other))
    assert rc == 3, err
    assert err.startswith("gcsstream: error: ") and err.count("\n") == 1
    (session,) = server.sessions()
    assert session.persisted == 2 * CHUNK and not session.cancelled and not session.finalized
    assert only_session(env)["id"] == entry["id"]


def test_status_abort_and_bare_session_uri(server, env, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * CHUNK + 1))
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    assert (
        finish(
            gcs(
                f"put --chunk-size {CHUNK} --retry-deadline 0.5 --retry-initial-delay 0.05 - gs://{BUCKET}/s",
                env,
                src,
            )
        )[0]
        == 75
    )
    entry = only_session(env)
    out = subprocess.run(
        ["gcsstream", "status", entry["id"], "--json"], env=env, capture_output=True, check=True
    ).stdout
    assert json.loads(out) == {
        "upload": entry["id"],
        "destination": f"gs://{BUCKET}/s",
        "held": CHUNK,
        "finished": False,
    }
    server.faults = FaultPlan()
    # The session URI alone (as a web backend would hand out) resumes, with a warning.
    session_uri = json.loads((Path(env["GCSSTREAM_STATE_DIR"]) / f"{entry['id']}.json").read_text())[
        "session_uri"
    ]
    rc, _, err = finish(gcs(f"resume {session_uri} -", env, src))
    assert rc == 0 and "cannot be checked against the input" in err, err
    assert session_uri.split("upload_id=")[1] not in err
    assert_object(server, "s", src)
    # abort on a fresh unfinished upload cancels it and forgets the journal
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    assert (
        finish(
            gcs(
                f"put --chunk-size {CHUNK} --retry-deadline 0.5 --retry-initial-delay 0.05 - gs://{BUCKET}/a",
                env,
                src,
            )
        )[0]
        == 75
    )
    entries = json.loads(
        subprocess.run(["gcsstream", "sessions", "--json"], env=env, capture_output=True).stdout
    )
    aborted = next(e for e in entries if e["destination"].endswith("/a"))
    r = subprocess.run(["gcsstream", "abort", aborted["id"]], env=env, capture_output=True)
    assert r.returncode == 0 and b"aborted" in r.stderr
    assert any(s.cancelled and s.name == "a" for s in server.sessions())
    ids = [
        e["id"]
        for e in json.loads(
            subprocess.run(["gcsstream", "sessions", "--json"], env=env, capture_output=True).stdout
        )
    ]
    assert aborted["id"] not in ids


def test_prune_forgets_sessions_the_service_no_longer_knows(server, env, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * CHUNK))
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    assert (
        finish(
            gcs(
                f"put --chunk-size {CHUNK} --retry-deadline 0.5 --retry-initial-delay 0.05 - gs://{BUCKET}/p",
                env,
                src,
            )
        )[0]
        == 75
    )
    entry = only_session(env)
    (session,) = server.sessions()
    server.expire_session(session.upload_id)
    r = subprocess.run(["gcsstream", "sessions", "--prune"], env=env, capture_output=True)
    assert r.returncode == 0 and f"forgot {entry['id']}".encode() in r.stderr
    assert b"no unfinished uploads" in r.stderr


def test_journal_is_private_and_never_half_written(server, env, tmp_path, state_dir):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(8 * CHUNK))
    server.faults.add(Fault("stall", on="chunk", nth=6, seconds=30))
    proc = gcs(f"put --chunk-size {CHUNK} - gs://{BUCKET}/j", env, src)
    server.wait_for_request(lambda r: r.fault is not None, 60)
    (journal,) = state_dir.glob("*.json")
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    entry = json.loads(journal.read_text())
    assert entry["persisted"] == 5 * CHUNK
    assert entry["persisted_crc32c"] == google_crc32c.value(src.read_bytes()[: 5 * CHUNK])
    assert not [p for p in state_dir.iterdir() if p.name.startswith(".")]  # no temporary left behind
    proc.kill()
    finish(proc)


def test_sigint_then_resume_against_gcp_storage_emulator(gcsstream_exe, state_dir, tmp_path):
    """The same round trip on gcp-storage-emulator (fake-gcs-server finalizes a session when
    asked for its status, so resume cannot work there: see the README's emulator table)."""
    from tests.emulators import start_gcp_storage_emulator

    data = os.urandom(5 * CHUNK + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    with start_gcp_storage_emulator(tmp_path / "emu") as emu:
        emu.create_bucket(BUCKET)
        env = {**os.environ, "STORAGE_EMULATOR_HOST": emu.url, "GCSSTREAM_STATE_DIR": str(state_dir)}
        env["PATH"] = f"{Path(gcsstream_exe).parent}:{env['PATH']}"
        # Feed two chunks and hold the pipe open: gcsstream stores them, then waits for more.
        proc = subprocess.Popen(
            ["gcsstream", "put", "--chunk-size", str(CHUNK), "-", f"gs://{BUCKET}/emu"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        proc.stdin.write(data[: 2 * CHUNK])
        proc.stdin.flush()
        # The emulator offers no request events: watch the journal until it records both chunks.
        deadline = time.monotonic() + 60
        while not any(json.loads(p.read_text())["persisted"] == 2 * CHUNK for p in state_dir.glob("*.json")):
            assert time.monotonic() < deadline, "the journal never recorded two chunks"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        proc.stdin.close()
        entry = only_session(env)
        assert proc.returncode == 130 and f"gcsstream resume {entry['id']} -" in err.decode()
        held = subprocess.run(["gcsstream", "status", entry["id"], "--json"], env=env, capture_output=True)
        assert json.loads(held.stdout)["held"] == 2 * CHUNK
        rc, _, err = finish(gcs(f"resume {entry['id']} -", env, src))
        assert rc == 0, err
        stored = emu.read_object(BUCKET, "emu")
        assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
        assert emu.object_resource(BUCKET, "emu")["crc32c"] == crc32c_b64(data)
