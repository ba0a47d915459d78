"""``ParallelUploader`` (``put --parallel``) against the protocol-faithful test server: parts
through the engine, a compose tree past 32 sources, the final object's metadata and
preconditions, its CRC32C checked end to end, and no temporary object left behind on any path
(success, a part that fails, a compose that fails, a composed object that is wrong, random
faults); then the basic case against gcp-storage-emulator."""

from __future__ import annotations

import functools
import gc
import io
import os
import threading
import weakref

import pytest

from gcsstream import parallel
from gcsstream.errors import (
    AuthError,
    IntegrityError,
    PreconditionError,
    ServiceError,
    SourceError,
    UsageError,
)
from gcsstream.events import PartFinished, PartStarted
from gcsstream.options import PARTS_SUFFIX, ObjectMetadata, ObjectURL, ParallelOptions, UploadOptions
from gcsstream.parallel import ParallelUploader
from gcsstream.sources import IterableSource, StreamSource
from gcsstream.transport import Transport
from tests.conftest import assert_stored
from tests.emulators import start_gcp_storage_emulator
from tests.gcs_test_server import QUANTUM, Fault, FaultPlan, GcsTestServer

BUCKET = "par"
PART = QUANTUM  # 256 KiB parts: many parts from a few MiB
FAST = {"retry_initial_delay": 0.01, "retry_max_delay": 0.05, "retry_deadline": 20.0}


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


def uploader(endpoint, *, n=4, part=PART, warnings=None, events=None, **options) -> ParallelUploader:
    return ParallelUploader(
        functools.partial(Transport.connect, endpoint),
        UploadOptions(**{"chunk_size": QUANTUM, **FAST, **options}),
        ParallelOptions(n, part),
        warn=warnings.append if warnings is not None else None,
        on_event=events.append if events is not None else None,
    )


def put(server, data: bytes, name: str, *, metadata=None, source=None, **kwargs):
    return uploader(server.url, **kwargs).upload(
        source or StreamSource(io.BytesIO(data)), ObjectURL(BUCKET, name), metadata
    )


def temporaries(server, bucket: str = BUCKET) -> list[str]:
    return [name for name in server.list_objects(bucket) if PARTS_SUFFIX in name]


def composes(server) -> list:
    return [r for r in server.requests if r.kind == "compose"]


