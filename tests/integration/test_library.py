"""The library API (open_upload, upload, gcsstream.aio) against the protocol-faithful server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import tarfile
import threading

import pytest

import gcsstream
from gcsstream.events import ChunkPersisted, UploadFinished
from tests.conftest import crc32c_b64
from tests.gcs_test_server import QUANTUM, Fault, FaultPlan, GcsTestServer

BUCKET = "lib"
CHUNK = QUANTUM


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def opts(server):
    return {"endpoint": server.url, "chunk_size": CHUNK}


def stored(server, name: str) -> bytes:
    return server.object_path(BUCKET, name).read_bytes()


def test_copyfileobj_into_open_upload(server, opts):
    data = os.urandom(5 * CHUNK + 3)
    with gcsstream.open_upload(f"gs://{BUCKET}/copy", **opts) as up:
        shutil.copyfileobj(io.BytesIO(data), up, length=100_000)
        assert up.session_uri and "upload_id=" in up.session_uri
    assert stored(server, "copy") == data
    assert up.result.size == len(data) and up.result.crc32c == crc32c_b64(data)


def test_tarfile_stream_mode(server, opts, tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(os.urandom(70_000 * i))
    with (
        gcsstream.open_upload(f"gs://{BUCKET}/site.tar", **opts) as up,
        tarfile.open(fileobj=up, mode="w|") as tar,
    ):
        for i in range(5):
            tar.add(tmp_path / f"f{i}", arcname=f"f{i}")
    with tarfile.open(fileobj=io.BytesIO(stored(server, "site.tar"))) as tar:
        for i in range(5):
            assert tar.extractfile(f"f{i}").read() == (tmp_path / f"f{i}").read_bytes()
    assert server.object_resource(BUCKET, "site.tar")["contentType"] == "application/x-tar"


def test_exception_in_with_block_cancels_and_creates_nothing(server, opts):
    with pytest.raises(RuntimeError, match="boom"), gcsstream.open_upload(f"gs://{BUCKET}/no", **opts) as up:
        up.write(os.urandom(3 * CHUNK))
        raise RuntimeError("boom")
    assert server.object_resource(BUCKET, "no") is None
    assert [s.cancelled for s in server.sessions()] == [True]


def test_upload_error_surfaces_in_write_or_close(server, opts):
    server.faults.add(Fault("status", status=403, on="chunk", nth=1))
    with pytest.raises(gcsstream.AuthError), gcsstream.open_upload(f"gs://{BUCKET}/denied", **opts) as up:
        for _ in range(20):
            up.write(os.urandom(CHUNK))


@pytest.mark.parametrize("kind", ["path", "file object", "iterable", "bytes"])
def test_upload_function_takes_any_source(server, opts, tmp_path, kind):
    data = os.urandom(3 * CHUNK + 11)
    path = tmp_path / "src"
    path.write_bytes(data)
    source = {
        "path": str(path),
        "file object": open(path, "rb"),  # noqa: SIM115
        "iterable": (data[i : i + 1000] for i in range(0, len(data), 1000)),
        "bytes": data,
    }[kind]
    events = []
    result = gcsstream.upload(source, f"gs://{BUCKET}/up", progress=events.append, checksum="both", **opts)
    assert stored(server, "up") == data
    assert result.name == "up" and result.size == len(data) and result.generation > 0
    assert result.md5 == server.object_resource(BUCKET, "up")["md5Hash"]
    assert isinstance(events[-1], UploadFinished)
    assert [e.persisted for e in events if isinstance(e, ChunkPersisted)][-1] == len(data)


def test_resume_through_session_uri(server, opts):
    data = os.urandom(4 * CHUNK)
    server.faults.add(Fault("status", status=503, on="chunk", nth=3, times=10_000))
    up = gcsstream.open_upload(f"gs://{BUCKET}/res", retry_deadline=0.3, **opts)
    with pytest.raises(gcsstream.TransientError):
        up.write(data)
        up.close()
    session_uri = up.session_uri
    server.faults = FaultPlan()
    result = gcsstream.upload(data, f"gs://{BUCKET}/res", session_uri=session_uri, **opts)
    assert stored(server, "res") == data and result.size == len(data)
    assert (
        sum(r.bytes_received for r in server.requests if r.kind in ("chunk", "final"))
        <= len(data) + 2 * CHUNK
    )


def test_aio_upload_of_an_async_generator_with_backpressure(server, opts):
    data = os.urandom(12 * CHUNK + 5)
    server.faults.add(Fault("trickle", on="chunk", nth=2, rate=4 * CHUNK, seconds=1.0))

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():  # the loop keeps running while the upload waits
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        async def body():
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        task = asyncio.create_task(ticker())
        result = await gcsstream.aio.upload(body(), f"gs://{BUCKET}/aio", **opts)
        stop.set()
        await task
        return result, ticks

    result, ticks = asyncio.run(main())
    assert stored(server, "aio") == data and result.crc32c == crc32c_b64(data)
    assert ticks >= 3  # the loop kept running while the upload held the producer back


def test_aio_open_upload_async_with_and_failing_generator(server, opts):
    async def main():
        async with gcsstream.aio.open_upload(f"gs://{BUCKET}/ok", **opts) as up:
            await up.write(b"hello ")
            await up.write(bytearray(b"world"))
        assert up.result.size == 11

        async def broken():
            yield os.urandom(3 * CHUNK)
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            await gcsstream.aio.upload(broken(), f"gs://{BUCKET}/broken", **opts)

    asyncio.run(main())
    assert stored(server, "ok") == b"hello world"
    assert server.object_resource(BUCKET, "broken") is None
    assert any(s.cancelled and s.name == "broken" for s in server.sessions())


def test_writer_memory_is_bounded_by_backpressure(server, opts):
    """A producer far faster than the upload never gets more than a chunk ahead of the window."""
    server.faults.add(Fault("trickle", on="chunk", nth=1, rate=8 * CHUNK, seconds=0.5))
    up = gcsstream.open_upload(f"gs://{BUCKET}/bp", **opts)
    source = up._source
    peak = 0
    digest = hashlib.sha256()
    for _ in range(40):
        piece = os.urandom(CHUNK // 4)
        digest.update(piece)
        up.write(piece)
        peak = max(peak, source._buffered)
    up.close()
    assert peak <= CHUNK + CHUNK // 4
    assert hashlib.sha256(stored(server, "bp")).digest() == digest.digest()
    assert threading.active_count() < 20
