"""The README's FastAPI recipe, run as written under uvicorn, fed a 1 GiB PUT by httpx.

Checks: the object is byte-identical; the app's peak RSS grows by less than three chunks;
GET /health answers within 100 ms throughout; a client that disconnects mid-body leaves no
object (the session is cancelled).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import httpx
import pytest

from tests.conftest import assert_stored
from tests.gcs_test_server import GcsTestServer

README = Path(__file__).resolve().parents[2] / "README.md"
BUCKET = "web-bucket"
CHUNK = 16 * 1024 * 1024  # gcsstream's default, which the recipe uses
SIZE = 1 << 30
HEALTH_BOUND = 0.1  # seconds: what the README promises for GET /health during an upload
HEALTH_INTERVAL = 0.05

# Polls GET /health until its stdin ends; prints "ok SENT_AT LATENCY" (time.monotonic(), the
# same clock in every process) for each 200 answer, and a "fail ..." line for anything else.
POLLER = """
import sys, threading, time
import httpx

url, interval = sys.argv[1], float(sys.argv[2])
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
with httpx.Client(timeout=5) as client:
    while not done.is_set():
        sent = time.monotonic()
        try:
            status = client.get(url).status_code
        except httpx.HTTPError as exc:
            print(f"fail after {time.monotonic() - sent:.3f} s: {exc!r}", flush=True)
        else:
            latency = time.monotonic() - sent
            print(f"ok {sent} {latency}" if status == 200 else f"fail: status {status}", flush=True)
        done.wait(interval)
"""


def recipe() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(# app\.py:.*?)```", text, flags=re.S)
    assert match, "the README has no FastAPI recipe (a python block starting with '# app.py:')"
    return match.group(1)


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak_rss(pid: int) -> None:
    """Reset the process's high-water mark (VmHWM) to its current RSS (proc(5): clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def running_app(directory: Path):
    """The recipe under uvicorn on loopback, storing into a fresh GcsTestServer; always stopped."""
    (directory / "app.py").write_text(recipe())
    with GcsTestServer(data_dir=directory / "gcs", buckets=[BUCKET], md5=False) as gcs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "BUCKET": BUCKET,
            "STORAGE_EMULATOR_HOST": gcs.url,
            "GCSSTREAM_STATE_DIR": str(directory / "state"),  # also when used by a module fixture
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=directory,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        log: collections.deque[str] = collections.deque(maxlen=50)
        ready = threading.Event()

        def drain() -> None:  # keeps reading uvicorn's log so that it never blocks on a full pipe
            for line in proc.stderr:
                log.append(line)
                if "Application startup complete" in line:
                    ready.set()
            ready.set()  # end of the log: uvicorn exited

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        try:
            if not ready.wait(30) or proc.poll() is not None:
                pytest.fail(f"uvicorn did not start (exit {proc.poll()}):\n{''.join(log)}")
            yield f"http://127.0.0.1:{port}", gcs, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            drainer.join(timeout=10)


@pytest.fixture
def app(tmp_path):
    with running_app(tmp_path) as running:
        yield running


def body(size: int, digest, crc=None, fail_after: int | None = None):
    """A generator of 1 MiB pieces, each different; optionally breaking off mid-body."""
    block = bytearray(os.urandom(1 << 20))
    for i in range(size >> 20):
        if fail_after is not None and i << 20 >= fail_after:
            raise ConnectionAbortedError("the client gives up")
        block[:8] = i.to_bytes(8, "big")
        piece = bytes(block)
        digest.update(piece)
        if crc is not None:
            crc.update(piece)
        yield piece


