"""Answers that go missing, make no progress, cannot be read, or describe someone else's object.

Each case here once lost data, hung, or deleted a good object: lost answers in a row (the
window never released), a server that never confirms anything (re-sent forever), a final answer
cut short (a correct object deleted), a resource without ``size`` (read as -1), and an upload
finished by another process (its object deleted as "bad").
"""

from __future__ import annotations

import os
import threading

import google_crc32c
import pytest

from gcsstream.engine import Resume, Uploader
from gcsstream.errors import IntegrityError, TransientError
from gcsstream.options import UploadOptions
from gcsstream.sources import IterableSource
from tests.unit.fake_service import QUANTUM, FakeService, response
from tests.unit.test_engine import DEST, FakeClock, crc32c_b64, run, stored

CHUNK = QUANTUM


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def delivered_then(answer, data: bytes, service: FakeService):
    """A fault: the service takes the whole chunk (or creates the object), then ``answer`` is
    what reaches the client instead of its real answer: a lost answer."""

    def fault(call, session):
        span = call.headers["content-range"].split()[1].split("/")[0]
        first = 0 if span == "*" else int(span.split("-")[0])
        service._chunk(
            session, call.headers["content-range"], data[first : first + call.size], lower(call.headers)
        )
        return answer(session) if callable(answer) else answer

    return fault


