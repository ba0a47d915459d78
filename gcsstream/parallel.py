"""One stream over many connections: cut into parts, uploaded at once, composed, verified.

``ParallelUploader.upload`` reads the source on the caller's thread and cuts it into parts of
``part_size`` bytes. Up to ``parallel`` parts upload at once on worker threads, each part a
resumable upload through the same engine (``Uploader``) from the part's bytes in memory, each
worker with a ``Transport`` of its own (its connections are not shared across threads). The
reader waits while ``parallel`` parts are held, so memory stays at most ``parallel`` parts plus
the engine's fixed overhead, whatever the input size.

Temporary objects live under the destination, recognisable and never colliding with another run:

    OBJECT.gcsstream-parts/RUN_ID/000042            part 42 (numbered from 0 in stream order)
    OBJECT.gcsstream-parts/RUN_ID/compose-1-000003  an intermediate composite (compose takes at
                                                    most 32 sources: a tree for more parts)

The final compose carries the destination's metadata and the caller's precondition
(``ifGenerationMatch``: 0 for no-clobber). Integrity: each part's CRC32C is the engine's, of the bytes
it sent, verified against the stored part; the whole stream's is their combination (CRC32C values
combine, so no byte is hashed twice). Every intermediate and the final object are checked
against them. A final object that does not match is
deleted (its generation only, and only the one this run's compose created): exit 3.

Temporary objects are deleted on success and on failure; what cannot be deleted is named in the
error, or given to ``warn`` after a success. Without a journal they are deleted too when the
caller's thread is interrupted (Ctrl-C, or the command line's SIGTERM/SIGHUP exceptions).

With a journal (a ``PartsRecorder``) the upload is resumable: the run's id is the entry's, each
part's session is journaled before its first byte, what it confirmed behind it, and each
verified part before its worker takes another. A signal, or retries running out, then stops the
run keeping its sessions and parts. Resumed from the entry, a run reads the stream again from
its start: every finished part's bytes, and what each running part's session confirmed, are
hashed and checked against the journal (a different stream is refused, ``PrefixMismatch``,
before anything is sent: the parts below the last one checked are held, not sent, until then),
the running parts continue their sessions (a fresh one where a session is gone, or the part as
it is where its session had stored it), and the rest upload as new.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import queue
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gcsstream.checksums import crc32c_combine, crc32c_extend, decode_crc32c, encode_crc32c
from gcsstream.engine import Resume, Uploader, UploadResult
from gcsstream.errors import (
    STOPPED_BY,
    AuthError,
    GcsstreamError,
    IntegrityError,
    Interrupted,
    NotFoundError,
    PreconditionError,
    PrefixMismatch,
    ServiceError,
    SourceError,
    TransientError,
    UsageError,
    error_for_status,
    service_message,
)
from gcsstream.events import (
    ChunkPersisted,
    ChunkSending,
    EventCallback,
    PartFinished,
    PartStarted,
    Retrying,
    UploadFinished,
    UploadStarted,
)
from gcsstream.options import (
    CLEANUP_RETRY_DEADLINE,
    ObjectMetadata,
    ObjectURL,
    ParallelOptions,
    UploadOptions,
    parse_gs_url,
)
from gcsstream.retry import (
    RETRYABLE_EXCEPTIONS,
    Retryable,
    describe_network_error,
    exchange,
    retryable,
    run_with_retries,
)
from gcsstream.session import (
    UnreadableAnswer,
    bucket_url,
    compose_url,
    list_url,
    object_url,
    parse_resource,
    resource_int,
)
from gcsstream.sources import Chunk, ChunkSource, read_full, read_full_into
from gcsstream.threads import HelperThread
from gcsstream.transport import HTTPTransport

if TYPE_CHECKING:
    from gcsstream.journal import JournalEntry, PartsRecorder, RunningPart

T = TypeVar("T")

#: The service composes at most this many sources per request.
MAX_COMPOSE_SOURCES = 32
#: Said of a parallel upload without a journal that stops short.
NOT_RESUMABLE = "a parallel upload without a journal cannot be resumed: run it again"
_NAMED = 10  # temporary objects named one by one in the line about leftovers; then a count
_POLL = 0.5  # seconds between checks while the reader waits (each wait is bounded)
#: Seconds a failed or interrupted run gives its workers to end once their sessions are cancelled.
_STOP_GRACE = 2.0
#: Seconds the cleanup may go without settling an object before it is given up (a stuck server
#: must not hold the run: its leftovers are named).
_CLEANUP_BOUND = CLEANUP_RETRY_DEADLINE


class _Aborted(Exception):
    """Raised in a worker whose upload must stop: another part failed, or the run was interrupted."""


@dataclass
class _Piece:
    """An object this run composes from, or created: a part, an intermediate, the destination."""

    target: ObjectURL
    size: int
    crc32c: int
    components: int = 1
    generation: int | None = None


def _part_buffer(size: int, *, populate: bool) -> mmap.mmap:
    """Memory for a part's bytes: anonymous pages, which the kernel hands out zeroed (a
    ``bytearray`` is also cleared by hand), and with ``populate`` mapped in one call rather than
    one page fault per 4 KiB as the stream is read into it."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)  # Linux
    return mmap.mmap(-1, size, flags=flags)


class _PartBytes:
    """One part's bytes as the reader read them: chunk-sized pieces, each in a slot of the run's
    budget (a pooled buffer, or fresh bytes from a source without ``readinto``).

    A piece goes back to the pool once the service has confirmed it and this attempt sent it
    (a piece the engine only hashed, resuming past it, stays to the end): the reader reads the
    next parts into it while this one still uploads. Then the part cannot be sent again from
    its start (``whole`` is False)."""

    def __init__(self) -> None:
        self.pieces: list[Chunk] = []
        self.buffers: list[mmap.mmap | None] = []
        self.ends: list[int] = []
        self.size = 0
        self.kept = 0  # pieces before this index went back
        self.sent_from: int | None = None

    def add(self, piece: Chunk, buffer: mmap.mmap | None) -> None:
        self.pieces.append(piece)
        self.buffers.append(buffer)
        self.size += len(piece)
        self.ends.append(self.size)

    @property
    def whole(self) -> bool:
        return self.kept == 0

    def sending(self, first: int) -> None:
        if self.sent_from is None or first < self.sent_from:
            self.sent_from = first

    def confirmed(self, persisted: int) -> list[mmap.mmap | None]:
        """The buffers of the pieces that need not be kept any more."""
        if self.sent_from is None:
            return []
        done = self.kept
        while done < len(self.ends) and self.ends[done] <= persisted:
            if self.ends[done] - len(self.pieces[done]) < self.sent_from:
                return self._drop(done)  # hashed only (resumed past it): kept to the end
            done += 1
        return self._drop(done)

    def _drop(self, upto: int) -> list[mmap.mmap | None]:
        gone = self.buffers[self.kept : upto]
        for i in range(self.kept, upto):
            self.pieces[i] = b""
        self.kept = max(self.kept, upto)
        return gone

    def release_all(self) -> list[mmap.mmap | None]:
        gone = self.buffers[self.kept :]
        self.kept = len(self.buffers)
        self.pieces.clear()
        self.buffers = [None] * self.kept  # a failure's traceback may hold this: not the maps
        return gone