@pytest.mark.parametrize("size", [0, 1, PART, 3 * PART + 5], ids=lambda n: f"{n}B")
def test_parts_are_uploaded_and_composed(server, size):
    data = os.urandom(size)
    events: list = []
    result = put(server, data, "dir/obj one", events=events)
    parts = max(1, -(-size // PART))
    resource = assert_stored(server, BUCKET, "dir/obj one", data)
    assert resource["componentCount"] == parts and "md5Hash" not in resource
    assert result.parts == parts and result.size == size and result.crc32c == resource["crc32c"]
    assert result.generation == int(resource["generation"]) and result.verified == ("crc32c",)
    assert server.list_objects(BUCKET) == ["dir/obj one"]  # every temporary object deleted
    uploads = [r for r in server.requests if r.kind == "initiate"]
    assert len(uploads) == parts and all(f"dir/obj one{PARTS_SUFFIX}/" in r.name for r in uploads)
    assert len(composes(server)) == 1
    assert sorted(e.index for e in events if isinstance(e, PartStarted)) == list(range(parts))
    assert all(e.ok for e in events if isinstance(e, PartFinished))


@pytest.mark.parametrize(("parts", "calls"), [(33, 2), (40, 3), (70, 4)], ids=lambda v: str(v))
def test_more_than_32_parts_are_composed_in_a_tree(server, parts, calls):
    data = os.urandom(parts * PART - 7)
    put(server, data, "tree", n=8)
    resource = assert_stored(server, BUCKET, "tree", data)
    assert resource["componentCount"] == parts
    assert len(composes(server)) == calls  # 32 sources at most per call: the server refuses more
    assert server.list_objects(BUCKET) == ["tree"]


def test_reader_holds_at_most_n_parts(server):
    n = 3
    total = 12 * PART
    read = [0]

    def pieces():
        for _ in range(total // QUANTUM):
            read[0] += QUANTUM
            yield os.urandom(QUANTUM)

    # The first n parts' final requests stall: while they do, the reader must wait.
    server.faults.add(Fault("stall", on="final", times=n, seconds=1.5))
    done = threading.Event()
    box: dict = {}

    def run():
        try:
            box["result"] = put(server, b"", "bounded", n=n, source=IterableSource(pieces()))
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    server.wait_for_request(lambda r: len(server.faults.applied("stall")) >= n, 30)
    assert read[0] <= n * PART, f"the reader read {read[0]} bytes while {n} parts were held"
    assert done.wait(60)
    thread.join()
    assert box["result"].size == total and server.list_objects(BUCKET) == ["bounded"]


def test_the_reader_reads_the_next_part_into_chunks_already_confirmed(server):
    """While the connections wait for their parts' last answers, the reader has the confirmed
    chunks back and reads the next part into them: it is ready when a connection frees."""
    n, chunks = 2, 4
    part = chunks * QUANTUM
    data = os.urandom(3 * part)
    events: list = []
    finished_when_read: list[int] = []

    class Watched(io.BytesIO):
        def readinto(self, buffer) -> int:  # type: ignore[override]
            if self.tell() >= n * part and not finished_when_read:
                finished_when_read.append(sum(isinstance(e, PartFinished) for e in events))
            return super().readinto(buffer)

    # Both parts' final requests stall: no part can finish before the reader reads part 2.
    server.faults.add(Fault("stall", on="final", times=n, seconds=1.5))
    result = put(server, b"", "ahead", n=n, part=part, events=events, source=StreamSource(Watched(data)))
    assert finished_when_read == [0], "the reader waited for a part to finish before reading on"
    assert result.size == len(data)
    assert_stored(server, BUCKET, "ahead", data)
    assert server.list_objects(BUCKET) == ["ahead"]


def test_metadata_content_type_class_and_kms_key_are_those_asked_for(server):
    data = os.urandom(5 * PART)
    metadata = ObjectMetadata(
        content_type="text/x-log",
        cache_control="no-cache",
        content_disposition="attachment",
        storage_class="NEARLINE",
        kms_key="projects/p/locations/l/keyRings/r/cryptoKeys/k",
        metadata={"source": "pg_dump", "n": "1"},
    )
    put(server, data, "meta.log", metadata=metadata)
    resource = assert_stored(server, BUCKET, "meta.log", data)
    assert resource["contentType"] == "text/x-log" and resource["cacheControl"] == "no-cache"
    assert resource["contentDisposition"] == "attachment" and resource["storageClass"] == "NEARLINE"
    assert resource["kmsKeyName"] == metadata.kms_key
    assert resource["metadata"] == {"source": "pg_dump", "n": "1"}


def test_no_clobber_and_if_generation_match_apply_to_the_final_compose(server):
    old = server.put_object(BUCKET, "kept", b"old bytes")
    with pytest.raises(PreconditionError, match="already exists"):
        put(server, os.urandom(3 * PART), "kept", if_generation_match=0)
    with pytest.raises(PreconditionError, match="is not at generation 1"):
        put(server, os.urandom(3 * PART), "kept", if_generation_match=1)
    assert server.read_object(BUCKET, "kept") == b"old bytes" and server.list_objects(BUCKET) == ["kept"]
    data = os.urandom(3 * PART)
    result = put(server, data, "kept", if_generation_match=int(old["generation"]))
    assert_stored(server, BUCKET, "kept", data)
    assert result.generation != int(old["generation"]) and server.list_objects(BUCKET) == ["kept"]
    finals = [r for r in composes(server) if r.name == "kept"]
    assert [r.status for r in finals] == [412, 412, 200]
    assert (
        "ifGenerationMatch=0" in finals[0].path and f"ifGenerationMatch={old['generation']}" in finals[2].path
    )


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=403, on="final", nth=3),
        Fault("status", status=400, on="initiate", nth=2),
        Fault("status", status=400, on="chunk", nth=2),
    ],
    ids=["part-final-403", "part-initiate-400", "part-chunk-400"],
)
def test_a_part_that_fails_permanently_leaves_nothing(server, fault):
    server.faults.add(fault)
    with pytest.raises((AuthError, ServiceError)):
        put(server, os.urandom(8 * PART), "failed", part=2 * PART, n=3)
    assert server.list_objects(BUCKET) == []


