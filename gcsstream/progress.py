"""What a person sees while and after an upload runs. The only module that writes to a terminal.

The engine calls ``ProgressState.record`` with its events on its own thread; that only stores
numbers. Drawing happens elsewhere: rich's refresh thread (at most 10 times a second) when
stderr is a terminal, or a timer thread that prints a plain timestamped line every
``interval`` seconds when it is not (cron logs, CI). So drawing never slows the upload.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from gcsstream.events import (
    BytesSent,
    ChunkPersisted,
    ChunkSending,
    Event,
    PartFinished,
    PartStarted,
    Retrying,
    UploadFinished,
    UploadStarted,
)
from gcsstream.threads import HelperThread, signals_held

if TYPE_CHECKING:  # rich, the engine and the downloader are imported only when used
    from rich.console import Group

    from gcsstream.download import DownloadResult
    from gcsstream.engine import UploadResult

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_RATE_WINDOW = 5.0  # seconds of history behind the displayed rate


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style sizes for messages."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float) -> str:
    """``12.5 MiB/s``: rates in the binary units of sizes, as curl and rclone print them."""
    return f"{human_bytes(bytes_per_second)}/s"


def timestamp() -> str:
    """The UTC time at the start of each stderr line that does not go to a terminal."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamped(stream: TextIO) -> bool:
    """Whether lines written to ``stream`` carry a timestamp: everywhere but on a terminal."""
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file: a log, not a person
        return True


def say(text: str, stream: TextIO | None = None) -> None:
    """Print one ``gcsstream: ...`` line on stderr, timestamped unless stderr is a terminal.

    Every message goes through here (progress, warnings, the summary, errors), so a log
    reads as one consistent, timestamped sequence."""
    out = stream or sys.stderr
    lines = [f"gcsstream: {line}" for line in text.split("\n")]
    if stamped(out):
        prefix = f"{timestamp()} "
        lines = [prefix + line for line in lines]
    print("\n".join(lines), file=out, flush=True)


