"""The bounded window of bytes between the service's persisted offset and what has been read.

A reader thread fills the window one chunk ahead of the sender, so reading the next chunk
overlaps sending the current one, and holds at most ``depth`` chunks: memory stays near two
chunks whatever the input size. Bytes leave the window only when the service has confirmed
them (``release``), so a 308 whose Range is short of what was sent is answered by ``seek``-ing
back and sending again from the window.

To google-resumable-media's ``ResumableUpload`` the window is the file-like stream it reads
chunks from (``tell``/``read``/``seek``). Chunks come out as the very objects (``bytes`` or views)
the source produced: only a resend from the middle of a chunk joins pieces (one copy).

A regular file of known size is *streamed* instead: its bytes can be read again (``reread``), so
one request carries the whole rest of the file (``stream``) and each buffer is dropped as soon as
it has been handed to the socket. A resend after a failure reads the bytes again from the file;
the final checksums (taken from the first reading) refuse a file that changed meanwhile. This
saves the round trip the service's answer costs per chunk, which Google's guidance names as the
reason to upload in a single request when the data allows it.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable, Iterator

from gcsstream.checksums import Checksums, crc32c_extend, encode_crc32c
from gcsstream.errors import GcsstreamError, IntegrityError, PrefixMismatch, SourceError
from gcsstream.sources import Chunk, ChunkSource, read_full
from gcsstream.threads import HelperThread


class ChunkWindow:
    def __init__(
        self,
        source: ChunkSource,
        chunk_size: int,
        checksums: Checksums,
        *,
        expected_size: int | None = None,
        depth: int = 2,
    ) -> None:
        self._source = source
        self._chunk_size = chunk_size
        self.checksums = checksums
        self._expected_size = expected_size
        self._depth = depth
        self._cond = threading.Condition()
        # (offset, data, CRC32C of all bytes before offset), contiguous
        self._buffers: deque[tuple[int, Chunk, int]] = deque()
        self._read_end = 0  # offset just past the last buffered byte
        self._crc_at_read_end = 0
        self._position = 0  # where the next read() starts
        self._floor = 0  # bytes below this were released
        self._floor_crc32c = 0  # CRC32C of the bytes below the floor
        self._check: tuple[int, int] | None = None  # (length, CRC32C) the prefix must have
        self._skipped = False  # the held prefix (if any) has been read and checked
        self._total: int | None = None  # set at end of input, after source.finish()
        self._error: GcsstreamError | None = None
        self._closed = False
        # A regular file of known size: streamed (see the module's docstring).
        streamed = getattr(source, "rereadable", False) and expected_size is not None
        self._reread: Callable[[int, int], bytes] | None = None
        if streamed:
            self._reread = getattr(source, "reread", None)
        # Streamed: (offset, CRC32C of the bytes before it) at every buffer's start, ascending, so
        # that the CRC32C at an offset whose buffer is gone is found again (``_crc32c_at``).
        self._marks: list[tuple[int, int]] = [(0, 0)]
        self._reader_done = False  # the reader thread has finished (and closed the source unless streamed)
        # Streamed: bytes were read from the file again, which may have changed since the first
        # reading, whose CRC32C values the marks hold: they no longer say what was sent.
        self._read_again = False
        self._thread = HelperThread(self._fill, name="gcsstream-reader")

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> ChunkWindow:
        self._thread.start()
        return self

    def begin_at(self, offset: int, *, verify: tuple[int, int] | None = None) -> None:
        """Resume: skip the ``offset`` bytes the service holds (checksumming them) before reading.

        ``verify`` is ``(length, crc32c)`` of a prefix recorded earlier (length <= offset); if
        the input's prefix differs, or the input is shorter than ``offset``, reading fails with
        ``PrefixMismatch`` and no byte is sent.
        """
        if self._thread.is_alive() or self._read_end:
            raise RuntimeError("begin_at() must come before start()")
        self._position = self._floor = self._read_end = offset
        self._check = verify

    def close(self) -> None:
        """Stop reading ahead. A reader blocked in the source's read ends when that read returns."""
        with self._cond:
            self._closed = True
            self._buffers.clear()
            self._cond.notify_all()
            # Never started (initiate failed), or streamed and done reading (it kept the file open
            # for resends): the reader will not close it.
            close = self._thread.ident is None or (self._reread is not None and self._reader_done)
        if close:
            self._close_source()

    def _close_source(self) -> None:
        try:
            self._source.close()
        except OSError:
            pass

    def __enter__(self) -> ChunkWindow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the sender sees -------------------------------------------------------------------

    def wait_skipped(self) -> None:
        """Block until the resumed prefix has been read and checked; raise if it did not match."""
        with self._cond:
            while not self._skipped and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    @property
    def total(self) -> int | None:
        """The size of the input once its end has been reached and accepted, else None."""
        return self._total

    @property
    def bytes_read(self) -> int:
        return self._read_end

    @property
    def confirmed(self) -> tuple[int, int]:
        """``(offset, crc32c)``: the bytes the service has confirmed, and their CRC32C."""
        with self._cond:
            return self._floor, self._floor_crc32c

    @property
    def streamed(self) -> bool:
        """Requests carry the whole rest of the input (a regular file of known size)."""
        return self._reread is not None

    def tell(self) -> int:
        return self._position

    def stream(self, n: int) -> StreamedBody | bytes:
        """The next ``n`` bytes (the expected size caps them) as a body sent piece by piece as the
        reader gets them; ``b""`` for none. Only for a ``streamed`` window."""
        assert self._reread is not None and self._expected_size is not None
        start = self._position
        end = min(start + n, self._expected_size)
        self._position = max(start, end)
        return StreamedBody(self, start, end) if end > start else b""

    def _piece(self, offset: int, end: int) -> Chunk:
        """The bytes from ``offset`` to at most ``end`` that a streamed body sends next. Everything
        below ``offset`` was handed to the socket: its buffers go, and the reader goes on."""
        assert self._reread is not None
        with self._cond:
            while self._buffers and self._buffers[0][0] + len(self._buffers[0][1]) <= offset:
                self._buffers.popleft()
                self._cond.notify_all()
            while self._error is None and not self._closed and self._read_end <= offset:
                if self._total is not None:
                    raise SourceError(f"{self._source.description} ended before its expected size")
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if self._closed:
                raise SourceError("the upload was stopped")
            if self._buffers and self._buffers[0][0] <= offset:
                start, data, _ = self._buffers[0]
                return memoryview(data)[offset - start : min(end, start + len(data)) - start]
            held_from = self._buffers[0][0] if self._buffers else self._read_end
        # A resend of bytes whose buffers are gone: read them from the file again.
        return self._from_file(offset, min(end, held_from, offset + self._chunk_size) - offset)

    def _from_file(self, offset: int, n: int, *, to_send: bool = True) -> bytes:
        """``n`` bytes at ``offset`` read from the file again (a streamed window's buffers go once
        sent). Bytes ``to_send`` may differ from the first reading, whose CRC32C values the marks
        hold: from then on no mark says what was sent (``mark_at_or_below``)."""
        assert self._reread is not None
        if to_send:
            self._read_again = True
        data = self._reread(offset, n)
        if len(data) < n:
            raise SourceError(f"{self._source.description} shrank while it was being uploaded")
        return data

    def read(self, n: int) -> Chunk:
        """``n`` bytes from the current position, fewer only at end of input; waits for the reader."""
        with self._cond:
            start = self._position
            end = start + n
            while self._error is None and self._total is None and self._read_end < end:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            end = min(end, self._read_end)
            self._position = end
            return self._slice(start, end)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Rewind (or advance) to ``offset``, which must still be inside the window."""
        if whence != 0:
            raise ValueError("the chunk window seeks only to absolute offsets")
        with self._cond:
            if offset < self._floor:
                raise IntegrityError(
                    f"the service reports {offset} bytes persisted after confirming {self._floor}"
                )
            if offset > self._read_end:
                raise IntegrityError(
                    f"the service reports {offset} bytes persisted; only {self._read_end} were read"
                )
            self._position = offset
            return offset

    def bytes_to_boundary(self, offset: int) -> int:
        """Bytes from ``offset`` to the end of the read buffer it falls inside; 0 at a boundary.

        After a short Range the sender can send just these bytes once, so that its later chunks
        line up with the buffers again and go out without being joined (copied).
        """
        with self._cond:
            for start, data, _ in self._buffers:
                if start < offset < start + len(data):
                    return start + len(data) - offset
            return 0

    def release(self, offset: int) -> None:
        """The service holds every byte below ``offset``: drop them and let the reader go on."""
        with self._cond:
            if offset <= self._floor:
                return
            self._floor_crc32c = self._crc32c_at(offset)
            self._floor = offset
            while self._buffers and self._buffers[0][0] + len(self._buffers[0][1]) <= offset:
                self._buffers.popleft()
            del self._marks[: self._mark_at(offset)]  # none below the floor is asked for again
            self._cond.notify_all()

    def mark_at_or_below(self, offset: int) -> tuple[int, int] | None:
        """Streamed: ``(start, CRC32C of the bytes before it)`` of the last buffer that starts at
        or below ``offset`` and above the confirmed bytes; None if there is none, or once bytes were
        read again (their CRC32C may not be the marks')."""
        with self._cond:
            if self._reread is None or self._read_again or offset <= self._floor:
                return None
            mark = self._marks[self._mark_at(offset)]
            return mark if mark[0] > self._floor else None

    def _mark_at(self, offset: int) -> int:
        """The index of the last mark at or below ``offset``."""
        return bisect.bisect_right(self._marks, (offset, 1 << 32)) - 1

    def _crc32c_at(self, offset: int) -> int:
        """CRC32C of the input's first ``offset`` bytes (``offset`` inside the window)."""
        if offset == self._read_end:
            return self._crc_at_read_end
        for start, data, crc_before in self._buffers:
            if start <= offset < start + len(data):
                if offset == start:
                    return crc_before
                return crc32c_extend(crc_before, memoryview(data)[: offset - start])
        if self._reread is not None and self._floor <= offset < self._read_end:
            # Streamed, and the buffer is gone: from the mark below, over the bytes read again.
            start, crc = self._marks[self._mark_at(offset)]
            return crc32c_extend(crc, self._from_file(start, offset - start, to_send=False))
        raise IntegrityError(f"offset {offset} is outside the window")

    def _slice(self, start: int, end: int) -> Chunk:
        parts: list[Chunk] = []
        held_from = self._buffers[0][0] if self._buffers else self._read_end
        if self._reread is not None and start < held_from:
            # Streamed: those buffers went once sent; read the bytes again.
            again = self._from_file(start, min(end, held_from) - start)
            if len(again) == end - start:
                return again
            parts.append(again)
        for offset, data, _ in self._buffers:
            if offset >= end:
                break
            if offset + len(data) <= start:
                continue
            if offset == start and offset + len(data) == end:
                return data  # the common case: a whole chunk as read, no copy
            view = memoryview(data)
            parts.append(view[max(start - offset, 0) : min(end - offset, len(data))])
        return b"".join(parts)

    # -- the reader thread ----------------------------------------------------------------------

    def _fill(self) -> None:
        try:
            offset = self._read_end
            if offset:
                self._skip(offset)
            else:
                with self._cond:
                    self._skipped = True
            while True:
                with self._cond:
                    while len(self._buffers) >= self._depth and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                data = read_full(self._source, self._chunk_size)
                offset += len(data)
                self._check_not_over(offset)
                at_end = len(data) < self._chunk_size or offset == self._expected_size
                if at_end:
                    if data and len(data) == self._chunk_size and self._source.read(1):
                        self._check_not_over(offset + 1)
                    if self._expected_size is not None and offset < self._expected_size:
                        raise SourceError(
                            f"{self._source.description} ended after {offset} bytes; "
                            f"expected {self._expected_size}"
                        )
                    self._source.finish()
                crc_before = self.checksums.crc32c
                if data:
                    self.checksums.update(data)
                with self._cond:
                    if data:
                        self._buffers.append((offset - len(data), data, crc_before))
                        if self._reread is not None:
                            self._marks.append((offset - len(data), crc_before))
                        self._read_end = offset
                        self._crc_at_read_end = self.checksums.crc32c
                    if at_end:
                        self._total = offset
                    self._cond.notify_all()
                if at_end:
                    return
        except GcsstreamError as exc:
            self._fail(exc)
        except Exception as exc:  # a source that raised something unexpected
            self._fail(SourceError(f"reading {self._source.description} failed: {exc}"))
        finally:
            with self._cond:
                # Streamed, a resend may read the file again until the window closes.
                self._reader_done = True
                close = self._reread is None or self._closed
            if close:
                self._close_source()

    def _skip(self, offset: int) -> None:
        """Read and checksum the first ``offset`` bytes without keeping them (resume)."""
        done = 0
        for stop in sorted({self._check[0], offset} if self._check else {offset}):
            while done < stop:
                data = self._source.read(min(self._chunk_size, stop - done))
                if not data:
                    raise PrefixMismatch(
                        f"{self._source.description} ended after {done} bytes, but the service "
                        f"already holds {offset}: it is not the input of this upload"
                    )
                self.checksums.update(data)
                done += len(data)
            if self._check and stop == self._check[0] and self.checksums.crc32c != self._check[1]:
                raise PrefixMismatch(
                    f"the first {stop} bytes of {self._source.description} differ from the ones "
                    f"uploaded (crc32c {encode_crc32c(self.checksums.crc32c)}, recorded "
                    f"{encode_crc32c(self._check[1])}): it is not the input of this upload"
                )
        with self._cond:
            self._floor_crc32c = self._crc_at_read_end = self.checksums.crc32c
            self._marks.append((offset, self._floor_crc32c))
            self._skipped = True
            self._cond.notify_all()

    def _fail(self, error: GcsstreamError) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def _check_not_over(self, offset: int) -> None:
        if self._expected_size is not None and offset > self._expected_size:
            raise SourceError(
                f"{self._source.description} has more than the expected {self._expected_size} bytes"
            )


class StreamedBody:
    """A request body of a streamed window: ``len`` bytes from ``start``, produced piece by piece
    (``pieces``) as the reader gets them, and again from the start if the request is sent again."""

    def __init__(self, window: ChunkWindow, start: int, end: int) -> None:
        self._window = window
        self.start = start
        self.end = end
        #: The end of the bytes handed out so far: the service cannot hold more of this request.
        self.handed_out = start
        #: Told the end of each piece once the socket has taken it (progress).
        self.observer: Callable[[int], None] | None = None

    def __len__(self) -> int:
        return self.end - self.start

    def pieces(self) -> Iterator[Chunk]:
        offset = self.start
        while offset < self.end:
            piece = self._window._piece(offset, self.end)
            offset += len(piece)
            self.handed_out = max(self.handed_out, offset)
            yield piece
            del piece  # sent: the window may drop its buffer
            if self.observer is not None:
                self.observer(offset)
