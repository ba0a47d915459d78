"""A regular file goes out in one streamed request (and a small final one), two chunks in memory.

The engine against the in-process service: the request's body is taken piece by piece as a socket
would; a cut mid-request is resent by reading the file again; a file that changed or shrank meanwhile
never becomes an object.
"""

from __future__ import annotations

import os

import pytest

from gcsstream.engine import Uploader
from gcsstream.errors import IntegrityError, SourceError
from gcsstream.events import BytesSent, ChunkPersisted, ChunkSending
from gcsstream.options import UploadOptions
from gcsstream.progress import ProgressState
from gcsstream.sources import FileSource, IterableSource
from tests.unit.fake_service import QUANTUM, FakeService
from tests.unit.test_engine import CHUNK, DEST, FakeClock, crc32c_b64, run, stored


def a_file(tmp_path, size: int):
    data = os.urandom(size)
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    return data, path


@pytest.mark.parametrize("extra", [0, 1, QUANTUM - 1, QUANTUM, QUANTUM + 7])
def test_a_file_goes_out_in_one_streamed_request_and_a_final_one_with_its_hash(tmp_path, extra):
    data, path = a_file(tmp_path, 9 * CHUNK + extra)
    service = FakeService()
    result, _ = run(service, FileSource(path))
    assert stored(service) == data and result.crc32c == crc32c_b64(data)
    streamed_end = (len(data) - 1) // QUANTUM * QUANTUM
    assert service.streamed_sizes == [streamed_end]
    sent = [(c.kind, c.size) for c in service.calls if c.kind in ("chunk", "final")]
    assert sent == [("chunk", streamed_end), ("final", len(data) - streamed_end)]
    final = next(c for c in service.calls if c.kind == "final")
    assert final.headers["X-Goog-Hash"] == f"crc32c={crc32c_b64(data)}"


def test_a_file_of_one_unit_or_less_is_one_final_request(tmp_path):
    data, path = a_file(tmp_path, QUANTUM - 5)
    service = FakeService()
    run(service, FileSource(path))
    assert stored(service) == data
    assert service.streamed_sizes == [] and [c.kind for c in service.calls][1:] == ["final"]


def test_a_pipe_or_iterable_is_still_sent_in_chunks():
    data = os.urandom(9 * CHUNK + 3)
    service = FakeService()
    run(service, IterableSource([data]))
    assert stored(service) == data
    assert service.streamed_sizes == []
    assert len([c for c in service.calls if c.kind == "chunk"]) == 9


def test_the_reader_stays_two_buffers_ahead_of_the_socket(tmp_path):
    """Memory near two chunks: while streaming, the file is read at most two chunks ahead of the
    bytes the socket has been handed (the window drops each buffer once it has gone out)."""
    data, path = a_file(tmp_path, 20 * CHUNK + 11)
    service = FakeService()
    source = FileSource(path)
    ahead = []
    handed = [0]
    read = source.read

    def counted_read(n):
        data = read(n)
        ahead.append(source._stream.tell() - handed[0])
        return data

    source.read = counted_read  # type: ignore[method-assign]
    events = []

    def on_event(event):
        events.append(event)
        if isinstance(event, BytesSent):
            handed[0] = event.end

    run(service, source, events=on_event)
    assert stored(service) == data
    assert len(ahead) >= 20
    assert max(ahead) <= 3 * CHUNK  # two held, and the piece on the wire as the reader refills


def test_a_cut_mid_request_resends_from_what_the_service_kept_reading_the_file_again(tmp_path):
    data, path = a_file(tmp_path, 24 * CHUNK + 99)
    service = FakeService()
    # 10 chunks and a bit went out, the service kept 4: chunks 4 to 9 are read from the file again.
    service.fail("stream", ("cut", 10 * CHUNK + 1000, 4 * CHUNK))
    result, _ = run(service, FileSource(path))
    assert stored(service) == data and result.crc32c == crc32c_b64(data)
    streamed_end = (len(data) - 1) // QUANTUM * QUANTUM
    assert service.streamed_sizes == [streamed_end, streamed_end - 4 * CHUNK]
    assert "status" in service.kinds()


