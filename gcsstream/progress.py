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

from gcsstream.events import ChunkPersisted, ChunkSending, Event, Retrying, UploadFinished, UploadStarted

if TYPE_CHECKING:  # rich loads only when a live bar is drawn: --help and --version stay instant
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


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_summary(result: UploadResult, note: str = "") -> str:
    """The one line printed on success: object, generation, bytes, crc32c, seconds, MB/s."""
    checks = f"crc32c {result.crc32c}" if result.crc32c else "no crc32c"
    if "md5" in result.verified:
        checks += f", md5 {result.md5}"
    checks += " (verified)" if result.verified else " (not verified: --checksum none)"
    return (
        f"gcsstream: uploaded {result.url} generation {result.generation}: "
        f"{result.size} bytes ({human_bytes(result.size)}), {checks}{note}, "
        f"{result.seconds:.2f} s, {result.bytes_per_second / 1e6:.1f} MB/s"
    )


def format_download_summary(result: DownloadResult) -> str:
    """The one line printed after ``cat``."""
    if result.verified:
        checks = f"crc32c {result.crc32c} (verified)" if "crc32c" in result.verified else "md5 (verified)"
    else:
        checks = "a byte range: not checked against the object" if result.crc32c is None else "not verified"
    return (
        f"gcsstream: read {result.url} generation {result.generation}: {result.size} bytes "
        f"({human_bytes(result.size)}), {checks}, {result.seconds:.2f} s, "
        f"{result.size / result.seconds / 1e6 if result.seconds else 0:.1f} MB/s"
    )


class ProgressState:
    """The numbers a display needs, updated from the engine's events (cheaply, under a lock)."""

    def __init__(self, label: str, size: int | None = None) -> None:
        self.label = label
        self.size = size
        self.persisted = 0
        self.sent = 0
        self.resumed_at = 0
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
            elif isinstance(event, ChunkPersisted):
                self.persisted = event.persisted
                self.note = ""
                self._samples.append((now, event.persisted))
                while len(self._samples) > 2 and now - self._samples[1][0] > _RATE_WINDOW:
                    self._samples.popleft()
            elif isinstance(event, Retrying):
                self._announce(f"{event.reason}, retrying in {event.delay:.1f} s")
            elif isinstance(event, UploadFinished):
                self.persisted = self.sent = event.result.size

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
        row = Table.grid(padding=(0, 1))
        bar = ProgressBar(total=size if size else None, completed=persisted, width=30)
        amount = f"{human_bytes(persisted)}/{human_bytes(size)}" if size else human_bytes(persisted)
        cells: list[Text | ProgressBar] = [Text(self.state.label, style="bold"), bar]
        if size:
            cells.append(Text(f"{persisted / size:4.0%}" if size else "", style="magenta"))
        cells += [Text(amount, style="green"), Text(f"{rate / 1e6:.1f} MB/s", style="cyan")]
        cells.append(Text(human_duration(elapsed), style="yellow"))
        if size and rate > 0 and persisted < size:
            cells.append(Text(f"ETA {human_duration((size - persisted) / rate)}", style="yellow"))
        row.add_row(*cells)
        lines: list[Table | Text] = [row]
        detail = f"{self.verb} {human_bytes(sent)}, confirmed by the service {human_bytes(persisted)}"
        lines.append(Text(f"  {detail}" + (f" · {note}" if note else ""), style="dim"))
        return Group(*lines)


@contextlib.contextmanager
def _rich_display(state: ProgressState, stream: TextIO, verb: str) -> Iterator[None]:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream, force_terminal=True)
    with Live(_Display(state, verb), console=console, refresh_per_second=10, transient=True):
        yield


@contextlib.contextmanager
def _plain_display(state: ProgressState, stream: TextIO, interval: float) -> Iterator[None]:
    """A timestamped line every ``interval`` seconds, and one per retry; no control characters."""
    stop = threading.Event()

    def line(text: str) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{stamp} gcsstream: {text}", file=stream, flush=True)

    def status() -> str:
        persisted, _, size, rate, elapsed, _ = state.snapshot()
        share = f" of {human_bytes(size)} ({persisted / size:.0%})" if size else ""
        return (
            f"{state.label}: {human_bytes(persisted)}{share} stored, {rate / 1e6:.1f} MB/s, {elapsed:.0f} s"
        )

    def run() -> None:
        next_status = time.monotonic() + interval
        while not stop.wait(min(0.2, interval)):
            while state.announcements:
                line(f"{state.label}: {state.announcements.popleft()}")
            if time.monotonic() >= next_status:
                line(status())
                next_status += interval

    thread = threading.Thread(target=run, name="gcsstream-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
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
    if quiet:
        return contextlib.nullcontext()
    if mode is None:
        mode = out.isatty() and os.environ.get("TERM") != "dumb"
        if not mode:
            return _plain_display(state, out, interval)
    if mode:
        return _rich_display(state, out, verb)
    return _plain_display(state, out, math.inf)  # --no-progress: only retries and resumes
