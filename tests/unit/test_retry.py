"""The one retry driver (uploads and downloads), on a fake clock; and the download's pure checks."""

from __future__ import annotations

import contextlib
import json
import os
import random
import zlib

import pytest

from gcsstream.download import Gunzip, check_media_answer
from gcsstream.errors import IntegrityError, ServiceError, TransientError
from gcsstream.retry import Failure, run_with_retries


class Clock:
    """Time that passes only when the driver sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Flaky(Exception):
    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("flaky")
        self.retry_after = retry_after


def transient(exc: BaseException) -> Failure | None:
    return Failure("503 from the service", exc.retry_after) if isinstance(exc, Flaky) else None


def drive(attempt, clock, **kwargs):
    options = {"initial": 1.0, "maximum": 32.0, "deadline": 60.0, **kwargs}
    return run_with_retries(
        attempt, transient=transient, sleep=clock.sleep, clock=clock, rng=random.Random(7), **options
    )


def test_gives_up_at_the_deadline_with_growing_delays():
    clock = Clock()
    calls: list[bool] = []

    def attempt(retried: bool) -> None:
        calls.append(retried)
        raise Flaky

    with pytest.raises(TransientError) as info:
        drive(attempt, clock, doing=lambda: "reading gs://b/o at byte 5")
    assert sum(clock.slept) <= 60.0
    for i, delay in enumerate(clock.slept):  # doubling up to the cap, jittered in [ceiling/2, ceiling]
        assert min(32.0, 2**i) / 2 <= delay <= min(32.0, 2**i)
    assert calls == [False] + [True] * len(clock.slept)
    message = str(info.value)
    assert message.startswith(f"gave up reading gs://b/o at byte 5 after {len(calls)} attempts")
    assert message.endswith("(--retry-deadline 60): 503 from the service")


def test_honours_retry_after_and_reports_each_retry():
    clock = Clock()
    failures = iter([Flaky(retry_after=7.5), Flaky()])
    seen = []

    def attempt(retried: bool) -> str:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return "done"

    result = drive(attempt, clock, on_retry=lambda f, delay, n: seen.append((f.reason, delay, n)))
    assert result == "done"
    assert clock.slept[0] == 7.5 and clock.slept[1] <= 2.0
    assert seen == [("503 from the service", 7.5, 1), ("503 from the service", clock.slept[1], 2)]


def test_a_retry_after_past_the_deadline_gives_up_at_once():
    clock = Clock()

    def attempt(retried: bool) -> None:
        raise Flaky(retry_after=120)

    with pytest.raises(TransientError):
        drive(attempt, clock)
    assert clock.slept == []


def test_progress_starts_a_new_run_of_failures():
    """Twenty failures over far more than the deadline, each after some bytes: never gives up,
    and every wait is a first wait (at most ``initial``)."""
    clock = Clock()
    position = [0]

    def attempt(retried: bool) -> int:
        if position[0] < 20:
            position[0] += 1
            clock.now += 10  # each attempt reads for 10 s before it breaks
            raise Flaky
        return position[0]

    assert drive(attempt, clock, deadline=15.0, progress=lambda: position[0]) == 20
    assert len(clock.slept) == 20 and max(clock.slept) <= 1.0
    position[0] = 0
    with pytest.raises(TransientError):  # the same failures without progress reported
        drive(attempt, clock, deadline=15.0)


def test_a_permanent_error_is_not_retried():
    clock = Clock()

    def attempt(retried: bool) -> None:
        raise ServiceError("400 from the service")

    with pytest.raises(ServiceError):
        drive(attempt, clock)
    assert clock.slept == []


def always_flaky(retried: bool) -> None:
    raise Flaky


def jitter_in_a_forked_child() -> list[float]:
    """The delays the default jitter draws in a child forked from this process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one run of failures with the default generator, then out
        try:
            clock = Clock()
            with contextlib.suppress(TransientError):
                run_with_retries(
                    always_flaky, transient=transient, sleep=clock.sleep, clock=clock,
                    initial=1.0, maximum=32.0, deadline=60.0,
                )  # fmt: skip
            os.write(write, json.dumps(clock.slept).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        delays = json.loads(answer.read())
    os.waitpid(pid, 0)
    return delays


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_processes_forked_from_one_parent_do_not_retry_in_step():
    """Workers forked from one parent (multiprocessing's default on Linux) draw their own jitter:
    it is there to keep clients from retrying in step, and a generator copied by fork repeats."""
    first, second = jitter_in_a_forked_child(), jitter_in_a_forked_child()
    assert len(first) > 3 and len(second) > 3
    assert first != second, "two forked workers drew the same backoff delays"


# -- the download's pure checks ------------------------------------------------------------------


def gz(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=31)
    return c.compress(data) + c.flush()


def test_gunzip_reads_every_member_across_any_piece_boundaries():
    parts = [b"a" * 5000, b"", b"bc" * 3000, bytes(range(256)) * 40]
    stored = b"".join(gz(p) for p in parts)
    for step in (1, 7, 100, len(stored)):
        g = Gunzip("gs://b/o")
        out = b"".join(b"".join(g.feed(stored[i : i + step])) for i in range(0, len(stored), step))
        g.finish()
        assert out == b"".join(parts) and g.members == len(parts), step


def test_gunzip_bounds_each_output_piece():
    g = Gunzip("gs://b/o")
    pieces = list(g.feed(gz(b"\0" * (5 << 20))))
    assert sum(map(len, pieces)) == 5 << 20 and max(map(len, pieces)) <= 1 << 20


def test_gunzip_refuses_garbage_and_truncation():
    g = Gunzip("gs://b/o")
    with pytest.raises(IntegrityError, match="after gzip member 1"):
        list(g.feed(gz(b"x" * 100) + b"junk"))
    g = Gunzip("gs://b/o")
    list(g.feed(gz(b"x" * 100)[:-3]))
    with pytest.raises(IntegrityError, match="truncated"):
        g.finish()


@pytest.mark.parametrize(
    ("status", "headers", "first", "last"),
    [
        (200, {}, 10, 99),  # the whole object for a range
        (200, {}, 0, 99),  # the whole object when only a prefix was asked
        (206, {"Content-Range": "bytes 0-89/1000"}, 10, 99),
        (206, {"Content-Range": "bytes 10-99/2000"}, 10, 99),
        (206, {}, 10, 99),
        (206, {"Content-Range": "bytes 10-99/1000", "Content-Length": "140"}, 10, 99),
        (204, {}, 10, 99),
    ],
)
def test_check_media_answer_refuses_what_was_not_asked(status, headers, first, last):
    with pytest.raises(ServiceError):
        check_media_answer(status, headers, first, last, 1000, "gs://b/o")


def test_check_media_answer_accepts_the_asked_range():
    check_media_answer(206, {"Content-Range": "bytes 10-99/1000", "Content-Length": "90"}, 10, 99, 1000, "o")
    check_media_answer(200, {"Content-Length": "1000"}, 0, 999, 1000, "o")
