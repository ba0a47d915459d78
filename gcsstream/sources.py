"""Where the bytes come from: a file, a binary stream (stdin), or an iterable of bytes.

A source hands out ``bytes`` (or views of a buffer it reuses: ``Chunk``), says
its size when it knows it, and gets a last word at end of input: ``finish()`` raises if the
bytes must not become an object (a producer that failed, a size that is wrong).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import io
import os
import select
import signal
import stat
import subprocess
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Protocol, cast

from gcsstream.errors import GcsstreamError, SourceError, UsageError

#: What a source hands out: ``bytes``, or a view of a buffer it reuses once the chunk is done
#: with (the parallel reader's parts). Both go to the hash and the socket without a copy.
Chunk = bytes | memoryview


class ChunkSource(Protocol):
    """What the chunk window reads from."""

    #: Total bytes the source will produce, when known before reading.
    size: int | None
    #: How to name the source in messages ("stdin", a path).
    description: str

    def read(self, n: int) -> Chunk:
        """Up to ``n`` bytes; ``b""`` only at end of input. Raises ``SourceError`` on failure."""
        ...

    def finish(self) -> None:
        """Called once at end of input; raises ``SourceError`` if the input is not good."""
        ...

    def close(self) -> None: ...


def read_full(source: ChunkSource, n: int) -> Chunk:
    """Exactly ``n`` bytes from ``source`` unless the input ends first (sources may return short
    reads: a pipe gives what is there)."""
    data = source.read(n)
    if len(data) == n or not data:
        return data
    parts, have = [data], len(data)
    while have < n and (more := source.read(n - have)):
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def read_full_into(source: ChunkSource, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``source`` unless the input ends first; the bytes read.

    A source with ``readinto`` (a stream) writes into the buffer itself, so a reader that reuses
    its buffers faults in no fresh memory per read; any other source is read and copied."""
    readinto = getattr(source, "readinto", None)
    have = 0
    while have < len(buffer):
        if readinto is not None:
            n = readinto(buffer[have:])
        else:
            data = source.read(len(buffer) - have)
            n = len(data)
            buffer[have : have + n] = data
        if not n:
            break
        have += n
    return have


class StreamSource:
    """A binary file object: stdin, a pipe, an open file, a socket's file."""

    def __init__(self, stream: BinaryIO, description: str = "stream", *, close: bool = False) -> None:
        self._stream = stream
        self._close = close
        self.description = description
        self.size = _remaining_size(stream)
        if self.size is None:
            _widen_pipe(stream)
        #: Where the input starts in its regular file (for ``reread``); None: not a regular file.
        self._file_start = stream.tell() if self.size is not None else None

    @property
    def rereadable(self) -> bool:
        """A regular file: any of its bytes can be read again, so what was sent need not stay in
        memory to be sent again (one request can carry the whole file)."""
        return self._file_start is not None

    def reread(self, offset: int, n: int) -> bytes:
        """The ``n`` bytes at ``offset`` of the input again (fewer only if the file shrank); the
        stream's own position is not moved, so the reader thread goes on undisturbed."""
        assert self._file_start is not None, "reread() of a source that is not a regular file"
        fd, at, parts, have = self._stream.fileno(), self._file_start + offset, [], 0
        try:
            while have < n and (data := os.pread(fd, n - have, at + have)):
                parts.append(data)
                have += len(data)
        except OSError as exc:
            raise SourceError(f"reading {self.description} again failed: {exc.strerror or exc}") from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, n: int) -> bytes:
        try:
            while (data := self._stream.read(n)) is None:
                # A non-blocking descriptor (inherited from a parent) with nothing ready yet:
                # that is not the end of input, so wait for it rather than finalize early.
                self._wait_readable()
            return data
        except OSError as exc:
            raise SourceError(f"reading {self.description} failed: {exc.strerror or exc}") from exc

    def readinto(self, buffer: memoryview) -> int:
        """Up to ``len(buffer)`` bytes into ``buffer``, as ``read`` would return them."""
        readinto = getattr(self._stream, "readinto", None)
        if readinto is None:  # a file-like object of the caller's with read() only
            data = self.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        try:
            while (n := readinto(buffer)) is None:
                self._wait_readable()
            return n
        except OSError as exc:
            raise SourceError(f"reading {self.description} failed: {exc.strerror or exc}") from exc

    def _wait_readable(self) -> None:
        poll = select.poll()  # not select(): it fails for descriptors above 1023
        poll.register(self._stream.fileno(), select.POLLIN)
        poll.poll()

    def finish(self) -> None:
        pass

    def close(self) -> None:
        if self._close:
            self._stream.close()


