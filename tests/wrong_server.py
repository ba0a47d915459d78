"""A deliberately wrong Cloud Storage endpoint, for what a hostile or broken server does.

``WrongServer`` is a small, in-memory JSON-API server on 127.0.0.1 whose every answer comes from
a ``Behaviour``. The base ``Behaviour`` answers correctly (resumable uploads, object metadata,
ranged media reads, object deletes), so a test names only the one answer that is wrong by
subclassing it: a ``Location`` on another origin, a redirect, a 308 that never makes progress,
a huge or trickling body, an unparsable final answer, a resource without ``size``, a ranged read
answered with the whole object, ...

Every request is recorded (``requests``) with its headers, so a test can check where the
Authorization header went. Bodies are held in memory: keep the objects small.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import json
import re
import socketserver
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:
    import crc32c as _crc32c

    def crc32c_value(data: bytes) -> int:
        return _crc32c.crc32c(data)

except ImportError:  # pragma: no cover
    import google_crc32c

    def crc32c_value(data: bytes) -> int:
        return google_crc32c.value(data)


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(crc32c_value(data).to_bytes(4, "big")).decode()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


_CONTENT_RANGE = re.compile(r"bytes (?:\*|(\d+)-(\d+))/(\*|\d+)$")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Reply:
    """An answer. ``body`` may be an iterable of pieces (sent as they come: trickles, huge
    bodies); ``reset`` drops the connection without answering."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""
    reset: bool = False

    @classmethod
    def json(cls, status: int, value: Any, **headers: str) -> Reply:
        return cls(status, {"Content-Type": "application/json", **headers}, json.dumps(value).encode())


@dataclass
class Session:
    bucket: str
    resource: dict[str, Any]
    data: bytearray = field(default_factory=bytearray)
    finished: dict[str, Any] | None = None


class Behaviour:
    """The correct answers; subclasses override the one that a test makes wrong."""

    def __init__(self) -> None:
        self.server: WrongServer  # set by the server

    # -- uploads ----------------------------------------------------------------------------------

    def initiate(self, request: Request, bucket: str) -> Reply:
        session_id = self.server.new_session(bucket, json.loads(request.body or b"{}"))
        return Reply(200, {"Location": self.server.session_url(session_id)})

    def session_put(self, request: Request, session: Session) -> Reply:
        """A chunk, a final request or a status query."""
        if session.finished is not None:
            return Reply.json(200, session.finished)
        match = _CONTENT_RANGE.match(request.headers.get("content-range", ""))
        if match is None:
            return Reply.json(400, {"error": {"code": 400, "message": "bad Content-Range"}})
        first, _, total = match.groups()
        if first is not None and int(first) <= len(session.data):
            session.data[int(first) :] = request.body
        if total != "*" and int(total) == len(session.data):
            return self.finalize(request, session)
        return self.incomplete(request, session)

    def incomplete(self, request: Request, session: Session) -> Reply:
        held = len(session.data) // (256 * 1024) * (256 * 1024) if request.body else len(session.data)
        del session.data[held:]
        return Reply(308, {"Range": f"bytes=0-{held - 1}"} if held else {})

    def finalize(self, request: Request, session: Session) -> Reply:
        resource = self.server.store(session.bucket, session.resource, bytes(session.data))
        session.finished = resource
        return Reply.json(200, resource)

    def cancel(self, request: Request, session: Session) -> Reply:
        return Reply(499)

    # -- objects ----------------------------------------------------------------------------------

    def object_get(self, request: Request, bucket: str, name: str) -> Reply:
        found = self.server.objects.get((bucket, name))
        if found is None:
            return Reply.json(404, {"error": {"code": 404, "message": "No such object"}})
        return Reply.json(200, found[1])

    def media_get(self, request: Request, bucket: str, name: str) -> Reply:
        found = self.server.objects.get((bucket, name))
        if found is None:
            return Reply.json(404, {"error": {"code": 404, "message": "No such object"}})
        data, resource = found
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Goog-Generation": str(resource["generation"]),
        }
        if resource.get("contentEncoding"):
            headers["Content-Encoding"] = resource["contentEncoding"]
        match = _RANGE.match(request.headers.get("range", ""))
        if match is None:
            return Reply(200, headers, data)
        first = int(match.group(1))
        last = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        return Reply(206, headers, data[first : last + 1])

    def object_delete(self, request: Request, bucket: str, name: str) -> Reply:
        self.server.deleted.append((bucket, name, request.query.get("generation")))
        if self.server.objects.pop((bucket, name), None) is None:
            return Reply.json(404, {"error": {"code": 404, "message": "No such object"}})
        return Reply(204)


