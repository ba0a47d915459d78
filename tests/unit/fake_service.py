"""An in-process model of the service's resumable-upload rules, as a transport for the engine.

It answers like the real service (not like the emulators): it may keep fewer bytes than sent,
answers 308 without Range when it holds nothing, checks X-Goog-Hash on the final request, and
ignores resent bytes. Tests script faults per request kind.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import google_crc32c
import requests
from requests.structures import CaseInsensitiveDict

QUANTUM = 256 * 1024
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")


def response(status: int, body: object = b"", headers: dict[str, str] | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.headers = CaseInsensitiveDict(headers or {})
    r._content = json.dumps(body).encode() if isinstance(body, dict) else body  # type: ignore[assignment]
    r.reason = {200: "OK", 308: "Resume Incomplete"}.get(status, "Error")
    return r


@dataclass
class Call:
    """One request the engine made."""

    method: str
    url: str
    headers: dict[str, str]
    size: int
    kind: str  # initiate, chunk, final, status, cancel, delete


@dataclass
class Session:
    bucket: str
    name: str
    resource: dict
    data: bytearray = field(default_factory=bytearray)
    total: int | None = None
    cancelled: bool = False
    finished: dict | None = None


class FakeService:
    endpoint = "https://storage.test"
    user_project: str | None = None

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, dict]] = {}
        self.sessions: dict[str, Session] = {}
        self.calls: list[Call] = []
        self.buckets = {"bkt"}
        self.honor_goog_hash = True  # False: like an emulator that ignores X-Goog-Hash
        self.corrupt_on_store = False  # flip a byte when creating the object
        self.corrupt_next_chunk = False  # flip a byte of the next chunk body as it arrives
        self._faults: dict[str, deque[Callable[[Call, Session | None], object]]] = {}
        self._ids = itertools.count(1)
        self._generations = itertools.count(1000)
        #: Called with each chunk Call before it is answered (for tests that watch timing).
        self.on_chunk: Callable[[Call], None] | None = None
        #: The length of each streamed request body (one for most of a regular file).
        self.streamed_sizes: list[int] = []
        self.lock = threading.Lock()

    # -- scripting ------------------------------------------------------------------------------

    def fail(self, kind: str, *actions: object) -> None:
        """Queue actions for the next requests of ``kind`` ("chunk" counts final ones too).

        An action is an int status, an exception to raise, ``("keep", n)`` to persist only n
        bytes of the chunk, ``("retry-after", status, seconds)``, or a callable(call, session).
        Kind "stream" takes ``("cut", n)`` (or None) for the next streamed requests.
        """
        queue = self._faults.setdefault(kind, deque())
        for action in actions:
            queue.append(
                action if callable(action) and not isinstance(action, BaseException) else _as_fault(action)
            )

    def kinds(self) -> list[str]:
        return [c.kind for c in self.calls]

    # -- the transport interface -----------------------------------------------------------------

    def request(self, method, url, *, data=None, headers=None) -> requests.Response:
        headers = dict(headers or {})
        lower = {k.lower(): v for k, v in headers.items()}
        parsed = urllib.parse.urlparse(url)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        body = data or b""
        if hasattr(body, "pieces"):  # a streamed body: taken piece by piece, as a socket would
            return self._streamed(method, url, headers, body)
        if method == "POST" and parsed.path.startswith("/upload/"):
            call = Call(method, url, headers, len(body), "initiate")
            return self._answer(call, None, lambda _: self._initiate(parsed.path, query, body, lower))
        if method == "DELETE" and "upload_id" in query:
            session = self.sessions.get(query["upload_id"])
            call = Call(method, url, headers, 0, "cancel")
            self.calls.append(call)
            if session is None or session.cancelled:
                return response(404)
            session.cancelled = True
            return response(499)
        if method == "DELETE":
            match = re.match(r"/storage/v1/b/([^/]+)/o/(.+)$", parsed.path)
            key = (match.group(1), urllib.parse.unquote(match.group(2)))
            return self._answer(
                Call(method, url, headers, 0, "delete"),
                None,
                lambda _: response(204) if self.objects.pop(key, None) else response(404),
            )
        session = self.sessions.get(query.get("upload_id", ""))
        content_range = lower.get("content-range", "")
        kind = "status" if content_range == "bytes */*" else "chunk"
        m = _RANGE.match(content_range)
        if kind == "chunk" and (
            content_range.startswith("bytes */") or m and m.group(3) == str(int(m.group(2)) + 1)
        ):
            kind = "final"
        call = Call(method, url, headers, len(body), kind)
        if kind == "chunk" and self.on_chunk:
            self.on_chunk(call)
        if session is None or session.cancelled:
            self.calls.append(call)
            return response(410 if session else 404)
        if kind == "status":
            return self._answer(call, session, lambda _: self._status(session))
        return self._answer(
            call, session, lambda keep: self._chunk(session, content_range, bytes(body), lower, keep)
        )

    def _streamed(self, method, url, headers, body) -> requests.Response:
        """A streamed request: its pieces are copied as they come (the window reuses buffers once
        a piece is sent); a ``("cut", n)`` fault takes only n bytes and then resets."""
        queue = self._faults.get("stream")
        cut = queue.popleft()(None, None) if queue else None
        received, have = [], 0
        self.streamed_sizes.append(len(body))
        for piece in body.pieces():
            received.append(bytes(piece))
            have += len(piece)
            if isinstance(cut, Cut) and have >= cut.n:
                break
        data = b"".join(received)
        if isinstance(cut, Cut):
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(url).query))
            session = self.sessions.get(query["upload_id"])
            start = int(headers["content-range"].split()[1].split("-")[0])
            kept = (start + cut.keep) // QUANTUM * QUANTUM  # whole units of what came, or fewer
            if session is not None and kept > len(session.data) >= start:
                session.data += data[len(session.data) - start : kept - start]
            self.calls.append(Call(method, url, dict(headers), cut.n, "chunk"))
            raise ConnectionResetError("connection reset by peer (injected, mid-request)")
        return self.request(method, url, data=data, headers=headers)

    # -- the service's rules ---------------------------------------------------------------------

    def _answer(self, call: Call, session: Session | None, handler) -> requests.Response:
        """Apply the next scripted fault for this kind of request, then the service's rules."""
        self.calls.append(call)
        keep = None
        kinds = (call.kind, "chunk") if call.kind == "final" else (call.kind,)
        queue = next((self._faults[k] for k in kinds if self._faults.get(k)), None)
        if queue:
            result = queue.popleft()(call, session)
            if isinstance(result, Keep):
                keep = result.n
            elif result is not None:
                return result
        return handler(keep)

    def _initiate(self, path: str, query: dict, body: bytes, headers: dict) -> requests.Response:
        bucket = urllib.parse.unquote(path.split("/")[5])
        if bucket not in self.buckets:
            return response(404, {"error": {"code": 404, "message": "The specified bucket does not exist."}})
        resource = json.loads(body)
        name = resource["name"]
        match = query.get("ifGenerationMatch")
        existing = self.objects.get((bucket, name))
        if match is not None and (int(match) == 0) == (existing is not None):
            return response(412, {"error": {"code": 412, "message": "Precondition Failed"}})
        upload_id = f"secret-upload-id-{next(self._ids)}"
        total = headers.get("x-upload-content-length")
        self.sessions[upload_id] = Session(bucket, name, resource, total=int(total) if total else None)
        return response(
            200,
            headers={
                "Location": f"{self.endpoint}/upload/storage/v1/b/{bucket}/o"
                f"?uploadType=resumable&upload_id={upload_id}"
            },
        )

    def _range_headers(self, session: Session) -> dict[str, str]:
        return {"Range": f"bytes=0-{len(session.data) - 1}"} if session.data else {}

    def _status(self, session: Session) -> requests.Response:
        if session.finished is not None:
            return response(200, session.finished)
        return response(308, headers=self._range_headers(session))

    def _chunk(
        self, session: Session, content_range: str, body: bytes, headers: dict, keep: int | None = None
    ) -> requests.Response:
        if self.corrupt_next_chunk and body:
            self.corrupt_next_chunk = False
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if session.finished is not None:
            return response(200, session.finished)
        if content_range.startswith("bytes */"):
            first, total = len(session.data), int(content_range.rsplit("/", 1)[1])
            if body:
                return response(400, {"error": {"message": "body with */TOTAL"}})
        else:
            m = _RANGE.match(content_range)
            if not m:
                return response(400, {"error": {"message": f"bad Content-Range {content_range}"}})
            first, last = int(m.group(1)), int(m.group(2))
            total = None if m.group(3) == "*" else int(m.group(3))
            if last - first + 1 != len(body):
                return response(400, {"error": {"message": "Content-Range does not match the body"}})
            if first > len(session.data):
                return response(400, {"error": {"message": "gap in the upload"}})
            final = total is not None and last + 1 == total
            if not final and len(body) % QUANTUM:
                return response(400, {"error": {"message": "non-final chunk not a multiple of 256 KiB"}})
            end = first + (len(body) if keep is None else min(keep, len(body)))
            if end > len(session.data):
                session.data += body[len(session.data) - first : end - first]
        if total is None or len(session.data) < total:
            return response(308, headers=self._range_headers(session))
        data = bytes(session.data)
        crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        goog_hash = headers.get("x-goog-hash")
        if goog_hash and self.honor_goog_hash:
            sent = dict(part.split("=", 1) for part in goog_hash.split(","))
            if sent.get("crc32c", crc) != crc or sent.get("md5", md5) != md5:
                return response(
                    400, {"error": {"message": "Provided CRC32C doesn't match calculated CRC32C"}}
                )
        if self.corrupt_on_store and data:
            data = bytes([data[0] ^ 1]) + data[1:]
            crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        resource = dict(
            session.resource,
            bucket=session.bucket,
            size=str(len(data)),
            crc32c=crc,
            md5Hash=md5,
            generation=str(next(self._generations)),
        )
        session.finished = resource
        self.objects[(session.bucket, session.name)] = (data, resource)
        return response(200, resource)


@dataclass
class Keep:
    """A fault: persist only the first ``n`` bytes of this chunk (the service may do this)."""

    n: int


@dataclass
class Cut:
    """A fault for a streamed request (kind "stream"): the connection resets after ``n`` bytes of
    its body; the service keeps ``keep`` of them (all by default) in whole 256 KiB units."""

    n: int
    keep: int


def _as_fault(action: object) -> Callable[[Call, Session | None], object]:
    def fault(call: Call, session: Session | None) -> object:
        if action is None:
            return None
        if isinstance(action, BaseException):
            raise action
        if isinstance(action, int):
            return response(action, {"error": {"code": action, "message": f"injected {action}"}})
        if isinstance(action, tuple) and action[0] == "retry-after":
            return response(action[1], headers={"Retry-After": str(action[2])})
        if isinstance(action, tuple) and action[0] == "keep":
            return Keep(action[1])
        if isinstance(action, tuple) and action[0] == "cut":
            return Cut(action[1], action[2] if len(action) > 2 else action[1])
        raise AssertionError(f"unknown fault {action!r}")

    return fault