class FileSource(StreamSource):
    """A file by path: checked up front so that a bad path is a usage error, not a half upload."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise UsageError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise UsageError(f"{self.path}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{self.path} is a directory; gcsstream uploads one file or stream")
        try:
            stream = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise UsageError(f"{self.path}: {exc.strerror}") from None
        super().__init__(stream, self.path, close=True)
        self.mtime_ns = st.st_mtime_ns


#: Seconds a producer's process group has to exit after SIGTERM before it gets SIGKILL.
PRODUCER_GRACE = 5.0


class ProducerSource(StreamSource):
    """The output of a shell command that gcsstream runs itself (``--exec``).

    Unlike a pipe into stdin, gcsstream learns how the producer ended: ``finish`` waits for it
    and refuses the input unless it exited 0, so a dump that dies halfway never becomes an object.

    The producer runs in a session and process group of its own (``start_new_session``; without
    a controlling terminal, so a prompt fails instead of stopping it), so that everything it
    starts can be stopped together: when the source is closed, and at the latest when gcsstream
    exits, whatever is left of the group gets SIGTERM, then SIGKILL after ``PRODUCER_GRACE``
    seconds; nothing it started outlives gcsstream. Being in its own group, the producer does not
    get a terminal's Ctrl-C: gcsstream stops it itself.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        try:
            self._process = subprocess.Popen(
                command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
            )
        except OSError as exc:
            raise UsageError(f"cannot run {command!r}: {exc.strerror or exc}") from None
        assert self._process.stdout is not None
        stdout = cast(BinaryIO, self._process.stdout)
        super().__init__(stdout, f"the producer {command!r}", close=True)
        self._stop_lock = threading.Lock()
        self._stopped = False
        atexit.register(self._stop_at_exit)  # the reader thread may never get to close()

    def finish(self) -> None:
        status = self._process.wait()
        if status < 0:
            name = signal.Signals(-status).name if -status in signal.valid_signals() else -status
            raise SourceError(f"{self.description} was killed by {name}")
        if status != 0:
            raise SourceError(f"{self.description} exited with status {status}")

    def close(self) -> None:
        self.stop()  # first: a read blocked on a silent producer returns once its group is gone
        super().close()

    def stop(self) -> None:
        """End whatever is left of the producer's process group: SIGTERM, then SIGKILL."""
        with self._stop_lock:
            if self._stopped:
                return
            try:
                if not self._group_gone():
                    self._signal_group(signal.SIGTERM)
                    if not self._wait_group(PRODUCER_GRACE):
                        self._signal_group(signal.SIGKILL)
                        self._wait_group(PRODUCER_GRACE)
            except BaseException:
                self._signal_group(signal.SIGKILL)  # interrupted again: no more grace
                raise
            finally:
                self._stopped = True
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(KeyboardInterrupt):
            self.stop()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    def _group_gone(self) -> bool:
        self._process.poll()  # reap the leader: a zombie still counts as a member of its group
        try:
            os.killpg(self._process.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # the group id was taken over by another user's process
            return True
        return False

    def _wait_group(self, seconds: float) -> bool:
        """Whether the group has no process left, polling for up to ``seconds``."""
        deadline = time.monotonic() + seconds
        pause = 0.005
        while not self._group_gone():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        return True


_END = object()


class IterableSource:
    """An iterable of bytes-like pieces of any sizes, regrouped into reads of ``n`` bytes.

    A read copies its bytes once at most (none when a piece is exactly one read), however the
    pieces fall: a large piece is handed out through views, never by re-slicing what is left.
    """

    def __init__(self, pieces: Iterable[bytes], description: str = "iterable") -> None:
        self._pieces: Iterator[bytes] = iter(pieces)
        self._piece = b""  # the current piece; bytes before self._used were handed out
        self._used = 0
        self.description = description
        self.size: int | None = None

    def read(self, n: int) -> bytes:
        parts: list[bytes | memoryview] = []
        have = 0
        while have < n:
            if self._used == len(self._piece):
                piece = next(self._pieces, _END)
                if piece is _END:
                    break
                if not piece:  # b"", or None from a non-blocking read: nothing yet, not the end
                    continue
                # bytes are kept as they are; a caller may reuse a bytearray, so copy that
                self._piece, self._used = (piece if isinstance(piece, bytes) else bytes(piece)), 0  # type: ignore[call-overload]
                continue
            take = min(n - have, len(self._piece) - self._used)
            if take == len(self._piece):
                parts.append(self._piece)
            else:
                parts.append(memoryview(self._piece)[self._used : self._used + take])
            self._used += take
            have += take
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


def _remaining_size(stream: BinaryIO) -> int | None:
    """Bytes left in a regular file (a path or a ``< file`` redirect); None for pipes and ttys."""
    try:
        st = os.fstat(stream.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(0, st.st_size - stream.tell())
    except (OSError, AttributeError, ValueError):
        return None


#: The pipe buffer asked for when reading a pipe: the most an unprivileged process may set by
#: default (``/proc/sys/fs/pipe-max-size``). Linux's 64 KiB default costs a context switch per
#: 64 KiB with the producer; 1 MiB made reading a 1 GiB pipe about a third faster.
PIPE_BUFFER = 1 << 20


def _widen_pipe(stream: BinaryIO) -> None:
    """Enlarge the buffer of a pipe we read (best effort: a limit or an old kernel says no)."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    try:
        fd = stream.fileno()
        if setsize is None or not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_BUFFER:
            fcntl.fcntl(fd, setsize, PIPE_BUFFER)
    except (OSError, AttributeError, ValueError):
        pass


#: What a writer may hand over beyond the chunk being assembled: enough to keep the reader busy,
#: small beside a chunk, so that a writer-fed upload holds about two chunks, like a piped one.
WRITER_BUDGET = 1 << 20


class WriterSource:
    """Bytes pushed by a writer (``open_upload``, ``aio``), pulled by the chunk window.

    It holds at most about ``budget`` bytes: a writer that gets ahead waits (``put``) or is told
    to (``offer`` returns False), which is the backpressure that keeps memory bounded. Each read
    assembles its chunk in a ``BytesIO`` as pieces arrive, releasing them at once, and hands the
    buffer over as ``bytes`` without a second copy; so a chunk never exists twice.
    """

    def __init__(self, budget: int, description: str = "the writer") -> None:
        self.description = description
        self.size: int | None = None
        self._budget = budget
        self._cond = threading.Condition()
        self._pieces: deque[memoryview] = deque()
        self._buffered = 0
        self._ended = False
        self._failure: BaseException | None = None
        #: Called (from the reader thread) whenever space frees up: async writers wake on it.
        self.on_space: Callable[[], None] | None = None

    # -- the writer's side ----------------------------------------------------------------------

    def offer(self, data: bytes) -> bool:
        """Take ``data`` if there is room now; never blocks."""
        with self._cond:
            self._check_open()
            if self._buffered >= self._budget:
                return False
            self._append(data)
            return True

    def put(self, data: bytes) -> None:
        """Take ``data``, waiting while the buffer is full."""
        with self._cond:
            while True:
                self._check_open()
                if self._buffered < self._budget:
                    self._append(data)
                    return
                self._cond.wait()

    def end(self) -> None:
        """No more data: the upload may finalize."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def fail(self, failure: BaseException) -> None:
        """Stop both sides: the writer's exception, or the upload's error."""
        with self._cond:
            if self._failure is None:
                self._failure = failure
            self._cond.notify_all()
        if self.on_space is not None:
            self.on_space()

    def _append(self, data: bytes) -> None:
        if data:
            self._pieces.append(memoryview(data))
            self._buffered += len(data)
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._failure is not None:
            if isinstance(self._failure, GcsstreamError):
                raise self._failure
            raise SourceError(f"the upload was abandoned: {self._failure!r}")
        if self._ended:
            raise ValueError("write to a closed upload")

    # -- the chunk window's side ----------------------------------------------------------------

    def read(self, n: int) -> bytes:
        chunk = io.BytesIO()
        need = n
        while need:
            with self._cond:
                while not self._pieces and not self._ended and self._failure is None:
                    self._cond.wait()
                if self._failure is not None:
                    raise SourceError(f"{self.description} failed: {self._failure!r}")
                if not self._pieces:  # ended
                    break
                if need == n and not self._ended:
                    # More is coming: size the buffer for the whole read at once. Growing it
                    # piece by piece reallocates (and copies) it dozens of times, and the freed
                    # blocks inflate the process's peak memory by most of a chunk.
                    chunk.seek(n - 1)
                    chunk.write(b"\0")
                    chunk.seek(0)
                while self._pieces and need:
                    piece = self._pieces[0]
                    if len(piece) <= need:
                        self._pieces.popleft()
                    else:
                        self._pieces[0] = piece[need:]
                        piece = piece[:need]
                    chunk.write(piece)
                    need -= len(piece)
                    self._buffered -= len(piece)
                self._cond.notify_all()
            if self.on_space is not None:
                self.on_space()
        if need:
            chunk.truncate(n - need)  # the input ended short of a whole read
        return chunk.getvalue()

    def finish(self) -> None:
        with self._cond:
            if self._failure is not None:
                raise SourceError(f"{self.description} failed: {self._failure!r}")

    def close(self) -> None:
        pass


class GzipSource:
    """Another source's bytes, gzip-compressed on the fly (``--gzip``).

    Compression runs where reads happen, on the chunk window's reader thread, so it overlaps
    sending. Checksums and sizes are then of the compressed bytes: what the service stores.
    """

    def __init__(self, inner: ChunkSource, level: int = 6) -> None:
        self._inner = inner
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip framing
        self._pending = memoryview(b"")
        self._flushed = False
        self.description = inner.description
        self.size: int | None = None

    def read(self, n: int) -> bytes:
        out = io.BytesIO()
        while out.tell() < n:
            if self._pending:
                take = self._pending[: n - out.tell()]
                out.write(take)
                self._pending = self._pending[len(take) :]
                continue
            if self._flushed:
                break
            data = self._inner.read(n)
            self._pending = memoryview(self._compressor.compress(data) if data else self._compressor.flush())
            self._flushed = not data
        return out.getvalue()

    def finish(self) -> None:
        self._inner.finish()

    def close(self) -> None:
        self._inner.close()
