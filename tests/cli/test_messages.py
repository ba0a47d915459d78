"""What gcsstream says, to the standard of curl and rclone: ``--debug`` exchanges without secrets,
a resumed upload's own rate, ``cat``'s bytes and what is missing, one unit convention and a
timestamp on every line of a log, an aligned ``sessions`` table, and a word when the endpoint is
an emulator. Every test runs the installed command in a real subprocess."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cli.test_faults import TokenEndpoint, leaks, service_account  # noqa: F401 - a fixture
from tests.conftest import BUCKET as EMU_BUCKET
from tests.conftest import STAMP, assert_stored, hold_a_file_upload, stall_a_file_upload, unstamped
from tests.gcs_test_server import QUANTUM, Fault, FaultPlan, GcsTestServer

BUCKET = "messages"
CHUNK = 4 * QUANTUM
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ gcsstream: ")


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


def environment(endpoint: str, gcsstream_exe: str, state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": endpoint,
        "PATH": f"{Path(gcsstream_exe).parent}:{os.environ['PATH']}",
        "GCSSTREAM_STATE_DIR": str(state_dir),
    }


@pytest.fixture
def env(server, gcsstream_exe, state_dir):
    return environment(server.url, gcsstream_exe, state_dir)


def run(command: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``bash -c COMMAND``, stderr captured (so not a terminal), bytes out."""
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=timeout)


