"""The engine against an in-process service that follows the real service's rules."""

from __future__ import annotations

import base64
import hashlib
import os
import threading

import google_crc32c
import pytest

from gcsstream.engine import Uploader
from gcsstream.errors import (
    AuthError,
    GcsstreamError,
    IntegrityError,
    NotFoundError,
    PreconditionError,
    SourceError,
    TransientError,
)
from gcsstream.events import ChunkPersisted, Retrying, UploadFinished, UploadStarted
from gcsstream.options import ObjectMetadata, ObjectURL, UploadOptions
from gcsstream.sources import ChunkSource, IterableSource, StreamSource
from tests.unit.fake_service import QUANTUM, FakeService, response

DEST = ObjectURL("bkt", "dir/obj.bin")
CHUNK = QUANTUM  # 256 KiB chunks keep the tests small


class FakeClock:
    """Time that moves only when the engine sleeps, so backoff is tested without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def run(service: FakeService, data: bytes | ChunkSource, *, events=None, **options):
    clock = FakeClock()
    opts = UploadOptions(**{"chunk_size": CHUNK, **options})
    uploader = Uploader(service, opts, on_event=events, sleep=clock.sleep, clock=clock)
    source = IterableSource([data]) if isinstance(data, bytes) else data
    return uploader.upload(source, DEST), clock


def stored(service: FakeService) -> bytes:
    return service.objects[(DEST.bucket, DEST.name)][0]


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


@pytest.mark.parametrize(
    "size",
    [0, 1, QUANTUM - 1, QUANTUM, QUANTUM + 1, 3 * QUANTUM, 3 * QUANTUM + 12345],
    ids=lambda n: f"{n}B",
)
def test_uploads_any_size_and_reports_checked_object(size):
    data = os.urandom(size)
    service = FakeService()
    result, _ = run(service, data)
    assert stored(service) == data
    assert result.size == size
    assert result.crc32c == crc32c_b64(data)
    chunk_sizes = [c.size for c in service.calls if c.kind == "chunk"]
    assert all(n % QUANTUM == 0 and n > 0 for n in chunk_sizes), chunk_sizes
    finals = [c for c in service.calls if c.kind == "final"]
    assert len(finals) == 1
    assert finals[0].headers["X-Goog-Hash"] == f"crc32c={crc32c_b64(data)}"
    assert not any("X-Goog-Hash" in c.headers for c in service.calls if c.kind != "final")


def test_exact_multiple_of_chunk_size_finalizes_with_total():
    data = os.urandom(4 * CHUNK)
    service = FakeService()
    run(service, data)
    assert stored(service) == data
    final = next(c for c in service.calls if c.kind == "final")
    # Either the last full chunk carried the total or an empty PUT finalized: both are valid.
    assert final.headers["content-range"] in (
        f"bytes */{len(data)}",
        f"bytes {3 * CHUNK}-{4 * CHUNK - 1}/{len(data)}",
    )


def test_empty_input_creates_zero_byte_object():
    service = FakeService()
    result, _ = run(service, b"")
    assert stored(service) == b""
    assert result.size == 0
    assert [c.headers.get("content-range") for c in service.calls if c.kind == "final"] == ["bytes */0"]


def test_partial_persistence_resends_from_persisted_offset():
    data = os.urandom(5 * CHUNK + 100)
    service = FakeService()
    # The service keeps only part of some chunks: half of one, nothing of the next, then half again.
    service.fail("chunk", ("keep", CHUNK), ("keep", 0), None, ("keep", CHUNK))
    result, _ = run(service, data, chunk_size=2 * CHUNK)
    assert stored(service) == data
    assert result.crc32c == crc32c_b64(data)


def test_partial_persistence_mid_chunk_with_unaligned_offset():
    data = os.urandom(6 * CHUNK + 7)
    service = FakeService()
    service.fail("chunk", ("keep", CHUNK), ("keep", 3 * CHUNK), ("keep", 1))  # last leaves an odd offset
    run(service, data, chunk_size=4 * CHUNK)
    assert stored(service) == data


def test_after_a_short_range_one_shorter_chunk_realigns_the_rest():
    """Chunks that line up with what was read go out as read; only the realigning one is joined."""
    data = os.urandom(13 * CHUNK + 7)
    service = FakeService()
    service.fail("chunk", ("keep", CHUNK))  # 1 of the first 4 chunks' worth persisted
    run(service, data, chunk_size=4 * CHUNK)
    assert stored(service) == data
    sizes = [c.size for c in service.calls if c.kind in ("chunk", "final")]
    assert sizes == [4 * CHUNK, 3 * CHUNK, 4 * CHUNK, 4 * CHUNK, CHUNK + 7]


def test_final_chunk_partly_persisted_is_resent():
    data = os.urandom(CHUNK + 999)
    service = FakeService()
    service.fail("final", ("keep", 500))
    run(service, data, chunk_size=2 * CHUNK)
    assert stored(service) == data
    assert service.kinds().count("final") == 2


def test_308_without_range_means_nothing_persisted():
    data = os.urandom(3 * CHUNK)
    service = FakeService()
    service.fail("chunk", ("keep", 0))  # first chunk: nothing kept, 308 has no Range header
    run(service, data)
    assert stored(service) == data
    first, second = [c for c in service.calls if c.kind in ("chunk", "final")][:2]
    assert first.headers["content-range"].startswith("bytes 0-") and second.headers[
        "content-range"
    ].startswith("bytes 0-")


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_status_is_retried_after_a_status_query(status):
    data = os.urandom(3 * CHUNK)
    service = FakeService()
    service.fail("chunk", None, status)
    _, clock = run(service, data)
    assert stored(service) == data
    kinds = service.kinds()
    second_chunk = [i for i, k in enumerate(kinds) if k in ("chunk", "final")][1]
    assert kinds[second_chunk + 1] == "status", kinds  # resync before resending
    assert len(clock.sleeps) == 1


def test_connection_reset_is_retried():
    data = os.urandom(2 * CHUNK + 5)
    service = FakeService()
    service.fail("chunk", ConnectionResetError("Connection reset by peer"))
    service.fail("status", TimeoutError("read timed out"))
    events = []
    run(service, data, events=events.append)
    assert stored(service) == data
    reasons = [e.reason for e in events if isinstance(e, Retrying)]
    assert reasons == ["connection reset", "timed out"]


def test_retry_after_is_honoured():
    service = FakeService()
    service.fail("chunk", ("retry-after", 429, 17))
    _, clock = run(service, os.urandom(CHUNK + 1))
    assert clock.sleeps[0] >= 17


def test_backoff_grows_and_gives_up_at_deadline_leaving_session_open():
    service = FakeService()
    service.fail("chunk", *([503] * 100))
    with pytest.raises(TransientError, match="503 from the service"):
        run(service, os.urandom(2 * CHUNK), retry_deadline=60, retry_initial_delay=1, retry_max_delay=8)
    assert "cancel" not in service.kinds()
    assert service.kinds().count("status") >= 3  # it resynced before each resend
    (session,) = service.sessions.values()
    assert not session.cancelled and session.finished is None


def test_backoff_delays_double_with_jitter_and_cap():
    service = FakeService()
    service.fail("chunk", *([500] * 7))
    _, clock = run(
        service, os.urandom(CHUNK + 1), retry_initial_delay=1, retry_max_delay=8, retry_deadline=1000
    )
    ceilings = [1, 2, 4, 8, 8, 8, 8]
    assert len(clock.sleeps) == 7
    for delay, ceiling in zip(clock.sleeps, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_lost_final_answer_completes_through_status_query():
    data = os.urandom(CHUNK + 10)
    service = FakeService()

    def deliver_then_drop(call, session):  # the object is made, the answer is lost
        service._chunk(
            session,
            call.headers["content-range"],
            data[CHUNK:],
            {k.lower(): v for k, v in call.headers.items()},
        )
        raise ConnectionResetError("connection dropped before the answer")

    service.fail("final", deliver_then_drop)
    result, _ = run(service, data)
    assert stored(service) == data and result.size == len(data)
    assert service.kinds()[-1] == "status"


def test_bytes_corrupted_in_flight_are_refused_by_the_final_hash_and_no_object():
    data = os.urandom(2 * CHUNK + 3)
    service = FakeService()
    service.corrupt_next_chunk = True  # the first chunk arrives damaged; nothing else notices
    with pytest.raises(IntegrityError, match="no object was created"):
        run(service, data)
    assert (DEST.bucket, DEST.name) not in service.objects
    assert service.kinds()[-1] == "cancel"


def test_emulator_that_ignores_hash_and_stores_bad_bytes_is_caught_and_object_deleted():
    service = FakeService()
    service.honor_goog_hash = False
    service.corrupt_on_store = True
    with pytest.raises(IntegrityError, match="crc32c mismatch"):
        run(service, os.urandom(CHUNK + 5))
    assert (DEST.bucket, DEST.name) not in service.objects
    assert "delete" in service.kinds()


def test_md5_mode_sends_and_checks_md5():
    data = os.urandom(CHUNK + 5)
    service = FakeService()
    result, _ = run(service, data, checksum="both")
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    final = next(c for c in service.calls if c.kind == "final")
    assert final.headers["X-Goog-Hash"] == f"crc32c={crc32c_b64(data)},md5={md5}"
    assert result.md5 == md5


def test_checksum_none_sends_no_hash_but_checks_size():
    service = FakeService()
    run(service, os.urandom(CHUNK + 5), checksum="none")
    assert all("X-Goog-Hash" not in c.headers for c in service.calls)

    short = FakeService()  # a service that "finishes" with fewer bytes than were sent
    resource = {"name": DEST.name, "size": "7", "generation": "9"}
    short.fail("final", lambda call, session: response(200, resource))
    with pytest.raises(IntegrityError, match=f"stored 7 bytes but {CHUNK + 5} were read"):
        run(short, os.urandom(CHUNK + 5), checksum="none")


def test_source_failure_cancels_session_and_creates_nothing():
    def pieces():
        yield os.urandom(2 * CHUNK)
        raise OSError(5, "Input/output error")

    service = FakeService()
    with pytest.raises(SourceError, match="Input/output error"):
        run(service, IterableSource(pieces(), "the producer"))
    assert service.objects == {}
    assert "cancel" in service.kinds() and "final" not in service.kinds()


@pytest.mark.parametrize("actual", [CHUNK - 1, CHUNK + 1, 3 * CHUNK])
def test_expected_size_mismatch_is_refused(actual):
    service = FakeService()
    with pytest.raises(SourceError, match="expected"):
        run(service, os.urandom(actual), expected_size=CHUNK)
    assert service.objects == {} and "final" not in service.kinds()


def test_expected_size_exact_sends_total_up_front():
    data = os.urandom(2 * CHUNK)
    service = FakeService()
    run(service, data, expected_size=len(data))
    assert stored(service) == data
    chunk = next(c for c in service.calls if c.kind in ("chunk", "final"))
    assert chunk.headers["content-range"] == f"bytes 0-{CHUNK - 1}/{len(data)}"


@pytest.mark.parametrize(
    ("kind", "status", "error"),
    [
        ("initiate", 401, AuthError),
        ("initiate", 403, AuthError),
        ("chunk", 403, AuthError),
        ("chunk", 410, NotFoundError),
        ("chunk", 404, NotFoundError),
    ],
)
def test_permanent_errors_are_typed(kind, status, error):
    service = FakeService()
    service.fail(kind, status)
    with pytest.raises(error):
        run(service, os.urandom(CHUNK + 1))


def test_unknown_bucket_is_not_found():
    service = FakeService()
    service.buckets = set()
    with pytest.raises(NotFoundError, match="bucket gs://bkt not found"):
        run(service, b"x")


def test_no_clobber_on_existing_object_is_precondition_error():
    service = FakeService()
    run(service, b"first")
    with pytest.raises(PreconditionError, match="already exists"):
        run(service, b"second", if_generation_match=0)
    assert stored(service) == b"first"


def test_metadata_goes_into_the_initiate_body():
    service = FakeService()
    clock = FakeClock()
    meta = ObjectMetadata(cache_control="no-cache", metadata={"k": "v=1"}, storage_class="NEARLINE")
    Uploader(service, UploadOptions(chunk_size=CHUNK), sleep=clock.sleep, clock=clock).upload(
        IterableSource([b"abc"]), ObjectURL("bkt", "site.tar"), meta
    )
    _, resource = service.objects[("bkt", "site.tar")]
    assert resource["contentType"] == "application/x-tar"
    assert resource["cacheControl"] == "no-cache"
    assert resource["metadata"] == {"k": "v=1"}
    assert resource["storageClass"] == "NEARLINE"


def test_events_report_progress_in_order():
    data = os.urandom(3 * CHUNK + 1)
    events = []
    run(FakeService(), data, events=events.append)
    assert isinstance(events[0], UploadStarted)
    persisted = [e.persisted for e in events if isinstance(e, ChunkPersisted)]
    assert persisted == sorted(persisted) and persisted[-1] == len(data)
    assert isinstance(events[-1], UploadFinished) and events[-1].result.size == len(data)


def test_read_ahead_is_bounded_to_two_chunks():
    """Memory stays near two chunks: the source is never more than two chunks ahead of the service."""
    service = FakeService()
    reads_ahead = []

    class CountingSource:
        size = None
        description = "counting"

        def __init__(self):
            self.read_bytes = 0

        def read(self, n):
            persisted = max((len(s.data) for s in service.sessions.values()), default=0)
            if self.read_bytes >= 12 * CHUNK:
                return b""
            self.read_bytes += n
            reads_ahead.append(self.read_bytes - persisted)  # held once this read returns
            return bytes(n)

        def finish(self):
            pass

        def close(self):
            pass

    clock = FakeClock()
    Uploader(service, UploadOptions(chunk_size=CHUNK), sleep=clock.sleep, clock=clock).upload(
        CountingSource(), DEST
    )
    assert max(reads_ahead) <= 2 * CHUNK


def test_reading_overlaps_sending():
    """While chunk k is on the wire, the reader is already reading chunk k+1."""
    service = FakeService()
    reads = threading.Condition()
    started = [0]
    overlapped = []

    class CountingSource:
        size = None
        description = "counting"
        chunks = 5

        def read(self, n):
            with reads:
                started[0] += 1
                reads.notify_all()
            if self.chunks == 0:
                return b""
            self.chunks -= 1
            return bytes(n)

        def finish(self):
            pass

        def close(self):
            pass

    def on_chunk(call):
        k = len(overlapped)  # this is chunk k (0-based); the read of chunk k+1 must start now
        with reads:
            overlapped.append(reads.wait_for(lambda: started[0] >= k + 2, timeout=10))

    service.on_chunk = on_chunk
    clock = FakeClock()
    Uploader(service, UploadOptions(chunk_size=CHUNK), sleep=clock.sleep, clock=clock).upload(
        CountingSource(), DEST
    )
    assert len(overlapped) >= 4 and all(overlapped)


def test_session_uri_never_appears_in_error_messages():
    service = FakeService()
    service.fail(
        "chunk", ConnectionResetError(f"{service.endpoint}/upload?upload_id=secret-upload-id-1 reset")
    )
    service.fail("status", 400)
    with pytest.raises(GcsstreamError) as info:
        run(service, os.urandom(CHUNK + 1))
    assert "400" in str(info.value)  # the status query's failure is what is reported
    assert "secret-upload-id" not in str(info.value)


def test_stream_source_reports_regular_file_size(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    with open(path, "rb") as f:
        f.read(10)
        assert StreamSource(f).size == 990


def test_credentials_that_cannot_refresh_are_an_auth_error():
    from google.auth import exceptions as auth_exceptions

    service = FakeService()
    service.fail("chunk", auth_exceptions.InvalidOperation("Anonymous credentials cannot be refreshed."))
    with pytest.raises(AuthError, match="cannot be refreshed"):
        run(service, os.urandom(CHUNK + 1))


def test_a_range_beyond_the_bytes_sent_is_an_integrity_error():
    """Bytes the service never saw must not be released (or journaled) as persisted."""
    service = FakeService()
    service.fail("chunk", lambda call, session: response(308, headers={"Range": f"bytes=0-{2 * CHUNK - 1}"}))
    with pytest.raises(IntegrityError, match=f"{2 * CHUNK} bytes persisted, but only {CHUNK} were sent"):
        run(service, os.urandom(3 * CHUNK + 1))
    assert service.objects == {} and service.kinds()[-1] == "cancel"


def test_a_bad_object_that_cannot_be_deleted_is_named_in_the_error():
    service = FakeService()
    service.honor_goog_hash = False
    service.corrupt_on_store = True
    service.fail("delete", 403)  # may create objects, may not delete them
    undeleted = r"bad object gs://bkt/dir/obj.bin#\d+ could not be deleted \(403"
    with pytest.raises(IntegrityError, match=undeleted):
        run(service, os.urandom(CHUNK + 5))
    assert (DEST.bucket, DEST.name) in service.objects


def test_the_source_is_closed_when_the_upload_never_starts():
    """A producer (--exec) must not outlive an upload whose initiate failed."""

    class Source(IterableSource):
        closed = False

        def close(self):
            self.closed = True

    source = Source([b"abc"])
    service = FakeService()
    service.buckets = set()
    with pytest.raises(NotFoundError):
        run(service, source)
    assert source.closed


def test_a_non_blocking_pipe_is_read_to_its_end():
    """An O_NONBLOCK stdin (inherited from a parent) with nothing ready is not the end of input."""
    data = os.urandom(3 * CHUNK + 17)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    def produce():
        with open(write_end, "wb", buffering=0) as pipe:
            for i in range(0, len(data), 4096):
                pipe.write(data[i : i + 4096])

    producer = threading.Thread(target=produce)
    producer.start()
    service = FakeService()
    with open(read_end, "rb") as stream:
        result, _ = run(service, StreamSource(stream, "standard input"))
    producer.join()
    assert stored(service) == data and result.crc32c == crc32c_b64(data)


@pytest.mark.parametrize("seed", range(5))
def test_iterable_source_regroups_pieces_of_any_size_into_exact_reads(seed):
    import random

    rng = random.Random(seed)
    pieces = [os.urandom(rng.choice([0, 1, 100, CHUNK - 1, CHUNK, 3 * CHUNK + 5])) for _ in range(12)]
    pieces.append(bytearray(b"tail"))  # bytes-like, not bytes
    source = IterableSource(pieces)
    reads = []
    while chunk := source.read(CHUNK):
        assert isinstance(chunk, bytes)
        reads.append(chunk)
    assert b"".join(reads) == b"".join(pieces)
    assert all(len(r) == CHUNK for r in reads[:-1])


def test_iterable_source_hands_out_a_piece_of_exactly_one_read_without_copying():
    piece = os.urandom(CHUNK)
    assert IterableSource([piece]).read(CHUNK) is piece


def test_a_status_of_bytes_0_0_on_an_empty_session_resends_from_the_start():
    """gcp-storage-emulator's answer for "nothing held"; taken literally it would skip a byte."""
    data = os.urandom(2 * CHUNK + 3)
    service = FakeService()
    service.fail("chunk", 503)
    service.fail("status", lambda call, session: response(308, headers={"Range": "bytes=0-0"}))
    result, _ = run(service, data)
    assert stored(service) == data and result.crc32c == crc32c_b64(data)


def test_an_empty_input_whose_status_says_bytes_0_0_still_finishes():
    service = FakeService()
    service.fail("chunk", 503)  # the one request, "bytes */0", fails
    service.fail("status", lambda call, session: response(308, headers={"Range": "bytes=0-0"}))
    result, _ = run(service, b"")
    assert stored(service) == b"" and result.size == 0


def test_iterable_source_takes_none_and_empty_pieces_for_nothing_yet():
    """A non-blocking file read yields None when nothing is ready: that is not the end."""
    pieces = [b"a" * CHUNK, None, b"", b"b" * 10]
    source = IterableSource(pieces)
    assert source.read(CHUNK) == b"a" * CHUNK
    assert source.read(CHUNK) == b"b" * 10
    assert source.read(CHUNK) == b""