@dataclass
class BigUpload:
    gcs: GcsTestServer
    response: httpx.Response
    sha256: str  # of the body sent
    crc32c: str  # of the body sent, base64 as in the object resource
    rss_growth: int
    started: float
    ended: float
    health: list[tuple[float, float]] = field(default_factory=list)  # (sent at, answer time)
    health_failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def big_upload(tmp_path_factory):
    """One 1 GiB PUT through the recipe, with /health polled and the app's peak RSS measured;
    the tests below each check one of the promises on it."""
    with running_app(tmp_path_factory.mktemp("fastapi")) as (url, gcs, proc):
        # The RSS baseline: a tiny warm-up upload runs the app's imports and first-request setup
        # (credentials, HTTP session, engine threads) without allocating chunk-sized buffers; a
        # warm-up of several chunks would leave its peak in VmHWM and its freed chunk buffers in the
        # allocator for the big upload to reuse, hiding them from the growth. Then the high-water
        # mark is reset to the current RSS, so the growth is the upload's peak minus the RSS just
        # before it: the memory the upload itself needed.
        warm_data = os.urandom(1000)
        with httpx.Client(timeout=60) as client:
            warm = client.put(f"{url}/objects/warm-up", content=warm_data)
        assert warm.status_code == 200, warm.text
        assert warm.json()["crc32c"] == assert_stored(gcs, BUCKET, "warm-up", warm_data)["crc32c"]
        reset_peak_rss(proc.pid)
        baseline = peak_rss(proc.pid)

        # /health is polled from a process of its own, so that its answer times are the app's and
        # not this process's, which is busy producing the body and running the storage server.
        poller = subprocess.Popen(
            [sys.executable, "-c", POLLER, f"{url}/health", str(HEALTH_INTERVAL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        polling = threading.Event()

        def collect() -> None:
            for line in poller.stdout:
                lines.append(line)
                polling.set()
            polling.set()

        collector = threading.Thread(target=collect, daemon=True)
        digest = hashlib.sha256()
        crc = google_crc32c.Checksum()
        try:
            collector.start()
            assert polling.wait(30) and poller.poll() is None, f"the /health poller did not start: {lines}"
            started = time.monotonic()
            with httpx.Client(timeout=120) as client:
                response = client.put(
                    f"{url}/objects/big/one.bin",
                    content=body(SIZE, digest, crc),
                    headers={"content-length": str(SIZE), "content-type": "application/octet-stream"},
                )
            ended = time.monotonic()
        finally:
            poller.stdin.close()  # the poller stops at the end of its input
            try:
                poller.wait(timeout=10)
            except subprocess.TimeoutExpired:
                poller.kill()
                poller.wait()
            if collector.ident is not None:
                collector.join(timeout=10)
        health = [tuple(map(float, line.split()[1:])) for line in lines if line.startswith("ok ")]
        failures = [line.strip() for line in lines if not line.startswith("ok ")]
        if poller.returncode:
            failures.append(f"the poller exited with {poller.returncode}")
        growth = peak_rss(proc.pid) - baseline
        upload = BigUpload(
            gcs=gcs,
            response=response,
            sha256=digest.hexdigest(),
            crc32c=base64.b64encode(crc.digest()).decode(),
            rss_growth=growth,
            started=started,
            ended=ended,
            health=health,
            health_failures=failures,
        )
        slowest = max((latency for _, latency in health), default=float("nan"))
        print(
            f"\nfastapi: {ended - started:.1f} s, RSS growth {growth / 2**20:.1f} MiB, "
            f"{len(health)} /health answers, slowest {slowest * 1000:.1f} ms"
        )
        yield upload


def test_one_gib_put_is_byte_identical(big_upload):
    response, gcs = big_upload.response, big_upload.gcs
    assert response.status_code == 200, response.text
    answer = response.json()
    resource = gcs.object_resource(BUCKET, "big/one.bin")
    assert answer["size"] == SIZE and int(resource["size"]) == SIZE
    assert answer["generation"] == int(resource["generation"])
    assert resource["crc32c"] == big_upload.crc32c and answer["crc32c"] == big_upload.crc32c
    stored = hashlib.sha256()
    with open(gcs.object_path(BUCKET, "big/one.bin"), "rb") as f:
        while piece := f.read(1 << 24):
            stored.update(piece)
    assert stored.hexdigest() == big_upload.sha256


def test_health_answers_within_100_ms_throughout_the_upload(big_upload):
    assert big_upload.response.status_code == 200, big_upload.response.text
    assert not big_upload.health_failures, big_upload.health_failures[:5]
    slowest = max((latency for _, latency in big_upload.health), default=float("inf"))
    assert slowest < HEALTH_BOUND, f"slowest /health: {slowest * 1000:.0f} ms"
    # The poller ran throughout: it sends one request per (answer time + interval), and answers
    # come within HEALTH_BOUND, so the upload should see elapsed / (HEALTH_BOUND + HEALTH_INTERVAL)
    # requests sent during it (half of that leaves room for the poller being scheduled late), and
    # no stretch of the upload longer than half a second without one.
    elapsed = big_upload.ended - big_upload.started
    during = [sent for sent, _ in big_upload.health if big_upload.started <= sent <= big_upload.ended]
    assert len(during) >= max(10, elapsed / (HEALTH_BOUND + HEALTH_INTERVAL) / 2), (
        f"only {len(during)} /health requests in the {elapsed:.1f} s upload"
    )
    points = [big_upload.started, *during, big_upload.ended]
    gap = max(b - a for a, b in itertools.pairwise(points))
    assert gap < 0.5, f"no /health request for {gap:.2f} s of the upload"


def test_peak_rss_grows_by_less_than_three_chunks(big_upload):
    assert big_upload.response.status_code == 200, big_upload.response.text
    growth = big_upload.rss_growth
    assert growth < 3 * CHUNK, f"peak RSS grew by {growth / 2**20:.1f} MiB"


def test_client_disconnect_mid_body_leaves_no_object(app):
    url, gcs, _ = app
    with httpx.Client(timeout=60) as client, pytest.raises(ConnectionAbortedError):
        client.put(
            f"{url}/objects/abandoned.bin",
            content=body(200 << 20, hashlib.sha256(), fail_after=40 << 20),
            headers={"content-length": str(200 << 20)},
        )
    gcs.wait_for_request(lambda r: r.kind == "cancel" and r.status is not None, timeout=30)
    assert gcs.object_resource(BUCKET, "abandoned.bin") is None
    assert [s.cancelled for s in gcs.sessions() if s.name == "abandoned.bin"] == [True]
