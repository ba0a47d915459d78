"""The rules of a resumable session, on top of google-resumable-media's ``ResumableUpload``.

``ResumableUpload`` prepares each request and processes each response without doing I/O; this
subclass adds what the real service needs and the base lacks (the service's resumable-upload
rules: https://cloud.google.com/storage/docs/performing-resumable-uploads):

- a 308 without a Range header means nothing is persisted yet (the base calls it invalid);
- after a 308 whose Range is short of what was sent, the stream is rewound to the persisted
  offset, so the next chunk resends the missing bytes (the base fails "stream is in unexpected
  state" here);
- the final request carries ``X-Goog-Hash`` so the service refuses a corrupted object;
- the returned object is checked for size, CRC32C and MD5 (any mismatch: ``IntegrityError``);
- a status query that finds the upload finished (200/201) completes it;
- a Range beyond the bytes sent is an integrity error; held counts from status queries are taken
  in whole 256 KiB units (``held_bytes``); after a short Range one shorter chunk realigns the
  rest with the window's buffers (no copies);
- whatever a status query confirms (lost answers: the service holds more than we saw) is
  released from the window at once, so the reader can go on however many answers were lost (a
  chunk's own 308 is released by the engine as soon as the attempt returns);
- an object resource that cannot be read (cut short, not JSON) is ``UnreadableAnswer``: the
  object may well exist, so the engine asks again instead of giving up; a missing or malformed
  field is an error, never a crash;
- the session knows whether the object was created by this run's own final request
  (``created_here``) and whether its checks proved it wrong (``proven_wrong``): only both
  together allow deleting it.

The stream is a ``ChunkWindow``; the engine sends what this class prepares.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from google.resumable_media._upload import ResumableUpload

from gcsstream.errors import IntegrityError
from gcsstream.options import CHUNK_QUANTUM, ObjectURL
from gcsstream.transport import Response
from gcsstream.window import ChunkWindow, StreamedBody

Request = tuple[str, str, bytes | StreamedBody | None, dict[str, str]]
_RANGE = re.compile(r"bytes=0-(\d+)$", re.IGNORECASE)


def initiate_url(
    endpoint: str,
    destination: ObjectURL,
    *,
    if_generation_match: int | None = None,
    user_project: str | None = None,
) -> str:
    query = {"uploadType": "resumable"}
    if if_generation_match is not None:
        query["ifGenerationMatch"] = str(if_generation_match)
    if user_project:
        query["userProject"] = user_project
    bucket = urllib.parse.quote(destination.bucket, safe="")
    return f"{endpoint}/upload/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"


def object_url(
    endpoint: str,
    target: ObjectURL,
    *,
    media: bool = False,
    generation: int | str | None = None,
    user_project: str | None = None,
) -> str:
    """The JSON API URL of an object (its resource; ``media``: its bytes; one ``generation``)."""
    query: dict[str, str] = {}
    if media:
        query["alt"] = "media"
    if generation is not None:
        query["generation"] = str(generation)
    if user_project:
        query["userProject"] = user_project
    bucket = urllib.parse.quote(target.bucket, safe="")
    name = urllib.parse.quote(target.name, safe="")
    suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"{endpoint}/storage/v1/b/{bucket}/o/{name}{suffix}"


def compose_url(
    endpoint: str,
    destination: ObjectURL,
    *,
    if_generation_match: int | None = None,
    kms_key: str | None = None,
    user_project: str | None = None,
) -> str:
    """The JSON API URL that composes sources into ``destination`` (the precondition and the KMS
    key apply to the destination)."""
    query: dict[str, str] = {}
    if if_generation_match is not None:
        query["ifGenerationMatch"] = str(if_generation_match)
    if kms_key:
        query["kmsKeyName"] = kms_key
    if user_project:
        query["userProject"] = user_project
    suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
    return object_url(endpoint, destination) + "/compose" + suffix


def list_url(
    endpoint: str, bucket: str, prefix: str, *, page_token: str | None = None, user_project: str | None = None
) -> str:
    """The JSON API URL listing the objects whose names start with ``prefix``."""
    query = {"prefix": prefix}
    if page_token:
        query["pageToken"] = page_token
    if user_project:
        query["userProject"] = user_project
    return f"{endpoint}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?{urllib.parse.urlencode(query)}"


def bucket_url(endpoint: str, bucket: str, *, user_project: str | None = None) -> str:
    """The JSON API URL of a bucket's resource (asked to tell a missing bucket from a missing object)."""
    suffix = f"?{urllib.parse.urlencode({'userProject': user_project})}" if user_project else ""
    return f"{endpoint}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}{suffix}"