def payload(tmp_path: Path, size: int, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


# -- 4. --debug ---------------------------------------------------------------------------------


def test_debug_shows_each_exchange_like_curl_without_secrets(server, env, tmp_path, service_account):  # noqa: F811
    key, tokens = service_account
    src = payload(tmp_path, 3 * CHUNK + 5)
    r = run(
        f"gcsstream put --debug --credentials {key} --chunk-size {CHUNK} --no-clobber {src} gs://{BUCKET}/d",
        env,
    )
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert_stored(server, BUCKET, "d", src.read_bytes())
    debug = [line for line in err.splitlines() if " gcsstream: debug: " in line]
    assert debug and all(LINE.match(line) for line in debug), err  # every line timestamped
    shown = [line.split(" gcsstream: debug: ", 1)[1] for line in debug]
    endpoint = server.url
    # The initiate: method, URL with its precondition, the answer with the session redacted.
    assert (
        f"> POST {endpoint}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&ifGenerationMatch=0" in shown
    )
    assert any(re.fullmatch(r"< 200 OK \(\d+ ms\)", s) for s in shown), shown
    assert any(s.startswith("< Location: ") and s.endswith("upload_id=REDACTED") for s in shown), shown
    assert "< X-GUploader-UploadID: REDACTED" in shown
    # The file's one streamed request: its Content-Range and Content-Length, the 308 and its Range.
    assert f"> Content-Range: bytes 0-{3 * CHUNK - 1}/{3 * CHUNK + 5}" in shown, shown
    assert f"< Range: bytes=0-{3 * CHUNK - 1}" in shown, shown
    assert f"> Content-Length: {3 * CHUNK}" in shown
    assert sum(bool(re.fullmatch(r"< 308 Resume Incomplete \(\d+ ms\)", s)) for s in shown) == 1
    # The final request carries the checksum.
    resource = server.object_resource(BUCKET, "d")
    assert f"> X-Goog-Hash: crc32c={resource['crc32c']}" in shown
    # No token, Authorization header or session id anywhere.
    upload_ids = [s.upload_id for s in server.sessions()]
    assert tokens.tokens and upload_ids
    assert leaks(err + r.stdout.decode(), tokens.tokens, upload_ids) == []


# -- 6. a resumed upload's rate -----------------------------------------------------------------


def interrupted_after(server, env, src: Path, name: str, chunks: int) -> str:
    """Start ``put SRC``, stop it with SIGINT once ``chunks`` chunks are held; the upload id."""
    stall_a_file_upload(server, chunks * CHUNK)
    proc = subprocess.Popen(
        ["gcsstream", "put", "--chunk-size", str(CHUNK), str(src), f"gs://{BUCKET}/{name}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        server.wait_for_request(lambda r: r.fault == "stall", 60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    server.faults = FaultPlan()
    return re.search(rb"gcsstream resume (\w+)", err).group(1).decode()


def test_resumed_upload_reports_the_bytes_this_run_sent_and_their_rate(server, env, tmp_path):
    src = payload(tmp_path, 6 * CHUNK + 7)
    upload = interrupted_after(server, env, src, "r", 4)
    r = run(f"gcsstream resume {upload}", env)
    assert r.returncode == 0, r.stderr
    assert_stored(server, BUCKET, "r", src.read_bytes())
    line = unstamped(r.stderr.decode()).strip().splitlines()[-1]
    total, held = 6 * CHUNK + 7, 4 * CHUNK
    match = re.search(
        rf": {total} bytes \(.*\), crc32c .* \(verified\), this run sent (\d+) bytes \(.*\) in ([\d.]+) s, "
        rf"([\d.]+) (B|KiB|MiB|GiB)/s \(resumed at {held} bytes held by the service\)$",
        line,
    )
    assert match, line
    sent, seconds, rate, unit = int(match[1]), float(match[2]), float(match[3]), match[4]
    assert sent == total - held
    factor = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
    # The rate is that of the bytes sent, not of the whole object (3x as many), to the printed
    # precision of both numbers: the seconds are rounded to 0.01, the rate to 0.1 of its unit.
    if seconds > 0.005:
        fastest, slowest = sent / (seconds - 0.005), sent / (seconds + 0.005)
        assert slowest - 0.06 * factor <= rate * factor <= fastest + 0.06 * factor, line


def test_resumed_upload_json_says_where_it_resumed(server, env, tmp_path):
    src = payload(tmp_path, 3 * CHUNK + 7)
    upload = interrupted_after(server, env, src, "j", 2)
    r = run(f"gcsstream resume {upload} --json", env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["resumed_at"] == 2 * CHUNK and summary["bytes"] == 3 * CHUNK + 7
    assert_stored(server, BUCKET, "j", src.read_bytes())


# -- 7. cat's words -----------------------------------------------------------------------------


def test_cat_progress_says_received_not_stored(server, env):
    data = os.urandom(2 * CHUNK)
    server.put_object(BUCKET, "slow", data)
    server.faults.add(Fault("trickle", on="download", rate=CHUNK, seconds=30))
    r = run(f"gcsstream cat --progress-interval 0.1 gs://{BUCKET}/slow > /dev/null", env)
    err = unstamped(r.stderr.decode())
    assert r.returncode == 0, err
    status = [line for line in err.splitlines() if line.startswith(f"gcsstream: gs://{BUCKET}/slow: ")]
    assert status, err
    assert all(" received, rate " in line and "stored" not in line for line in status), status


def test_cat_of_a_gzip_object_reports_bytes_written_and_stored(server, env):
    data = os.urandom(50_000) * 4
    stored = gzip.compress(data)
    server.put_object(BUCKET, "g", stored, contentEncoding="gzip")
    r = run(f"gcsstream cat gs://{BUCKET}/g", env)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    line = unstamped(r.stderr.decode()).strip()
    assert f": {len(data)} bytes (" in line and f"decompressed from {len(stored)} bytes (" in line, line
    raw = run(f"gcsstream cat --raw gs://{BUCKET}/g", env)
    assert raw.returncode == 0 and raw.stdout == stored
    assert f": {len(stored)} bytes (" in raw.stderr.decode() and "decompressed" not in raw.stderr.decode()


def assert_missing_named(env: dict[str, str], bucket: str) -> None:
    no_bucket = run("gcsstream cat gs://no-such-bucket-here/x > /dev/null", env)
    assert no_bucket.returncode == 5
    assert (
        unstamped(no_bucket.stderr.decode())
        == "gcsstream: error: bucket gs://no-such-bucket-here not found\n"
    )
    no_object = run(f"gcsstream cat gs://{bucket}/no/such/object > /dev/null", env)
    assert no_object.returncode == 5
    assert unstamped(no_object.stderr.decode()) == (
        f"gcsstream: error: object gs://{bucket}/no/such/object not found (the bucket gs://{bucket} exists)\n"
    )


def test_cat_says_whether_the_bucket_or_the_object_is_missing(env):
    assert_missing_named(env, BUCKET)


def test_cat_says_which_is_missing_on_each_emulator(emulator, gcsstream_exe, state_dir):
    assert_missing_named(environment(emulator.url, gcsstream_exe, state_dir), EMU_BUCKET)


# -- 8. units and timestamps --------------------------------------------------------------------


def test_every_stderr_line_of_a_log_is_timestamped_in_binary_units(server, env, tmp_path):
    src = payload(tmp_path, 6 * CHUNK)  # a file: one streamed request, slowed, and the final one
    server.faults.add(Fault("trickle", on="chunk", nth=1, rate=4 * CHUNK, seconds=30))
    server.faults.add(Fault("status", status=503, on="final", nth=1))
    ok = run(f"gcsstream put --chunk-size {CHUNK} --progress-interval 0.2 --retry-initial-delay 0.05 {src} "
             f"gs://{BUCKET}/log", env)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert_stored(server, BUCKET, "log", src.read_bytes())
    failed = run(f"gcsstream cat gs://{BUCKET}/nothing-here > /dev/null", env)
    assert failed.returncode == 5
    lines = (ok.stderr + failed.stderr).decode().splitlines()
    assert all(LINE.match(line) for line in lines), lines  # progress, retry, summary and error alike
    text = STAMP.sub("", "\n".join(lines))
    pattern = (
        r"^gcsstream: gs://messages/log: [\d.]+ \w+ of [\d.]+ MiB \(\d+%\) (?:sent, [\d.]+ \w+ )?stored, "
        r"rate (.*), \d+ s$"
    )
    status = re.findall(pattern, text, flags=re.MULTILINE)
    assert status and all(re.fullmatch(r"[\d.]+ (B|KiB|MiB)/s", rate) for rate in status), text
    assert "retrying in" in text and "MB/s" not in text and " MB" not in text
    summary = text.splitlines()[-2]
    assert summary.startswith("gcsstream: uploaded gs://messages/log ") and re.search(
        r", [\d.]+ \w+/s$", summary
    )
    assert text.splitlines()[-1].startswith("gcsstream: error: object gs://messages/nothing-here not found")


# -- 10. sessions -------------------------------------------------------------------------------


def held_upload(server, env, src: Path, name: str) -> None:
    """An upload left unfinished: after its first chunk, requests fail until the deadline (exit 75)."""
    hold_a_file_upload(server, CHUNK)
    r = subprocess.run(
        ["gcsstream", "put", "--chunk-size", str(CHUNK), "--retry-deadline", "0.3", "--retry-initial-delay",
         "0.05", str(src), f"gs://{BUCKET}/{name}"], env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 75, r.stderr
    server.faults = FaultPlan()


def test_sessions_table_is_aligned_escaped_and_names_the_endpoint(server, env, tmp_path):
    with GcsTestServer(data_dir=tmp_path / "other", buckets=[BUCKET]) as other:
        other_env = {**env, "STORAGE_EMULATOR_HOST": other.url}
        odd = tmp_path / "line\nbreak\x1b[31m.bin"
        odd.write_bytes(os.urandom(3 * CHUNK + 5))
        held_upload(server, env, payload(tmp_path, 3 * CHUNK + 5, "a.bin"), "short")
        held_upload(other, other_env, odd, "a much longer object name\tw\u00efth a tab/and \u6f22\u5b57")
        r = subprocess.run(["gcsstream", "sessions"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout  # a header and one line per upload: nothing broke a line
    assert "\x1b" not in r.stdout and "\t" not in r.stdout
    assert "line\\x0abreak\\x1b[31m.bin" in r.stdout and "name\\x09w\u00efth" in r.stdout
    header = lines[0]
    assert header.split() == ["ID", "HELD", "AGE", "ENDPOINT", "DESTINATION", "SOURCE"]
    by_endpoint = {line: next(url for url in (server.url, other.url) if url in line) for line in lines[1:]}
    assert set(by_endpoint.values()) == {server.url, other.url}

    def column(line: str, start_of: str) -> int:
        """The display column where ``start_of`` begins (wide characters count two)."""
        before = line[: line.index(start_of)]
        return sum(2 if "\u4e00" <= c <= "\u9fff" else 1 for c in before)

    for line in lines[1:]:
        assert column(line, "http://") == header.index("ENDPOINT")
        assert column(line, "gs://") == header.index("DESTINATION")
        assert column(line, str(tmp_path)) == header.index("SOURCE"), (line, header)


# -- 11. emulators ------------------------------------------------------------------------------


def test_an_emulator_is_named_once_per_run(emulator, gcsstream_exe, state_dir, tmp_path, object_name):
    env = environment(emulator.url, gcsstream_exe, state_dir)
    src = payload(tmp_path, 3 * CHUNK)
    r = subprocess.run(
        ["gcsstream", "put", "--chunk-size", str(CHUNK), str(src), f"gs://{EMU_BUCKET}/{object_name}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert_stored(emulator, EMU_BUCKET, object_name, src.read_bytes())
    warnings = [line for line in unstamped(r.stderr).splitlines() if "answers like" in line]
    assert warnings == [
        f"gcsstream: warning: {emulator.url} answers like {emulator.name}, not like Cloud Storage: "
        + warnings[0].split("not like Cloud Storage: ", 1)[1]
    ], r.stderr
    assert "ignores preconditions" in warnings[0] and "wrong X-Goog-Hash" in warnings[0]
    quiet = subprocess.run(
        ["gcsstream", "put", "-q", str(src), f"gs://{EMU_BUCKET}/{object_name}.q"],
        env=env,
        capture_output=True,
    )
    assert quiet.returncode == 0 and quiet.stderr == b""


def test_the_test_server_is_not_taken_for_an_emulator(server, env, tmp_path):
    src = payload(tmp_path, 3 * CHUNK)
    r = run(f"gcsstream put --chunk-size {CHUNK} {src} gs://{BUCKET}/real", env)
    assert r.returncode == 0 and b"answers like" not in r.stderr, r.stderr
    assert_stored(server, BUCKET, "real", src.read_bytes())


def test_cat_live_bar_says_received_not_confirmed(server, env):
    from tests.cli.test_experience import plain, run_in_terminal

    server.put_object(BUCKET, "tty", os.urandom(2 * CHUNK))
    server.faults.add(Fault("trickle", on="download", rate=CHUNK, seconds=30))
    code, raw, _ = run_in_terminal(f"gcsstream cat gs://{BUCKET}/tty > /dev/null", {**env, "TERM": "xterm"})
    assert code == 0, raw
    assert "━" in raw and "  received " in plain(raw), raw
    assert "stored" not in plain(raw) and "confirmed" not in plain(raw), raw