class _PartSource:
    """A ``ChunkSource`` over one part's bytes, held as the pieces the reader read: a chunk-sized
    read hands out a piece as it is (no copy)."""

    def __init__(self, pieces: list[Chunk], description: str) -> None:
        self._pieces = deque(pieces)
        self.size: int | None = sum(len(p) for p in pieces)
        self.description = description

    def read(self, n: int) -> Chunk:
        if not self._pieces:
            return b""
        head = self._pieces[0]
        if len(head) <= n:
            return self._pieces.popleft()
        self._pieces[0] = head[n:]
        return head[:n]

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self._pieces.clear()


class _PartSession:
    """The engine's recorder for a part: keeps its session (to cancel it), journals it before its
    first byte (with a ``PartsRecorder``), and stops it between chunks once the run is aborted."""

    def __init__(
        self,
        aborted: threading.Event,
        index: int = 0,
        recorder: PartsRecorder | None = None,
        size: int = 0,
    ) -> None:
        self._aborted = aborted
        self._index = index
        self._recorder = recorder
        self._size = size
        self.session_uri: str | None = None

    def started(self, session_uri: str) -> None:
        self.session_uri = session_uri
        if self._aborted.is_set():
            raise _Aborted()
        if self._recorder is not None:
            self._recorder.part_started(self._index, session_uri)

    def persisted(self, offset: int, crc32c: int) -> None:
        if self._aborted.is_set():
            raise _Aborted()
        if self._recorder is not None and offset < self._size:  # the whole part: it is finished
            self._recorder.part_persisted(self._index, offset, crc32c)

    def finished(self) -> None:
        pass


