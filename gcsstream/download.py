"""Reading an object back: streamed to a sink, checksummed as it goes, resumed after failures.

The generation is pinned when the download starts, so a resumed download cannot splice two
versions together. The stored bytes are what is checksummed (a gzip-encoded object is fetched
as stored and, unless ``raw``, decompressed on the way out, every member of it). A whole-object
download is checked against the object's CRC32C (or MD5): a mismatch is an ``IntegrityError``,
exit 3. Every answer to a ranged read is checked to carry exactly the bytes asked for, and
failures are retried by the same driver as uploads (``retry.run_with_retries``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gcsstream.checksums import crc32c_extend, encode_crc32c
from gcsstream.errors import (
    Busy,
    IntegrityError,
    NotFoundError,
    OutputClosed,
    ServiceError,
    SinkError,
    UsageError,
    error_for_status,
    service_message,
)
from gcsstream.events import Retrying
from gcsstream.options import ObjectURL, UploadOptions
from gcsstream.retry import (
    RETRYABLE_EXCEPTIONS,
    RETRYABLE_STATUSES,
    Failure,
    HeaderLookup,
    NetworkError,
    Retryable,
    describe_network_error,
    retryable,
    run_with_retries,
)
from gcsstream.session import bucket_url, object_url
from gcsstream.transport import Response, Transport

PIECE = 1 << 20
#: ``download_to_file`` keeps FILE's bytes in ``.FILE`` + this, beside it, until they are verified.
PARTIAL_SUFFIX = ".gcsstream-partial"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_EMPTY_CRC32C = encode_crc32c(0)


def parse_range(text: str) -> tuple[int, int | None]:
    """``START-END`` (inclusive), ``START-`` or ``-N`` (the last N bytes, as a negative start)."""
    start, sep, end = text.partition("-")
    try:
        if not sep:
            raise ValueError
        if not start:
            return -int(end), None
        first = int(start)
        last = int(end) if end else None
    except ValueError:
        raise UsageError(f"not a byte range: {text!r} (examples: 0-1023, 1048576-, -100)") from None
    if first < 0 or (last is not None and last < first):
        raise UsageError(f"not a byte range: {text!r}")
    return first, last


def check_media_answer(
    status: int, headers: HeaderLookup, first: int, last: int, size: int, name: str
) -> None:
    """Refuse an answer to ``Range: bytes=FIRST-LAST`` that does not carry exactly those bytes.

    A 200 (the whole object) is the asked range only when the whole object was asked for; a 206
    must name the asked range in its Content-Range. Otherwise the body would be written as bytes
    it is not.
    """
    asked = f"bytes={first}-{last} of {name}"
    if status == 200:
        if first != 0 or last != size - 1:
            raise ServiceError(f"the service answered a read of {asked} with the whole object (200, not 206)")
    elif status == 206:
        content_range = headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if (
            match is None
            or int(match[1]) != first
            or int(match[2]) != last
            or (match[3] != "*" and int(match[3]) != size)
        ):
            raise ServiceError(f"the service answered a read of {asked} with Content-Range {content_range!r}")
    else:
        raise ServiceError(f"the service answered a read of {asked} with {status}")
    length = headers.get("Content-Length")
    if length is not None and length.strip() != str(last - first + 1):
        raise ServiceError(f"the service answered a read of {asked} with Content-Length {length!r}")


class Gunzip:
    """Decompresses every member of a gzip stream (concatenated .gz files, BGZF, composed logs).

    zlib stops at the end of the first member; the rest is read as further members. Zero bytes
    between members are padding (as gzip(1) allows); anything else is an ``IntegrityError``, never
    dropped. Output comes in pieces of at most ``PIECE`` bytes, so memory stays bounded whatever
    the compression ratio.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._inflate: Any = None  # the member in progress, if any
        self.members = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._inflate is None:
                if self.members:
                    data = data.lstrip(b"\0")
                    if not data:
                        return
                self._inflate = zlib.decompressobj(wbits=31)
            while True:
                try:
                    out = self._inflate.decompress(data, PIECE)
                except zlib.error as exc:
                    where = (
                        f"after gzip member {self.members}" if self.members else "in its first gzip member"
                    )
                    raise IntegrityError(
                        f"the stored bytes of {self._name} are not valid gzip {where} ({exc}); "
                        "--raw writes them as stored"
                    ) from None
                if out:
                    yield out
                if self._inflate.eof:
                    self.members += 1
                    data = self._inflate.unused_data
                    self._inflate = None
                    break
                data = self._inflate.unconsumed_tail
                if not data and len(out) < PIECE:
                    return

    def finish(self) -> None:
        """The stored bytes have ended: a member cut short is an error."""
        if self._inflate is not None:
            raise IntegrityError(f"the stored bytes of {self._name} end inside a gzip member (truncated)")