def status_request(session_uri: str) -> Request:
    """The status query: an empty PUT with ``Content-Range: bytes */*``."""
    return "PUT", session_uri, None, {"content-range": "bytes */*"}


def held_bytes(response: Response, floor: int = 0) -> int | None:
    """From a status query's answer: where to continue, or None if the upload has finished.

    That is the bytes the session holds, in whole 256 KiB units but never below ``floor`` (what
    was already confirmed): the service persists whole units until the end and ignores bytes
    sent again, so this changes nothing there; gcp-storage-emulator answers an empty session with
    ``bytes=0-0``, which taken literally skips a byte it does not hold (and it then refuses).
    A count below ``floor`` is returned as it is, for the caller to refuse.
    """
    if response.status_code in (200, 201):
        return None
    if response.status_code != 308:
        raise IntegrityError(f"unexpected status {response.status_code} for a status query")
    value = response.headers.get("range")
    match = _RANGE.match(value.strip()) if value else None
    if value and not match:
        raise IntegrityError(f"unexpected Range {value!r} in the answer to a status query")
    held = int(match.group(1)) + 1 if match else 0  # no Range: nothing held yet
    return held if held <= floor else max(floor, held // CHUNK_QUANTUM * CHUNK_QUANTUM)


def is_final_range(content_range: str) -> bool:
    """Whether a chunk's Content-Range (``bytes A-B/TOTAL``, ``bytes */TOTAL``) ends the upload."""
    spec = content_range.removeprefix("bytes ")
    span, _, total = spec.partition("/")
    if total == "*":
        return False
    if span == "*":
        return True
    return int(span.partition("-")[2]) + 1 == int(total)


class UnreadableAnswer(Exception):
    """The service answered 200/201 but its object resource could not be read: ask again."""


def resource_int(resource: dict[str, Any], name: str) -> int | None:
    """An integer field of an object resource (the JSON API sends them as strings), or None if
    it is absent; a malformed value is an error, never a crash."""
    value = resource.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise IntegrityError(f"the service's object resource has a malformed {name}: {str(value)[:40]!r}")
    return int(value)


def parse_resource(response: Response) -> dict[str, Any]:
    """The object resource in a 200/201 answer; ``UnreadableAnswer`` if it is not one."""
    try:
        resource = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        raise UnreadableAnswer("the service's answer to the final request could not be read") from None
    if not isinstance(resource, dict):
        raise UnreadableAnswer("the service's answer to the final request is not an object resource")
    return resource


class ResumableSession(ResumableUpload):
    """One object's resumable session, reading its bytes from a ``ChunkWindow``."""

    def __init__(
        self,
        upload_url: str,
        window: ChunkWindow,
        chunk_size: int,
        *,
        verify_md5: bool = False,
        verify_crc32c: bool = True,
    ) -> None:
        super().__init__(upload_url, chunk_size)
        self._window = window
        self._stream = window
        self._verify_crc32c = verify_crc32c
        self._verify_md5 = verify_md5
        #: The object resource once the service has created the object (even a bad one).
        self.resource: dict[str, Any] | None = None
        self._sent_end = 0  # the end of the furthest chunk sent: no Range may claim more
        self._body: StreamedBody | None = None  # the last streamed request's body
        self._sent_final = False  # this run sent the request that completes the object
        self._last_was_final = False
        #: The object was created by this run's own final request (not found finished).
        self.created_here = False
        #: The object's size or checksums were compared and differ from what was read.
        self.proven_wrong = False

    @property
    def window(self) -> ChunkWindow:
        """The bytes being uploaded (the engine records what it confirms)."""
        return self._window

    # -- initiate -------------------------------------------------------------------------------

    def prepare_initiate(self, resource: dict[str, Any], expected_size: int | None) -> Request:
        content_type = str(resource.get("contentType", "application/octet-stream"))
        return self._prepare_initiate_request(
            self._window, resource, content_type, total_bytes=expected_size, stream_final=False
        )

    def process_initiate(self, response: Response) -> None:
        self._process_initiate_response(response)

    def attach(self, session_uri: str, content_type: str, total: int | None) -> None:
        """Continue an existing session (resume) instead of initiating one."""
        self._resumable_url = session_uri
        self._content_type = content_type
        self._total_bytes = total

    def process_resume_status(self, response: Response, confirmed: int = 0) -> int | None:
        """Where an attached session continues (see ``held_bytes``; ``confirmed`` is what the
        journal recorded), or None when the upload already finished."""
        held = held_bytes(response, confirmed)
        if held is not None:
            self._bytes_uploaded = self._sent_end = held
        return held

    # -- chunks ---------------------------------------------------------------------------------

    def prepare_chunk(self) -> Request:
        """The next chunk from the window; the final one carries ``X-Goog-Hash``."""
        total = self._window.total
        position = self._window.tell()
        if self._total_bytes is None and total is not None and total > position:
            # The reader already reached the end: say the total with the last bytes and save
            # a round trip. (With nothing left, the base sends ``bytes */TOTAL`` by itself.)
            self._total_bytes = total
        elif self._total_bytes is not None and self._total_bytes == position:
            # Every byte is held but the upload is not final (a resume after the closing request
            # was lost). The base cannot say ``bytes */TOTAL`` for a known size; with the size
            # unset it reads the (checked) end of input and does.
            self._total_bytes = None
        chunk_size = self._chunk_size
        streamed_end = self._streamed_end(position)
        if streamed_end:
            # A regular file: one request for all but its last bytes, read from the window as
            # it goes; those last bytes follow in a request of their own, the final one, whose
            # X-Goog-Hash can then be the whole file's.
            self._chunk_size = streamed_end - position
            self._stream = _Streaming(self._window)
        else:
            realign = self._window.bytes_to_boundary(position)
            if realign and realign % CHUNK_QUANTUM == 0:
                # A short Range left us inside a buffer: a shorter (still valid) chunk up to its
                # end puts the following chunks back on buffer boundaries, where they cost no copy.
                self._chunk_size = realign
        try:
            method, url, payload, headers = self._prepare_request()
        finally:
            self._chunk_size = chunk_size
            self._stream = self._window
        self._sent_end = self._sent_so_far()
        if isinstance(payload, StreamedBody):
            self._body = payload  # what it sent counts once its pieces have gone out
        else:
            self._sent_end = max(self._sent_end, position + len(payload))
        self._last_was_final = is_final_range(headers["content-range"])
        if self._last_was_final:
            self._sent_final = True
            goog_hash = self._window.checksums.goog_hash_header(
                crc32c=self._verify_crc32c, md5=self._verify_md5
            )
            if goog_hash:
                headers["X-Goog-Hash"] = goog_hash
        return method, url, payload, headers

    def process_chunk(self, response: Response, bytes_sent: int) -> None:
        self._process_resumable_response(response, bytes_sent)

    def _process_resumable_response(self, response: Response, bytes_sent: int) -> None:
        if response.status_code in (200, 201):
            # Only an answer to our own final request means that we created the object; a chunk
            # answered with the object found the upload finished by someone else.
            self.created_here = self._last_was_final
        if response.status_code == 308 and "range" not in response.headers:
            self._bytes_uploaded = 0  # the service's way of saying "nothing persisted yet"
        else:
            super()._process_resumable_response(response, bytes_sent)
        if response.status_code == 308:
            self._check_not_beyond_sent()
            self._window.seek(self._bytes_uploaded)  # resend whatever was not persisted

    # -- status query (after a failure) ---------------------------------------------------------

    def prepare_status(self) -> Request:
        return self._prepare_recover_request()

    def process_status(self, response: Response) -> None:
        if response.status_code in (200, 201):
            # Finished: by our own final request whose answer was lost, or (if we never sent
            # one, e.g. when resuming) by someone else.
            self.created_here = self._sent_final
            self._invalid = False
            self._finished = True
            self._validate_checksum(response)
            self._bytes_uploaded = self._window.total or 0
            return
        # The base's _process_recover_response, but in whole units above what was confirmed (a
        # chunk's own 308 may have confirmed an odd offset): see ``held_bytes``.
        resend_from = held_bytes(response, self._window.confirmed[0])
        assert resend_from is not None  # 200/201 handled above
        self._bytes_uploaded = resend_from
        self._check_not_beyond_sent()
        self._window.seek(resend_from)
        self._window.release(resend_from)  # lost answers: the service holds more than we saw
        self._invalid = False

    def _streamed_end(self, position: int) -> int:
        """Where a streamed request from ``position`` ends (0: send a chunk): the last whole 256
        KiB unit before the end of a streamed window's input. Every request of a streamed window
        but the final one is streamed, since the buffers below its oldest one are gone."""
        total = self._total_bytes
        if not self._window.streamed or total is None:
            return 0
        end = (total - 1) // CHUNK_QUANTUM * CHUNK_QUANTUM
        return end if end > position else 0

    def _sent_so_far(self) -> int:
        """The end of the furthest byte sent (of a streamed body: handed to the socket)."""
        return max(self._sent_end, self._body.handed_out if self._body is not None else 0)

    def _check_not_beyond_sent(self) -> None:
        """A Range past the bytes sent would release (and journal) bytes the service never saw."""
        sent = self._sent_so_far()
        if self._bytes_uploaded > sent:
            raise IntegrityError(
                f"the service reports {self._bytes_uploaded} bytes persisted, but only {sent} were sent"
            )

    # -- cancel ---------------------------------------------------------------------------------

    def prepare_cancel(self) -> Request:
        return "DELETE", self.resumable_url, None, {}

    # -- the finished object --------------------------------------------------------------------

    # The base's hooks for reading an answer (google-resumable-media's requests flavour has the
    # same three; that module imports requests, which start-up cannot afford).

    @staticmethod
    def _get_status_code(response: Response) -> int:
        # The service may answer a completed upload with 201 as well as 200; the base knows 200.
        return 200 if response.status_code == 201 else response.status_code

    @staticmethod
    def _get_headers(response: Response) -> Any:
        return response.headers

    @staticmethod
    def _get_body(response: Response) -> bytes:
        return response.content

    def _validate_checksum(self, response: Response) -> None:
        try:
            resource = parse_resource(response)
        except UnreadableAnswer:
            self._finished = False  # not known to be finished until an answer says so readably
            raise
        self.resource = resource
        resource_int(resource, "generation")  # malformed: an error here, not a crash later
        total = self._window.total
        if total is None:  # the upload was finished by someone else before we read everything
            raise IntegrityError(
                f"the upload was finished by another request or process before all the input was "
                f"read ({self._window.bytes_read} bytes so far): it cannot be checked"
            )
        checksums = self._window.checksums
        expected: list[tuple[str, str | None, Any]] = []
        if self._verify_crc32c:
            expected.append(("crc32c", checksums.crc32c_b64, resource.get("crc32c")))
        if self._verify_md5:
            expected.append(("md5Hash", checksums.md5_b64, resource.get("md5Hash")))
        size = resource_int(resource, "size")
        if size is None and total == 0 and expected and all(ours == theirs for _, ours, theirs in expected):
            size = 0  # some servers omit the size of an empty object; its checksums agree
        if size is None:
            raise IntegrityError(f"the service's object resource has no size ({total} bytes were read)")
        if size != total:
            self.proven_wrong = True
            raise IntegrityError(f"the service stored {size} bytes but {total} were read")
        for field, ours, theirs in expected:
            if theirs is None:
                raise IntegrityError(f"the service's object resource has no {field} to check")
            if ours != theirs:
                self.proven_wrong = True
                raise IntegrityError(f"{field} mismatch: read {ours}, the service stored {theirs}")


class _Streaming:
    """The window as the base reads a streamed request from it: ``read`` gives a lazy body."""

    def __init__(self, window: ChunkWindow) -> None:
        self._window = window

    def tell(self) -> int:
        return self._window.tell()

    def read(self, n: int) -> StreamedBody | bytes:
        return self._window.stream(n)
