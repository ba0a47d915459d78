"""The command line in a real terminal and in a log file: progress, cat, --limit-rate, --gzip."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pexpect
import pyte
import pytest

from tests.gcs_test_server import QUANTUM, Fault, GcsTestServer

BUCKET = "cli-bucket"
ESC = "\x1b"


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
        "TERM": "xterm-256color",
    }


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(os.urandom(24 * QUANTUM + 99))
    return path


def slow(server) -> None:
    """Make the upload take about two seconds, so that progress has time to show."""
    server.faults.add(Fault("trickle", on="chunk", nth=2, times=2, rate=QUANTUM, seconds=1.0))


def plain(raw: str) -> str:
    """Terminal output without its escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)


def run_in_terminal(command: str, env: dict[str, str], columns: int = 120) -> tuple[int, str, pyte.Screen]:
    """Run in a real pseudo-terminal; return the exit status, the raw output and the final screen."""
    child = pexpect.spawn("bash", ["-c", command], env=env, dimensions=(24, columns), encoding="utf-8")
    child.expect(pexpect.EOF, timeout=120)
    child.close()
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
    assert re.search(r"\d+\.\d MiB +\d+\.\d MB/s", plain(raw)), "no bytes and rate in the live display"
    assert "confirmed by the service" in raw and "━" in raw and len(frames) > 3
    assert raw.rfind(f"{ESC}[?25h") > raw.rfind(f"{ESC}[?25l") >= 0, "the cursor was left hidden"
    lines = [line.rstrip() for line in screen.display if line.strip()]
    assert len(lines) in (1, 2) and lines[0].startswith("gcsstream: uploaded gs://cli-bucket/tty"), lines
    assert not screen.cursor.hidden


def test_known_size_shows_percent_and_eta(server, env, src):
    slow(server)
    code, raw, _ = run_in_terminal(f"gcsstream put --chunk-size 256KiB {src} gs://{BUCKET}/pct", env)
    assert code == 0, raw
    assert re.search(r"\d+%", plain(raw)) and "ETA" in raw


def test_no_color_is_honoured(server, env, src):
    slow(server)
    code, raw, _ = run_in_terminal(
        f"gcsstream put --chunk-size 256KiB {src} gs://{BUCKET}/nc", {**env, "NO_COLOR": "1"}
    )
    assert code == 0, raw
    assert not re.search(r"\x1b\[[0-9;]*3[0-9](;[0-9]+)*m", raw), "colour codes despite NO_COLOR"


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
        r"gs://cli-bucket/log: [\d.]+ \w+ stored, [\d.]+ MB/s, \d+ s$"
    )
    assert len(lines) >= 3 and all(status.match(line) for line in lines[:-1]), lines
    assert lines[-1].startswith("gcsstream: uploaded gs://cli-bucket/log")


def test_quiet_and_no_progress(server, env, src):
    slow(server)
    quiet = subprocess.run(
        ["gcsstream", "put", "-q", str(src), f"gs://{BUCKET}/q"], env=env, capture_output=True
    )
    assert quiet.returncode == 0 and quiet.stderr == b""
    code, raw, _ = run_in_terminal(f"gcsstream put --no-progress {src} gs://{BUCKET}/np", env)
    assert code == 0 and "━" not in raw and "gcsstream: uploaded" in raw


def test_limit_rate_holds_against_the_wall_clock(server, env, tmp_path):
    size, rate = 6 << 20, 2 << 20  # 6 MiB at 2 MiB/s, after a one-second burst: at least 2 s
    path = tmp_path / "six"
    path.write_bytes(os.urandom(size))
    started = time.monotonic()
    r = subprocess.run(
        [
            "gcsstream",
            "put",
            "-q",
            "--chunk-size",
            "1MiB",
            "--limit-rate",
            "2M",
            str(path),
            f"gs://{BUCKET}/rate",
        ],
        env=env,
        capture_output=True,
    )
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    minimum = (size - rate) / rate
    assert minimum * 0.95 <= elapsed < minimum * 5 + 10, f"{elapsed:.2f} s for {size} bytes at {rate} B/s"


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
    assert b"of the gzip-compressed bytes stored" in r.stderr


def test_cat_resumes_a_broken_download(server, env, src):
    assert subprocess.run(["gcsstream", "put", "-q", str(src), f"gs://{BUCKET}/b"], env=env).returncode == 0
    server.faults.add(Fault("reset", on="download", after_bytes=3 * QUANTUM + 5))
    r = subprocess.run(
        ["bash", "-c", f"gcsstream cat --retry-initial-delay 0.05 gs://{BUCKET}/b | sha256sum"],
        env=env,
        capture_output=True,
    )
    assert r.returncode == 0 and b"(verified)" in r.stderr, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()
    ranges = [r.path for r in server.requests if r.kind == "download"]
    assert len(ranges) == 2


def test_cat_detects_corruption_with_exit_3(server, env, src):
    assert subprocess.run(["gcsstream", "put", "-q", str(src), f"gs://{BUCKET}/c"], env=env).returncode == 0
    server.faults.add(Fault("corrupt_download", on="download"))
    r = subprocess.run(
        ["bash", "-c", f"gcsstream cat gs://{BUCKET}/c > /dev/null"], env=env, capture_output=True
    )
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert (
        err.startswith("gcsstream: error: the bytes read from gs://cli-bucket/c do not match its crc32c")
        and err.count("\n") == 1
    )


def test_cat_range(server, env, src):
    assert subprocess.run(["gcsstream", "put", "-q", str(src), f"gs://{BUCKET}/r"], env=env).returncode == 0
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
