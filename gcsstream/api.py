"""The library's front door: ``open_upload`` (a writable file object) and ``upload``.

Both run the one engine (``Uploader``) that the command line runs, with the command line's
options as keyword arguments. A writer feeds the engine through a bounded ``WriterSource``; the
engine runs on a thread of its own, so ``write`` only hands bytes over (and waits when the
upload is two chunks behind: that is the backpressure that bounds memory).
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, BinaryIO

from google.auth import credentials as auth_credentials

from gcsstream import jobs
from gcsstream.engine import SessionRecorder, Uploader, UploadResult
from gcsstream.errors import GcsstreamError, SourceError, UsageError
from gcsstream.events import EventCallback
from gcsstream.journal import Journal, JournalRecorder
from gcsstream.options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PART_SIZE,
    DEFAULT_RETRY_DEADLINE,
    ChecksumMode,
    ObjectMetadata,
    ParallelOptions,
    UploadOptions,
    parse_gs_url,
    parse_size,
)
from gcsstream.sources import (
    WRITER_BUDGET,
    ChunkSource,
    FileSource,
    IterableSource,
    StreamSource,
    WriterSource,
)
from gcsstream.threads import HelperThread
from gcsstream.transport import Transport, resolve_endpoint

Credentials = str | os.PathLike[str] | auth_credentials.Credentials


@dataclass(frozen=True)
class _Plan:
    """An upload's plan (``jobs.UploadPlan``, the command line's too), with the library's transport
    and progress callback."""

    job: jobs.UploadPlan
    transport: Transport
    progress: EventCallback | None
    #: ``resume=``: the upload being continued (its input is checked against its journal).
    continuing: jobs.Continuing | None = None
    #: A parallel upload (``job.parallel``): a way to open one more connection for each worker.
    connect: Callable[[], Transport] | None = None

    def uploader(self) -> Uploader:
        return Uploader(self.transport, self.job.options, on_event=self.progress)

    def recorder(self, source: ChunkSource) -> JournalRecorder | None:
        """The journal recorder of this upload, if it is journaled; a resumed file upload's input
        must be that file, unchanged (as for ``gcsstream resume``)."""
        if self.continuing is not None:
            self.continuing.check_source(source)
        return self.job.recorder(source)

    def release(self) -> None:
        """Release what the plan holds: the journal entries it claimed, the connection."""
        try:
            self.job.release()
        finally:
            self.transport.close()

    def execute(
        self, source: ChunkSource, recorder: SessionRecorder | None, journaled: JournalRecorder | None
    ) -> UploadResult:
        """Run the upload. A journaled one's errors carry its journal id (``upload_id``) and
        session URI, so that the caller can resume it; its lock is released at the end."""
        if self.job.parallel is not None and self.connect is not None:
            from gcsstream.parallel import ParallelUploader

            parts = self.job.parts_recorder(source)
            try:
                parallel = ParallelUploader(
                    self.connect, self.job.options, self.job.parallel, on_event=self.progress
                )
                result = parallel.upload(
                    self.job.input(source),
                    self.job.destination,
                    self.job.metadata,
                    transport=self.transport,
                    recorder=parts,
                )
            except GcsstreamError as exc:
                jobs.name_unfinished(exc, parts)
                raise
            finally:
                self.job.release()
            jobs.remember_finished(parts, result.resource)
            return result
        try:
            result = self.uploader().upload(
                self.job.input(source),
                self.job.destination,
                self.job.metadata,
                recorder=recorder,
                resume=self.job.resume,
            )
        except GcsstreamError as exc:
            jobs.name_unfinished(exc, journaled, with_session=True)
            raise
        finally:
            self.job.release()
        jobs.remember_finished(journaled, result.resource)  # for `gcsstream status ID`
        return result


#: Keywords that ``resume=`` takes from the journal or the session (the session fixed them).
_FROM_JOURNAL = (
    "checksum",
    "content_type",
    "cache_control",
    "content_encoding",
    "content_disposition",
    "metadata",
    "storage_class",
    "kms_key",
    "if_generation_match",
    "size",
    "session_uri",
    "parallel",
    "part_size",
)


def _transport(
    endpoint: str | None, credentials: Credentials | None, project: str | None, *, anonymous: bool = False
) -> Transport:
    """The library's transport: ``credentials`` a key file, google-auth credentials, or None."""
    if isinstance(credentials, auth_credentials.Credentials):
        return Transport(resolve_endpoint(endpoint)[0], credentials, user_project=project)
    return Transport.connect(
        endpoint,
        credentials_file=os.fspath(credentials) if credentials else None,
        user_project=project,
        anonymous=anonymous and credentials is None,
    )