def test_a_failed_run_lets_go_of_its_buffers_at_once(server, monkeypatch):
    """Not at the next garbage collection: a library caller that retries a failed upload must
    not hold ``n`` parts of memory per failure."""
    maps: list[weakref.ref] = []
    made = parallel._part_buffer

    def watched(size: int, *, populate: bool):
        buffer = made(size, populate=populate)
        maps.append(weakref.ref(buffer))
        return buffer

    monkeypatch.setattr(parallel, "_part_buffer", watched)
    server.faults.add(Fault("status", status=403, on="final", nth=3))
    gc.disable()
    try:
        with pytest.raises((AuthError, ServiceError)):
            put(server, os.urandom(12 * PART), "failed", part=4 * PART, n=2)
        alive = sum(ref() is not None for ref in maps)
    finally:
        gc.enable()
    # At most the chunk the failed request carried: the error's traceback holds that request.
    assert len(maps) == 8 and alive <= 1, f"{alive} of {len(maps)} buffers are still held"
    assert server.list_objects(BUCKET) == []


def test_parts_that_give_up_say_not_resumable_and_leave_nothing(server):
    server.faults.add(Fault("status", status=503, on="final", nth=2, times=10_000))
    with pytest.raises(
        Exception, match="a parallel upload without a journal cannot be resumed: run it again"
    ) as raised:
        put(server, os.urandom(6 * PART), "gaveup", retry_deadline=0.3)
    assert raised.value.exit_code == 75
    assert server.list_objects(BUCKET) == []


def test_a_failing_source_creates_nothing(server):
    def pieces():
        yield os.urandom(3 * PART)
        raise OSError("disk on fire")

    with pytest.raises(SourceError, match="no object was created"):
        put(server, b"", "src", source=IterableSource(pieces()))
    assert server.list_objects(BUCKET) == []


@pytest.mark.parametrize(
    ("parts", "nth"),
    [(5, 1), (40, 1), (40, 2), (40, 3)],
    ids=["final", "tree-first", "tree-second", "tree-final"],
)
def test_a_compose_that_fails_leaves_nothing(server, parts, nth):
    server.faults.add(Fault("status", status=400, on="compose", nth=nth))
    with pytest.raises(ServiceError, match="compos"):
        put(server, os.urandom(parts * PART), "composed")
    assert server.list_objects(BUCKET) == []


def test_a_wrong_composed_object_is_deleted_exit_3(server):
    data = os.urandom(6 * PART)
    server.faults.add(Fault("corrupt_compose", on="compose"))
    with pytest.raises(IntegrityError, match="the bad object was deleted") as raised:
        put(server, data, "bad")
    assert raised.value.exit_code == 3
    assert server.list_objects(BUCKET) == []
    deletes = [r for r in server.requests if r.kind == "delete" and r.name == "bad"]
    assert len(deletes) == 1 and "generation=" in deletes[0].path  # only the generation it created


def test_a_wrong_intermediate_stops_before_the_destination_is_touched(server):
    server.put_object(BUCKET, "dest", b"the previous generation")
    server.faults.add(Fault("corrupt_compose", on="compose", nth=2))
    with pytest.raises(IntegrityError, match="composed temporary object"):
        put(server, os.urandom(40 * PART), "dest")
    assert server.read_object(BUCKET, "dest") == b"the previous generation"
    assert server.list_objects(BUCKET) == ["dest"]


@pytest.mark.parametrize("no_clobber", [False, True], ids=["overwrite", "no-clobber"])
def test_a_lost_compose_answer_is_recognised(server, no_clobber):
    data = os.urandom(40 * PART)
    server.faults.extend([Fault("lost", on="compose", name="lost"), Fault("lost", on="compose", nth=1)])
    put(server, data, "lost", if_generation_match=0 if no_clobber else None)
    assert_stored(server, BUCKET, "lost", data)
    intermediates = sorted(r.status for r in composes(server) if r.name != "lost")
    finals = [r.status for r in composes(server) if r.name == "lost"]
    # The intermediate's retry finds it composed (412 to ifGenerationMatch=0) and takes it; so
    # does the final one's under no-clobber, while an overwrite simply composes it again.
    assert intermediates == [200, 412, 503] and finals == [503, 412 if no_clobber else 200]
    assert server.list_objects(BUCKET) == ["lost"]


