"""What a person sees while and after an upload runs. The only module that writes to a terminal.

Renderers receive the engine's events (see ``events``); they print, the engine never does.
"""

from __future__ import annotations

import sys
from typing import TextIO

from gcsstream.engine import UploadResult
from gcsstream.events import Event, Retrying

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style sizes for messages."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_summary(result: UploadResult) -> str:
    """The one line printed on success: object, generation, bytes, crc32c, seconds, MB/s."""
    checks = f"crc32c {result.crc32c}" if result.crc32c else "no crc32c"
    if "md5" in result.verified:
        checks += f", md5 {result.md5}"
    checks += " (verified)" if result.verified else " (not verified: --checksum none)"
    return (
        f"gcsstream: uploaded {result.url} generation {result.generation}: "
        f"{result.size} bytes ({human_bytes(result.size)}), {checks}, "
        f"{result.seconds:.2f} s, {result.bytes_per_second / 1e6:.1f} MB/s"
    )


class EventPrinter:
    """Plain lines for the events a person should hear about (retries), on stderr."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr

    def __call__(self, event: Event) -> None:
        if isinstance(event, Retrying):
            print(
                f"gcsstream: {event.reason}; retrying in {event.delay:.1f} s (attempt {event.attempt})",
                file=self._stream,
                flush=True,
            )