def test_a_file_changed_before_a_resend_never_becomes_an_object(tmp_path):
    data, path = a_file(tmp_path, 24 * CHUNK + 99)
    service = FakeService()

    def change_the_file(call, session):
        with open(path, "r+b") as f:
            f.seek(6 * CHUNK)  # read once, sent, not kept: it is read again for the resend
            f.write(b"changed")

    service.fail("stream", ("cut", 10 * CHUNK, 4 * CHUNK))
    service.fail("status", change_the_file)
    with pytest.raises(IntegrityError):
        run(service, FileSource(path))
    assert (DEST.bucket, DEST.name) not in service.objects


def test_a_file_that_shrinks_while_streamed_is_a_source_error_and_no_object(tmp_path):
    data, path = a_file(tmp_path, 24 * CHUNK)
    service = FakeService()
    source = FileSource(path)
    os.truncate(path, 12 * CHUNK)
    with pytest.raises(SourceError):
        run(service, source)
    assert (DEST.bucket, DEST.name) not in service.objects
    assert all(s.cancelled for s in service.sessions.values())


def test_progress_follows_the_bytes_sent_within_the_streamed_request(tmp_path):
    data, path = a_file(tmp_path, 12 * CHUNK + 1)
    events = []
    run(FakeService(), FileSource(path), events=events.append)
    sent = [e.end for e in events if isinstance(e, BytesSent)]
    assert sent == sorted(sent) and len(sent) >= 12 and sent[-1] == (len(data) - 1) // QUANTUM * QUANTUM
    assert [e.end - e.first for e in events if isinstance(e, ChunkSending)] == [1]  # only the final one
    state = ProgressState("x", len(data))
    for event in events:
        if isinstance(event, BytesSent) and event.end == sent[5]:
            state.record(event)
            break
        state.record(event)
    assert state.persisted == 0 and state.done() == sent[5]  # the bar moves before the confirmation
    assert [e for e in events if isinstance(e, ChunkPersisted)][-1].persisted == len(data)


def test_a_resumed_file_streams_the_rest(tmp_path):
    """Resume of a file: the held prefix is read and checked, the rest goes in one request."""
    data, path = a_file(tmp_path, 24 * CHUNK + 5)
    service = FakeService()
    service.fail("stream", ("cut", 8 * CHUNK))
    clock = FakeClock()
    opts = UploadOptions(chunk_size=CHUNK, retry_deadline=0)
    uploader = Uploader(service, opts, sleep=clock.sleep, clock=clock)
    with pytest.raises(Exception):  # noqa: B017 - the cut with no retries left ends the run
        uploader.upload(FileSource(path), DEST)
    from gcsstream.engine import Resume

    session_uri = next(iter(service.sessions))
    uri = f"{service.endpoint}/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id={session_uri}"
    result = Uploader(service, UploadOptions(chunk_size=CHUNK), sleep=clock.sleep, clock=clock).upload(
        FileSource(path), DEST, resume=Resume(uri)
    )
    assert stored(service) == data and result.crc32c == crc32c_b64(data)
    assert service.streamed_sizes[-1] == (len(data) - 1) // QUANTUM * QUANTUM - 8 * CHUNK


@pytest.mark.parametrize(
    "fault",
    [
        ("chunk", ("keep", 39 * QUANTUM)),
        ("chunk", ("keep", 38 * QUANTUM)),
        ("stream", ("cut", 41 * QUANTUM, 39 * QUANTUM)),
    ],
    ids=["short-range-39", "short-range-38", "cut-then-status"],
)
def test_a_resend_within_a_chunk_of_the_end_reads_the_gone_buffers_again(tmp_path, fault):
    """The service keeps less than a chunk short of the streamed end, below the oldest buffer
    still held (the last starts at 40 units): the resend is streamed too, read from the file,
    and never a chunk with a hole in it (found by helper-24's review)."""
    data, path = a_file(tmp_path, 42 * QUANTUM + 100)
    service = FakeService()
    service.fail(*fault)
    result, _ = run(service, FileSource(path), chunk_size=4 * QUANTUM)
    assert stored(service) == data and result.crc32c == crc32c_b64(data)
    assert len(service.streamed_sizes) == 2