@pytest.mark.parametrize(
    ("seed", "chunks"), [(1, 1), (2, 1), (3, 1), (4, 1), (5, 4), (6, 4), (7, 3)], ids=lambda v: str(v)
)
def test_random_faults_on_parts_and_compose_still_give_an_identical_object(server, seed, chunks):
    """With parts of several chunks, confirmed chunks go back to the reader and are read into
    again while their part goes on: a retry must never send a chunk overwritten under it."""
    data = os.urandom((37 if chunks == 1 else 10) * chunks * PART + 11)
    server.faults = FaultPlan.random(
        seed, 0.25, kinds=("status", "reset", "partial", "lost"), on=("initiate", "chunk", "final", "compose")
    )
    put(
        server,
        data,
        "random",
        part=chunks * PART,
        n=4,
        chunk_size=QUANTUM,
        if_generation_match=0 if seed % 2 else None,
    )
    assert server.faults.applied(), "the plan injected nothing"
    assert_stored(server, BUCKET, "random", data)
    assert server.list_objects(BUCKET) == ["random"]


def test_temporary_objects_that_cannot_be_deleted_are_named_once(server):
    warnings: list[str] = []
    data = os.urandom(3 * PART)
    server.faults.add(Fault("status", status=403, on="delete", times=2))
    put(server, data, "undeletable", warnings=warnings)
    assert_stored(server, BUCKET, "undeletable", data)
    left = temporaries(server)
    assert len(left) == 2 and len(warnings) == 1
    assert "2 temporary object(s) of this upload could not be deleted" in warnings[0]
    assert all(f"gs://{BUCKET}/{name}" in warnings[0] for name in left)
    assert "upload_id" not in warnings[0] and "\n" not in warnings[0]


def test_after_a_failure_what_cannot_be_deleted_is_named_in_the_error(server):
    server.faults.extend(
        [Fault("status", status=400, on="compose"), Fault("status", status=403, on="delete", times=3)]
    )
    with pytest.raises(ServiceError) as raised:
        put(server, os.urandom(3 * PART), "failing")
    left = temporaries(server)
    message = str(raised.value)
    assert len(left) == 3 and "\n" not in message
    assert "3 temporary object(s) of this upload could not be deleted" in message
    assert all(f"gs://{BUCKET}/{name}" in message for name in left)


@pytest.mark.parametrize(
    "fields",
    [{"retentionPolicy": {"retentionPeriod": "3600"}}, {"defaultEventBasedHold": True}],
    ids=["retention", "hold"],
)
def test_a_bucket_whose_temporaries_could_not_be_deleted_is_refused_up_front(server, fields):
    server.create_bucket("held", **fields)
    with pytest.raises(UsageError, match="temporary objects of --parallel could not be deleted"):
        uploader(server.url).upload(StreamSource(io.BytesIO(b"x" * PART)), ObjectURL("held", "o"))
    assert [r.kind for r in server.requests] == ["bucket"]
    assert server.list_objects("held") == []


def test_the_test_server_keeps_retained_and_held_objects(server):
    """What the refusal protects against: in such a bucket a temporary object could not be deleted."""
    server.create_bucket("retained", retentionPolicy={"retentionPeriod": "3600"})
    server.create_bucket("held", defaultEventBasedHold=True)
    for bucket in ("retained", "held"):
        server.put_object(bucket, "o", b"x")
        with Transport.connect(server.url) as transport:
            status = transport.request("DELETE", f"{server.url}/storage/v1/b/{bucket}/o/o").status_code
        assert status == 403 and server.list_objects(bucket) == ["o"]


def test_checksum_md5_is_refused():
    for mode in ("md5", "both"):
        with pytest.raises(UsageError, match="no MD5"):
            ParallelUploader(lambda: None, UploadOptions(checksum=mode), ParallelOptions(2, PART))


def test_against_gcp_storage_emulator(tmp_path):
    """gcp-storage-emulator composes (it does not enforce the 32-source limit, so the tree is
    the test server's to prove)."""
    emulator = start_gcp_storage_emulator(tmp_path / "emu")
    try:
        emulator.create_bucket(BUCKET)
        data = os.urandom(9 * PART + 3)
        metadata = ObjectMetadata(content_type="text/plain", metadata={"k": "v"})
        result = uploader(emulator.url).upload(
            StreamSource(io.BytesIO(data)), ObjectURL(BUCKET, "emu obj"), metadata
        )
        assert emulator.read_object(BUCKET, "emu obj") == data
        resource = emulator.object_resource(BUCKET, "emu obj")
        assert resource["crc32c"] == result.crc32c and int(resource["size"]) == len(data)
        assert resource["contentType"] == "text/plain" and resource["metadata"] == {"k": "v"}
        assert [o["name"] for o in emulator.list_objects(BUCKET)] == ["emu obj"]
    finally:
        emulator.stop()
