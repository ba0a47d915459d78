"""The upload engine: one source, one resumable session, every byte confirmed and checked.

``Uploader.upload`` is the single upload implementation behind the command line and the
library. It reads through a ``ChunkWindow`` (bounded memory, read-ahead overlapping the send),
lets ``ResumableSession`` decide what each request is and what each answer means, sends through
an ``HTTPTransport``, retries transient failures with backoff and a status query before each
resend, and reports progress as events. It never touches a terminal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from google.resumable_media import common

from gcsstream.checksums import Checksums
from gcsstream.errors import (
    AuthError,
    GcsstreamError,
    IntegrityError,
    NotFoundError,
    PreconditionError,
    PrefixMismatch,
    ServiceError,
    SourceError,
    TransientError,
    error_for_status,
    is_hash_mismatch,
    service_message,
)
from gcsstream.events import (
    BytesSent,
    ChunkPersisted,
    ChunkSending,
    EventCallback,
    Retrying,
    UploadFinished,
    UploadStarted,
)
from gcsstream.options import ObjectMetadata, ObjectURL, UploadOptions
from gcsstream.redact import redact
from gcsstream.retry import (
    RETRYABLE_EXCEPTIONS,
    Retryable,
    describe_network_error,
    exchange,
    retryable,
    run_with_retries,
)
from gcsstream.session import (
    Request,
    ResumableSession,
    UnreadableAnswer,
    held_bytes,
    initiate_url,
    object_url,
    parse_resource,
    resource_int,
    status_request,
)
from gcsstream.sources import ChunkSource
from gcsstream.transport import HTTPTransport, Response
from gcsstream.window import ChunkWindow, StreamedBody

T = TypeVar("T")


@dataclass(frozen=True)
class UploadResult:
    """The object the service created, checked against what was read."""

    bucket: str
    name: str
    generation: int
    size: int
    crc32c: str | None
    md5: str | None
    seconds: float
    #: The checksums compared with the service's (and sent in X-Goog-Hash): "crc32c", "md5".
    verified: tuple[str, ...]
    resource: dict[str, Any] = field(repr=False)
    #: A parallel upload: the number of parts composed into the object (None: one stream).
    parts: int | None = None

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @property
    def bytes_per_second(self) -> float:
        return self.size / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The fields of the one-line summary, for ``--json``."""
        return {
            "object": self.url,
            "generation": self.generation,
            "bytes": self.size,
            "crc32c": self.crc32c,
            "md5": self.md5,
            "verified": list(self.verified),
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.bytes_per_second / 1e6, 2),
            **({"parts": self.parts} if self.parts is not None else {}),
        }


@dataclass(frozen=True)
class Resume:
    """Continue an existing session instead of starting one."""

    session_uri: str
    #: ``(length, crc32c)`` of a prefix recorded earlier (the journal's); the input must match it.
    verify: tuple[int, int] | None = None
    #: ``(length, crc32c)`` of longer prefixes that went out unconfirmed (a streamed request's):
    #: the longest that the service holds is checked instead, since it holds only bytes sent.
    sent: tuple[tuple[int, int], ...] = ()

    def evidence(self, held: int) -> tuple[int, int] | None:
        """The longest recorded prefix that the ``held`` bytes must begin with."""
        confirmed = self.verify[0] if self.verify else 0
        longer = [pair for pair in self.sent if confirmed < pair[0] <= held]
        return max(longer) if longer else self.verify


class SessionRecorder(Protocol):
    """Told where an upload stands, so that it can be resumed by another process (the journal).

    A recorder that writes in the background may also have ``flush()``: the engine calls it as the
    run ends, since another process may take the upload over once this one is done. It may have
    ``sent(offset, crc32c)``: a streamed request, confirmed only at its end, has sent that prefix
    (a resume checks it against the input when the service holds at least that much).
    """

    def started(self, session_uri: str) -> None:
        """The session exists; called before the first byte is sent."""

    def persisted(self, offset: int, crc32c: int) -> None:
        """The service confirmed the first ``offset`` bytes, whose CRC32C is ``crc32c``."""

    def finished(self) -> None:
        """The upload completed, or was cancelled: nothing is left to resume."""