def in_thread(target, timeout: float = 30.0):
    """Run ``target`` on a thread; fail (instead of hanging the suite) if it does not end."""
    outcome: dict[str, object] = {}

    def body():
        try:
            outcome["value"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the upload hung"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


@pytest.mark.parametrize("lost", [2, 3])
def test_answers_lost_in_a_row_release_the_window_and_do_not_hang(lost):
    data = os.urandom(6 * CHUNK + 99)
    service = FakeService()
    service.fail("chunk", *[delivered_then(response(503), data, service) for _ in range(lost)])
    result, _ = in_thread(lambda: run(service, data))
    assert stored(service) == data and result.crc32c == crc32c_b64(data)
    assert "delete" not in service.kinds() and "cancel" not in service.kinds()


def test_answers_lost_in_a_row_by_resets_do_not_hang():

    data = os.urandom(5 * CHUNK)
    service = FakeService()

    def reset(_session):
        raise ConnectionResetError("connection reset after the body arrived")

    service.fail("chunk", *[delivered_then(reset, data, service) for _ in range(3)])
    result, _ = in_thread(lambda: run(service, data))
    assert stored(service) == data and result.size == len(data)


def test_a_server_that_never_keeps_anything_meets_the_deadline():
    service = FakeService()
    service.fail("chunk", *[("keep", 0)] * 10_000)  # 308 without Range, forever
    with pytest.raises(TransientError, match="kept none of the"):
        in_thread(lambda: run(service, os.urandom(3 * CHUNK), retry_deadline=60))
    (session,) = service.sessions.values()
    assert not session.cancelled  # the session is kept, to be resumed


def test_a_range_that_stays_behind_meets_the_deadline():
    data = os.urandom(4 * CHUNK)
    service = FakeService()
    # The first chunk is kept; after that, every chunk is answered with the same old Range.
    service.fail("chunk", None, *[("keep", 0)] * 10_000)
    with pytest.raises(TransientError):
        in_thread(lambda: run(service, data, retry_deadline=60))


def test_a_308_to_the_final_request_meets_the_deadline():
    data = os.urandom(CHUNK + 10)
    service = FakeService()
    stuck = response(308, headers={"Range": f"bytes=0-{len(data) - 1}"})
    service.fail("final", *[lambda call, session: stuck] * 10_000)
    service.fail("status", *[lambda call, session: stuck] * 10_000)
    with pytest.raises(TransientError, match="did not finish the upload|kept none"):
        in_thread(lambda: run(service, data, retry_deadline=60))


@pytest.mark.parametrize("body", [b'{"kind": "storage#object", "si', b"<html>oops</html>", b"[]"])
def test_an_unreadable_final_answer_is_asked_again_and_the_object_kept(body):
    data = os.urandom(2 * CHUNK + 7)
    service = FakeService()
    service.fail("final", delivered_then(response(200, body), data, service))
    result, _ = run(service, data)
    assert stored(service) == data and result.crc32c == crc32c_b64(data)
    assert "delete" not in service.kinds() and "cancel" not in service.kinds()
    assert service.kinds()[-1] == "status"  # asked the session, which answered readably


def without(field: str, value: object = None):
    def answer(session):
        resource = dict(session.finished)
        if value is None:
            resource.pop(field)
        else:
            resource[field] = value
        return response(200, resource)

    return answer


def test_an_empty_object_without_size_is_accepted_when_its_checksums_agree():
    service = FakeService()
    service.fail("final", delivered_then(without("size"), b"", service))
    result, _ = run(service, b"")
    assert result.size == 0 and stored(service) == b""
    assert "delete" not in service.kinds()


def test_a_nonempty_object_without_size_is_an_error_and_kept():
    data = os.urandom(CHUNK + 3)
    service = FakeService()
    service.fail("final", delivered_then(without("size"), data, service))
    with pytest.raises(IntegrityError, match="has no size.*could not be checked and was left as it is"):
        run(service, data)
    assert stored(service) == data and "delete" not in service.kinds()


@pytest.mark.parametrize(("field", "value"), [("size", "-1"), ("size", "12.5"), ("generation", "abc")])
def test_a_malformed_field_is_a_clear_error_not_a_crash(field, value):
    data = os.urandom(CHUNK + 3)
    service = FakeService()
    service.fail("final", delivered_then(without(field, value), data, service))
    with pytest.raises(IntegrityError, match=f"malformed {field}"):
        run(service, data)
    assert "delete" not in service.kinds()


def test_a_size_that_differs_from_what_was_read_deletes_our_own_object():
    data = os.urandom(CHUNK + 3)
    service = FakeService()
    service.fail("final", delivered_then(without("size", "5"), data, service))
    with pytest.raises(IntegrityError, match="stored 5 bytes.*deleted"):
        run(service, data)
    assert "delete" in service.kinds()


def test_an_upload_finished_by_another_process_is_reported_not_deleted():
    data = os.urandom(4 * CHUNK)
    other = os.urandom(4 * CHUNK)
    service = FakeService()

    def finished_elsewhere(call, session):  # another writer completed this session meanwhile
        session.data = bytearray(other)
        service._chunk(session, f"bytes */{len(other)}", b"", {})
        return None  # the service then answers our chunk with the finished object

    service.fail("chunk", None, finished_elsewhere)
    with pytest.raises(IntegrityError, match=r"finished by another.*#\d+ was not created by this run"):
        run(service, data)
    assert stored(service) == other
    assert "delete" not in service.kinds() and "cancel" not in service.kinds()


def test_resuming_a_finished_session_with_other_bytes_after_the_prefix_deletes_nothing():
    data = os.urandom(3 * CHUNK + 5)
    service = FakeService()
    result, _ = run(service, data)
    (session_uri,) = [
        f"{service.endpoint}/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id={i}"
        for i in service.sessions
    ]
    changed = data[:CHUNK] + os.urandom(len(data) - CHUNK)
    clock = FakeClock()
    uploader = Uploader(service, UploadOptions(chunk_size=CHUNK), sleep=clock.sleep, clock=clock)
    with pytest.raises(IntegrityError, match=f"#{result.generation} was not created by this run"):
        uploader.upload(
            IterableSource([changed]),
            DEST,
            resume=Resume(session_uri, verify=(CHUNK, google_crc32c.value(data[:CHUNK]))),
        )
    assert stored(service) == data and "delete" not in service.kinds()


def test_resuming_a_finished_session_with_the_same_input_succeeds():
    data = os.urandom(2 * CHUNK + 5)
    service = FakeService()
    first, _ = run(service, data)
    (upload_id,) = service.sessions
    session_uri = f"{service.endpoint}/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id={upload_id}"
    clock = FakeClock()
    again = Uploader(service, UploadOptions(chunk_size=CHUNK), sleep=clock.sleep, clock=clock).upload(
        IterableSource([data]), DEST, resume=Resume(session_uri)
    )
    assert again.generation == first.generation and again.size == len(data)
    assert "delete" not in service.kinds()


def test_every_answer_lost_but_every_chunk_kept_is_progress_not_a_run_of_failures():
    """The status queries confirm each lost chunk: that is progress, so the backoff starts again
    instead of adding up across the whole upload until the deadline."""
    data = os.urandom(10 * CHUNK + 1)
    service = FakeService()
    service.fail("chunk", *[delivered_then(response(503), data, service) for _ in range(10)])
    result, clock = run(service, data, retry_deadline=20, retry_initial_delay=1, retry_max_delay=32)
    assert stored(service) == data and result.size == len(data)
    assert max(clock.sleeps) <= 1  # every failure was the first of its run


def test_a_bad_object_in_a_requester_pays_bucket_is_deleted_with_its_user_project():
    service = FakeService()
    service.user_project = "billed-project"
    service.honor_goog_hash, service.corrupt_on_store = False, True
    with pytest.raises(IntegrityError, match="deleted"):
        run(service, os.urandom(CHUNK + 5))
    (delete,) = [c for c in service.calls if c.kind == "delete"]
    assert "userProject=billed-project" in delete.url and "generation=" in delete.url