def cell_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide (CJK) characters two, combining marks none."""
    import unicodedata

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def format_table(header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Lines of a table whose columns line up whatever their lengths (cells already escaped);
    columns in ``right`` are right-aligned, the last is never padded."""
    table = [header, *rows]
    widths = [max(cell_width(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for row in table:
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - cell_width(cell))
            last = i == len(row) - 1
            cells.append(pad + cell if i in right else cell if last else cell + pad)
        lines.append("  ".join(cells))
    return lines


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_summary(result: UploadResult, note: str = "", resumed_at: int = 0) -> str:
    """The line printed on success: object, generation, bytes, crc32c, seconds, rate.

    A resumed upload's rate is that of the bytes this run sent (the prefix the service already
    held was not sent), and the line says how much that was."""
    checks = f"crc32c {result.crc32c}" if result.crc32c else "no crc32c"
    if "md5" in result.verified:
        checks += f", md5 {result.md5}"
    checks += " (verified)" if result.verified else " (not verified: --checksum none)"
    if result.parts is not None:
        checks += f", composed of {result.parts} part{'s' if result.parts != 1 else ''}"
    sent = result.size - resumed_at
    rate = human_rate(sent / result.seconds if result.seconds > 0 else 0.0)
    timing = f"{result.seconds:.2f} s, {rate}"
    if resumed_at:
        timing = (
            f"this run sent {sent} bytes ({human_bytes(sent)}) in {timing} "
            f"(resumed at {resumed_at} bytes held by the service)"
        )
    return (
        f"uploaded {result.url} generation {result.generation}: "
        f"{result.size} bytes ({human_bytes(result.size)}), {checks}{note}, {timing}"
    )


def format_download_summary(result: DownloadResult) -> str:
    """The line printed after ``cat``: the bytes written out, and those stored when they differ
    (a gzip-encoded object is decompressed on the way out)."""
    if result.verified:
        checks = f"crc32c {result.crc32c} (verified)" if "crc32c" in result.verified else "md5 (verified)"
    else:
        checks = "a byte range: not checked against the object" if result.crc32c is None else "not verified"
    written = result.size if result.written is None else result.written
    amount = f"{written} bytes ({human_bytes(written)})"
    if result.written is not None:
        amount += f" decompressed from {result.size} bytes ({human_bytes(result.size)}) stored gzip-encoded"
    rate = human_rate(result.size / result.seconds if result.seconds else 0)
    return (
        f"read {result.url} generation {result.generation}: {amount}, {checks}, "
        f"{result.seconds:.2f} s, {rate}"
    )


class ProgressState:
    """The numbers a display needs, updated from the engine's events (cheaply, under a lock)."""

    def __init__(self, label: str, size: int | None = None) -> None:
        self.label = label
        self.size = size
        self.persisted = 0
        self.sent = 0
        #: How far a streamed request (one for most of a file) has gone out: the bar follows it,
        #: since the service confirms such a request only at its end.
        self.written = 0
        self.resumed_at = 0
        #: A parallel upload: parts being sent now, and parts stored.
        self.parts_in_flight = 0
        self.parts_done = 0
        self.note = ""  # a retry or resume in progress, shown in line
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._lock = threading.Lock()
        #: Lines that must be printed once (retries), for the plain display.
        self.announcements: deque[str] = deque()

    def record(self, event: Event) -> None:
        now = time.monotonic()
        with self._lock:
            if isinstance(event, UploadStarted):
                self.size = event.size if event.size is not None else self.size
                self.resumed_at = self.persisted = self.sent = event.resumed_at
                self._samples = deque([(now, event.resumed_at)])
                if event.resumed_at:
                    self._announce(f"resumed at {human_bytes(event.resumed_at)}")
            elif isinstance(event, ChunkSending):
                self.sent = max(self.sent, event.end)
            elif isinstance(event, BytesSent):
                self.sent = max(self.sent, event.end)
                self.written = event.end
                self._sample(now)
            elif isinstance(event, ChunkPersisted):
                self.persisted = event.persisted
                self.note = ""
                self._sample(now)
            elif isinstance(event, Retrying):
                self.written = 0  # what went out unconfirmed is sent again
                self._announce(f"{event.reason}, retrying in {event.delay:.1f} s")
            elif isinstance(event, UploadFinished):
                self.persisted = self.sent = event.result.size
            elif isinstance(event, PartStarted):
                self.parts_in_flight += 1
            elif isinstance(event, PartFinished):
                self.parts_in_flight -= 1
                self.parts_done += event.ok

    def _sample(self, now: float) -> None:
        self._samples.append((now, max(self.persisted, self.written)))
        while len(self._samples) > 2 and now - self._samples[1][0] > _RATE_WINDOW:
            self._samples.popleft()

    def parts(self) -> str:
        """``, parts: 3 in flight, 12 stored`` for a parallel upload; "" for one stream."""
        with self._lock:
            if not (self.parts_in_flight or self.parts_done):
                return ""
            return f", parts: {self.parts_in_flight} in flight, {self.parts_done} stored"

    def progress(self, done: int) -> None:
        """For downloads: ``done`` bytes written so far."""
        now = time.monotonic()
        with self._lock:
            self.persisted = self.sent = done
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[1][0] > _RATE_WINDOW:
                self._samples.popleft()

    def _announce(self, message: str) -> None:
        self.note = message
        self.announcements.append(message)

    def snapshot(self) -> tuple[int, int, int | None, float, float, str]:
        """(persisted, sent, size, rate in bytes/s, elapsed s, note)."""
        with self._lock:
            (t0, b0), b1 = self._samples[0], self._samples[-1][1]
            now = time.monotonic()
            rate = (b1 - b0) / (now - t0) if now > t0 else 0.0
            return self.persisted, self.sent, self.size, rate, now - self.started, self.note

    def done(self) -> int:
        """The bytes a bar shows: confirmed, or gone out in a streamed request."""
        with self._lock:
            return max(self.persisted, self.written)


class _Display:
    """rich's view of a ``ProgressState``: built afresh on each refresh, from rich's thread."""

    def __init__(self, state: ProgressState, verb: str) -> None:
        self.state = state
        self.verb = verb

    def __rich__(self) -> Group:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        persisted, sent, size, rate, elapsed, note = self.state.snapshot()
        shown = max(persisted, self.state.done())
        row = Table.grid(padding=(0, 1))
        bar = ProgressBar(total=size if size else None, completed=shown, width=30)
        amount = f"{human_bytes(shown)}/{human_bytes(size)}" if size else human_bytes(shown)
        cells: list[Text | ProgressBar] = [Text(self.state.label, style="bold"), bar]
        if size:
            cells.append(Text(f"{shown / size:4.0%}" if size else "", style="magenta"))
        cells += [Text(amount, style="green"), Text(human_rate(rate), style="cyan")]
        cells.append(Text(human_duration(elapsed), style="yellow"))
        if size and rate > 0 and shown < size:
            cells.append(Text(f"ETA {human_duration((size - shown) / rate)}", style="yellow"))
        row.add_row(*cells)
        lines: list[Table | Text] = [row]
        detail = f"{self.verb} {human_bytes(sent)}"
        if self.verb != "received":  # a download has nothing for the service to confirm
            detail += f", confirmed by the service {human_bytes(persisted)}{self.state.parts()}"
        lines.append(Text(f"  {detail}" + (f" · {note}" if note else ""), style="dim"))
        return Group(*lines)


@contextlib.contextmanager
def _rich_display(state: ProgressState, stream: TextIO, verb: str) -> Iterator[None]:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream, force_terminal=True)
    live = Live(_Display(state, verb), console=console, refresh_per_second=10, transient=True)
    try:
        with signals_held():  # its refresh thread, like ours, leaves signals to the main thread
            live.start(refresh=True)
        yield
    finally:
        live.stop()


@contextlib.contextmanager
def _plain_display(state: ProgressState, stream: TextIO, interval: float, done: str) -> Iterator[None]:
    """A timestamped line every ``interval`` seconds, and one per retry; no control characters.

    ``done`` says what the count is: bytes "stored" by the service, or "received" from it."""
    stop = threading.Event()

    def line(text: str) -> None:
        say(text, stream)

    def status() -> str:
        persisted, _, size, rate, elapsed, _ = state.snapshot()
        shown = max(persisted, state.done())
        share = f" of {human_bytes(size)} ({shown / size:.0%})" if size else ""
        amount = f"{human_bytes(shown)}{share} {done}"
        if shown > persisted:  # a streamed request, confirmed only at its end
            amount = f"{human_bytes(shown)}{share} sent, {human_bytes(persisted)} {done}"
        return f"{state.label}: {amount}, rate {human_rate(rate)}, {elapsed:.0f} s{state.parts()}"

    def run() -> None:
        next_status = time.monotonic() + interval
        while not stop.wait(min(0.2, interval)):
            while state.announcements:
                line(f"{state.label}: {state.announcements.popleft()}")
            if time.monotonic() >= next_status:
                line(status())
                next_status += interval

    thread = HelperThread(run, name="gcsstream-progress")
    try:
        thread.start()
        yield
    finally:
        stop.set()
        if thread.ident is not None:
            thread.join()
        while state.announcements:
            line(f"{state.label}: {state.announcements.popleft()}")


def display(
    state: ProgressState,
    *,
    mode: bool | None,
    interval: float,
    quiet: bool,
    stream: TextIO | None = None,
    verb: str = "sent",
) -> contextlib.AbstractContextManager[None]:
    """The right display for where stderr goes: ``mode`` None means detect, True/False force.

    A terminal gets a live bar (colour unless NO_COLOR is set); anything else plain lines every
    ``interval`` seconds; ``mode=False`` only the lines that announce retries and resumes;
    ``quiet`` nothing.
    """
    out = stream or sys.stderr
    done = "received" if verb == "received" else "stored"
    if quiet:
        return contextlib.nullcontext()
    if mode is None:
        mode = out.isatty() and os.environ.get("TERM") != "dumb"
        if not mode:
            return _plain_display(state, out, interval, done)
    if mode:
        return _rich_display(state, out, verb)
    return _plain_display(state, out, math.inf, done)  # --no-progress: only retries and resumes