def _plan(url: str, **options: Any) -> _Plan:
    """Resolve ``open_upload``'s keyword arguments (the one place they are declared)."""
    bound = inspect.signature(open_upload).bind(url, **options)  # unknown names: TypeError
    if bound.arguments.get("resume") is not None:
        return _resume_plan(url, bound.arguments)
    bound.apply_defaults()
    o = SimpleNamespace(**bound.arguments)
    upload_options = UploadOptions(
        chunk_size=parse_size(o.chunk_size),
        checksum=o.checksum,
        if_generation_match=o.if_generation_match,
        retry_deadline=o.retry_deadline,
        expected_size=o.size,
    )
    object_metadata = ObjectMetadata(
        content_type=o.content_type,
        cache_control=o.cache_control,
        content_encoding=o.content_encoding,
        content_disposition=o.content_disposition,
        storage_class=o.storage_class,
        kms_key=o.kms_key,
        metadata=dict(o.metadata or {}),
    )
    parts = ParallelOptions(o.parallel, parse_size(o.part_size))
    if parts.parallel > 1:
        parts.check(upload_options)  # a composed object has no MD5
    transport = _transport(o.endpoint, o.credentials, o.project, anonymous=o.session_uri is not None)
    try:
        destination = parse_gs_url(url)
        journal = None
        if o.journal:
            if o.session_uri:
                raise UsageError("journal=True journals new uploads; a session_uri has no journal")
            journal = Journal()
            journal.check_writable()
        job = jobs.plan_new(
            destination,
            upload_options,
            object_metadata,
            endpoint=transport.endpoint,
            journal=journal,
            session_uri=o.session_uri,
            parallel=parts if parts.parallel > 1 else None,
        )
    except BaseException:
        transport.close()
        raise
    if parts.parallel == 1:
        return _Plan(job, transport, o.progress)
    connect = functools.partial(_transport, o.endpoint, o.credentials, o.project)
    return _Plan(job, transport, o.progress, connect=connect)


def _resume_plan(url: str, given: dict[str, Any]) -> _Plan:
    """``resume=ID`` or ``resume=SESSION_URI``: continue an upload as ``gcsstream resume`` does,
    with its journal's options (a session URI no journal knows: the session's own)."""
    conflicting = sorted(key for key in given if key in _FROM_JOURNAL)
    if conflicting:
        raise UsageError(
            f"resume=ID takes the upload's options from its journal; do not pass {', '.join(conflicting)}"
        )
    journal = Journal()
    job = jobs.continuing(journal, given["resume"], endpoint=given.get("endpoint"))
    try:
        job.check_destination(parse_gs_url(url))
        chunk_size = given.get("chunk_size")
        plan = job.plan(
            chunk_size=parse_size(chunk_size) if chunk_size is not None else None,
            destination=parse_gs_url(url),
            tuning={"retry_deadline": given.get("retry_deadline", DEFAULT_RETRY_DEADLINE)},
        )
        credentials = given.get("credentials")
        endpoint, anonymous = job.connection(
            credentials=credentials is not None, endpoint=given.get("endpoint")
        )
        transport = _transport(endpoint, credentials, given.get("project"), anonymous=anonymous)
    except BaseException:
        job.release()
        raise
    connect = (
        functools.partial(_transport, endpoint, credentials, given.get("project"), anonymous=anonymous)
        if plan.parallel is not None
        else None
    )
    return _Plan(plan, transport, given.get("progress"), job, connect=connect)


class _Upload:
    """What a writer and its engine thread share; the thread holds this, never the writer.

    So a writer dropped without ``close()`` becomes garbage, and its finalizer cancels the upload.
    It is the engine's ``SessionRecorder`` (passing each call on to ``inner``, if any).
    """

    def __init__(self, inner: JournalRecorder | None = None) -> None:
        self.inner = inner
        self.session_uri: str | None = None
        self.open = False  # the session exists and has neither completed nor been cancelled
        self.outcome: UploadResult | BaseException | None = None

    def started(self, session_uri: str) -> None:
        self.session_uri, self.open = session_uri, True
        if self.inner is not None:
            self.inner.started(session_uri)

    def persisted(self, offset: int, crc32c: int) -> None:
        if self.inner is not None:
            self.inner.persisted(offset, crc32c)

    def sent(self, offset: int, crc32c: int) -> None:
        if self.inner is not None:
            self.inner.sent(offset, crc32c)

    def flush(self) -> None:
        if self.inner is not None:
            self.inner.flush()

    def finished(self) -> None:
        self.open = False
        if self.inner is not None:
            self.inner.finished()

    def run(self, plan: _Plan, source: ChunkSource) -> UploadResult:
        """Run the upload; an error it ends with names the session it left open (``session_uri``)."""
        try:
            return plan.execute(source, self, self.inner)
        except GcsstreamError as exc:
            if self.open and exc.session_uri is None:
                exc.session_uri = self.session_uri
            raise


