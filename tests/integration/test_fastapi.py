"""The README's FastAPI recipe, run as written under uvicorn, fed a 1 GiB PUT by httpx.

Checks: the object is byte-identical; the app's peak RSS grows by less than three chunks;
GET /health answers within 100 ms throughout; a client that disconnects mid-body leaves no
object (the session is cancelled).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.gcs_test_server import GcsTestServer

README = Path(__file__).resolve().parents[2] / "README.md"
BUCKET = "web-bucket"
CHUNK = 16 * 1024 * 1024  # gcsstream's default, which the recipe uses
SIZE = 1 << 30


def recipe() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(# app\.py:.*?)```", text, flags=re.S)
    assert match, "the README has no FastAPI recipe (a python block starting with '# app.py:')"
    return match.group(1)


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@pytest.fixture
def app(tmp_path):
    (tmp_path / "app.py").write_text(recipe())
    with GcsTestServer(data_dir=tmp_path / "gcs", buckets=[BUCKET], md5=False) as gcs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "BUCKET": BUCKET, "STORAGE_EMULATOR_HOST": gcs.url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in proc.stderr:  # wait for uvicorn to say it is ready
            if "Application startup complete" in line:
                break
        else:
            pytest.fail(f"uvicorn did not start (exit {proc.wait()})")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
        try:
            yield f"http://127.0.0.1:{port}", gcs, proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def body(size: int, digest, fail_after: int | None = None):
    """A generator of 1 MiB pieces, each different; optionally breaking off mid-body."""
    block = bytearray(os.urandom(1 << 20))
    for i in range(size >> 20):
        if fail_after is not None and i << 20 >= fail_after:
            raise ConnectionAbortedError("the client gives up")
        block[:8] = i.to_bytes(8, "big")
        piece = bytes(block)
        digest.update(piece)
        yield piece


def test_one_gib_put_is_identical_bounded_and_the_loop_stays_responsive(app):
    url, gcs, proc = app
    with httpx.Client(timeout=60) as client:
        warm = client.put(f"{url}/objects/warm-up", content=os.urandom(3 * CHUNK))
        assert warm.status_code == 200, warm.text
    baseline = peak_rss(proc.pid)

    latencies: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get(f"{url}/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                done.wait(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    digest = hashlib.sha256()
    try:
        with httpx.Client(timeout=120) as client:
            response = client.put(
                f"{url}/objects/big/one.bin",
                content=body(SIZE, digest),
                headers={"content-length": str(SIZE), "content-type": "application/octet-stream"},
            )
    finally:
        done.set()
        poller.join()
    assert response.status_code == 200, response.text
    answer = response.json()
    resource = gcs.object_resource(BUCKET, "big/one.bin")
    assert answer["size"] == SIZE and answer["generation"] == int(resource["generation"])
    assert answer["crc32c"] == resource["crc32c"]
    stored = hashlib.sha256()
    with open(gcs.object_path(BUCKET, "big/one.bin"), "rb") as f:
        while piece := f.read(1 << 24):
            stored.update(piece)
    assert stored.digest() == digest.digest()

    growth = peak_rss(proc.pid) - baseline
    print(f"\nfastapi: RSS growth {growth / 2**20:.1f} MiB, slowest /health {max(latencies) * 1000:.1f} ms")
    assert growth < 3 * CHUNK, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    assert len(latencies) > 10 and max(latencies) < 0.1, f"slowest /health: {max(latencies) * 1000:.0f} ms"


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
