"""Reading an object back: streamed to a sink, checksummed as it goes, resumed after failures.

The generation is pinned when the download starts, so a resumed download cannot splice two
versions together. The stored bytes are what is checksummed (a gzip-encoded object is fetched
as stored and, unless ``raw``, decompressed on the way out). A whole-object download is checked
against the object's CRC32C (or MD5): a mismatch is an ``IntegrityError``, exit 3.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import google_crc32c
import requests

from gcsstream.checksums import encode_crc32c
from gcsstream.errors import (
    IntegrityError,
    NotFoundError,
    TransientError,
    UsageError,
    error_for_status,
    service_message,
)
from gcsstream.options import ObjectURL, UploadOptions
from gcsstream.retry import (
    RETRYABLE_EXCEPTIONS,
    RETRYABLE_STATUSES,
    Backoff,
    describe_network_error,
    retry_after_seconds,
)
from gcsstream.transport import Transport

PIECE = 1 << 20


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


@dataclass(frozen=True)
class DownloadResult:
    url: str
    generation: int
    size: int  # bytes of the object (or the range) received
    crc32c: str | None
    verified: tuple[str, ...]
    seconds: float


class Downloader:
    """Streams objects through one transport, with the upload engine's retry rules."""

    def __init__(
        self,
        transport: Transport,
        options: UploadOptions | None = None,
        *,
        on_progress: Callable[[int], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._options = options or UploadOptions()
        self._on_progress = on_progress
        self._sleep = sleep
        self._clock = clock

    def object_resource(self, source: ObjectURL) -> dict[str, Any]:
        response = self._get(self._object_url(source), {})
        return json.loads(response.content)

    def download(
        self,
        source: ObjectURL,
        sink: BinaryIO,
        *,
        byte_range: tuple[int, int | None] | None = None,
        raw: bool = False,
    ) -> DownloadResult:
        started = self._clock()
        resource = self.object_resource(source)
        generation = int(resource["generation"])
        size = int(resource["size"])
        first, last = byte_range or (0, None)
        if first < 0:
            first = max(0, size + first)
        last = size - 1 if last is None or last >= size else last
        whole = first == 0 and last == size - 1
        gzip = resource.get("contentEncoding") == "gzip" and not raw
        if gzip and not whole:
            raise UsageError("a byte range of a gzip-encoded object needs --raw (the stored bytes)")
        crc = 0
        md5 = hashlib.md5(usedforsecurity=False) if self._options.use_md5 else None
        inflate = zlib.decompressobj(wbits=31) if gzip else None
        offset = first
        url = self._object_url(source, media=True, generation=generation)
        backoff = self._backoff()
        while offset <= last:
            headers = {"Accept-Encoding": "gzip", "Range": f"bytes={offset}-{last}"}
            try:
                response = self._get(url, headers, stream=True)
                # read1, not stream(): stream() waits to fill each piece, so a broken connection
                # would lose the bytes of the piece in progress and resume earlier than it reached.
                while piece := response.raw.read1(PIECE, decode_content=False):
                    crc = google_crc32c.extend(crc, piece)
                    if md5 is not None:
                        md5.update(piece)
                    sink.write(inflate.decompress(piece) if inflate else piece)
                    offset += len(piece)
                    if self._on_progress is not None:
                        self._on_progress(offset - first)
                response.close()
                if offset <= last:
                    raise requests.ConnectionError("the response ended early")
            except RETRYABLE_EXCEPTIONS + (_Transient,) as exc:
                reason = exc.reason if isinstance(exc, _Transient) else describe_network_error(exc)
                delay = backoff.next_delay(getattr(exc, "retry_after", None))
                if delay is None:
                    raise TransientError(
                        f"gave up reading {source} at byte {offset} after {backoff.elapsed:.0f} s: {reason}"
                    ) from None
                self._sleep(delay)
                continue
            backoff = self._backoff()  # progress made: a new run of failures starts afresh
        if inflate is not None:
            sink.write(inflate.flush())
        sink.flush()
        verified = self._verify(source, resource, crc, md5) if whole else ()
        return DownloadResult(
            url=str(source),
            generation=generation,
            size=offset - first,
            crc32c=encode_crc32c(crc) if whole else None,
            verified=verified,
            seconds=self._clock() - started,
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

    def _get(self, url: str, headers: dict[str, str], *, stream: bool = False) -> requests.Response:
        response = self._transport.request("GET", url, headers=headers, stream=stream)
        if response.status_code in RETRYABLE_STATUSES:
            response.close()
            raise _Transient(
                f"{response.status_code} from the service", retry_after_seconds(response.headers)
            )
        if response.status_code == 404:
            raise NotFoundError(f"{_name_of(url)} not found")
        if response.status_code >= 400:
            raise error_for_status(
                response.status_code,
                f"{response.status_code} reading {_name_of(url)}: {service_message(response)}",
            )
        return response

    def _object_url(self, source: ObjectURL, *, media: bool = False, generation: int | None = None) -> str:
        bucket = urllib.parse.quote(source.bucket, safe="")
        name = urllib.parse.quote(source.name, safe="")
        query: dict[str, str] = {}
        if media:
            query["alt"] = "media"
        if generation is not None:
            query["generation"] = str(generation)
        if self._transport.user_project:
            query["userProject"] = self._transport.user_project
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{self._transport.endpoint}/storage/v1/b/{bucket}/o/{name}{suffix}"

    def _backoff(self) -> Backoff:
        opts = self._options
        return Backoff(opts.retry_initial_delay, opts.retry_max_delay, opts.retry_deadline, self._clock)


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _name_of(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    bucket, _, name = path.partition("/storage/v1/b/")[2].partition("/o/")
    return f"gs://{urllib.parse.unquote(bucket)}/{urllib.parse.unquote(name)}"
