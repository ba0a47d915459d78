"""Progress events: what the engine reports as it works, for any renderer or callback.

The engine calls the callback on its own thread with these small immutable records; a renderer
must only record them and draw elsewhere, so that drawing never slows the upload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gcsstream.engine import UploadResult


@dataclass(frozen=True)
class UploadStarted:
    """A session exists; ``size`` is the source's size when known; a resumed upload starts at
    ``resumed_at``, the bytes the service already held."""

    destination: str
    size: int | None
    chunk_size: int
    resumed_at: int = 0


@dataclass(frozen=True)
class ChunkSending:
    """A request carrying bytes ``first`` up to ``end`` is going out."""

    first: int
    end: int


@dataclass(frozen=True)
class BytesSent:
    """A streamed request (one for most of a regular file) has handed its bytes up to ``end`` to
    the network: progress within one long request, ahead of the service's confirmation."""

    end: int


@dataclass(frozen=True)
class ChunkPersisted:
    """The service confirmed bytes: ``persisted`` of them are safe, ``read`` came from the source."""

    persisted: int
    read: int
    size: int | None


@dataclass(frozen=True)
class Retrying:
    """An attempt failed with something transient; the engine waits ``delay`` seconds and resyncs."""

    reason: str
    delay: float
    attempt: int


@dataclass(frozen=True)
class UploadFinished:
    result: UploadResult


@dataclass(frozen=True)
class PartStarted:
    """A parallel upload began sending part ``index``: ``size`` bytes from ``offset`` of the stream."""

    index: int
    offset: int
    size: int


@dataclass(frozen=True)
class PartFinished:
    """Part ``index`` of a parallel upload is stored and checked (``ok``), or failed."""

    index: int
    size: int
    ok: bool = True


Event = (
    UploadStarted
    | ChunkSending
    | BytesSent
    | ChunkPersisted
    | Retrying
    | UploadFinished
    | PartStarted
    | PartFinished
)
EventCallback = Callable[[Event], None]
