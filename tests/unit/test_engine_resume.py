"""Resuming an existing session: the held prefix is read and checked, never resent."""

from __future__ import annotations

import base64
import hashlib
import os

import google_crc32c
import pytest

from gcsstream.engine import Resume, Uploader
from gcsstream.errors import PrefixMismatch, TransientError
from gcsstream.options import ObjectURL, UploadOptions
from gcsstream.sources import FileSource, IterableSource
from tests.unit.fake_service import QUANTUM, FakeService, Session
from tests.unit.test_engine import DEST, FakeClock, stored

CHUNK = QUANTUM


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def started(self, session_uri: str) -> None:
        self.log.append(("started", session_uri))

    def persisted(self, offset: int, crc32c: int) -> None:
        self.log.append(("persisted", offset, crc32c))

    def finished(self) -> None:
        self.log.append(("finished",))


def uploader(service: FakeService, **options) -> Uploader:
    clock = FakeClock()
    opts = UploadOptions(**{"chunk_size": CHUNK, "retry_deadline": 5, **options})
    return Uploader(service, opts, sleep=clock.sleep, clock=clock)


def interrupted_upload(service: FakeService, data: bytes, chunks_before_failure: int, **options) -> Recorder:
    """Upload until the service fails for good after ``chunks_before_failure`` chunks."""
    service.fail("chunk", *([None] * chunks_before_failure), *([503] * 1000))
    recorder = Recorder()
    with pytest.raises(TransientError):
        uploader(service, **options).upload(IterableSource([data]), DEST, recorder=recorder)
    service._faults.clear()
    return recorder


def test_recorder_sees_session_before_bytes_and_crc_of_each_confirmed_prefix():
    data = os.urandom(3 * CHUNK + 5)
    service = FakeService()
    recorder = interrupted_upload(service, data, 2)
    assert recorder.log[0][0] == "started" and service.calls[1].kind == "chunk"
    persisted = [entry for entry in recorder.log if entry[0] == "persisted"]
    assert [p[1] for p in persisted] == [CHUNK, 2 * CHUNK]
    assert all(p[2] == google_crc32c.value(data[: p[1]]) for p in persisted)
    assert ("finished",) not in recorder.log  # the session stays resumable


@pytest.mark.parametrize("checksum", ["crc32c", "both"])
def test_resume_continues_without_resending_held_bytes(checksum):
    data = os.urandom(5 * CHUNK + 77)
    service = FakeService()
    recorder = interrupted_upload(service, data, 3, checksum=checksum)
    session_uri, (_, offset, crc) = recorder.log[0][1], recorder.log[-1]
    calls_before = len(service.calls)
    resumed = Recorder()
    result = uploader(service, checksum=checksum).upload(
        IterableSource([data]), DEST, recorder=resumed, resume=Resume(session_uri, verify=(offset, crc))
    )
    assert stored(service) == data
    sent = sum(c.size for c in service.calls[calls_before:])
    assert sent == len(data) - offset  # nothing held was sent again
    assert result.crc32c == base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    if checksum == "both":  # MD5 covers the whole object, the skipped prefix included
        assert result.md5 == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert resumed.log[-1] == ("finished",)


def test_resume_when_service_holds_more_than_the_journal():
    """After kill -9 the journal may be a chunk behind: the service's offset wins."""
    data = os.urandom(4 * CHUNK)
    service = FakeService()
    recorder = interrupted_upload(service, data, 3)
    session_uri = recorder.log[0][1]
    _, offset, crc = [e for e in recorder.log if e[0] == "persisted"][0]  # an older record
    uploader(service).upload(IterableSource([data]), DEST, resume=Resume(session_uri, verify=(offset, crc)))
    assert stored(service) == data