class _Workers:
    """``n`` daemon threads running jobs, each job given its thread's own transport."""

    def __init__(self, n: int, connect: Callable[[], HTTPTransport]) -> None:
        self._connect = connect
        self._jobs: queue.Queue[tuple[Callable[[HTTPTransport], Any], Future[Any]] | None] = queue.Queue()
        self._threads = [HelperThread(self._run, name=f"gcsstream-part-{i}") for i in range(n)]
        try:
            for thread in self._threads:
                thread.start()
        except BaseException:  # interrupted: the threads that did start end at once
            self.close()
            raise

    def submit(self, job: Callable[[HTTPTransport], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((job, future))
        return future

    def _run(self) -> None:
        transport: HTTPTransport | None = None
        try:
            while (item := self._jobs.get()) is not None:
                job, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    if transport is None:
                        transport = self._connect()
                    future.set_result(job(transport))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the job
                    future.set_exception(exc)
        finally:
            close = getattr(transport, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    def close(self) -> None:
        """Let the threads end once their jobs are done (they are daemons: none blocks exit)."""
        for _ in self._threads:
            self._jobs.put(None)


class ParallelUploader:
    """Uploads a source as parts over several connections and composes them into one object."""

    def __init__(
        self,
        connect: Callable[[], HTTPTransport],
        options: UploadOptions | None = None,
        parallel: ParallelOptions | None = None,
        *,
        on_event: EventCallback | None = None,
        warn: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._options = options or UploadOptions()
        self._parallel = parallel or ParallelOptions()
        self._parallel.check(self._options)
        self._on_event = on_event
        self._warn = warn
        self._sleep = sleep
        self._clock = clock

    def upload(
        self,
        source: ChunkSource,
        destination: ObjectURL,
        metadata: ObjectMetadata | None = None,
        *,
        transport: HTTPTransport | None = None,
        recorder: PartsRecorder | None = None,
    ) -> UploadResult:
        """Upload everything ``source`` produces to ``destination`` in parts; return the checked
        object. ``transport`` (else a new one) carries the bucket, compose and delete requests.
        ``recorder`` journals the run (resumable); one holding an entry with parts resumes it."""
        own = transport is None
        main = transport if transport is not None else self._connect()
        try:
            return _Run(self, main, source, destination, metadata or ObjectMetadata(), recorder).run()
        finally:
            with contextlib.suppress(Exception):
                source.close()
            if own:
                close = getattr(main, "close", None)
                if close is not None:
                    close()


class _Run:
    """One parallel upload: its parts, its temporary objects, and their cleanup."""

    def __init__(
        self,
        owner: ParallelUploader,
        transport: HTTPTransport,
        source: ChunkSource,
        destination: ObjectURL,
        metadata: ObjectMetadata,
        recorder: PartsRecorder | None = None,
    ) -> None:
        self.o = owner
        self.opts = owner._options
        self.part_size = owner._parallel.part_size
        self.n = owner._parallel.parallel
        self.transport = transport
        self.source = source
        self.destination = destination
        self.metadata = metadata
        self.recorder = recorder
        #: The entry this run resumes (None: a new upload).
        self.resumed: JournalEntry | None = recorder.entry if recorder is not None else None
        self._name_run(self.resumed.id if self.resumed is not None else "0" * 16)
        try:
            destination.temporary(self.run_id, "compose-9-999999")  # the longest temporary name
        except UsageError:
            raise UsageError(
                f"the object name is too long for --parallel: its temporary objects ({self.prefix}...) "
                "would exceed the service's 1024 bytes"
            ) from None
        #: A resumable stop: the sessions and parts are kept for ``resume`` (set before ``aborted``).
        self.keep = False
        self.aborted = threading.Event()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        #: The bytes held are counted in chunk-sized slots: ``parallel`` parts' worth at most.
        self.chunk = min(self.opts.chunk_size, self.part_size)
        self.slots = self.n * -(-self.part_size // self.chunk)
        self.slots_out = 0
        #: Chunk buffers no part holds any more: a stream is read into them again, so that the
        #: run faults in at most ``parallel`` parts of fresh memory, not the whole input.
        self.spare: list[mmap.mmap] = []
        self.readinto = hasattr(source, "readinto")
        #: The bytes of the parts being uploaded (their pieces go back as they are confirmed).
        self.part_bytes: dict[int, _PartBytes] = {}
        self.failure: BaseException | None = None
        self.futures: list[Future[Any]] = []
        self.temporaries: list[_Piece] = []  # created by this run, to delete at the end
        self.uncertain = False  # a temporary object may exist that this run did not hear of
        self.read = 0
        self.expected = self.opts.expected_size if self.opts.expected_size is not None else source.size
        self.confirmed: dict[int, int] = {}
        #: Parts being uploaded: their sessions, cancelled from here if the run stops.
        self.live: dict[int, tuple[_PartSession, ObjectURL]] = {}
        self.sent: dict[int, int] = {}
        #: The temporary objects the cleanup deleted (or found gone).
        self.gone_names: set[str] = set()

    def _name_run(self, run_id: str) -> None:
        self.run_id = run_id
        self.prefix = self.destination.parts_prefix(run_id)

    # -- the whole run --------------------------------------------------------------------------

    def run(self) -> UploadResult:
        try:
            return self._run()
        finally:
            # A failure's traceback holds this run (its frames hold the bodies being sent): the
            # buffers go now, not at the next garbage collection (a worker still running past
            # the grace keeps its own; a cleanup that outlives the run still has the futures).
            with self.lock:
                self.spare.clear()
                self.failure = None

    def _run(self) -> UploadResult:
        started = self.o._clock()
        workers: _Workers | None = None
        try:
            self._check_bucket()
            if self.recorder is not None:
                self._name_run(self.recorder.started().id)
            else:
                self._name_run(secrets.token_hex(8))
            self._check_resumable()
            workers = _Workers(self.n, self.o._connect)
            resumed_at = self.resumed.persisted if self.resumed is not None else 0
            self._emit(UploadStarted(str(self.destination), self.expected, self.part_size, resumed_at))
            parts, total, crc = self._read_parts(workers)
            if self.resumed is not None:
                self._delete_strays(parts)
            final = self._compose_tree(parts, workers)
            self._check_final(final, total, crc)
        except BaseException as exc:
            if self._keeps(exc) or (self.resumed is not None and workers is None):
                # Resumable, or a resumed upload refused before any part moved: left as it was.
                self.keep = True
                self.aborted.set()
                self._let_parts_stop(workers)
                raise
            self.aborted.set()
            left = self._cleanup(workers, failed=True)
            self._journal_leftovers(left=bool(left))
            raise self._failed(exc, left) from None
        left = self._cleanup(workers, failed=False)
        if self.recorder is not None:
            self._journal_leftovers(left=bool(left), composed=final.piece.generation or 1)
        if left and self.o._warn is not None:
            kept = self.recorder.entry if self.recorder is not None and not self.recorder.done else None
            hint = f" (`gcsstream abort {kept.id}` deletes them)" if kept is not None else ""
            self.o._warn(left + hint)
        stored = final.resource
        result = UploadResult(
            bucket=self.destination.bucket,
            name=self.destination.name,
            generation=final.piece.generation or 0,
            size=total,
            crc32c=stored.get("crc32c"),
            md5=None,
            seconds=self.o._clock() - started,
            verified=("crc32c",),
            resource=stored,
            parts=len(parts),
        )
        self._emit(UploadFinished(result))
        return result

    # -- the bucket -----------------------------------------------------------------------------

    def _check_bucket(self) -> None:
        """Refuse up front a bucket whose temporary objects could not be deleted."""
        bucket = self.destination.bucket
        url = bucket_url(self.transport.endpoint, bucket, user_project=self.transport.user_project)
        try:
            resource = self._json("GET", url, None, f"reading bucket gs://{bucket}")
        except NotFoundError:
            raise NotFoundError(f"bucket gs://{bucket} not found") from None
        except AuthError as exc:
            if "(403)" not in str(exc):
                raise
            if self.o._warn is not None:  # an account may write objects without reading the bucket
                self.o._warn(
                    f"cannot read the settings of gs://{bucket} (403): if it has a retention policy "
                    "or holds, the temporary objects of --parallel cannot be deleted"
                )
            return
        why = None
        if resource.get("retentionPolicy"):
            why = "a retention policy"
        elif resource.get("defaultEventBasedHold"):
            why = "a default event-based hold"
        if why:
            raise UsageError(
                f"gs://{bucket} has {why}: the temporary objects of --parallel could not be deleted; "
                "upload it as one stream (without --parallel)"
            )

    # -- reading and the parts ------------------------------------------------------------------

    def _read_parts(self, workers: _Workers) -> tuple[list[_Piece], int, int]:
        """Cut the source into parts and hand each to a worker; the stream's size and CRC32C.

        Resuming, a finished part's bytes are checked against the journal and skipped, and a
        running part's against what its session confirmed; the parts below the last one checked
        are held until then (nothing is sent from a stream that turns out to differ)."""
        parts: list[_Piece] = []
        total = crc = 0
        entry = self.resumed
        finished = {p.index: p for p in entry.parts} if entry is not None else {}
        running = {p.index: p for p in entry.running} if entry is not None else {}
        # Up to here the input is checked against the journal before anything is sent: the
        # stored parts, and what the running parts' sessions confirmed.
        horizon = _check_horizon(entry) if entry is not None else -1
        held: list[Callable[[HTTPTransport], None]] = []
        while True:
            index = len(parts)
            data = self._read_part(total)
            size = data.size
            if size == 0 and parts:
                break
            expected = self.opts.expected_size
            if expected is not None and total + size > expected:
                raise SourceError(f"{self.source.description} has more than the expected {expected} bytes")
            target = self.destination.temporary(self.run_id, f"{index:06d}")
            stored = finished.get(index)
            if stored is not None:
                self._check_stored(index, total, stored.size, stored.crc32c, data.pieces, size)
                self._give_back(data.buffers)
                part = _Piece(target, size, stored.crc32c, generation=stored.generation)
                parts.append(part)
                with self.lock:
                    self.temporaries.append(part)
                    self.confirmed[index] = size
            else:
                session = running.get(index)
                if session is not None and session.confirmed:
                    self._check_confirmed(index, total, session, data.pieces)
                # Its CRC32C is the engine's, of these very bytes as it sent them, once its upload
                # is verified: hashed once, not also here.
                part = _Piece(target, size, 0)
                parts.append(part)
                job = self._part_job(index, total, part, data, session)
                if index < horizon:
                    held.append(job)
                else:
                    self.futures.append(workers.submit(job))
            if index == horizon:  # the input is what the journal says: send the held parts
                for job in held:
                    self.futures.append(workers.submit(job))
                held.clear()
            del data
            total += size
            with self.lock:
                self.read = total
            if size < self.part_size:
                break
        if horizon >= len(parts):
            assert entry is not None
            size = entry.part_size
            ends = [p.index * size + p.size for p in entry.parts]
            ends += [p.index * size + p.confirmed for p in entry.running if p.confirmed]
            raise PrefixMismatch(
                f"the input ended after {total} bytes, but upload {entry.id} has sent bytes of it "
                f"up to offset {max(ends)}: resume it with the same input; the upload is left as it was"
            )
        if self.opts.expected_size is not None and total != self.opts.expected_size:
            raise SourceError(
                f"{self.source.description} ended after {total} bytes; expected {self.opts.expected_size}"
            )
        self.source.finish()  # a producer that failed: no object
        for future in self.futures:
            self._wait(future)
        for part in parts:
            crc = crc32c_combine(crc, part.crc32c, part.size)
        return parts, total, crc

    def _check_stored(
        self, index: int, offset: int, size: int, crc32c: int, pieces: list[Chunk], read: int
    ) -> None:
        """A part stored by an earlier run must be what the input holds there (``PrefixMismatch``)."""
        found, _ = _crc32c_of(pieces)
        if read != size or found != crc32c:
            assert self.resumed is not None
            raise PrefixMismatch(
                f"the input differs from what upload {self.resumed.id} stored: part {index} "
                f"({size} bytes at offset {offset}, crc32c {encode_crc32c(crc32c)}) is "
                f"{read} bytes with crc32c {encode_crc32c(found)} in it; resume it with the same "
                "input; the upload is left as it was"
            )

    def _check_confirmed(self, index: int, offset: int, session: RunningPart, pieces: list[Chunk]) -> None:
        """What a running part's session confirmed must be what the input holds there."""
        found, have = _crc32c_of(pieces, session.confirmed)
        if have < session.confirmed or found != session.crc32c:
            assert self.resumed is not None
            raise PrefixMismatch(
                f"the input differs from what upload {self.resumed.id} sent: the session of part "
                f"{index} confirmed {session.confirmed} bytes at offset {offset} with crc32c "
                f"{encode_crc32c(session.crc32c)}, and the input has "
                f"{have} bytes with crc32c {encode_crc32c(found)} "
                "there; resume it with the same input; the upload is left as it was"
            )

    def _take_slot(self, populate: bool) -> mmap.mmap | None:
        """Room for one more chunk (block while ``parallel`` parts' worth is held; raise the
        first part's failure): a spare buffer or a new one, for a source that reads into it."""
        with self.cond:
            while self.failure is None and self.slots_out >= self.slots:
                self.cond.wait(_POLL)
            if self.failure is not None:
                raise self.failure
            self.slots_out += 1
            buffer = self.spare.pop() if self.spare else None
        if buffer is None and self.readinto:
            buffer = _part_buffer(self.chunk, populate=populate)
        return buffer

    def _give_back(self, buffers: list[mmap.mmap | None]) -> None:
        with self.cond:
            self._returned(buffers)

    def _returned(self, buffers: list[mmap.mmap | None]) -> None:
        """(Holding the lock.) Chunks nothing will read again: their slots and buffers are free."""
        self.slots_out -= len(buffers)
        self.spare.extend(b for b in buffers if b is not None)
        self.cond.notify_all()

    def _read_part(self, offset: int) -> _PartBytes:
        """The next part's bytes, as chunk-sized pieces (the engine sends each without a copy),
        each in a slot of the budget; ``offset``: bytes read before it."""
        data = _PartBytes()
        while data.size < self.part_size:
            n = min(self.chunk, self.part_size - data.size)
            # A new buffer is mapped at once unless the stream may be shorter than a chunk; a
            # part's failure met here is raised as it is (it is not the source's).
            buffer = self._take_slot(populate=offset + data.size > 0)
            try:
                if buffer is None:
                    piece = read_full(self.source, n)
                else:
                    view = memoryview(buffer)
                    piece = view[: read_full_into(self.source, view[:n])]
            except GcsstreamError:
                raise
            except Exception as exc:  # a source that raised something unexpected, as the window says
                raise SourceError(f"reading {self.source.description} failed: {exc}") from None
            if not piece:
                self._give_back([buffer])
                break
            data.add(piece, buffer)
        return data

    def _part_job(
        self,
        index: int,
        offset: int,
        part: _Piece,
        data: _PartBytes,
        running: RunningPart | None = None,
    ) -> Callable[[HTTPTransport], None]:
        source = _PartSource(list(data.pieces), f"part {index} of {self.source.description}")

        def job(transport: HTTPTransport) -> None:
            with self.lock:
                self.part_bytes[index] = data
            try:
                self._upload_part(transport, index, offset, part, source, data, running)
            except BaseException as exc:
                with self.cond:
                    if self.failure is None and not isinstance(exc, _Aborted):
                        self.failure = exc
                        if self._keeps_session(exc):  # the other parts keep theirs too
                            self.keep = True
                        self.aborted.set()
                raise
            finally:
                # Its bytes are no longer needed, whatever happened: nothing sends them any more
                # (every send of this part ran on this thread), so its buffers can be reused.
                source.close()
                with self.cond:
                    self.part_bytes.pop(index, None)
                    self._returned(data.release_all())

        return job

    def _upload_part(
        self,
        transport: HTTPTransport,
        index: int,
        offset: int,
        part: _Piece,
        source: _PartSource,
        data: _PartBytes,
        running: RunningPart | None,
    ) -> None:
        if self.aborted.is_set():
            raise _Aborted()
        opts = self.opts
        options = UploadOptions(
            chunk_size=min(opts.chunk_size, self.part_size),
            checksum="crc32c",
            if_generation_match=0,  # a temporary object never replaces anything
            retry_deadline=opts.retry_deadline,
            retry_initial_delay=opts.retry_initial_delay,
            retry_max_delay=opts.retry_max_delay,
            connect_timeout=opts.connect_timeout,
            io_timeout=opts.io_timeout,
            expected_size=part.size,
        )
        session = _PartSession(self.aborted, index, self.recorder, part.size)
        uploader = Uploader(
            transport,
            options,
            on_event=lambda event: self._part_event(index, event),
            sleep=self._sleep_unless_aborted,
            clock=self.o._clock,
        )
        part_metadata = self._part_metadata()
        self._emit(PartStarted(index, offset, part.size))
        with self.lock:
            self.live[index] = (session, part.target)
        ok = False
        try:
            try:
                if running is None:
                    result = uploader.upload(source, part.target, part_metadata, recorder=session)
                else:
                    result = self._continue_part(uploader, session, running, part, source, data)
            except BaseException as exc:
                with self.lock:
                    self.uncertain = True  # its final request may have created it unheard
                if session.session_uri is not None and not self._keeps_session(exc):
                    with contextlib.suppress(Exception):  # best effort: a dead session creates nothing
                        uploader.cancel(session.session_uri, part.target)
                raise
            part.generation = result.generation
            with self.lock:
                self.temporaries.append(part)
            if result.size != part.size or result.crc32c is None:
                raise IntegrityError(
                    f"{part.target} holds {result.size} bytes with crc32c {result.crc32c}, but part "
                    f"{index} was {part.size} bytes"
                )
            part.crc32c = decode_crc32c(result.crc32c)  # verified by the engine against its bytes
            if self.recorder is not None and part.generation is not None:
                self.recorder.part_finished(index, part.size, part.crc32c, part.generation)
            ok = True
        finally:
            with self.lock:
                self.live.pop(index, None)
            self._emit(PartFinished(index, part.size, ok))

    def _continue_part(
        self,
        uploader: Uploader,
        session: _PartSession,
        running: RunningPart,
        part: _Piece,
        source: _PartSource,
        data: _PartBytes,
    ) -> UploadResult:
        """Continue a part's journaled session (the engine hashes what it holds, and checks what
        the journal says it confirmed); where the session is gone, upload the part afresh."""
        metadata = self._part_metadata()
        # What the part holds, while every piece is here (the engine gives sent ones back): a part
        # found existing is taken only if it holds these bytes.
        crc, _ = _crc32c_of(data.pieces)
        try:
            try:
                # The reader checked the journal's confirmed prefix against the input already; a
                # session that holds less than that is continued from what it holds (every byte
                # of the part is here), not refused as a single upload's would be.
                resume = Resume(running.session_uri)
                return uploader.upload(source, part.target, metadata, recorder=session, resume=resume)
            except PrefixMismatch:
                raise
            except IntegrityError as exc:
                # What its session held is not what the input holds there: a different stream.
                raise PrefixMismatch(
                    f"the input differs from what upload {self.run_id} sent of {part.target}: {exc}; "
                    "resume it with the same input"
                ) from None
            except NotFoundError:
                pass
            return self._upload_part_again(uploader, session, part, source, data)
        except PreconditionError:
            # Its temporary object exists: the killed run's last request created it unheard.
            adopted = self._adopt_part(uploader.transport, part, crc)
            if adopted is not None:
                return adopted
            return self._upload_part_again(uploader, session, part, source, data)

    def _upload_part_again(
        self, uploader: Uploader, session: _PartSession, part: _Piece, source: _PartSource, data: _PartBytes
    ) -> UploadResult:
        """The part afresh, on a new session, if its bytes are all still held."""
        if not data.whole:
            raise TransientError(
                f"the session of {part.target} ended before the part was stored, and the bytes "
                "it had confirmed are no longer held: resume the upload to send the part again"
            )
        session.session_uri = None
        fresh = _PartSource(list(data.pieces), source.description)
        return uploader.upload(fresh, part.target, self._part_metadata(), recorder=session)

    def _adopt_part(self, transport: HTTPTransport, part: _Piece, crc: int) -> UploadResult | None:
        """A part found existing where its session is gone: it is this part if it holds these
        bytes (CRC32C ``crc``); other bytes there mean another input (``PrefixMismatch``);
        None: it is gone again."""
        found = self._retrying(
            lambda _: self._existing(transport, part.target),
            f"reading {part.target}",
            sleep=self._sleep_unless_aborted,  # a part's worker: it stops with the run
        )
        generation = resource_int(found, "generation") if found is not None else None
        if found is None or generation is None:
            return None
        if not self._holds(found, _Piece(part.target, part.size, crc)):
            raise PrefixMismatch(
                f"the input differs from what upload {self.run_id} stored as {part.target} "
                f"({found.get('size')} bytes with crc32c {found.get('crc32c')}; the input has "
                f"{part.size} bytes with crc32c {encode_crc32c(crc)} there): resume it with the same "
                "input; the upload is left as it was"
            )
        return UploadResult(
            bucket=part.target.bucket,
            name=part.target.name,
            generation=generation,
            size=part.size,
            crc32c=str(found["crc32c"]),
            md5=None,
            seconds=0.0,
            verified=("crc32c",),
            resource=found,
        )

    def _part_metadata(self) -> ObjectMetadata:
        # Every part has the destination's storage class (compose needs the sources' to be one)
        # and its KMS key (the bytes are never stored under another key).
        return ObjectMetadata(
            content_type="application/octet-stream",
            storage_class=self.metadata.storage_class,
            kms_key=self.metadata.kms_key,
        )

    def _keeps(self, exc: BaseException) -> bool:
        """Whether the run stops resumably: journaled, and stopped by a signal, by retries running
        out, or by an input that differs from the journal's (its sessions and parts are kept)."""
        return self.recorder is not None and (
            isinstance(exc, (KeyboardInterrupt, TransientError, Interrupted, PrefixMismatch))
            or _stopped_by(exc) is not None
        )

    def _keeps_session(self, exc: BaseException) -> bool:
        """Whether a part that failed with ``exc`` leaves its session open for ``resume``."""
        return self.keep or (self.recorder is not None and isinstance(exc, (TransientError, PrefixMismatch)))

    def _check_resumable(self) -> None:
        """A resumed entry must have this run's parts, and few enough holes to hold in memory."""
        entry = self.resumed
        if entry is None:
            return
        if entry.composed:
            raise UsageError(
                f"upload {entry.id} has finished: it created {entry.destination} generation "
                f"{entry.composed}; only temporary objects it could not delete are left "
                f"(`gcsstream abort {entry.id}` deletes them)"
            )
        if (entry.part_size, entry.connections) != (self.part_size, self.n):
            raise UsageError(
                f"upload {entry.id} has parts of {entry.part_size} bytes over {entry.connections} "
                f"connections; it continues only with those"
            )
        done = {p.index for p in entry.parts}
        horizon = _check_horizon(entry)
        missing = sum(1 for i in range(horizon) if i not in done)  # held until the horizon's check
        if missing > self.n - 1:
            raise UsageError(
                f"upload {entry.id} cannot be continued: {missing} of its parts before its last stored "
                f"(or confirmed) one are not stored; `gcsstream abort {entry.id}` deletes its parts"
            )

    def _delete_strays(self, parts: list[_Piece]) -> None:
        """Resuming: delete what earlier runs left under the prefix that this run does not compose
        (intermediates of a compose that was cut off, a part created after its run was killed)."""
        keep = {(p.target.name, p.generation) for p in parts}
        for name, generation in self._listed():
            if (name, generation) in keep:
                continue
            why = self._delete(self.transport, self._listed_piece(name, generation))
            if why is not None:
                raise TransientError(
                    f"a temporary object an earlier run left, gs://{self.destination.bucket}/{name}, "
                    f"could not be deleted: {why}"
                )

    def _let_parts_stop(self, workers: _Workers | None) -> None:
        """A resumable stop: give the workers a moment to end (a part finishing is journaled)."""
        self._await_parts()
        if workers is not None:
            workers.close()
        if self.recorder is not None:
            with contextlib.suppress(GcsstreamError):
                self.recorder.flush()
            self.recorder.close()  # a part still running past the grace journals nothing more

    def _journal_leftovers(self, *, left: bool, composed: int = 0) -> None:
        """After the cleanup: forget the entry, or, where anything is ``left`` (a part, an
        intermediate of the compose tree), keep it with the parts left in it: ``sessions``
        lists it, ``abort`` deletes everything under its prefix."""
        recorder = self.recorder
        if recorder is None or recorder.entry is None:
            return
        entry = recorder.entry
        parts = {p.index for p in entry.parts if entry.part_name(p.index).name not in self.gone_names}
        with contextlib.suppress(GcsstreamError):
            if parts or left:
                recorder.keep_only(parts, composed=composed)
            else:
                recorder.finished()

    def _sleep_unless_aborted(self, seconds: float) -> None:
        if self.aborted.wait(seconds):
            raise _Aborted()

    def _part_event(self, index: int, event: object) -> None:
        """A part's engine events, as events of the whole upload (the parts' own starts and ends
        become PartStarted/PartFinished)."""
        with self.lock:
            data = self.part_bytes.get(index)
            if data is not None and isinstance(event, ChunkSending):
                data.sending(event.first)
            if data is not None and isinstance(event, ChunkPersisted):
                self._returned(data.confirmed(event.persisted))
            if isinstance(event, ChunkPersisted):
                self.confirmed[index] = event.persisted
                self._emit(ChunkPersisted(sum(self.confirmed.values()), self.read, self.expected))
            elif isinstance(event, ChunkSending):
                before = sum(self.sent.values())
                self.sent[index] = max(self.sent.get(index, 0), event.end)
                self._emit(ChunkSending(before, sum(self.sent.values())))
            elif isinstance(event, Retrying):
                self._emit(Retrying(f"part {index}: {event.reason}", event.delay, event.attempt))

    # -- compose --------------------------------------------------------------------------------

    def _compose_tree(self, parts: list[_Piece], workers: _Workers) -> _Composed:
        """Compose the parts, 32 at a time, level by level, then into the destination."""
        level_pieces = parts
        level = 1
        while len(level_pieces) > MAX_COMPOSE_SOURCES:
            groups = [
                level_pieces[i : i + MAX_COMPOSE_SOURCES]
                for i in range(0, len(level_pieces), MAX_COMPOSE_SOURCES)
            ]
            jobs: list[Future[_Composed] | _Piece] = []
            for number, group in enumerate(groups):
                if len(group) == 1:
                    jobs.append(group[0])
                    continue
                target = self.destination.temporary(self.run_id, f"compose-{level}-{number:06d}")
                future = workers.submit(self._compose_job(group, target))
                self.futures.append(future)
                jobs.append(future)
            level_pieces = [job if isinstance(job, _Piece) else self._wait(job).piece for job in jobs]
            level += 1
        return self._compose(self.transport, level_pieces, self.destination, final=True)

    def _compose_job(self, group: list[_Piece], target: ObjectURL) -> Callable[[HTTPTransport], _Composed]:
        def job(transport: HTTPTransport) -> _Composed:
            if self.aborted.is_set():
                raise _Aborted()
            return self._compose(transport, group, target, final=False)

        return job

    def _compose(
        self, transport: HTTPTransport, sources: list[_Piece], target: ObjectURL, *, final: bool
    ) -> _Composed:
        """One compose request; an intermediate is checked here, the destination by the caller."""
        size = sum(s.size for s in sources)
        crc = 0
        for s in sources:
            crc = crc32c_combine(crc, s.crc32c, s.size)
        components = sum(s.components for s in sources)
        if final:
            resource = self.metadata.resource(target.name)
            match = self.opts.if_generation_match
        else:
            resource = ObjectMetadata(
                content_type="application/octet-stream",
                storage_class=self.metadata.storage_class,
                kms_key=self.metadata.kms_key,
            ).resource(target.name)
            match = 0
        body = {
            "kind": "storage#composeRequest",
            "sourceObjects": [{"name": s.target.name, "generation": str(s.generation)} for s in sources],
            "destination": resource,
        }
        url = compose_url(
            transport.endpoint,
            target,
            if_generation_match=match,
            kms_key=self.metadata.kms_key,
            user_project=transport.user_project,
        )
        what = f"composing {target}" if final else f"composing the temporary object {target}"
        piece = _Piece(target, size, crc, components)

        def attempt(retried: bool) -> dict[str, Any]:
            try:
                return self._exchange(transport, "POST", url, body, what)
            except PreconditionError as exc:
                if (retried or self.resumed is not None) and match is not None:
                    # An earlier attempt (or, resuming, a killed run's compose that landed late)
                    # may have composed it: if the object there has our bytes, it is ours.
                    found = self._existing(transport, target)
                    if found is not None and self._holds(found, piece):
                        return found
                    if found is not None and not final and self.resumed is not None:
                        # A killed run's intermediate of other sources, under this upload's prefix.
                        gone = _Piece(target, 0, 0, 1, resource_int(found, "generation"))
                        if self._delete(transport, gone) is None:
                            raise Retryable(f"{target} was left by an earlier run; deleted it") from None
                if final:
                    raise self._precondition_failed(match, exc) from None
                raise

        try:
            stored = self._retrying(attempt, what)
        except BaseException:
            if not final:
                with self.lock:
                    self.uncertain = True
            raise
        piece.generation = resource_int(stored, "generation")
        if final:
            return _Composed(piece, stored)
        with self.lock:
            self.temporaries.append(piece)
        if not self._holds(stored, piece):
            raise IntegrityError(
                f"the composed temporary object {target} holds {stored.get('size')} bytes with crc32c "
                f"{stored.get('crc32c')}, but its sources hold {size} bytes with crc32c {encode_crc32c(crc)}"
            )
        return _Composed(piece, stored)

    @staticmethod
    def _holds(resource: dict[str, Any], piece: _Piece) -> bool:
        stored_crc = resource.get("crc32c")
        try:
            crc = decode_crc32c(stored_crc) if isinstance(stored_crc, str) else None
        except ValueError:
            crc = None
        return resource_int(resource, "size") == piece.size and crc == piece.crc32c

    def _existing(self, transport: HTTPTransport, target: ObjectURL) -> dict[str, Any] | None:
        url = object_url(transport.endpoint, target, user_project=transport.user_project)
        try:
            return self._exchange(transport, "GET", url, None, f"reading {target}")
        except NotFoundError:
            return None

    def _precondition_failed(self, match: int | None, exc: PreconditionError) -> PreconditionError:
        if match == 0:
            return PreconditionError(f"{self.destination} already exists (no-clobber)")
        if match is None:
            return exc
        return PreconditionError(f"{self.destination} is not at generation {match}")

    def _check_final(self, final: _Composed, total: int, crc: int) -> None:
        """The destination must hold the stream as read: else delete this run's generation."""
        piece, stored = final.piece, final.resource
        if self._holds(stored, piece) and piece.size == total and piece.crc32c == crc:
            return
        why = (
            f"the composed object {self.destination} holds {stored.get('size')} bytes with crc32c "
            f"{stored.get('crc32c')}, but {total} bytes with crc32c {encode_crc32c(crc)} were read"
        )
        if piece.generation is None:
            raise IntegrityError(f"{why}; it has no generation and was left as it is")
        deleted = self._delete(self.transport, piece)
        bad = f"{self.destination}#{piece.generation}"
        outcome = (
            "the bad object was deleted"
            if deleted is None
            else f"the bad object {bad} could not be deleted ({deleted}): delete it"
        )
        raise IntegrityError(f"{why}; {outcome}")

    # -- requests -------------------------------------------------------------------------------

    def _json(self, method: str, url: str, body: dict[str, Any] | None, what: str) -> dict[str, Any]:
        return self._retrying(lambda _: self._exchange(self.transport, method, url, body, what), what)

    def _retrying(
        self,
        attempt: Callable[[bool], T],
        what: str,
        deadline: float | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> T:
        opts = self.opts
        return run_with_retries(
            attempt,
            transient=retryable,
            initial=opts.retry_initial_delay,
            maximum=opts.retry_max_delay,
            deadline=opts.retry_deadline if deadline is None else deadline,
            on_retry=lambda failure, delay, attempts: self._emit(
                Retrying(f"{what}: {failure.reason}", delay, attempts)
            ),
            doing=lambda: what,
            sleep=sleep or self.o._sleep,
            clock=self.o._clock,
        )

    @staticmethod
    def _exchange(
        transport: HTTPTransport, method: str, url: str, body: dict[str, Any] | None, what: str
    ) -> dict[str, Any]:
        """One JSON API exchange: transient failures become ``Retryable``, others typed errors."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json; charset=UTF-8"} if body is not None else {}
        response = exchange(transport, method, url, what=what, data=data, headers=headers)
        status = response.status_code
        if status >= 400:
            raise error_for_status(status, f"{what} failed ({status}): {service_message(response)}")
        if method == "DELETE" or status == 204 or not response.content:
            return {}  # a deletion's answer says nothing more (some servers send text)
        try:
            return parse_resource(response)
        except UnreadableAnswer as exc:
            raise Retryable(str(exc)) from None

    # -- cleanup --------------------------------------------------------------------------------

    def _cleanup(self, workers: _Workers | None, *, failed: bool) -> str:
        """Delete every temporary object; what could not be deleted, as one sentence ("" if none).

        After a failure, objects under this run's prefix that it never heard of (a part whose
        final answer was lost) are listed and deleted too. It runs on a thread of its own and is
        given up once nothing has been settled for ``_CLEANUP_BOUND`` seconds, or on another
        interruption: a stuck server leaves whatever is not known to be gone named, not waited for."""
        gone: set[str] = set()
        left: dict[str, str] = {}  # name: why it is left
        guard = threading.Lock()  # ``gone`` and ``left`` are filled by the cleanup's thread
        with self.lock:
            uncertain = self.uncertain or bool(self.futures)
        done = threading.Event()

        def clean() -> None:
            try:
                self._clean(workers, failed, gone, left, guard)
            except BaseException:  # noqa: BLE001 - named below as not known to be gone
                pass
            finally:
                done.set()

        thread = HelperThread(clean, name="gcsstream-cleanup")
        why = "timed out"
        try:
            thread.start()
            settled = -1
            end = 0.0
            while not done.wait(_POLL):
                with guard:
                    now = len(gone) + len(left)
                if now != settled:  # progress: a healthy cleanup of many objects may go on
                    settled, end = now, time.monotonic() + _CLEANUP_BOUND
                elif time.monotonic() >= end:
                    break
        except BaseException:  # interrupted again: name whatever is not known to be gone
            why = "the cleanup was interrupted"
        finally:
            if workers is not None:
                workers.close()
        with guard:
            finished = done.is_set()
            gone, left = set(gone), dict(left)
        self.gone_names = set(gone)
        if not finished:
            with self.lock:
                pieces = list(self.temporaries)
            for piece in pieces:
                if piece.target.name not in gone:
                    left.setdefault(piece.target.name, why)
            if failed and uncertain:
                left.setdefault(f"{self.prefix}*", why)
        if not left:
            return ""
        names = list(left)
        shown = name_leftovers(
            [f"gs://{self.destination.bucket}/{name}" for name in names],
            f" under gs://{self.destination.bucket}/{self.prefix}",
        )
        return (
            f"{len(names)} temporary object(s) of this upload could not be deleted "
            f"({next(iter(left.values()))}): {shown}; delete them"
        )

    def _clean(
        self,
        workers: _Workers | None,
        failed: bool,
        gone: set[str],
        left: dict[str, str],
        guard: threading.Lock,
    ) -> None:
        """The cleanup's requests (on its own thread): fills ``gone`` and ``left`` as it goes."""

        def settle(name: str, why: str | None) -> None:
            with guard:
                if why is None:
                    gone.add(name)
                else:
                    left[name] = why

        if workers is not None and failed:
            for name in self._stop_parts():
                settle(name, "its upload could not be cancelled")
        with self.lock:
            pieces = list(self.temporaries)
            uncertain = self.uncertain or bool(self.futures)
        deletions = [
            (piece, workers.submit(self._delete_job(piece)) if workers else None) for piece in pieces
        ]
        for piece, future in deletions:
            settle(
                piece.target.name,
                self._delete(self.transport, piece) if future is None else self._bounded(future),
            )
        if failed and uncertain:
            try:
                listed = self._listed()
            except GcsstreamError as exc:
                settle(f"{self.prefix}*", f"listing them failed: {exc}")
                listed = []
            for name, generation in listed:
                with guard:
                    known = name in gone or name in left
                if not known:
                    settle(name, self._delete(self.transport, self._listed_piece(name, generation)))

    def _stop_parts(self) -> list[str]:
        """Cancel the sessions of the parts still uploading (a cancelled session creates nothing,
        whatever its worker is doing), then give the workers a moment to end. The parts whose
        session could not be cancelled may still appear: their names."""
        with self.lock:
            sessions = {
                session.session_uri: target
                for session, target in self.live.values()
                if session.session_uri is not None  # not started: its ``started`` refuses to go on
            }
        entry = self.recorder.entry if self.recorder is not None else None
        if entry is not None:  # journaled sessions, maybe not resumed yet
            for part in entry.running:
                sessions.setdefault(part.session_uri, entry.part_name(part.index))
        canceller = Uploader(self.transport, UploadOptions(retry_deadline=CLEANUP_RETRY_DEADLINE))
        maybe = []
        for uri, target in sessions.items():
            try:
                canceller.cancel(uri, target)
            except GcsstreamError:
                maybe.append(target.name)
        self._await_parts()
        return maybe

    def _await_parts(self) -> None:
        """Give the workers ``_STOP_GRACE`` seconds to end their jobs."""
        end = self.o._clock() + _STOP_GRACE
        for future in self.futures:
            while not future.done() and self.o._clock() < end:
                with contextlib.suppress(Exception):
                    future.exception(timeout=min(_POLL, max(0.0, end - self.o._clock())))

    def _bounded(self, future: Future[str | None]) -> str | None:
        end = self.o._clock() + CLEANUP_RETRY_DEADLINE + self.opts.io_timeout
        while self.o._clock() < end:
            try:
                return future.result(timeout=_POLL)
            except TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001 - a reason for the line about leftovers
                return str(exc)
        return "timed out"

    def _delete_job(self, piece: _Piece) -> Callable[[HTTPTransport], str | None]:
        return lambda transport: self._delete(transport, piece)

    def _delete(self, transport: HTTPTransport, piece: _Piece) -> str | None:
        """Delete the generation this run created; None if it is gone, else why not."""
        url = object_url(
            transport.endpoint, piece.target, generation=piece.generation, user_project=transport.user_project
        )
        what = f"deleting {piece.target}"
        try:
            self._retrying(
                lambda _: self._exchange(transport, "DELETE", url, None, what), what, CLEANUP_RETRY_DEADLINE
            )
        except NotFoundError:
            return None
        except GcsstreamError as exc:
            return str(exc)
        return None

    def _listed(self) -> list[tuple[str, int | None]]:
        """The objects under this run's prefix (those whose creation was never heard of)."""
        found: list[tuple[str, int | None]] = []
        token: str | None = None
        while True:
            url = list_url(
                self.transport.endpoint,
                self.destination.bucket,
                self.prefix,
                page_token=token,
                user_project=self.transport.user_project,
            )
            what = f"listing gs://{self.destination.bucket}/{self.prefix}"
            page = self._list_page(url, what)
            for item in page.get("items") or ():
                if (
                    isinstance(item, dict)
                    and isinstance(item.get("name"), str)
                    and item["name"].startswith(self.prefix)
                ):
                    found.append((item["name"], resource_int(item, "generation")))
            token = page.get("nextPageToken")
            if not token:
                return found

    def _listed_piece(self, name: str, generation: int | None) -> _Piece:
        """An object ``_listed`` found under the prefix, to delete by its generation."""
        return _Piece(ObjectURL(self.destination.bucket, name), 0, 0, 1, generation)

    def _list_page(self, url: str, what: str) -> dict[str, Any]:
        return self._retrying(
            lambda _: self._exchange(self.transport, "GET", url, None, what), what, CLEANUP_RETRY_DEADLINE
        )

    def discard(self) -> tuple[bool, list[str]]:
        """``discard_parts``: every session of the resumed entry cancelled, every object under
        its prefix deleted (by generation)."""
        entry = self.resumed
        assert entry is not None
        bucket = self.destination.bucket
        canceller = Uploader(self.transport, UploadOptions(retry_deadline=CLEANUP_RETRY_DEADLINE))
        known = False
        left = []
        for part in entry.running:
            target = entry.part_name(part.index)
            try:
                known = canceller.cancel(part.session_uri, target) or known
            except GcsstreamError as exc:
                left.append(f"the session of gs://{bucket}/{target.name} ({exc})")
        for name, generation in self._listed():
            known = True
            why = self._delete(self.transport, self._listed_piece(name, generation))
            if why is not None:
                left.append(f"gs://{bucket}/{name} ({why})")
        return known, left

    # -- failures -------------------------------------------------------------------------------

    def _wait(self, future: Future[T]) -> T:
        """A worker's result; a part that failed first is the error raised (bounded waits)."""
        while True:
            with self.lock:
                failure = self.failure
            if failure is not None:
                raise failure
            try:
                return future.result(timeout=_POLL)
            except TimeoutError:
                continue
            except _Aborted:
                with self.lock:
                    failure = self.failure
                raise failure if failure is not None else Interrupted("the upload was stopped") from None

    def _failed(self, exc: BaseException, left: str) -> BaseException:
        """The error to raise after cleanup: the cause, saying what became of the upload."""
        tail = f"; {left}" if left else "; its temporary objects were deleted"
        stopped = _stopped_by(exc)
        if stopped is not None:
            error, word = stopped
            return error(f"{word}; {NOT_RESUMABLE}{tail}")
        if isinstance(exc, (TransientError, Interrupted)):
            return type(exc)(f"{exc}; {NOT_RESUMABLE}{tail}")
        if isinstance(exc, SourceError):
            return SourceError(f"{exc}; no object was created{tail}")
        if isinstance(exc, GcsstreamError):
            return type(exc)(f"{exc}{'; ' + left if left else ''}") if left else exc
        if isinstance(exc, RETRYABLE_EXCEPTIONS):
            return ServiceError(f"{describe_network_error(exc)}{tail}")
        return exc

    def _emit(self, event: Any) -> None:
        if self.o._on_event is not None:
            self.o._on_event(event)


def _crc32c_of(pieces: list[Chunk], length: int | None = None) -> tuple[int, int]:
    """The CRC32C of the pieces' bytes (the first ``length`` of them, if given) and how many
    bytes that was."""
    crc = have = 0
    for piece in pieces:
        if length is not None:
            if have >= length:
                break
            piece = piece[: length - have]
        crc = crc32c_extend(crc, piece)
        have += len(piece)
    return crc, have


def name_leftovers(items: list[str], where: str = "") -> str:
    """What is left, for a message: the first ``_NAMED`` items, then a count (``where`` they are)."""
    more = len(items) - _NAMED
    return ", ".join(items[:_NAMED]) + (f" and {more} more{where}" if more > 0 else "")


def _check_horizon(entry: JournalEntry) -> int:
    """The last part a resume checks against the journal before it sends anything: the last one
    stored, or running with bytes its session confirmed (-1: none)."""
    checked = [p.index for p in entry.parts] + [p.index for p in entry.running if p.confirmed]
    return max(checked, default=-1)


def discard_parts(entry: JournalEntry, uploader: Uploader) -> tuple[bool, list[str]]:
    """Cancel a journaled parallel upload's sessions and delete its temporary objects (``abort``):
    whether anything of it was left, and what could not be cancelled or deleted (with why)."""
    transport = uploader.transport
    owner = ParallelUploader(
        lambda: transport,
        UploadOptions(retry_deadline=CLEANUP_RETRY_DEADLINE),
        ParallelOptions(entry.connections, entry.part_size),
    )
    run = _Run(
        owner, transport, _PartSource([], "nothing"), parse_gs_url(entry.destination), ObjectMetadata()
    )
    run.resumed = entry
    run._name_run(entry.id)
    return run.discard()


@dataclass
class _Composed:
    piece: _Piece
    resource: dict[str, Any]


def _stopped_by(exc: BaseException) -> tuple[type[Interrupted], str] | None:
    """A signal that stopped the caller's thread: Ctrl-C (KeyboardInterrupt), or an exception
    carrying ``signum`` (the command line raises one for SIGTERM and SIGHUP)."""
    signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else getattr(exc, "signum", None)
    return STOPPED_BY.get(signum) if isinstance(signum, int) else None