class Uploader:
    """Uploads sources to objects through one transport with one set of options."""

    def __init__(
        self,
        transport: HTTPTransport,
        options: UploadOptions | None = None,
        *,
        on_event: EventCallback | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._options = options or UploadOptions()
        self._on_event = on_event
        self._sleep = sleep
        self._clock = clock

    @property
    def transport(self) -> HTTPTransport:
        """Where this uploader's requests go."""
        return self._transport

    def upload(
        self,
        source: ChunkSource,
        destination: ObjectURL,
        metadata: ObjectMetadata | None = None,
        *,
        recorder: SessionRecorder | None = None,
        resume: Resume | None = None,
    ) -> UploadResult:
        """Upload everything ``source`` produces to ``destination``; return the checked object.

        With ``resume``, continue that session: the bytes the service holds are read from the
        source and checksummed (never resent), and must match ``resume.verify`` if given.
        """
        opts = self._options
        started = self._clock()
        expected = opts.expected_size if opts.expected_size is not None else source.size
        checksums = Checksums(md5=opts.use_md5)
        window = ChunkWindow(source, opts.chunk_size, checksums, expected_size=expected)
        session = ResumableSession(
            initiate_url(
                self._transport.endpoint,
                destination,
                if_generation_match=opts.if_generation_match,
                user_project=self._transport.user_project,
            ),
            window,
            opts.chunk_size,
            verify_crc32c=opts.use_crc32c,
            verify_md5=opts.use_md5,
        )
        resource = (metadata or ObjectMetadata()).resource(destination.name)
        try:
            if resume is None:
                initiate = session.prepare_initiate(resource, expected)
                self._retrying(lambda _: session.process_initiate(self._send(initiate, destination)))
                window.start()
                resumed_at = 0
            else:
                session.attach(resume.session_uri, str(resource.get("contentType")), expected)
                resumed_at = self._attach(session, window, resume, destination)
            if recorder is not None:
                recorder.started(str(session.resumable_url))
                if resume is not None and resumed_at:  # held and checked: the journal's now
                    recorder.persisted(*window.confirmed)
            self._emit(UploadStarted(str(destination), expected, opts.chunk_size, resumed_at))
            while not session.finished:
                self._retrying(
                    lambda retried: self._transmit_next_chunk(session, retried, destination, recorder),
                    progress=lambda: window.confirmed[0],
                )
                window.release(session.bytes_uploaded)
                if recorder is not None:
                    recorder.persisted(*window.confirmed)
                self._emit(ChunkPersisted(session.bytes_uploaded, window.bytes_read, expected))
        except PrefixMismatch:
            raise  # the wrong input was given to resume: leave the session as it is
        except SourceError as exc:
            self._discard(session, destination, recorder)
            raise SourceError(f"{exc}; the upload was cancelled and no object was created") from None
        except IntegrityError as exc:
            outcome = self._discard(session, destination, recorder)
            raise IntegrityError(f"{exc}{outcome}") from None
        except common.InvalidResponse as exc:
            raise ServiceError(f"unexpected answer from the service: {redact(str(exc))}") from None
        finally:
            window.close()
            flush = getattr(recorder, "flush", None)
            if flush is not None:
                with contextlib.suppress(GcsstreamError):  # a failure already being raised matters more
                    flush()
        if recorder is not None:
            recorder.finished()
        stored = session.resource or {}
        result = UploadResult(
            bucket=destination.bucket,
            name=destination.name,
            generation=resource_int(stored, "generation") or 0,
            size=window.total or 0,
            crc32c=stored.get("crc32c"),
            md5=stored.get("md5Hash"),
            seconds=self._clock() - started,
            verified=tuple(name for name, on in (("crc32c", opts.use_crc32c), ("md5", opts.use_md5)) if on),
            resource=stored,
        )
        self._emit(UploadFinished(result))
        return result

    # -- sessions -------------------------------------------------------------------------------

    def session_status(self, session_uri: str, destination: ObjectURL) -> int | dict[str, Any]:
        """The bytes an unfinished session holds, or the object resource once it has finished."""
        response = self._retrying(
            lambda _: self._readable(self._send(status_request(session_uri), destination))
        )
        held = held_bytes(response)
        return parse_resource(response) if held is None else held

    def cancel(self, session_uri: str, destination: ObjectURL) -> bool:
        """Cancel a session on the service; False if the service no longer knew it."""
        try:
            response = self._transport.request("DELETE", session_uri)
        except RETRYABLE_EXCEPTIONS as exc:
            raise TransientError(
                f"cancelling the upload to {destination}: {describe_network_error(exc)}"
            ) from None
        if response.status_code in (404, 410):
            return False
        if response.status_code not in (200, 204, 499):
            raise self._error_for(response, "DELETE", {}, destination)
        return True

    # -- steps ----------------------------------------------------------------------------------

    def _attach(
        self, session: ResumableSession, window: ChunkWindow, resume: Resume, destination: ObjectURL
    ) -> int:
        """Ask an existing session what it holds; skip that much of the input, checking it."""
        response = self._retrying(lambda _: self._readable(self._send(session.prepare_status(), destination)))
        held = session.process_resume_status(response, resume.verify[0] if resume.verify else 0)
        if held is None:  # it had finished: check the whole input against the object
            held = resource_int(parse_resource(response), "size") or 0
            window.begin_at(held, verify=resume.evidence(held))
            window.start()
            if window.read(1):
                raise PrefixMismatch(
                    f"the upload had already finished with {held} bytes, but the input is longer"
                )
            session.process_status(response)
            return held
        if resume.verify is not None and resume.verify[0] > held:
            raise ServiceError(
                f"the service holds {held} bytes of {destination}, fewer than the {resume.verify[0]} "
                "it had confirmed; start the upload again"
            )
        window.begin_at(held, verify=resume.evidence(held))
        window.start()
        window.wait_skipped()  # a wrong input is refused here, before anything is sent
        return held

    def _transmit_next_chunk(
        self,
        session: ResumableSession,
        resync: bool,
        destination: ObjectURL,
        recorder: SessionRecorder | None,
    ) -> None:
        """Send the next chunk; after a failure, first ask the session what it holds (and record
        it: a run that then gives up says, and journals, what the service holds)."""
        try:
            if resync:
                confirmed = session.window.confirmed[0]
                session.process_status(self._send(session.prepare_status(), destination))
                if session.finished:
                    return  # the final chunk had arrived; only its answer was lost
                if recorder is not None and session.window.confirmed[0] > confirmed:
                    recorder.persisted(*session.window.confirmed)
            request = session.prepare_chunk()
            payload = request[2]
            size = len(payload or b"")
            before = session.bytes_uploaded
            if isinstance(payload, StreamedBody):  # progress as its pieces go out
                payload.observer = lambda end: self._streamed_to(end, session.window, recorder)
            else:
                self._emit(ChunkSending(before, before + size))
            session.process_chunk(self._send(request, destination), size)
        except UnreadableAnswer as exc:  # the object may exist: ask the session again
            raise Retryable(str(exc)) from None
        if not session.finished and session.bytes_uploaded <= before:
            # An answer that confirms nothing is no progress: it counts as a failed attempt, so
            # a server that never moves on meets --retry-deadline instead of being fed forever.
            raise Retryable(
                f"the service kept none of the {size} bytes sent"
                if size
                else "the service did not finish the upload"
            )

    def _streamed_to(self, end: int, window: ChunkWindow, recorder: SessionRecorder | None) -> None:
        """A streamed request has handed its bytes up to ``end`` to the socket."""
        self._emit(BytesSent(end))
        sent = getattr(recorder, "sent", None)
        if sent is not None and (mark := window.mark_at_or_below(end)) is not None:
            sent(*mark)

    @staticmethod
    def _readable(response: Response) -> Response:
        """A status answer whose object resource cannot be read is asked again."""
        if response.status_code in (200, 201):
            try:
                parse_resource(response)
            except UnreadableAnswer as exc:
                raise Retryable(str(exc)) from None
        return response

    def _retrying(self, attempt: Callable[[bool], T], progress: Callable[[], int] | None = None) -> T:
        """Run ``attempt(retried)`` until it succeeds, a permanent error, or the deadline.

        ``progress`` counts the bytes confirmed: a failure after progress (lost answers whose
        bytes a status query confirmed) starts a new run of failures, as for downloads."""
        opts = self._options
        return run_with_retries(
            attempt,
            transient=retryable,
            initial=opts.retry_initial_delay,
            maximum=opts.retry_max_delay,
            deadline=opts.retry_deadline,
            on_retry=lambda failure, delay, attempts: self._emit(Retrying(failure.reason, delay, attempts)),
            progress=progress,
            sleep=self._sleep,
            clock=self._clock,
        )

    def _send(self, request: Request, destination: ObjectURL) -> Response:
        """One HTTP exchange; transient failures become ``Retryable``, others typed errors."""
        method, url, payload, headers = request
        response = exchange(
            self._transport, method, url, what=str(destination), data=payload, headers=headers
        )
        if response.status_code >= 400:
            raise self._error_for(response, method, headers, destination)
        return response

    def _error_for(
        self, response: Response, method: str, headers: dict[str, str], destination: ObjectURL
    ) -> GcsstreamError:
        """The typed error for a final answer, worded after what the request was and asked for."""
        status = response.status_code
        message = service_message(response)
        initiating = method == "POST"
        if status == 400 and "X-Goog-Hash" in headers and is_hash_mismatch(message):
            return IntegrityError(f"the service refused {destination}: {message} (no object was created)")
        if status == 400:
            what = "starting the upload of" if initiating else "a request of the upload to"
            return ServiceError(f"the service refused {what} {destination} (400): {message}")
        if status == 404 and initiating:
            return NotFoundError(f"bucket gs://{destination.bucket} not found ({message})")
        if status in (404, 410):
            return NotFoundError(f"the upload session for {destination} no longer exists ({status})")
        if status == 412:
            match = self._options.if_generation_match
            if match == 0:
                return PreconditionError(f"{destination} already exists (no-clobber)")
            if match is None:
                return PreconditionError(
                    f"the service answered 412 (precondition failed) for {destination}, though no "
                    f"precondition was given: {message}"
                )
            return PreconditionError(f"{destination} is not at generation {match} ({message})")
        if status in (401, 403):
            return AuthError(f"access to {destination} denied ({status}): {message}")
        return error_for_status(status, f"{status} from the service for {destination}: {message}")

    def _discard(
        self, session: ResumableSession, destination: ObjectURL, recorder: SessionRecorder | None
    ) -> str:
        """After a source or integrity failure: cancel the session, or delete the bad object.

        Returns what became of a bad object, for the error message: it must not stay unnoticed
        (an account that may create objects but not delete them gets a 403 here).
        """
        if recorder is not None:
            recorder.finished()
        if session.resource is not None and "generation" in session.resource:
            generation = session.resource["generation"]
            if not session.created_here:
                return f"; {destination}#{generation} was not created by this run and was left as it is"
            if not session.proven_wrong:
                return f"; {destination}#{generation} could not be checked and was left as it is"
            url = object_url(
                self._transport.endpoint,
                destination,
                generation=generation,
                user_project=self._transport.user_project,
            )
            try:
                status = self._transport.request("DELETE", url).status_code
            except Exception as exc:  # noqa: BLE001 - reported below; the integrity error matters most
                status, why = None, describe_network_error(exc)
            else:
                why = f"{status} from the service"
            if status is not None and (200 <= status < 300 or status == 404):
                return "; the bad object was deleted"
            return f"; the bad object {destination}#{generation} could not be deleted ({why}): delete it"
        if session.resumable_url is not None:
            try:
                method, url, _, headers = session.prepare_cancel()
                self._transport.request(method, url, headers=headers)
            except Exception:  # noqa: BLE001 - best effort: an unfinished session creates nothing
                pass
        return ""

    def _emit(self, event: Any) -> None:
        if self._on_event is not None:
            self._on_event(event)