@pytest.mark.parametrize(
    "other",
    [
        lambda d: bytes([d[0] ^ 1]) + d[1:],  # a different stream
        lambda d: d[: CHUNK + 10],  # a truncated stream
        lambda d: b"",  # nothing at all
    ],
    ids=["different", "truncated", "empty"],
)
def test_wrong_input_on_resume_is_refused_and_session_kept(other):
    data = os.urandom(3 * CHUNK + 5)
    service = FakeService()
    recorder = interrupted_upload(service, data, 2)
    session_uri, (_, offset, crc) = recorder.log[0][1], recorder.log[-1]
    calls_before = len(service.calls)
    with pytest.raises(PrefixMismatch):
        uploader(service).upload(
            IterableSource([other(data)]), DEST, resume=Resume(session_uri, (offset, crc))
        )
    assert {c.kind for c in service.calls[calls_before:]} == {"status"}  # no byte sent, nothing cancelled
    (session,) = service.sessions.values()
    assert not session.cancelled and len(session.data) == offset


def test_resume_of_a_finished_upload_checks_the_whole_input():
    data = os.urandom(2 * CHUNK + 1)
    service = FakeService()
    recorder = Recorder()
    uploader(service).upload(IterableSource([data]), DEST, recorder=recorder)
    session_uri = recorder.log[0][1]
    result = uploader(service).upload(IterableSource([data]), DEST, resume=Resume(session_uri))
    assert result.size == len(data)
    with pytest.raises(PrefixMismatch, match="already finished"):
        uploader(service).upload(IterableSource([data + b"x"]), DEST, resume=Resume(session_uri))


def test_resume_of_a_bare_session_uri_without_a_recorded_prefix():
    data = os.urandom(3 * CHUNK)
    service = FakeService()
    session_uri = interrupted_upload(service, data, 1).log[0][1]
    uploader(service).upload(IterableSource([data]), ObjectURL("bkt", DEST.name), resume=Resume(session_uri))
    assert stored(service) == data


def test_resume_of_a_file_when_the_service_holds_every_byte_but_never_finalized(tmp_path):
    """A pipe upload of an exact multiple of the chunk size lost its closing ``bytes */N``;
    resuming it from the saved file (a known size) must close it, not fail."""
    data = os.urandom(2 * CHUNK)
    service = FakeService()
    service.sessions["held"] = Session("bkt", DEST.name, {"name": DEST.name}, data=bytearray(data))
    session_uri = f"{service.endpoint}/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=held"
    path = tmp_path / "saved.bin"
    path.write_bytes(data)
    result = uploader(service).upload(FileSource(path), DEST, resume=Resume(session_uri))
    assert stored(service) == data and result.size == len(data)
    (final,) = [c for c in service.calls if c.kind == "final"]
    assert final.size == 0 and final.headers["content-range"] == f"bytes */{len(data)}"
    crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    assert final.headers["X-Goog-Hash"] == f"crc32c={crc}"


def test_resume_when_the_journal_recorded_an_offset_between_256_kib_units():
    """A server that confirms odd offsets (the service does not, emulators may): the journal's
    offset is kept, not rounded below what was confirmed."""
    data = os.urandom(5 * CHUNK + 3)
    service = FakeService()
    service.fail("chunk", ("keep", CHUNK + 100), *([503] * 1000))
    recorder = Recorder()
    with pytest.raises(TransientError):
        uploader(service, chunk_size=2 * CHUNK).upload(IterableSource([data]), DEST, recorder=recorder)
    service._faults.clear()
    session_uri, (_, offset, crc) = recorder.log[0][1], recorder.log[-1]
    assert offset == CHUNK + 100
    calls_before = len(service.calls)
    uploader(service, chunk_size=2 * CHUNK).upload(
        IterableSource([data]), DEST, resume=Resume(session_uri, verify=(offset, crc))
    )
    assert stored(service) == data
    assert sum(c.size for c in service.calls[calls_before:]) == len(data) - offset


class FlushingRecorder(Recorder):
    """A recorder that writes in the background: the engine must let it finish at the end."""

    def flush(self) -> None:
        self.log.append(("flush",))


