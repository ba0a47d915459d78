"""The command line in a real terminal and in a log file: progress, cat, --limit-rate, --gzip."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pexpect
import pyte
import pytest

from tests.conftest import assert_stored, crc32c_b64, unstamped
from tests.gcs_test_server import QUANTUM, Fault, GcsTestServer

BUCKET = "cli-bucket"
ESC = "\x1b"
COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-9](;[0-9]+)*m")  # SGR with a foreground colour


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def env(server, gcsstream_exe, state_dir):
    inherited = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    return {
        **inherited,
        "STORAGE_EMULATOR_HOST": server.url,
        "GCSSTREAM_STATE_DIR": str(state_dir),
        "PATH": f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}",
        "TERM": "xterm-256color",
    }


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(os.urandom(24 * QUANTUM + 99))
    return path


def slow(server, *, streamed: bool = False) -> None:
    """Make the upload take about two seconds, so that progress has time to show. A ``streamed``
    file goes out in one request: that one is slowed."""
    if streamed:
        server.faults.add(Fault("trickle", on="chunk", nth=1, rate=QUANTUM, seconds=2.0))
    else:
        server.faults.add(Fault("trickle", on="chunk", nth=2, times=2, rate=QUANTUM, seconds=1.0))


def plain(raw: str) -> str:
    """Terminal output without its escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)


def run_in_terminal(command: str, env: dict[str, str], columns: int = 120) -> tuple[int, str, pyte.Screen]:
    """Run in a real pseudo-terminal; return the exit status, the raw output and the final screen."""
    child = pexpect.spawn("bash", ["-c", command], env=env, dimensions=(24, columns), encoding="utf-8")
    try:
        child.expect(pexpect.EOF, timeout=120)
    finally:
        child.close(force=True)  # on a timeout: hang up the terminal, then SIGKILL what is left
    screen = pyte.Screen(columns, 24)
    stream = pyte.Stream(screen)
    stream.feed(child.before.replace("\n", "\r\n") if "\r\n" not in child.before else child.before)
    return child.exitstatus, child.before, screen


def test_terminal_shows_a_live_bar_and_is_left_clean(server, env, src):
    slow(server)
    code, raw, screen = run_in_terminal(
        f"cat {src} | gcsstream put --chunk-size 256KiB - gs://{BUCKET}/tty", env
    )
    assert code == 0, raw
    frames = raw.split(f"{ESC}[2K")  # rich redraws the display line by line
    assert re.search(r"\d+\.\d MiB +\d+\.\d [KM]iB/s", plain(raw)), "no bytes and rate in the live display"
    assert "confirmed by the service" in raw and "━" in raw and len(frames) > 3
    assert raw.rfind(f"{ESC}[?25h") > raw.rfind(f"{ESC}[?25l") >= 0, "the cursor was left hidden"
    lines = [line.rstrip() for line in screen.display if line.strip()]
    assert len(lines) in (1, 2) and lines[0].startswith("gcsstream: uploaded gs://cli-bucket/tty"), lines
    assert not screen.cursor.hidden
    assert_stored(server, BUCKET, "tty", src.read_bytes())


def test_known_size_shows_percent_and_eta(server, env, src):
    """A file, sent in one streamed request: the bar follows the bytes sent, before the service
    confirms any."""
    slow(server, streamed=True)
    code, raw, _ = run_in_terminal(f"gcsstream put --chunk-size 256KiB {src} gs://{BUCKET}/pct", env)
    assert code == 0, raw
    assert re.search(r"\b([1-9]\d?)%", plain(raw)) and "ETA" in raw, plain(raw)
    assert re.search(r"sent [1-9][\d.]* [KM]iB, confirmed by the service 0 B", plain(raw)), plain(raw)
    assert_stored(server, BUCKET, "pct", src.read_bytes())