class WrongServer:
    """The server; a context manager. ``url`` is its origin, ``requests`` what it was sent."""

    def __init__(self, behaviour: Behaviour | None = None, *, buckets: Iterable[str] = ("gcsstream-test",)):
        self.behaviour = behaviour or Behaviour()
        self.behaviour.server = self
        self.buckets = set(buckets)
        self.sessions: dict[str, Session] = {}
        self.objects: dict[tuple[str, str], tuple[bytes, dict[str, Any]]] = {}
        self.requests: list[Request] = []
        self.deleted: list[tuple[str, str, str | None]] = []
        self._ids = itertools.count(1)
        self._generations = itertools.count(int(time.time() * 1e6))
        self._lock = threading.RLock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> WrongServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- state ------------------------------------------------------------------------------------

    def new_session(self, bucket: str, resource: dict[str, Any]) -> str:
        session_id = f"wrong{next(self._ids)}"
        self.sessions[session_id] = Session(bucket, resource)
        return session_id

    def session_url(self, session_id: str, origin: str | None = None) -> str:
        return f"{origin or self.url}/upload/storage/v1/b/x/o?uploadType=resumable&upload_id={session_id}"

    def store(self, bucket: str, metadata: dict[str, Any], data: bytes) -> dict[str, Any]:
        """Create an object as the service would and return its resource."""
        resource = {
            "kind": "storage#object",
            "bucket": bucket,
            "name": metadata["name"],
            "generation": str(next(self._generations)),
            "size": str(len(data)),
            "crc32c": crc32c_b64(data),
            "md5Hash": md5_b64(data),
            **{k: v for k, v in metadata.items() if k != "name"},
        }
        self.objects[(bucket, metadata["name"])] = (data, resource)
        return resource

    def put_object(self, bucket: str, name: str, data: bytes, **fields: Any) -> dict[str, Any]:
        return self.store(bucket, {"name": name, **fields}, data)

    def read_object(self, bucket: str, name: str) -> bytes:
        return self.objects[(bucket, name)][0]

    def requests_with_auth(self) -> list[Request]:
        return [r for r in self.requests if "authorization" in r.headers]

    # -- routing ----------------------------------------------------------------------------------

    def route(self, request: Request) -> Reply:
        b = self.behaviour
        path = request.path
        if path.startswith("/upload/storage/v1/b/") and "upload_id" in request.query:
            session = self.sessions.get(request.query["upload_id"])
            if session is None:
                return Reply.json(404, {"error": {"code": 404, "message": "No such upload"}})
            if request.method == "DELETE":
                return b.cancel(request, session)
            return b.session_put(request, session)
        match = re.match(r"/upload/storage/v1/b/([^/]+)/o$", path)
        if match and request.method == "POST":
            bucket = unquote(match.group(1))
            if bucket not in self.buckets:
                return Reply.json(404, {"error": {"code": 404, "message": "No such bucket"}})
            return b.initiate(request, bucket)
        match = re.match(r"/storage/v1/b/([^/]+)/o/(.+)$", path)
        if match:
            bucket, name = unquote(match.group(1)), unquote(match.group(2))
            if request.method == "DELETE":
                return b.object_delete(request, bucket, name)
            if request.query.get("alt") == "media":
                return b.media_get(request, bucket, name)
            return b.object_get(request, bucket, name)
        return Reply.json(404, {"error": {"code": 404, "message": f"no route for {request.method} {path}"}})


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    owner: WrongServer


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(
            self.command,
            parts.path,
            {k: v[0] for k, v in parse_qs(parts.query).items()},
            {k.lower(): v for k, v in self.headers.items()},
            body,
        )
        with owner._lock:
            owner.requests.append(request)
            reply = owner.route(request)
        if reply.reset:
            self.close_connection = True
            self.connection.close()
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if isinstance(reply.body, (bytes, bytearray)):
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        else:  # pieces as they come, the connection closed at the end
            if not any(k.lower() == "content-length" for k in reply.headers):
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                for piece in reply.body:
                    self.wfile.write(piece)
                    self.wfile.flush()
            except OSError:
                self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = _handle  # noqa: N815


def gzip_member(data: bytes) -> bytes:
    """One gzip member of ``data`` (concatenate several for a multi-member object)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


__all__ = ["Behaviour", "Reply", "Request", "Session", "WrongServer", "crc32c_b64", "gzip_member", "quote"]