@pytest.mark.parametrize("fails", [False, True], ids=["completed", "interrupted"])
def test_a_run_ends_only_after_the_recorder_has_flushed_what_it_recorded(fails):
    data = os.urandom(3 * CHUNK + 5)
    service = FakeService()
    recorder = FlushingRecorder()
    if fails:
        service.fail("chunk", None, *([503] * 1000))
        with pytest.raises(TransientError):
            uploader(service).upload(IterableSource([data]), DEST, recorder=recorder)
        assert recorder.log[-1] == ("flush",)  # after the last offset it was told
    else:
        uploader(service).upload(IterableSource([data]), DEST, recorder=recorder)
        assert recorder.log[-2:] == [("flush",), ("finished",)]
    assert ("persisted", CHUNK, google_crc32c.value(data[:CHUNK])) in recorder.log


def test_what_a_status_query_confirms_is_recorded_before_the_run_gives_up(tmp_path):
    """A file's one streamed request is cut; the status query finds 4 units held, and every
    request after it fails: the recorder hears of the 4 units (with their CRC32C), so the give-up
    message and a resume know them, though no answer to a chunk ever confirmed them."""
    data = os.urandom(12 * CHUNK + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    service = FakeService()
    service.fail("stream", ("cut", 6 * CHUNK, 4 * CHUNK))
    service.fail("chunk", *([503] * 1000))
    recorder = Recorder()
    with pytest.raises(TransientError):
        uploader(service).upload(FileSource(path), DEST, recorder=recorder)
    persisted = [entry for entry in recorder.log if entry[0] == "persisted"]
    assert persisted == [("persisted", 4 * CHUNK, google_crc32c.value(data[: 4 * CHUNK]))]


class SentRecorder(Recorder):
    def sent(self, offset: int, crc32c: int) -> None:
        self.log.append(("sent", offset, crc32c))


def test_a_streamed_request_records_each_prefix_sent_and_resume_checks_the_longest_held(tmp_path):
    data = os.urandom(12 * CHUNK + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    service = FakeService()
    service.fail("stream", ("cut", 9 * CHUNK, 7 * CHUNK))
    service.fail("status", *([503] * 1000))  # nothing is confirmed
    recorder = SentRecorder()
    with pytest.raises(TransientError):
        uploader(service).upload(FileSource(path), DEST, recorder=recorder)
    sent = [(offset, crc) for kind, *rest in recorder.log if kind == "sent" for offset, crc in [rest]]
    assert sent == sorted(sent) and sent[-1][0] >= 7 * CHUNK  # the journal keeps each once
    assert all(crc == google_crc32c.value(data[:offset]) for offset, crc in sent)
    assert not [entry for entry in recorder.log if entry[0] == "persisted"]
    service._faults.clear()
    session_uri = recorder.log[0][1]
    wrong = bytearray(data)
    wrong[5 * CHUNK] ^= 1
    other = tmp_path / "g"
    other.write_bytes(bytes(wrong))
    calls = len(service.calls)
    with pytest.raises(PrefixMismatch):  # checked against the longest prefix sent that is held
        uploader(service).upload(
            FileSource(other), DEST, resume=Resume(session_uri, verify=(0, 0), sent=tuple(sent))
        )
    assert [c.kind for c in service.calls[calls:]] == ["status"]
    result = uploader(service).upload(
        FileSource(path), DEST, resume=Resume(session_uri, verify=(0, 0), sent=tuple(sent))
    )
    assert stored(service) == data and result.size == len(data)


def test_no_prefix_is_recorded_as_sent_once_bytes_were_read_again(tmp_path):
    """A resend reads bytes from the file again, which may have changed since the first reading
    whose CRC32C values the marks hold: from then on nothing is recorded as sent (helper-25)."""
    data = os.urandom(24 * CHUNK + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    service = FakeService()
    service.fail("stream", ("cut", 12 * CHUNK, 2 * CHUNK))  # chunks 2.. are read again
    recorder = SentRecorder()
    uploader(service).upload(FileSource(path), DEST, recorder=recorder)
    assert stored(service) == data
    kinds = [entry[0] for entry in recorder.log]
    resynced = kinds.index("persisted")  # the status query's 2 chunks
    assert "sent" in kinds[:resynced] and "sent" not in kinds[resynced:]