def test_no_color_is_honoured(server, env, src):
    # Positive control: the same run in the same terminal without NO_COLOR is coloured, so the
    # absence of colour codes below is NO_COLOR's doing (not a terminal rich thinks colourless).
    slow(server)
    code, raw, _ = run_in_terminal(f"gcsstream put --chunk-size 256KiB {src} gs://{BUCKET}/col", env)
    assert code == 0, raw
    assert COLOUR.search(raw), "no colour codes without NO_COLOR: the check below would prove nothing"
    assert_stored(server, BUCKET, "col", src.read_bytes())
    slow(server)
    code, raw, _ = run_in_terminal(
        f"gcsstream put --chunk-size 256KiB {src} gs://{BUCKET}/nc", {**env, "NO_COLOR": "1"}
    )
    assert code == 0, raw
    assert "━" in raw, "no live bar under NO_COLOR: the absence of colour would prove nothing"
    assert not COLOUR.search(raw), "colour codes despite NO_COLOR"
    assert_stored(server, BUCKET, "nc", src.read_bytes())


def test_log_file_gets_plain_lines_only(server, env, src, tmp_path):
    slow(server)
    log = tmp_path / "cron.log"
    r = subprocess.run(
        [
            "bash",
            "-c",
            f"cat {src} | gcsstream put --chunk-size 256KiB --progress-interval 0.3 "
            f"- gs://{BUCKET}/log 2> {log}",
        ],
        env=env,
    )
    assert r.returncode == 0
    text = log.read_text()
    assert ESC not in text and "\r" not in text
    lines = text.splitlines()
    status = re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ gcsstream: "
        r"gs://cli-bucket/log: [\d.]+ \w+ stored, rate [\d.]+ \w+/s, \d+ s$"
    )
    assert len(lines) >= 3 and all(status.match(line) for line in lines[:-1]), lines
    assert unstamped(lines[-1]).startswith("gcsstream: uploaded gs://cli-bucket/log")
    assert_stored(server, BUCKET, "log", src.read_bytes())


def test_quiet_and_no_progress(server, env, src):
    slow(server)
    quiet = subprocess.run(
        ["gcsstream", "put", "-q", str(src), f"gs://{BUCKET}/q"], env=env, capture_output=True
    )
    assert quiet.returncode == 0 and quiet.stderr == b""
    assert_stored(server, BUCKET, "q", src.read_bytes())
    code, raw, _ = run_in_terminal(f"gcsstream put --no-progress {src} gs://{BUCKET}/np", env)
    assert code == 0 and "━" not in raw and "gcsstream: uploaded" in raw
    assert_stored(server, BUCKET, "np", src.read_bytes())


def test_limit_rate_holds_against_the_wall_clock(server, env, tmp_path):
    size, rate, chunk = 6 << 20, 2 << 20, 1 << 20  # "--limit-rate 2M" is 2 MiB/s
    path = tmp_path / "six"
    path.write_bytes(os.urandom(size))
    r = subprocess.run(
        ["gcsstream", "put", "-q", "--chunk-size", "1MiB", "--limit-rate", "2M", str(path)]
        + [f"gs://{BUCKET}/rate"],
        env=env,
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert_stored(server, BUCKET, "rate", path.read_bytes())
    puts = [q for q in server.requests if q.kind in ("chunk", "final") and q.name == "rate"]
    assert sum(q.bytes_received for q in puts) >= size
    # Measured by the server, from the first chunk request's arrival to the last one's answer:
    # interpreter start-up and the session's initiation are left out. The bucket starts empty
    # (found by a new user: a full one let the first second carry twice the cap), so the upload
    # cannot take less than size / rate = 3 s. The upper bound leaves 1.9 s for a loaded 2-core
    # machine: the limiter's sleeps make up their own overshoot, and moving 6 MiB over loopback
    # takes milliseconds. A limiter off by 2x fails: at half the rate it takes 6 s, at twice the
    # rate 1.5 s; one starting full takes 2 s.
    elapsed = max(q.finished for q in puts) - min(q.started for q in puts)
    minimum = size / rate
    assert minimum * 0.85 <= elapsed <= minimum * 1.3 + 1.0, f"{elapsed:.2f} s for {size} bytes at {rate} B/s"
    # The pacing is within each request body, not only between requests: once the burst is spent,
    # a 1 MiB chunk takes chunk / rate = 0.5 s to arrive.
    longest = max(q.finished - q.started for q in puts)
    assert longest >= 0.8 * chunk / rate, f"the longest chunk request took {longest:.2f} s"


def test_put_then_cat_round_trip_through_pipes(server, env, src):
    r = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"cat {src} | gcsstream put -q - gs://{BUCKET}/rt && "
            f"gcsstream cat -q gs://{BUCKET}/rt | sha256sum",
        ],
        env=env,
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()
    assert_stored(server, BUCKET, "rt", src.read_bytes())


