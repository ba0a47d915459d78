"""One stream over many connections: cut into parts, uploaded at once, composed, verified.

``ParallelUploader.upload`` reads the source on the caller's thread and cuts it into parts of
``part_size`` bytes. Up to ``parallel`` parts upload at once on worker threads, each part a
resumable upload through the same engine (``Uploader``) from the part's bytes in memory, each
worker with a ``Transport`` of its own (a ``requests.Session`` is not shared across threads). The
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

Temporary objects are deleted on success, on failure, and when the caller's thread is
interrupted (Ctrl-C, or the command line's SIGTERM/SIGHUP exceptions); what cannot be deleted is
named in the error, or given to ``warn`` after a success. In this version an interrupted parallel
upload is not resumable, and nothing is journaled.
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import requests

from gcsstream.checksums import crc32c_combine, decode_crc32c, encode_crc32c
from gcsstream.engine import Uploader, UploadResult
from gcsstream.errors import (
    AuthError,
    GcsstreamError,
    HungUp,
    IntegrityError,
    Interrupted,
    NotFoundError,
    PreconditionError,
    ServiceError,
    SourceError,
    Terminated,
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
)
from gcsstream.retry import (
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
from gcsstream.sources import ChunkSource, read_full
from gcsstream.transport import HTTPTransport

T = TypeVar("T")

#: The service composes at most this many sources per request.
MAX_COMPOSE_SOURCES = 32
#: Said of every parallel upload that stops short: there is no ``resume`` for it yet.
NOT_RESUMABLE = "a parallel upload cannot be resumed: run it again"
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


class _PartSource:
    """A ``ChunkSource`` over one part's bytes, held as the pieces the reader read: a chunk-sized
    read hands out a piece as it is (no copy)."""

    def __init__(self, pieces: list[bytes], description: str) -> None:
        self._pieces = deque(pieces)
        self.size: int | None = sum(len(p) for p in pieces)
        self.description = description

    def read(self, n: int) -> bytes:
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
    """The engine's recorder for a part: keeps its session (to cancel it) and stops it between
    chunks once the run is aborted. Nothing is journaled."""

    def __init__(self, aborted: threading.Event) -> None:
        self._aborted = aborted
        self.session_uri: str | None = None

    def started(self, session_uri: str) -> None:
        self.session_uri = session_uri
        if self._aborted.is_set():
            raise _Aborted()

    def persisted(self, offset: int, crc32c: int) -> None:
        if self._aborted.is_set():
            raise _Aborted()

    def finished(self) -> None:
        pass


class _Workers:
    """``n`` daemon threads running jobs, each job given its thread's own transport."""

    def __init__(self, n: int, connect: Callable[[], HTTPTransport]) -> None:
        self._connect = connect
        self._jobs: queue.Queue[tuple[Callable[[HTTPTransport], Any], Future[Any]] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._run, name=f"gcsstream-part-{i}", daemon=True) for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

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
    ) -> UploadResult:
        """Upload everything ``source`` produces to ``destination`` in parts; return the checked
        object. ``transport`` (else a new one) carries the bucket, compose and delete requests."""
        own = transport is None
        main = transport if transport is not None else self._connect()
        try:
            return _Run(self, main, source, destination, metadata or ObjectMetadata()).run()
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
    ) -> None:
        self.o = owner
        self.opts = owner._options
        self.part_size = owner._parallel.part_size
        self.n = owner._parallel.parallel
        self.transport = transport
        self.source = source
        self.destination = destination
        self.metadata = metadata
        self.run_id = secrets.token_hex(8)
        self.prefix = destination.parts_prefix(self.run_id)
        try:
            destination.temporary(self.run_id, "compose-9-999999")  # the longest temporary name
        except UsageError:
            raise UsageError(
                f"the object name is too long for --parallel: its temporary objects ({self.prefix}...) "
                "would exceed the service's 1024 bytes"
            ) from None
        self.aborted = threading.Event()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.in_flight = 0  # parts read and not yet finished: each holds its bytes
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

    # -- the whole run --------------------------------------------------------------------------

    def run(self) -> UploadResult:
        started = self.o._clock()
        workers: _Workers | None = None
        try:
            self._check_bucket()
            workers = _Workers(self.n, self.o._connect)
            self._emit(UploadStarted(str(self.destination), self.expected, self.part_size))
            parts, total, crc = self._read_parts(workers)
            final = self._compose_tree(parts, workers)
            self._check_final(final, total, crc)
        except BaseException as exc:
            self.aborted.set()
            left = self._cleanup(workers, failed=True)
            raise self._failed(exc, left) from None
        left = self._cleanup(workers, failed=False)
        if left and self.o._warn is not None:
            self.o._warn(left)
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
        """Cut the source into parts and hand each to a worker; the stream's size and CRC32C."""
        parts: list[_Piece] = []
        total = crc = 0
        chunk = min(self.opts.chunk_size, self.part_size)
        while True:
            self._wait_for_room()
            pieces, size = self._read_part(chunk)
            if size == 0 and parts:
                with self.lock:
                    self.in_flight -= 1
                break
            expected = self.opts.expected_size
            if expected is not None and total + size > expected:
                raise SourceError(f"{self.source.description} has more than the expected {expected} bytes")
            # Its CRC32C is the engine's, of these very bytes as it sent them, once its upload is
            # verified: hashed once, not also here.
            part = _Piece(self.destination.temporary(self.run_id, f"{len(parts):06d}"), size, 0)
            parts.append(part)
            self.futures.append(workers.submit(self._part_job(len(parts) - 1, total, part, pieces)))
            del pieces
            total += size
            with self.lock:
                self.read = total
            if size < self.part_size:
                break
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

    def _wait_for_room(self) -> None:
        """Block until fewer than ``parallel`` parts are held; raise the first part's failure."""
        with self.cond:
            while self.failure is None and self.in_flight >= self.n:
                self.cond.wait(_POLL)
            if self.failure is not None:
                raise self.failure
            self.in_flight += 1

    def _read_part(self, chunk: int) -> tuple[list[bytes], int]:
        pieces: list[bytes] = []
        size = 0
        while size < self.part_size:
            piece = self._read_full(min(chunk, self.part_size - size))
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
        return pieces, size

    def _read_full(self, n: int) -> bytes:
        try:
            return read_full(self.source, n)
        except GcsstreamError:
            raise
        except Exception as exc:  # a source that raised something unexpected, as the window says
            raise SourceError(f"reading {self.source.description} failed: {exc}") from None

    def _part_job(
        self, index: int, offset: int, part: _Piece, pieces: list[bytes]
    ) -> Callable[[HTTPTransport], None]:
        source = _PartSource(pieces, f"part {index} of {self.source.description}")

        def job(transport: HTTPTransport) -> None:
            try:
                self._upload_part(transport, index, offset, part, source)
            except BaseException as exc:
                with self.cond:
                    if self.failure is None and not isinstance(exc, _Aborted):
                        self.failure = exc
                        self.aborted.set()
                raise
            finally:
                source.close()  # its bytes are no longer needed, whatever happened
                with self.cond:
                    self.in_flight -= 1
                    self.cond.notify_all()

        return job

    def _upload_part(
        self, transport: HTTPTransport, index: int, offset: int, part: _Piece, source: _PartSource
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
        session = _PartSession(self.aborted)
        uploader = Uploader(
            transport,
            options,
            on_event=lambda event: self._part_event(index, event),
            sleep=self._sleep_unless_aborted,
            clock=self.o._clock,
        )
        # Every part has the destination's storage class (compose needs the sources' to be one)
        # and its KMS key (the bytes are never stored under another key).
        part_metadata = ObjectMetadata(
            content_type="application/octet-stream",
            storage_class=self.metadata.storage_class,
            kms_key=self.metadata.kms_key,
        )
        self._emit(PartStarted(index, offset, part.size))
        with self.lock:
            self.live[index] = (session, part.target)
        ok = False
        try:
            try:
                result = uploader.upload(source, part.target, part_metadata, recorder=session)
            except BaseException:
                with self.lock:
                    self.uncertain = True  # its final request may have created it unheard
                if session.session_uri is not None:
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
            ok = True
        finally:
            with self.lock:
                self.live.pop(index, None)
            self._emit(PartFinished(index, part.size, ok))

    def _sleep_unless_aborted(self, seconds: float) -> None:
        if self.aborted.wait(seconds):
            raise _Aborted()

    def _part_event(self, index: int, event: object) -> None:
        """A part's engine events, as events of the whole upload (the parts' own starts and ends
        become PartStarted/PartFinished)."""
        with self.lock:
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
                if retried and match is not None:
                    # An earlier attempt may have composed it and lost its answer: if the object
                    # there has our bytes, it is ours.
                    found = self._existing(transport, target)
                    if found is not None and self._holds(found, piece):
                        return found
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

    def _retrying(self, attempt: Callable[[bool], T], what: str, deadline: float | None = None) -> T:
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
            sleep=self.o._sleep,
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

        thread = threading.Thread(target=clean, name="gcsstream-cleanup", daemon=True)
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
        shown = ", ".join(f"gs://{self.destination.bucket}/{name}" for name in names[:_NAMED])
        more = (
            f" and {len(names) - _NAMED} more under gs://{self.destination.bucket}/{self.prefix}"
            if len(names) > _NAMED
            else ""
        )
        return (
            f"{len(names)} temporary object(s) of this upload could not be deleted "
            f"({next(iter(left.values()))}): {shown}{more}; delete them"
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
                    piece = _Piece(ObjectURL(self.destination.bucket, name), 0, 0, 1, generation)
                    settle(name, self._delete(self.transport, piece))

    def _stop_parts(self) -> list[str]:
        """Cancel the sessions of the parts still uploading (a cancelled session creates nothing,
        whatever its worker is doing), then give the workers a moment to end. The parts whose
        session could not be cancelled may still appear: their names."""
        with self.lock:
            live = list(self.live.values())
        canceller = Uploader(self.transport, UploadOptions(retry_deadline=CLEANUP_RETRY_DEADLINE))
        maybe = []
        for session, target in live:
            uri = session.session_uri
            if uri is None:
                continue  # not started: its ``started`` refuses to go on (the run is aborted)
            try:
                canceller.cancel(uri, target)
            except GcsstreamError:
                maybe.append(target.name)
        end = self.o._clock() + _STOP_GRACE
        for future in self.futures:
            while not future.done() and self.o._clock() < end:
                with contextlib.suppress(Exception):
                    future.exception(timeout=min(_POLL, max(0.0, end - self.o._clock())))
        return maybe

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

    def _list_page(self, url: str, what: str) -> dict[str, Any]:
        return self._retrying(
            lambda _: self._exchange(self.transport, "GET", url, None, what), what, CLEANUP_RETRY_DEADLINE
        )

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
        if isinstance(exc, requests.RequestException):
            return ServiceError(f"{describe_network_error(exc)}{tail}")
        return exc

    def _emit(self, event: Any) -> None:
        if self.o._on_event is not None:
            self.o._on_event(event)


@dataclass
class _Composed:
    piece: _Piece
    resource: dict[str, Any]


def _stopped_by(exc: BaseException) -> tuple[type[Interrupted], str] | None:
    """A signal that stopped the caller's thread: Ctrl-C (KeyboardInterrupt), or an exception
    carrying ``signum`` (the command line raises one for SIGTERM and SIGHUP)."""
    signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else getattr(exc, "signum", None)
    stopped: dict[int, tuple[type[Interrupted], str]] = {
        signal.SIGINT: (Interrupted, "interrupted"),
        signal.SIGTERM: (Terminated, "terminated"),
        signal.SIGHUP: (HungUp, "hung up"),
    }
    return stopped.get(signum) if isinstance(signum, int) else None