def _run_writer(plan: _Plan, source: WriterSource, upload: _Upload) -> None:
    """The engine thread of an ``ObjectWriter``."""
    try:
        upload.outcome = upload.run(plan, source)
    except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
        upload.outcome = exc
        source.fail(exc)
    finally:
        plan.release()


def _discarded(source: WriterSource) -> None:
    """A writer was garbage-collected without ``close()``: cancel its upload, never finalize it."""
    source.fail(SourceError("the writer was discarded without close()"))


class ObjectWriter(io.BufferedIOBase):
    """A writable binary file whose bytes become one Cloud Storage object.

    ``close()`` finalizes the upload and returns once the object exists and its checksums match
    (``result`` then holds it); an exception inside a ``with`` block cancels the upload, and no
    object is created; so does dropping the writer without ``close()``. Works with
    ``shutil.copyfileobj`` and ``tarfile.open(fileobj=w, mode="w|")``.
    """

    def __init__(self, plan: _Plan) -> None:
        super().__init__()
        self._plan = plan
        self._source = WriterSource(min(plan.job.options.chunk_size, WRITER_BUDGET))
        try:
            self._upload = _Upload(plan.recorder(self._source))
        except BaseException:  # refused before the engine starts: nothing else will release it
            plan.release()
            raise
        self._thread = HelperThread(
            _run_writer, args=(plan, self._source, self._upload), name="gcsstream-upload"
        )
        self._finalizer = weakref.finalize(self, _discarded, self._source)
        self._finalizer.atexit = False  # at exit the engine thread stops with the interpreter
        self._thread.start()

    @property
    def session_uri(self) -> str | None:
        """The resumable session's URI once it exists: a credential, so keep it secret."""
        return self._upload.session_uri

    @property
    def result(self) -> UploadResult | None:
        """The finished object, after a successful ``close()``."""
        outcome = self._upload.outcome
        return outcome if isinstance(outcome, UploadResult) else None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # bytes-like, as for any binary file
        if self.closed:
            raise ValueError("write to a closed upload")
        piece = data if type(data) is bytes else bytes(data)  # the caller may reuse its buffer
        self._source.put(piece)
        return len(piece)

    def close(self) -> None:
        """Finalize: wait until the object exists and is verified; raise if it could not be."""
        if self.closed:
            return
        super().close()
        self._finalizer.detach()
        self._source.end()
        self._thread.join()
        if isinstance(self._upload.outcome, BaseException):
            raise self._upload.outcome

    def abort(self, reason: BaseException | None = None) -> None:
        """Cancel the upload: the session is cancelled and no object is created."""
        if self.closed:
            return
        super().close()
        self._finalizer.detach()
        self._source.fail(reason or SourceError("the upload was aborted"))
        self._thread.join()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()

    def __del__(self) -> None:
        # IOBase would close(), i.e. finalize, a writer that was dropped mid-way: never do that.
        # The finalizer (``_discarded``) cancels it instead.
        pass


