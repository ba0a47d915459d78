"""The library API (open_upload, upload, gcsstream.aio) against the protocol-faithful server."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import io
import itertools
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time

import pytest

import gcsstream
from gcsstream.events import ChunkPersisted, UploadFinished
from tests.conftest import assert_stored, crc32c_b64
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
    resource = assert_stored(server, BUCKET, "copy", data)
    assert up.result.size == len(data) and up.result.crc32c == resource["crc32c"] == crc32c_b64(data)


class Tee:
    """A write-only file that copies every write into ``up`` and keeps the bytes written."""

    def __init__(self, up) -> None:
        self.up, self.written = up, io.BytesIO()

    def write(self, data) -> int:
        self.written.write(data)
        return self.up.write(data)


def test_tarfile_stream_mode(server, opts, tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(os.urandom(70_000 * i))
    with gcsstream.open_upload(f"gs://{BUCKET}/site.tar", **opts) as up:
        tee = Tee(up)
        with tarfile.open(fileobj=tee, mode="w|") as tar:
            for i in range(5):
                tar.add(tmp_path / f"f{i}", arcname=f"f{i}")
    assert up.result.crc32c == assert_stored(server, BUCKET, "site.tar", tee.written.getvalue())["crc32c"]
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
    resource = assert_stored(server, BUCKET, "up", data)
    assert result.name == "up" and result.size == len(data) and result.generation > 0
    assert result.crc32c == resource["crc32c"] == crc32c_b64(data)
    assert result.md5 == resource["md5Hash"] == base64.b64encode(hashlib.md5(data).digest()).decode()
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
    resource = assert_stored(server, BUCKET, "res", data)
    assert result.size == len(data) and result.crc32c == resource["crc32c"]
    assert (
        sum(r.bytes_received for r in server.requests if r.kind in ("chunk", "final"))
        <= len(data) + 2 * CHUNK
    )


def test_aio_upload_of_an_async_generator_with_backpressure(server, opts):
    data = os.urandom(12 * CHUNK + 5)
    # the second chunk trickles in at one chunk a second: the producer is held back meanwhile
    server.faults.add(Fault("trickle", on="chunk", nth=2, rate=CHUNK, seconds=1.0))

    async def main():
        ticks: list[float] = []
        ticking = asyncio.Event()
        stop = asyncio.Event()

        async def ticker():  # the loop keeps running while the upload waits
            while not stop.is_set():
                ticks.append(time.monotonic())
                ticking.set()
                await asyncio.sleep(0.01)

        async def body():
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        task = asyncio.create_task(ticker())
        await ticking.wait()
        started = time.monotonic()
        result = await gcsstream.aio.upload(body(), f"gs://{BUCKET}/aio", **opts)
        ended = time.monotonic()
        stop.set()
        await task
        return result, [started, *(t for t in ticks if started < t < ended), ended]

    result, points = asyncio.run(main())
    resource = assert_stored(server, BUCKET, "aio", data)
    assert result.crc32c == resource["crc32c"] == crc32c_b64(data)
    # The loop stayed free: the ticker ran every 10 ms throughout the upload, also while the
    # trickled chunk held the producer back for about a second. Not a speed target but a
    # blocked-loop detector: an upload that blocked the loop while a chunk was being sent would
    # leave a gap of that second. 300 ms, not 100: with the test server's threads in this process,
    # free-loop gaps of up to 240 ms were measured on this 2-core machine with two CPU-bound
    # processes beside the test (20-35 ms when idle).
    gap = max(b - a for a, b in itertools.pairwise(points))
    assert points[-1] - points[0] > 0.5, "the trickled chunk did not hold the upload back"
    assert gap < 0.3, f"the loop stalled for {gap * 1000:.0f} ms"


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
        return up.result

    result = asyncio.run(main())
    assert result.crc32c == assert_stored(server, BUCKET, "ok", b"hello world")["crc32c"]
    assert server.object_resource(BUCKET, "broken") is None
    assert any(s.cancelled and s.name == "broken" for s in server.sessions())


def test_writer_memory_is_bounded_by_backpressure(server, opts):
    """A producer far faster than the upload never gets further ahead of the window than the
    writer's budget (a chunk here, at most 1 MiB)."""
    server.faults.add(Fault("trickle", on="chunk", nth=1, rate=8 * CHUNK, seconds=0.5))
    up = gcsstream.open_upload(f"gs://{BUCKET}/bp", **opts)
    source = up._source
    peak = 0
    pieces = []
    for _ in range(40):
        pieces.append(os.urandom(CHUNK // 4))
        up.write(pieces[-1])
        peak = max(peak, source._buffered)
    up.close()
    assert peak <= CHUNK + CHUNK // 4
    resource = assert_stored(server, BUCKET, "bp", b"".join(pieces))
    assert up.result.crc32c == resource["crc32c"]
    assert threading.active_count() < 20


@pytest.mark.parametrize("api", ["open_upload", "aio"])
def test_discarded_writer_cancels_its_session(server, opts, api):
    """A writer dropped without close() is garbage: its finalizer cancels the session (the engine
    thread does not keep the writer alive), and no object is created."""
    url = f"gs://{BUCKET}/dropped"
    if api == "open_upload":
        up = gcsstream.open_upload(url, **opts)
        for _ in range(3):  # past the writer's budget: the session exists and chunks have gone out
            up.write(os.urandom(CHUNK))
        del up
        gc.collect()
    else:

        async def main():
            up = await gcsstream.aio.open_upload(url, **opts)
            for _ in range(3):
                await up.write(os.urandom(CHUNK))
            del up
            gc.collect()
            # while the loop still runs: its closing must not be what ends the upload
            await asyncio.to_thread(server.wait_for_request, lambda r: r.kind == "cancel", 30)

        asyncio.run(main())
    server.wait_for_request(lambda r: r.kind == "cancel", 30)
    assert [s.cancelled for s in server.sessions()] == [True]
    assert server.object_resource(BUCKET, "dropped") is None


@pytest.mark.parametrize("how", ["open_upload", "upload"])
def test_transient_error_names_the_session_to_resume(server, opts, how):
    data = os.urandom(4 * CHUNK + 7)
    server.faults.add(Fault("status", status=503, on="chunk", nth=3, times=10_000))
    with pytest.raises(gcsstream.TransientError) as failed:
        if how == "upload":
            gcsstream.upload(data, f"gs://{BUCKET}/again", retry_deadline=0.3, **opts)
        else:
            with gcsstream.open_upload(f"gs://{BUCKET}/again", retry_deadline=0.3, **opts) as up:
                up.write(data)
    session_uri = failed.value.session_uri
    (session,) = server.sessions()
    assert session_uri and session.upload_id in session_uri and session.persisted == 2 * CHUNK
    assert session.upload_id not in str(failed.value) and session.upload_id not in repr(failed.value)
    server.faults = FaultPlan()
    with gcsstream.open_upload(f"gs://{BUCKET}/again", session_uri=session_uri, **opts) as up:
        up.write(data)
    resource = assert_stored(server, BUCKET, "again", data)
    assert up.result.crc32c == resource["crc32c"] == crc32c_b64(data) and up.result.size == len(data)
    assert len(server.sessions()) == 1


def test_journaled_library_upload_resumes_by_id_after_a_transient_error(server, opts, tmp_path, state_dir):
    """journal=True keeps the command line's journal; a TransientError carries the upload's id and
    session; upload(..., resume=ID) continues it (the held prefix checked, the options the
    journal's) and the object is identical."""
    src = tmp_path / "src.bin"
    data = os.urandom(4 * CHUNK + 7)
    src.write_bytes(data)
    _refuse_after_two_chunks(server, file=True)
    url = f"gs://{BUCKET}/journaled"
    with pytest.raises(gcsstream.TransientError) as caught:
        gcsstream.upload(src, url, journal=True, retry_deadline=0.5, metadata={"k": "v"}, **opts)
    err = caught.value
    assert err.upload_id and err.session_uri and "upload_id=" in err.session_uri
    assert err.session_uri not in str(err)
    (journal,) = state_dir.glob("*.json")
    assert journal.stem == err.upload_id
    server.faults = FaultPlan()
    with pytest.raises(gcsstream.UsageError, match="from its journal; do not pass metadata"):
        gcsstream.upload(src, url, resume=err.upload_id, metadata={"k": "other"}, endpoint=server.url)
    other = tmp_path / "other.bin"
    other.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # differs whatever the random first byte
    with pytest.raises(gcsstream.IntegrityError):  # the held prefix is checked
        gcsstream.upload(other, url, resume=err.upload_id)
    result = gcsstream.upload(src, url, resume=err.upload_id)
    resource = assert_stored(server, BUCKET, "journaled", data)
    assert result.crc32c == resource["crc32c"] and resource["metadata"] == {"k": "v"}
    # forgotten, lock file included; only the record of what it created is left, for `status ID`
    assert [p.name for p in state_dir.iterdir()] == ["finished"]
    assert [p.name for p in (state_dir / "finished").iterdir()] == [f"{err.upload_id}.json"]
    assert len(server.sessions()) == 1


def test_library_does_not_journal_unless_asked(server, opts, state_dir):
    server.faults.add(Fault("status", status=503, on="chunk", nth=2, times=10_000))
    with pytest.raises(gcsstream.TransientError) as caught:
        gcsstream.upload(os.urandom(3 * CHUNK), f"gs://{BUCKET}/plain", retry_deadline=0.5, **opts)
    assert caught.value.upload_id is None and not state_dir.exists()


def test_a_cancelled_journaled_upload_names_no_dead_session(server, opts, state_dir):
    """A failed source cancels the session and forgets its journal: the error must not offer
    them for resuming (a plain upload's error carries None there too)."""

    def pieces():
        yield os.urandom(3 * CHUNK)
        raise OSError("the producer failed")

    with pytest.raises(gcsstream.SourceError, match="cancelled") as caught:
        gcsstream.upload(pieces(), f"gs://{BUCKET}/cancelled", journal=True, **opts)
    assert caught.value.session_uri is None and caught.value.upload_id is None
    assert [s.cancelled for s in server.sessions()] == [True]
    assert not list(state_dir.glob("*.json"))


def _refuse_after_two_chunks(server, *, file: bool = False) -> None:
    """The service keeps two chunks and refuses every request after them. A ``file`` goes out in
    one streamed request, of which it keeps two chunks' worth."""
    if file:
        server.faults.add(Fault("partial", on="chunk", nth=1, persist=2 * CHUNK))
        server.faults.add(Fault("status", status=503, on="put", nth=2, times=10_000))
    else:
        server.faults.add(Fault("status", status=503, on="chunk", nth=3, times=10_000))


def _interrupted(server, call, *, file: bool = False) -> gcsstream.TransientError:
    """Run ``call`` with every chunk after the second refused, until its retries run out."""
    _refuse_after_two_chunks(server, file=file)
    with pytest.raises(gcsstream.TransientError) as caught:
        call()
    server.faults = FaultPlan()
    return caught.value


def _last_seq(server) -> int:
    return max((r.seq for r in server.requests), default=0)


def _sent_since(server, seq: int) -> int:
    """The bytes of the chunks sent after request ``seq`` (the interrupted run's are recorded late)."""
    return sum(r.bytes_received for r in server.requests if r.kind in ("chunk", "final") and r.seq > seq)


def test_library_resumes_a_file_by_journal_id_only_from_the_same_unchanged_file(
    server, opts, tmp_path, state_dir
):
    """resume=ID holds the library to gcsstream resume's rules: the file must be the one the
    journal names, unchanged (size and modification time), before any byte is sent."""
    src = tmp_path / "src.bin"
    data = os.urandom(5 * CHUNK + 9)
    src.write_bytes(data)
    url = f"gs://{BUCKET}/by-id"
    err = _interrupted(
        server, lambda: gcsstream.upload(src, url, journal=True, retry_deadline=0.5, **opts), file=True
    )
    assert err.upload_id
    recorded = os.stat(src).st_mtime_ns
    os.utime(src, ns=(recorded, recorded + 5_000_000_000))  # the same bytes, touched
    requests_before = len(server.requests)
    with pytest.raises(gcsstream.IntegrityError, match=f"changed since upload {err.upload_id}"):
        gcsstream.upload(src, url, resume=err.upload_id)
    assert len(server.requests) == requests_before  # refused before asking the service anything
    os.utime(src, ns=(recorded, recorded))
    before = _last_seq(server)
    result = gcsstream.upload(src, url, resume=err.upload_id)
    resource = assert_stored(server, BUCKET, "by-id", data)
    assert result.crc32c == resource["crc32c"] == crc32c_b64(data) and result.size == len(data)
    assert _sent_since(server, before) <= len(data) - 2 * CHUNK  # the held prefix is not resent
    assert [p.name for p in state_dir.iterdir()] == ["finished"] and len(server.sessions()) == 1


@pytest.mark.parametrize("api", ["open_upload", "aio"])
def test_library_resumes_a_journaled_upload_by_its_session_uri(server, opts, state_dir, api):
    """resume=SESSION_URI of a journaled upload uses its journal, as gcsstream resume URI does:
    the held prefix is checked against it, and the entry is forgotten once the object exists."""
    data = os.urandom(6 * CHUNK + 1)
    url = f"gs://{BUCKET}/by-uri-{api}"

    def first() -> None:
        with gcsstream.open_upload(url, journal=True, retry_deadline=0.5, **opts) as up:
            up.write(data)

    err = _interrupted(server, first)
    assert err.upload_id and err.session_uri and "upload_id=" in err.session_uri
    wrong = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(gcsstream.IntegrityError), gcsstream.open_upload(url, resume=err.session_uri) as up:
        up.write(wrong)
    assert [p.stem for p in state_dir.glob("*.json")] == [err.upload_id]  # left as it was
    if api == "aio":

        async def pieces():
            for i in range(0, len(data), 100_000):
                yield data[i : i + 100_000]

        result = asyncio.run(gcsstream.aio.upload(pieces(), url, resume=err.session_uri))
    else:
        with gcsstream.open_upload(url, resume=err.session_uri) as up:
            shutil.copyfileobj(io.BytesIO(data), up, length=65536)
        result = up.result
    resource = assert_stored(server, BUCKET, f"by-uri-{api}", data)
    assert result.crc32c == resource["crc32c"] == crc32c_b64(data) and result.size == len(data)
    assert [p.name for p in state_dir.iterdir()] == ["finished"]
    assert [p.stem for p in (state_dir / "finished").iterdir()] == [err.upload_id]
    assert len(server.sessions()) == 1


def test_library_resumes_a_bare_session_uri_named_by_resume(server, opts, state_dir):
    """A session URI no journal knows (handed out by another process) is continued like
    session_uri=: no journal, the whole stream again, the held prefix skipped, not resent."""
    data = os.urandom(4 * CHUNK + 3)
    url = f"gs://{BUCKET}/bare"
    err = _interrupted(server, lambda: gcsstream.upload(data, url, retry_deadline=0.5, **opts))
    assert err.session_uri and err.upload_id is None
    with pytest.raises(
        gcsstream.UsageError, match="the session writes the bucket lib, not gs://elsewhere/bare"
    ):
        gcsstream.upload(data, "gs://elsewhere/bare", resume=err.session_uri)
    with pytest.raises(gcsstream.UsageError, match="do not pass metadata"):
        gcsstream.upload(data, url, resume=err.session_uri, metadata={"k": "v"})
    before = _last_seq(server)
    result = gcsstream.upload(data, url, resume=err.session_uri, chunk_size=CHUNK)
    resource = assert_stored(server, BUCKET, "bare", data)
    assert result.crc32c == resource["crc32c"] == crc32c_b64(data) and result.size == len(data)
    assert _sent_since(server, before) <= len(data) - 2 * CHUNK  # the held prefix is not resent
    assert not state_dir.exists() and len(server.sessions()) == 1


# -- parallel= (as put --parallel) ------------------------------------------------------------------


@pytest.mark.parametrize("api", ["open_upload", "upload", "aio"])
def test_parallel_library_uploads_compose_verified_parts_and_leave_nothing_behind(server, opts, api):
    data = os.urandom(7 * CHUNK + 11)  # eight parts of one chunk each
    url = f"gs://{BUCKET}/par"
    par = {**opts, "parallel": 3, "part_size": CHUNK, "content_type": "text/x-par"}
    if api == "open_upload":
        with gcsstream.open_upload(url, **par) as up:
            shutil.copyfileobj(io.BytesIO(data), up, length=100_000)
        result = up.result
    elif api == "upload":
        result = gcsstream.upload(io.BytesIO(data), url, **par)
    else:

        async def body():
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        result = asyncio.run(gcsstream.aio.upload(body(), url, **par))
    resource = assert_stored(server, BUCKET, "par", data)
    assert resource["componentCount"] == 8 and resource["contentType"] == "text/x-par"
    assert result.crc32c == resource["crc32c"] == crc32c_b64(data) and result.parts == 8
    assert server.list_objects(BUCKET) == ["par"]  # every temporary part was deleted


def test_parallel_library_upload_refuses_what_it_cannot_honour(server, opts, state_dir):
    url = f"gs://{BUCKET}/no"
    for extra in ({"checksum": "md5"}, {"session_uri": f"{server.url}/x?upload_id=1"}):
        with pytest.raises(gcsstream.UsageError):
            gcsstream.upload(io.BytesIO(b"x"), url, **opts, parallel=2, **extra)
    with pytest.raises(gcsstream.UsageError, match="takes the upload's options from its journal"):
        gcsstream.upload(io.BytesIO(b"x"), url, **opts, parallel=2, resume="0123456789abcdef")
    assert server.list_objects(BUCKET) == []


def test_a_journaled_parallel_library_upload_resumes_after_retries_run_out(server, opts, state_dir):
    data = os.urandom(6 * CHUNK + 123)
    url = f"gs://{BUCKET}/parjournal"
    par = {**opts, "parallel": 2, "part_size": CHUNK, "journal": True, "retry_deadline": 0.3}
    server.faults.add(Fault("status", status=503, on="final", nth=4, times=10_000))
    with pytest.raises(gcsstream.TransientError) as raised:
        gcsstream.upload(io.BytesIO(data), url, **par)
    upload_id = raised.value.upload_id
    assert upload_id and len(upload_id) == 16 and raised.value.session_uri is None
    assert server.object_resource(BUCKET, "parjournal") is None
    server.faults.clear()
    start = max(r.seq for r in server.requests)
    result = gcsstream.upload(io.BytesIO(data), url, **opts, resume=upload_id)
    assert_stored(server, BUCKET, "parjournal", data)
    assert result.parts == 7 and server.list_objects(BUCKET) == ["parjournal"]
    initiated = [r for r in server.requests if r.seq > start and r.kind == "initiate"]
    assert len(initiated) < 7  # the stored parts were not sent again
    assert list(state_dir.glob("*.json")) == []


# -- a library's threads leave the caller's signal mask alone --------------------------------------


def _blocks_sigint() -> bool:
    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_a_child_the_callers_iterable_starts_can_be_stopped(server, opts):
    # Found in review: the reader thread that runs the caller's iterable blocked SIGTERM, and a
    # process the iterable started inherited that mask: terminate() did nothing to it.
    children: list[subprocess.Popen] = []
    masks: list[bool] = []

    def pieces():
        masks.append(_blocks_sigint())
        children.append(subprocess.Popen(["sleep", "60"]))
        yield b"x" * 10

    data = b"x" * 10
    gcsstream.upload(pieces(), f"gs://{BUCKET}/child", **opts)
    assert_stored(server, BUCKET, "child", data)
    (child,) = children
    try:
        child.terminate()
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert masks == [False]


def test_the_callers_progress_callback_runs_with_the_callers_signal_mask(server, opts):
    masks: list[bool] = []
    with gcsstream.open_upload(
        f"gs://{BUCKET}/cb", progress=lambda e: masks.append(_blocks_sigint()), **opts
    ) as up:
        up.write(b"y" * 10)
    assert_stored(server, BUCKET, "cb", b"y" * 10)
    assert masks and not any(masks)


def test_a_failed_upload_keeps_its_entry_locked_until_its_late_write_has_landed(
    server, opts, tmp_path, monkeypatch
):
    # Found in review: the library released the run's locks twice, and the second release let go
    # of the entry while a journal write that had outlasted its bound was still being made.
    from gcsstream import journal as journal_module
    from gcsstream.errors import Busy
    from gcsstream.jobs import claim_entry
    from gcsstream.journal import Journal

    gate, writing = threading.Event(), threading.Event()
    write = Journal.write

    def held(self, entry):
        if entry.persisted:
            writing.set()
            gate.wait(30)
        write(self, entry)

    monkeypatch.setattr(Journal, "write", held)
    monkeypatch.setattr(journal_module, "JOURNAL_WRITE_TIMEOUT", 0.2)
    state = tmp_path / "state"
    try:
        with pytest.raises(gcsstream.GcsstreamError, match="has not finished"):
            gcsstream.upload(os.urandom(4 * CHUNK), f"gs://{BUCKET}/late", journal=True, **opts)
        assert writing.is_set()
        (entry,) = Journal(state).entries()
        with pytest.raises(Busy):
            claim_entry(Journal(state), entry.id)
    finally:
        gate.set()