@dataclass(frozen=True)
class DownloadResult:
    url: str
    generation: int
    size: int  # bytes of the object (or the range) received
    crc32c: str | None
    verified: tuple[str, ...]
    seconds: float
    #: Bytes a ``download_to_file`` took from the partial file of an earlier run (not received again).
    resumed: int = 0
    #: Bytes written out when they differ from those received (a decompressed gzip object).
    written: int | None = None


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where ``download_to_file`` keeps the bytes of ``path`` until they are verified."""
    target = Path(path)
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


@dataclass
class _Prefix:
    """Bytes already in the sink (a partial file's), checksummed: the download continues after them."""

    length: int = 0
    crc: int = 0
    md5: Any = None


class Downloader:
    """Streams objects through one transport, with the upload engine's retry rules."""

    def __init__(
        self,
        transport: Transport,
        options: UploadOptions | None = None,
        *,
        on_start: Callable[[int], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        on_retry: Callable[[Retrying], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._options = options or UploadOptions()
        self._on_start = on_start
        self._on_progress = on_progress
        self._on_retry = on_retry
        self._sleep = sleep
        self._clock = clock

    def object_resource(self, source: ObjectURL) -> dict[str, Any]:
        """The object's metadata (retried like any request). A 404 says whether the bucket or only
        the object is missing when a GET of the bucket can tell."""
        try:
            return self._retrying(lambda _: self._resource_once(source), doing=lambda: f"reading {source}")
        except NotFoundError as exc:
            raise NotFoundError(self._which_is_missing(source) or str(exc)) from None

    def _which_is_missing(self, source: ObjectURL) -> str | None:
        """After a 404 for an object: its bucket's answer, in words (None if it tells nothing)."""
        url = bucket_url(self._transport.endpoint, source.bucket, user_project=self._transport.user_project)
        try:
            response = self._transport.request("GET", url)
            response.close()
        except Exception:  # noqa: BLE001 - only a better message was at stake
            return None
        if response.status_code == 404:
            return f"bucket gs://{source.bucket} not found"
        if response.status_code == 200:
            return f"object {source} not found (the bucket gs://{source.bucket} exists)"
        return None

    def download_to_file(
        self, source: ObjectURL, path: str | os.PathLike[str], *, raw: bool = False
    ) -> DownloadResult:
        """Download to ``path`` through ``partial_path(path)``, renamed over ``path`` only once the
        whole object's checksum matched: a failed or corrupt read never leaves a ``path`` that
        looks whole.

        A partial file left by an earlier (failed) run is continued with a ranged read from its
        end; its bytes are checksummed again, so the check covers them and the new ones. A
        decompressed download (a gzip-encoded object, not ``raw``) starts again from byte 0: its
        checksum is of the stored bytes, which a partial file of decompressed ones cannot give. A
        mismatch removes the partial file (exit 3); any other failure keeps it for the next run.
        """
        started = self._clock()
        target = Path(path)
        if target.is_dir():
            raise UsageError(f"{target} is a directory")
        partial = partial_path(target)
        resource = self.object_resource(source)
        size = _field(resource, "size", source) if "size" in resource else None
        decompress = resource.get("contentEncoding") == "gzip" and not raw
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise SinkError(f"writing {partial}: {exc.strerror or exc}") from None
        with open(fd, "r+b") as sink:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(f"another process is writing {partial}") from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SinkError(f"writing {partial}: it is not a regular file")
            kept = info.st_size if size is not None and not decompress and info.st_size <= size else 0
            try:
                prefix = self._checksum_prefix(sink, kept, partial)
                sink.truncate(kept)
                sink.seek(kept)
                result = self._download(
                    source, resource, sink, raw=raw, sink_name=str(partial), prefix=prefix, started=started
                )
                if not result.verified:
                    raise IntegrityError(
                        f"{source} has no checksum to verify it by ({target} was not written)"
                    )
                with _Sink(sink, str(partial))._errors():
                    sink.flush()
                    os.fsync(fd)
                    os.replace(partial, target)
            except IntegrityError as exc:
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise IntegrityError(f"{exc}; {partial} was removed") from None
        _sync_directory(target.parent)
        return result

    def _checksum_prefix(self, sink: BinaryIO, length: int, name: Path) -> _Prefix:
        """The checksums of the first ``length`` bytes of a partial file, read again."""
        prefix = _Prefix(md5=hashlib.md5(usedforsecurity=False) if self._options.use_md5 else None)
        sink.seek(0)
        while prefix.length < length:
            try:
                piece = sink.read(min(PIECE, length - prefix.length))
            except OSError as exc:
                raise SinkError(f"reading {name}: {exc.strerror or exc}") from None
            if not piece:
                break
            prefix.crc = crc32c_extend(prefix.crc, piece)
            if prefix.md5 is not None:
                prefix.md5.update(piece)
            prefix.length += len(piece)
        return prefix

    def download(
        self,
        source: ObjectURL,
        sink: BinaryIO,
        *,
        byte_range: tuple[int, int | None] | None = None,
        raw: bool = False,
        sink_name: str = "the output",
    ) -> DownloadResult:
        started = self._clock()
        resource = self.object_resource(source)
        return self._download(
            source, resource, sink, byte_range=byte_range, raw=raw, sink_name=sink_name, started=started
        )

    def _download(
        self,
        source: ObjectURL,
        resource: dict[str, Any],
        sink: BinaryIO,
        *,
        byte_range: tuple[int, int | None] | None = None,
        raw: bool,
        sink_name: str,
        started: float,
        prefix: _Prefix | None = None,
    ) -> DownloadResult:
        """Read ``resource``'s object into ``sink``, after the ``prefix`` it already holds."""
        prefix = prefix or _Prefix(md5=hashlib.md5(usedforsecurity=False) if self._options.use_md5 else None)
        generation = _field(resource, "generation", source)
        size = _field(resource, "size", source) if "size" in resource else None
        if size is None and byte_range is not None:
            raise ServiceError(f"the object resource of {source} has no size: a byte range cannot be read")
        gzip = resource.get("contentEncoding") == "gzip" and not raw
        sink_out = _Sink(sink, sink_name)
        inflate = Gunzip(str(source)) if gzip else None
        crc, written = prefix.crc, 0
        md5 = prefix.md5
        url = self._object_url(source, media=True, generation=generation)

        def take(piece: bytes) -> None:
            nonlocal crc, written
            crc = crc32c_extend(crc, piece)
            if md5 is not None:
                md5.update(piece)
            for out in inflate.feed(piece) if inflate is not None else (piece,):
                sink_out.write(out)
                written += len(out)

        if size is None:  # allowed only for an empty object, checked below by its checksums
            received = self._retrying(lambda _: self._read_unsized(url, source, take))
            first, whole = 0, True
        else:
            first, last = byte_range or (prefix.length, None)
            if first < 0:
                first = max(0, size + first)
            last = size - 1 if last is None or last >= size else last
            whole = first == prefix.length and last == size - 1
            if gzip and not whole:
                raise UsageError("a byte range of a gzip-encoded object needs --raw (the stored bytes)")
            if self._on_start is not None:
                self._on_start(max(0, last - first + 1))
            position = [first]

            def fetch(_: bool) -> None:
                self._read_range(url, source, position, last, size, take, first)

            self._retrying(
                fetch,
                progress=lambda: position[0],
                doing=lambda: f"reading {source} at byte {position[0]}",
            )
            received = position[0] - first
        if inflate is not None:
            inflate.finish()
        sink_out.flush()
        if size is None and received:
            raise ServiceError(f"the object resource of {source} has no size, and its media is not empty")
        verified = self._verify(source, resource, crc, md5) if whole else ()
        if size is None and not verified:
            raise ServiceError(f"the object resource of {source} has no size, and no checksum to check")
        return DownloadResult(
            url=str(source),
            generation=generation,
            size=received,
            crc32c=encode_crc32c(crc) if whole else None,
            verified=verified,
            seconds=self._clock() - started,
            resumed=prefix.length,
            written=written if inflate is not None else None,
        )

    def _resource_once(self, source: ObjectURL) -> dict[str, Any]:
        response = self._get(self._object_url(source), {})
        try:
            resource = json.loads(response.content)
        except ValueError:
            raise ServiceError(f"the object resource of {source} is not JSON") from None
        if not isinstance(resource, dict):
            raise ServiceError(f"the object resource of {source} is not a JSON object")
        return resource

    def _read_range(
        self,
        url: str,
        source: ObjectURL,
        position: list[int],
        last: int,
        size: int,
        take: Callable[[bytes], None],
        first: int,
    ) -> None:
        """One GET of ``position[0]..last``; ``position`` advances with every piece taken."""
        if position[0] > last:
            return
        headers = {"Accept-Encoding": "gzip", "Range": f"bytes={position[0]}-{last}"}
        response = self._get(url, headers, stream=True)
        with contextlib.closing(response):
            check_media_answer(response.status_code, response.headers, position[0], last, size, str(source))
            # read1, not stream(): stream() waits to fill each piece, so a broken connection
            # would lose the bytes of the piece in progress and resume earlier than it reached.
            while position[0] <= last:
                piece = response.read1(min(PIECE, last + 1 - position[0]))
                if not piece:
                    raise NetworkError("the media answer ended early")
                take(piece)
                position[0] += len(piece)
                if self._on_progress is not None:
                    self._on_progress(position[0] - first)
            if response.read1(1):
                raise ServiceError(
                    f"the service sent more than the {last + 1 - first} bytes asked of {source}"
                )

    def _read_unsized(self, url: str, source: ObjectURL, take: Callable[[bytes], None]) -> int:
        """The media of an object whose resource has no size: it must be empty (one byte is enough
        to tell)."""
        response = self._get(url, {"Accept-Encoding": "gzip"}, stream=True)
        with contextlib.closing(response):
            if response.status_code != 200:
                raise ServiceError(f"the service answered a read of {source} with {response.status_code}")
            piece = response.read1(1)
        take(piece)
        return len(piece)

    def _retrying(
        self,
        attempt: Callable[[bool], Any],
        *,
        progress: Callable[[], int] | None = None,
        doing: Callable[[], str] | None = None,
    ) -> Any:
        opts = self._options
        on_retry = self._on_retry
        return run_with_retries(
            attempt,
            transient=_transient,
            initial=opts.retry_initial_delay,
            maximum=opts.retry_max_delay,
            deadline=opts.retry_deadline,
            on_retry=None
            if on_retry is None
            else lambda failure, delay, attempts: on_retry(Retrying(failure.reason, delay, attempts)),
            progress=progress,
            doing=doing,
            sleep=self._sleep,
            clock=self._clock,
        )

    def _verify(self, source: ObjectURL, resource: dict[str, Any], crc: int, md5: Any) -> tuple[str, ...]:
        checks = []
        if self._options.use_crc32c and resource.get("crc32c"):
            if encode_crc32c(crc) != resource["crc32c"]:
                raise IntegrityError(
                    f"the bytes read from {source} do not match its crc32c "
                    f"(read {encode_crc32c(crc)}, stored {resource['crc32c']})"
                )
            checks.append("crc32c")
        if md5 is not None:
            ours = base64.b64encode(md5.digest()).decode()
            if not resource.get("md5Hash"):
                raise IntegrityError(f"{source} has no md5Hash to check (a composite object?)")
            if ours != resource["md5Hash"]:
                raise IntegrityError(f"the bytes read from {source} do not match its md5 (read {ours})")
            checks.append("md5")
        return tuple(checks)

    def _get(self, url: str, headers: dict[str, str], *, stream: bool = False) -> Response:
        response = self._transport.request("GET", url, headers=headers, stream=stream)
        if response.status_code in RETRYABLE_STATUSES:
            response.close()
            raise Retryable.from_status(response.status_code, response.headers)
        if response.status_code == 404:
            raise NotFoundError(f"{_name_of(url)} not found")
        if response.status_code >= 400:
            raise error_for_status(
                response.status_code,
                f"{response.status_code} reading {_name_of(url)}: {service_message(response)}",
            )
        return response

    def _object_url(self, source: ObjectURL, *, media: bool = False, generation: int | None = None) -> str:
        transport = self._transport
        return object_url(
            transport.endpoint,
            source,
            media=media,
            generation=generation,
            user_project=transport.user_project,
        )


def _name_of(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    bucket, _, name = path.partition("/storage/v1/b/")[2].partition("/o/")
    return f"gs://{urllib.parse.unquote(bucket)}/{urllib.parse.unquote(name)}"


def _sync_directory(directory: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse to sync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _transient(exc: BaseException) -> Failure | None:
    """What the retry driver may retry: transient statuses and network failures, nothing else."""
    if isinstance(exc, Retryable):
        return retryable(exc)
    if isinstance(exc, RETRYABLE_EXCEPTIONS):
        return Failure(describe_network_error(exc))
    return None


def _field(resource: dict[str, Any], key: str, source: ObjectURL) -> int:
    """A non-negative integer field of an object resource; a clear error when it is not one."""
    value = resource.get(key)
    try:
        number = int(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else -1
    except ValueError:
        number = -1
    if number < 0:
        raise ServiceError(f"the object resource of {source} has no valid {key} ({value!r})")
    return number


class _Sink:
    """The output: a failure to write it is a ``SinkError`` (never a network error to retry)."""

    def __init__(self, sink: BinaryIO, name: str) -> None:
        self._sink = sink
        self._name = name

    def write(self, data: bytes) -> None:
        with self._errors():
            self._sink.write(data)

    def flush(self) -> None:
        with self._errors():
            self._sink.flush()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise OutputClosed(f"{self._name} was closed by its reader") from None
        except OSError as exc:
            raise SinkError(f"writing {self._name}: {exc.strerror or exc}") from None
