"""asyncio front on the same engine: stream an async iterable (FastAPI's ``request.stream()``)
into an object without holding it in memory and without blocking the event loop.

The engine runs on a thread of its own. ``write`` only appends to a small bounded buffer; when
the upload is two chunks behind, it awaits until the engine frees space (backpressure), so a
fast producer waits and memory stays near two chunks.

    async with gcsstream.aio.open_upload("gs://b/o") as up:
        async for piece in request.stream():
            await up.write(piece)
    up.result.generation
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterable, Generator
from typing import Any

from gcsstream.api import ObjectWriter, _plan
from gcsstream.engine import UploadResult
from gcsstream.errors import SourceError


class AsyncObjectWriter:
    """An upload to write to from a coroutine; finalized by ``close()`` or the ``async with``."""

    def __init__(self, writer: ObjectWriter) -> None:
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._space = asyncio.Event()
        # Only the loop and the event: the engine thread holds the source, and a reference to
        # this writer from there would keep a discarded writer alive (and its session open).
        writer._source.on_space = functools.partial(_wake, self._loop, self._space)

    @property
    def session_uri(self) -> str | None:
        """The resumable session's URI once it exists: a credential, so keep it secret."""
        return self._writer.session_uri

    @property
    def result(self) -> UploadResult | None:
        """The finished object, after a successful ``close()``."""
        return self._writer.result

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Hand ``data`` to the upload; waits (without blocking the loop) while it is two chunks behind."""
        piece = data if type(data) is bytes else bytes(data)
        source = self._writer._source
        while not source.offer(piece):
            self._space.clear()
            if source.offer(piece):  # space freed between the two calls
                break
            await self._space.wait()
        return len(piece)

    async def close(self) -> UploadResult:
        """Finalize; returns the verified object."""
        await asyncio.to_thread(self._writer.close)
        assert self._writer.result is not None
        return self._writer.result

    async def abort(self, reason: BaseException | None = None) -> None:
        """Cancel the session: no object is created."""
        await asyncio.to_thread(self._writer.abort, reason)

    async def __aenter__(self) -> AsyncObjectWriter:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            await self.abort(exc)
        else:
            await self.close()


def _wake(loop: asyncio.AbstractEventLoop, space: asyncio.Event) -> None:
    """Tell a writer waiting for space (from the engine's thread)."""
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
        loop.call_soon_threadsafe(space.set)


class _Opening:
    """What ``open_upload`` returns: ``await`` it, or use it in ``async with``."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self._url, self._options = url, options
        self._writer: AsyncObjectWriter | None = None

    async def _open(self) -> AsyncObjectWriter:
        plan = await asyncio.to_thread(_plan, self._url, **self._options)  # credentials may read files
        return AsyncObjectWriter(ObjectWriter(plan))

    def __await__(self) -> Generator[Any, None, AsyncObjectWriter]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncObjectWriter:
        self._writer = await self._open()
        return self._writer

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._writer is not None
        await self._writer.__aexit__(exc_type, exc, tb)


def open_upload(url: str, **options: Any) -> _Opening:
    """Open ``gs://BUCKET/OBJECT`` for writing from a coroutine.

    ``async with gcsstream.aio.open_upload(url) as up: await up.write(piece)`` finalizes at the
    end of the block, or cancels the session (no object) if the block raises. ``up = await
    open_upload(url)`` works too; then call ``await up.close()``. Takes the keyword arguments of
    ``gcsstream.open_upload``.
    """
    return _Opening(url, options)


async def upload(source: AsyncIterable[bytes], url: str, **options: Any) -> UploadResult:
    """Upload everything an async iterable yields; returns the verified object.

    If the iterable raises (a client that disconnects mid-body), the session is cancelled and
    no object is created; the exception propagates.
    """
    up = await open_upload(url, **options)
    try:
        async for piece in source:
            await up.write(piece)
    except BaseException as exc:
        await up.abort(exc if isinstance(exc, Exception) else SourceError("the upload was cancelled"))
        raise
    return await up.close()