def open_upload(
    url: str,
    *,
    chunk_size: int | str = DEFAULT_CHUNK_SIZE,
    checksum: ChecksumMode = "crc32c",
    content_type: str | None = None,
    cache_control: str | None = None,
    content_encoding: str | None = None,
    content_disposition: str | None = None,
    metadata: Mapping[str, str] | None = None,
    storage_class: str | None = None,
    kms_key: str | None = None,
    if_generation_match: int | None = None,
    size: int | None = None,
    retry_deadline: float = DEFAULT_RETRY_DEADLINE,
    endpoint: str | None = None,
    credentials: Credentials | None = None,
    project: str | None = None,
    progress: EventCallback | None = None,
    session_uri: str | None = None,
    journal: bool = False,
    resume: str | None = None,
    parallel: int = 1,
    part_size: int | str = DEFAULT_PART_SIZE,
) -> ObjectWriter:
    """Open ``gs://BUCKET/OBJECT`` for writing; closing the file creates the verified object.

    Args:
        url: the destination, ``gs://BUCKET/OBJECT``.
        chunk_size: bytes per request, a multiple of 256 KiB (int or ``"16MiB"``); memory use is
            about two chunks.
        checksum: ``"crc32c"`` (default), ``"md5"``, ``"both"`` or ``"none"``: computed while
            writing, sent with the final request (the service refuses a mismatch) and verified.
        content_type: default guessed from the object name, else application/octet-stream.
        cache_control, content_encoding, content_disposition, storage_class, kms_key: object
            metadata fields.
        metadata: custom metadata.
        if_generation_match: replace only this generation; 0: the object must not exist.
        size: the exact number of bytes that will be written; anything else fails.
        retry_deadline: seconds to keep retrying a failing request (then ``TransientError``).
        endpoint: default ``$STORAGE_EMULATOR_HOST``, else the real service.
        credentials: a service-account key file, or google-auth credentials; default:
            Application Default Credentials (none against an emulator).
        project: the project billed for requester-pays buckets.
        progress: called with each progress event (see ``gcsstream.events``), on the upload's
            thread: record, don't draw.
        session_uri: continue this existing session: write the whole stream again from its
            start; what the service already holds is checksummed and skipped, not resent.
        journal: keep a resume journal in the command line's state directory (off by default:
            a library should not write state files unasked), locked by this process while it
            runs; an error then carries ``upload_id``, for ``resume=``, and ``gcsstream resume``.
        resume: continue an upload as ``gcsstream resume`` does, named by its journal id
            (``err.upload_id``, or one listed by ``gcsstream sessions``) or by its session URI
            (``err.session_uri``): supply the same input again (a file upload's file,
            unchanged); the held prefix must match the journal's CRC32C, and the object's
            options come from the journal (passing them is refused). A session URI no journal
            knows is continued like ``session_uri=``. Raises ``Busy`` if another process drives it.
        parallel: upload this many parts at once, each over its own connection, then compose
            them (as ``gcsstream put --parallel``): CRC32C only; memory is about ``parallel``
            parts. With ``journal=True`` it is resumable (``resume=`` takes the parts from the
            journal).
        part_size: bytes per part (default 64 MiB), a multiple of 256 KiB.

    Raises ``GcsstreamError`` subclasses (see ``gcsstream.errors``) from ``write`` or ``close``.
    """
    arguments = dict(locals())
    # As ``upload`` passes them: only the options given (a default is no choice), so that
    # ``resume=`` refuses only the options that the journal would override.
    defaults = {name: p.default for name, p in inspect.signature(open_upload).parameters.items()}
    given = {name: value for name, value in arguments.items() if name != "url" and value != defaults[name]}
    return ObjectWriter(_plan(url, **given))


def upload(
    source: str | os.PathLike[str] | BinaryIO | Iterable[bytes], url: str, **options: Any
) -> UploadResult:
    """Upload a file path, a binary file object or an iterable of bytes to ``gs://BUCKET/OBJECT``.

    Returns the verified object (``name``, ``generation``, ``size``, ``crc32c``, ``md5``, and the
    full ``resource``). Takes the keyword arguments of ``open_upload``.
    """
    plan = _plan(url, **options)
    try:
        chunks = _source(source)
        return _Upload(plan.recorder(chunks)).run(plan, chunks)
    finally:
        plan.release()


# help(upload) shows the keyword arguments it takes: open_upload's.
_upload_signature = inspect.signature(upload).replace(
    parameters=[
        *list(inspect.signature(upload).parameters.values())[:2],
        *list(inspect.signature(open_upload).parameters.values())[1:],
    ]
)
upload.__signature__ = _upload_signature  # type: ignore[attr-defined]


def _source(source: str | os.PathLike[str] | BinaryIO | Iterable[bytes]) -> ChunkSource:
    if isinstance(source, (str, os.PathLike)):
        return FileSource(source)
    if hasattr(source, "read"):
        return StreamSource(source, getattr(source, "name", "stream"))  # type: ignore[arg-type]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return IterableSource([bytes(source)], "bytes")
    if isinstance(source, Iterable):
        return IterableSource(source, "iterable")
    raise UsageError(f"cannot upload a {type(source).__name__}: give a path, a binary file or bytes")


__all__ = ["GcsstreamError", "ObjectWriter", "open_upload", "upload"]