def test_gzip_round_trip(server, env, tmp_path):
    data = b"".join(f"line {i} of a very compressible log\n".encode() for i in range(200_000))
    (tmp_path / "log.txt").write_bytes(data)
    r = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"gcsstream put --gzip {tmp_path}/log.txt gs://{BUCKET}/log.txt && "
            f"gcsstream cat gs://{BUCKET}/log.txt > {tmp_path}/back",
        ],
        env=env,
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back").read_bytes() == data
    resource = server.object_resource(BUCKET, "log.txt")
    assert resource["contentEncoding"] == "gzip" and int(resource["size"]) < len(data) // 10
    stored = server.read_object(BUCKET, "log.txt")  # the compressed bytes, and their checksum
    assert int(resource["size"]) == len(stored) and resource["crc32c"] == crc32c_b64(stored)
    assert hashlib.sha256(gzip.decompress(stored)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert b"of the gzip-compressed bytes stored" in r.stderr


def put_source(server, env, src, name: str) -> None:
    """Upload ``src`` with the command and read it back."""
    r = subprocess.run(["gcsstream", "put", "-q", str(src), f"gs://{BUCKET}/{name}"], env=env)
    assert r.returncode == 0
    assert_stored(server, BUCKET, name, src.read_bytes())


def broken_download(server, env, src, name: str, broken_at: int) -> tuple[int, int]:
    """``gcsstream cat`` through one connection reset at ``broken_at`` bytes into the response,
    flushed so that the client receives exactly those bytes. Returns the two GETs' first bytes."""
    server.faults.add(Fault("reset", on="download", after_bytes=broken_at, flush=True))
    server.clear_requests()
    r = subprocess.run(
        ["bash", "-c", f"gcsstream cat --retry-initial-delay 0.05 gs://{BUCKET}/{name} | sha256sum"],
        env=env,
        capture_output=True,
    )
    assert r.returncode == 0 and b"(verified)" in r.stderr, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()
    gets = [q for q in server.requests if q.kind == "download"]
    assert len(gets) == 2, [(q.range_header, q.status) for q in gets]
    first, second = gets
    last = src.stat().st_size - 1
    assert first.range_start == 0 and first.bytes_sent == broken_at and first.status is None
    assert second.status == 206 and second.range_header == f"bytes={second.range_start}-{last}"
    return first.range_start, second.range_start


@pytest.mark.parametrize("broken_at", [3 * QUANTUM + 5, 16 * QUANTUM + 5], ids=["in-first-MiB", "at-4MiB+5"])
def test_cat_resumes_a_broken_download(server, env, src, broken_at):
    put_source(server, env, src, "b")
    _, resumed = broken_download(server, env, src, "b", broken_at)
    assert resumed == broken_at, f"the second GET starts at byte {resumed}, the first broke at {broken_at}"


def test_cat_detects_corruption_with_exit_3(server, env, src):
    put_source(server, env, src, "c")
    server.faults.add(Fault("corrupt_download", on="download"))
    r = subprocess.run(
        ["bash", "-c", f"gcsstream cat gs://{BUCKET}/c > /dev/null"], env=env, capture_output=True
    )
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert (
        unstamped(err).startswith(
            "gcsstream: error: the bytes read from gs://cli-bucket/c do not match its crc32c"
        )
        and err.count("\n") == 1
    )


def test_cat_range(server, env, src):
    put_source(server, env, src, "r")
    r = subprocess.run(
        ["gcsstream", "cat", "--range", "100-199", f"gs://{BUCKET}/r"], env=env, capture_output=True
    )
    assert r.returncode == 0 and r.stdout == src.read_bytes()[100:200]
    assert b"not checked against the object" in r.stderr


def test_every_command_has_help_with_exit_codes(env):
    for command in ("put", "cat", "resume", "sessions", "status", "abort"):
        r = subprocess.run(["gcsstream", command, "--help"], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "Usage: gcsstream " + command in r.stdout, command
    for command in ("put", "cat", "resume", "sessions", "status", "abort"):
        out = subprocess.run(["gcsstream", command, "--help"], env=env, capture_output=True, text=True).stdout
        assert "Examples:" in out and "Exit codes:" in out, command
