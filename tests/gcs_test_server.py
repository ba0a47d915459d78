"""A protocol-faithful, fault-injecting Google Cloud Storage JSON-API test server.

It implements the resumable-upload rules of the real service rather than those of the public
emulators (the README's "Emulators and the real service" table says where they differ):

* a non-final chunk must be a multiple of 256 KiB (else 400);
* bytes resent below the persisted offset are ignored, a chunk starting past it is a gap (400);
* a 308 carries ``Range: bytes=0-N`` for the persisted bytes, and no Range at all when none are;
* the final request may carry ``X-Goog-Hash``; a mismatch answers 400 and creates no object;
* ``DELETE`` on a session answers 499 and the session answers 410 afterwards;
* ``ifGenerationMatch`` is checked when the session starts and again when it finalizes;
* compose has at most 32 sources and yields a crc32c and a componentCount but no md5Hash;
* a bucket created with a ``retentionPolicy`` (``retentionPeriod`` seconds) or
  ``defaultEventBasedHold`` refuses (403) to delete an object still retained or held.

Request bodies are streamed to files under a data directory through one reused buffer per
connection thread and CRC32C'd inline; the MD5 of an upload is computed from its file by a
per-session thread that works only while no request body is being received (see _Md5Tail), and
the finalizing request hashes what is left.  Neither an object nor a chunk is held in memory.

Choices where the real service is not pinned down here: a final request whose X-Goog-Hash does not
match answers 400, creates nothing and leaves the session open at its previous persisted offset
(the final request's bytes are dropped), so a status query still answers 308; likewise a final
request failing ``ifGenerationMatch`` answers 412 and leaves the session open.  A connection that
breaks mid-body keeps the 256 KiB-aligned prefix that arrived.  A reset fault placed after the
whole final chunk finalizes the object and then drops the connection ("response lost").

Faults are scripted with :class:`Fault` objects in a :class:`FaultPlan` (by request kind and
ordinal), or drawn at random with :meth:`FaultPlan.random`.  Every request is recorded in
:attr:`GcsTestServer.requests`.  Session ids are bearer credentials: they are redacted in the log
records and never printed.

Run as a process::

    python -m tests.gcs_test_server --port 0 --data-dir DIR [--bucket NAME ...] \\
        [--seed S --fault-rate R [--fault-kinds status,reset,partial]] [--discard] [--verbose]

``--discard`` (``discard=True``) hashes upload bodies and throws them away: objects keep their
size, crc32c and md5Hash but no bytes (reading them answers 501), so that a benchmark's sink costs
no disk and stays off the client's critical path.

It prints exactly one line ``READY http://127.0.0.1:PORT`` on stdout once it listens and exits
cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import fnmatch
import hashlib
import http.server
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:  # accepts any buffer: lets us hash the reused receive buffer without copying it
    import crc32c as _crc32c_mod

    def _crc_update(value: int, data) -> int:
        return _crc32c_mod.crc32c(data, value)

except ImportError:  # pragma: no cover - fallback: google_crc32c only accepts bytes
    import google_crc32c

    def _crc_update(value: int, data) -> int:
        return google_crc32c.extend(value, bytes(data))


__all__ = [
    "FAULT_KINDS",
    "QUANTUM",
    "REQUEST_KINDS",
    "Fault",
    "FaultPlan",
    "GcsTestServer",
    "RequestRecord",
    "SessionState",
    "main",
]

QUANTUM = 256 * 1024
"""Every non-final chunk must be a multiple of this many bytes; partial persistence uses it too."""

_BUF_SIZE = 1024 * 1024  # per-thread receive buffer; a multiple of QUANTUM
_MAX_JSON = 4 * 1024 * 1024
_MAX_MULTIPART = 256 * 1024 * 1024
_MAX_SOURCES = 32
_MAX_COMPONENTS = 1024

FAULT_KINDS = (
    "status",
    "reset",
    "stall",
    "partial",
    "expire",
    "unauthorized",
    "trickle",
    "corrupt_download",
    "lost",
    "corrupt_compose",
)

REQUEST_KINDS = (
    "initiate",  # POST .../upload/...?uploadType=resumable
    "chunk",  # PUT to a session, not completing the object
    "final",  # PUT to a session that completes the object (incl. an empty ``bytes */TOTAL``)
    "status",  # PUT to a session with ``bytes */*``
    "cancel",  # DELETE of a session
    "download",  # GET ?alt=media
    "simple",  # uploadType=media or multipart
    "compose",
    "object",  # GET object resource
    "list",
    "delete",  # DELETE object
    "bucket",  # bucket create / get
    "other",
)
_SESSION_PUT_KINDS = ("chunk", "final", "status")
_TARGETS = (*REQUEST_KINDS, "put", "any")
_RETRYABLE = (408, 429, 500, 502, 503, 504)
_DEFAULT_STATUS = {"status": 503, "expire": 410, "unauthorized": 401, "lost": 503}

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    308: "Resume Incomplete",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    416: "Requested Range Not Satisfiable",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\*)|(\d+)\s*-\s*(\d+))\s*/\s*(\*|\d+)\s*$", re.I)
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.I)
_UPLOAD_ID_RE = re.compile(r"(upload_id=)[^&\s]+")


def _floor_q(n: int) -> int:
    return n - n % QUANTUM


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _crc_b64(value: int) -> str:
    return _b64(value.to_bytes(4, "big"))


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def redact(upload_id: str | None) -> str | None:
    """Shortened, non-usable form of a session id, for logs."""
    if upload_id is None:
        return None
    return upload_id[:4] + "..."


def _redact_path(path: str) -> str:
    return _UPLOAD_ID_RE.sub(r"\1REDACTED", path)


# --------------------------------------------------------------------------------------------
# Faults


@dataclass
class Fault:
    """One fault to inject.

    ``kind``: one of :data:`FAULT_KINDS`.

    Targeting: ``on`` is a request kind (:data:`REQUEST_KINDS`), ``"put"`` (chunk, final or status)
    or ``"any"``; ``name`` optionally restricts it to one object name, ``name_like`` to names matching a
    shell pattern (``fnmatch``, case-sensitive).  The fault counts the
    matching requests it sees from the moment it is in the plan (``seen``); it fires on the
    ``nth`` of them (1-based; ``None`` = the next one) and on the following ones until it has fired
    ``times`` times.  One fault at most is applied per request: the first eligible one in the plan's
    order; another eligible one waits for the next matching request.

    Parameters (``None`` = the kind's default):

    * ``status``: HTTP status for kind ``status`` (default 503), ``expire`` (410; 404 allowed),
      ``unauthorized`` (401) and ``lost`` (503).

    Kind ``lost`` is a lost answer: the whole chunk is kept (a final one creates the object), and
    then the answer is ``status`` instead of 308 or 200, as when the service's answer never
    reaches the client.  (A reset after the whole body, ``Fault("reset", after_bytes=LEN)``, is
    the other way an answer gets lost.)
    * ``retry_after``: seconds for ``Retry-After`` (sent with status 429, default 1, or whenever set).
    * ``after_bytes``: body position for ``reset`` (default: half the body) and ``stall`` (default
      0, i.e. before the body); for downloads the position in the response body (``stall`` with
      ``None`` stalls before the headers).
    * ``persist``: how many of the request's new bytes (beyond those already persisted) are kept,
      rounded down to 256 KiB.  ``status``: default 0; ``partial``: default half; always less than
      the new bytes; ``reset``: default all that arrived before the reset.
    * ``seconds``: ``stall`` duration (default 3) and ``trickle`` duration (default 0.5).
    * ``rate``: ``trickle`` speed in bytes/s (default 256 KiB/s).
    * ``read_body``: ``status``/``unauthorized``/``expire``: False answers at once without
      reading the body, then closes the connection (the client usually sees a reset).
    * ``offset``: ``corrupt_download``: position in the response body of the flipped byte
      (default: the middle); ``corrupt_compose``: position in the composed object of the byte
      flipped before it is stored (default: the middle), its crc32c being that of the stored
      bytes, as if the service had composed wrongly.

    On ``compose``, a ``lost`` fault composes the object and then answers ``status``, and a
    ``reset`` whose ``after_bytes`` reaches the end of the body composes it and then drops the
    connection: the object exists, its answer never arrives.
    * ``flush``: ``reset``: before dropping the connection, wait (up to 5 s) until the peer has
      acknowledged every response byte written, so that a download's client receives exactly
      ``after_bytes`` (by default the RST also discards what the kernel had not yet sent).
    """

    kind: str
    on: str = "chunk"
    nth: int | None = None
    times: int = 1
    name: str | None = None
    name_like: str | None = None
    status: int | None = None
    retry_after: float | None = None
    after_bytes: int | None = None
    persist: int | None = None
    seconds: float | None = None
    rate: int | None = None
    read_body: bool = True
    offset: int | None = None
    flush: bool = False
    seen: int = field(default=0, init=False, compare=False)
    fired: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.on not in _TARGETS:
            raise ValueError(f"unknown request kind {self.on!r}; expected one of {_TARGETS}")
        if self.nth is not None and self.nth < 1:
            raise ValueError("nth is 1-based")
        if self.times < 1:
            raise ValueError("times must be >= 1")
        if self.status is None and self.kind in _DEFAULT_STATUS:
            self.status = _DEFAULT_STATUS[self.kind]

    def _matches(self, kind: str, name: str | None) -> bool:
        if self.name is not None and self.name != name:
            return False
        if self.name_like is not None and not fnmatch.fnmatchcase(name or "", self.name_like):
            return False
        return self.on in (kind, "any") or (self.on == "put" and kind in _SESSION_PUT_KINDS)

    def _eligible(self) -> bool:
        if self.fired >= self.times:
            return False
        return self.nth is None or self.seen >= self.nth

    @property
    def done(self) -> bool:
        """True once the fault has fired ``times`` times."""
        return self.fired >= self.times


class FaultPlan:
    """Faults to inject: scripted ones (:meth:`add`), optionally followed by random draws.

    Thread-safe; ``history`` lists ``(request kind, fault)`` for every fault applied, in order.
    """

    DEFAULT_RANDOM_KINDS = ("status", "reset", "partial", "lost")

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = list(faults)
        self._rng: random.Random | None = None
        self.seed: int | None = None
        self.rate = 0.0
        self.kinds: tuple[str, ...] = ()
        self.random_on: tuple[str, ...] = ()
        self.max_faults: int | None = None
        self.stall_seconds = 2.0
        self.history: list[tuple[str, Fault]] = []
        self._random_count = 0

    @classmethod
    def random(
        cls,
        seed: int,
        rate: float,
        *,
        kinds: Iterable[str] = DEFAULT_RANDOM_KINDS,
        on: Iterable[str] = ("chunk", "final"),
        max_faults: int | None = None,
        stall_seconds: float = 2.0,
    ) -> FaultPlan:
        """A plan that gives each request of a kind in ``on`` a fault with probability ``rate``.

        The fault's kind is drawn from ``kinds`` and its parameters at random (deterministically
        for a seed and a sequence of requests): statuses from 408/429/500/502/503/504 (429 with
        ``Retry-After: 0``) persisting nothing or a random part, resets at a random body position,
        partial persistence of a random 256 KiB multiple, ``stall_seconds`` stalls, 1 MiB/s
        trickles of 0.2 s.  ``max_faults`` caps the number of random faults.
        """
        plan = cls()
        kinds = tuple(kinds)
        for k in kinds:
            if k not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {k!r}")
        plan._rng = random.Random(seed)
        plan.seed = seed
        plan.rate = float(rate)
        plan.kinds = kinds
        plan.random_on = tuple(on)
        plan.max_faults = max_faults
        plan.stall_seconds = stall_seconds
        return plan

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def extend(self, faults: Iterable[Fault]) -> None:
        with self._lock:
            self._faults.extend(faults)

    def clear(self) -> None:
        """Drop the scripted faults and stop drawing random ones."""
        with self._lock:
            self._faults.clear()
            self._rng = None

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def pending(self) -> list[Fault]:
        """Scripted faults that have not fired as often as asked."""
        with self._lock:
            return [f for f in self._faults if not f.done]

    def applied(self, kind: str | None = None) -> list[Fault]:
        """Faults applied so far (optionally only those of one fault kind)."""
        with self._lock:
            return [f for _, f in self.history if kind is None or f.kind == kind]

    def _pick(self, kind: str, name: str | None, body_len: int) -> Fault | None:
        with self._lock:
            chosen: Fault | None = None
            for f in self._faults:
                if not f._matches(kind, name):
                    continue
                f.seen += 1
                if chosen is None and f._eligible():
                    chosen = f
            if chosen is not None:
                chosen.fired += 1
            elif (
                self._rng is not None
                and kind in self.random_on
                and self.kinds
                and (self.max_faults is None or self._random_count < self.max_faults)
                and self._rng.random() < self.rate
            ):
                chosen = self._draw(kind, body_len)
                self._random_count += 1
            if chosen is not None:
                self.history.append((kind, chosen))
            return chosen

    def _draw(self, kind: str, body_len: int) -> Fault:
        rng = self._rng
        assert rng is not None
        fk = rng.choice(self.kinds)
        pos = rng.randrange(body_len + 1)
        if fk == "status":
            status = rng.choice(_RETRYABLE)
            persist = 0 if rng.random() < 0.5 else pos
            f = Fault(fk, on=kind, status=status, persist=persist, retry_after=0 if status == 429 else None)
        elif fk == "reset":
            f = Fault(fk, on=kind, after_bytes=pos)
        elif fk == "partial":
            f = Fault(fk, on=kind, persist=pos)
        elif fk == "stall":
            f = Fault(fk, on=kind, after_bytes=pos, seconds=self.stall_seconds)
        elif fk == "trickle":
            f = Fault(fk, on=kind, rate=1024 * 1024, seconds=0.2)
        elif fk == "lost":  # the whole chunk kept, then 503 or a reset after the body
            if rng.random() < 0.5:
                f = Fault(fk, on=kind, status=rng.choice(_RETRYABLE), retry_after=0)
            else:
                f = Fault("reset", on=kind, after_bytes=body_len)
        else:
            f = Fault(fk, on=kind)
        f.fired = 1
        return f


# --------------------------------------------------------------------------------------------
# Records and states


@dataclass
class RequestRecord:
    """One handled request.  ``status`` is the logical status (308 even when sent as 200 with
    ``X-Http-Status-Code-Override``); ``None`` when the connection was dropped without an answer."""

    seq: int
    method: str
    kind: str
    path: str  # upload ids redacted
    content_range: str | None = None
    content_length: int | None = None
    bucket: str | None = None
    name: str | None = None
    session: str | None = None  # redacted session id
    status: int | None = None
    fault: str | None = None
    bytes_received: int = 0
    persisted: int | None = None  # session's persisted offset after the request
    error: str | None = None
    started: float = 0.0
    finished: float | None = None
    done: bool = False
    range_header: str | None = None  # the request's ``Range`` header as sent (downloads)
    range_start: int | None = None  # download: first object byte served (0 without a Range)
    bytes_sent: int | None = None  # download: response body bytes handed to the socket
    fired_at: int | None = None  # body byte at which a stall or reset fault took hold


@dataclass(frozen=True)
class SessionState:
    upload_id: str = field(repr=False)
    bucket: str
    name: str
    persisted: int
    total: int | None
    finalized: bool
    cancelled: bool
    expired: bool
    generation: str | None
    created: float


@dataclass
class _Object:
    path: Path
    resource: dict[str, Any]


class _Md5Tail:
    """MD5 of a session's persisted bytes, computed by a thread that trails the persisted offset.

    It only works while no request body is being received anywhere in the server: on a 2-core
    machine any third busy thread (MD5 runs at ~0.8 GB/s) cut loopback chunk throughput about
    eightfold.  So chunk PUTs run at full speed and MD5 fills the gaps between them (a client
    reading a pipe leaves many); the finalizing request hashes whatever is left.
    """

    STEP = 256 * 1024

    def __init__(self, path: Path, gcs: GcsTestServer) -> None:
        self.path = path
        self.gcs = gcs
        self.md5 = hashlib.md5()
        self.done = 0
        self.target = 0
        self.closed = False
        self._cond = threading.Condition()  # target, closed
        self._hlock = threading.Lock()  # md5, done
        self._thread: threading.Thread | None = None

    def advance(self, upto: int) -> None:
        with self._cond:
            if self.closed or upto <= self.target:
                return
            self.target = upto
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gcs-md5", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        mv = memoryview(bytearray(self.STEP))
        try:
            with open(self.path, "rb", buffering=0) as f:
                while True:
                    with self._cond:
                        while not self.closed and self.done >= self.target:
                            self._cond.wait()
                        if self.closed:
                            return
                        target = self.target
                    self.gcs._wait_idle()
                    with self._hlock:
                        if self.closed:
                            return
                        f.seek(self.done)
                        n = f.readinto(mv[: min(self.STEP, target - self.done)])
                        if not n:
                            return
                        self.md5.update(mv[:n])
                        self.done += n
        except OSError:
            return  # the finalizing request hashes from ``done`` on

    def take(self) -> tuple[Any, int]:
        """Stop the thread; return a copy of the MD5 state and how many bytes it covers."""
        self.close()
        with self._hlock:
            return self.md5.copy(), self.done

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class _Session:
    def __init__(self, upload_id: str, bucket: str, name: str, meta: dict, path: Path) -> None:
        self.upload_id = upload_id
        self.bucket = bucket
        self.name = name
        self.meta = meta
        self.path = path
        self.lock = threading.Lock()
        self.persisted = 0
        self.crc = 0
        self.total: int | None = None
        self.declared_size: int | None = None
        self.preconditions: dict[str, int] = {}
        self.finalized = False
        self.cancelled = False
        self.expired = False
        self.expire_status = 410
        self.resource: dict | None = None
        self.writer = 0  # token of the request currently allowed to write
        self.tail: _Md5Tail | None = None
        self.created = time.time()
        self.md5: Any = None  # discard mode: MD5 of the persisted bytes, kept inline
        self.md5_pending: tuple[int, Any] | None = None  # discard mode: (offset, MD5) not yet committed

    def state(self) -> SessionState:
        return SessionState(
            upload_id=self.upload_id,
            bucket=self.bucket,
            name=self.name,
            persisted=self.persisted,
            total=self.total,
            finalized=self.finalized,
            cancelled=self.cancelled,
            expired=self.expired,
            generation=self.resource["generation"] if self.resource else None,
            created=self.created,
        )


class _HttpError(Exception):
    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


class _Reset(Exception):
    """Raised by the fault pacer: drop the connection with a TCP RST."""


# --------------------------------------------------------------------------------------------
# Body reading and fault pacing


class _Body:
    """A request body (Content-Length or chunked), read into caller-supplied buffers."""

    def __init__(self, rfile, length: int | None, chunked: bool) -> None:
        self.rfile = rfile
        self.length = length
        self.chunked = chunked
        self.remaining = length or 0
        self.chunk_left = 0
        self.received = 0
        self.ended = not chunked and not length
        self.broken = False

    def readinto(self, mv: memoryview) -> int:
        """Fill ``mv``; fewer bytes only at the end of the body or when the connection broke."""
        if self.ended or self.broken or not len(mv):
            return 0
        if not self.chunked:
            got = self._raw(mv[: min(len(mv), self.remaining)])
            self.remaining -= got
            if self.remaining == 0:
                self.ended = True
            return got
        total = 0
        while total < len(mv) and not (self.ended or self.broken):
            if self.chunk_left == 0:
                self._next_chunk()
                continue
            want = min(len(mv) - total, self.chunk_left)
            got = self._raw(mv[total : total + want])
            total += got
            self.chunk_left -= got
            if got < want:
                break
            if self.chunk_left == 0 and self._line() != b"\r\n":
                self.broken = True
        return total

    def _raw(self, mv: memoryview) -> int:
        try:
            got = self.rfile.readinto(mv) or 0
        except OSError:
            got = 0
        if got < len(mv):
            self.broken = True
        self.received += got
        return got

    def _line(self) -> bytes:
        try:
            return self.rfile.readline(65537)
        except OSError:
            return b""

    def _next_chunk(self) -> None:
        line = self._line()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            self.broken = True
            return
        if size == 0:
            while True:
                trailer = self._line()
                if trailer in (b"\r\n", b"\n"):
                    break
                if not trailer:
                    self.broken = True
                    break
            self.ended = True
            return
        self.chunk_left = size

    def read_small(self, limit: int) -> bytes:
        """The whole (small) body as bytes; 400 if longer than ``limit``."""
        if self.length is not None and self.length > limit:
            raise _HttpError(400, "request body too large")
        out = bytearray()
        buf = bytearray(min(limit + 1, 1 << 20))
        mv = memoryview(buf)
        while True:
            n = self.readinto(mv)
            out += mv[:n]
            if len(out) > limit:
                raise _HttpError(400, "request body too large")
            if n < len(mv):
                break
        if self.broken:
            raise _HttpError(400, "incomplete request body")
        return bytes(out)


class _Pacer:
    """Applies stall / reset / trickle faults at byte positions of a body being moved."""

    def __init__(
        self,
        fault: Fault | None,
        stop: threading.Event,
        body_len: int,
        download: bool = False,
        on_fire: Callable[[int], None] | None = None,
    ):
        self.stop = stop
        self.on_fire = on_fire  # told the body position when a stall or reset takes hold
        self.pos = 0
        self.trigger_at: int | None = None
        self.trigger_kind: str | None = None
        self.triggered = False
        self.stall_seconds = 3.0
        self.trickle_rate = 0
        self.trickle_seconds = 0.0
        self.trickle_start: float | None = None
        self.trickle_bytes = 0
        if fault is None:
            return
        if fault.kind == "reset":
            at = fault.after_bytes if fault.after_bytes is not None else body_len // 2
            self.trigger_kind, self.trigger_at = "reset", max(0, min(at, body_len))
        elif fault.kind == "stall":
            self.stall_seconds = 3.0 if fault.seconds is None else fault.seconds
            if download and fault.after_bytes is None:
                self.trigger_kind, self.trigger_at = "stall-head", 0
            else:
                self.trigger_kind, self.trigger_at = "stall", max(0, min(fault.after_bytes or 0, body_len))
        elif fault.kind == "trickle":
            self.trickle_rate = fault.rate or 256 * 1024
            self.trickle_seconds = 0.5 if fault.seconds is None else fault.seconds

    def head(self) -> None:
        """Before the response headers of a download."""
        if self.trigger_kind == "stall-head" and not self.triggered:
            self.triggered = True
            self.stop.wait(self.stall_seconds)

    def _fire(self) -> None:
        self.triggered = True
        if self.on_fire is not None:
            self.on_fire(self.pos)
        if self.trigger_kind == "reset":
            raise _Reset()
        if self.trigger_kind == "stall":
            self.stop.wait(self.stall_seconds)

    def limit(self, want: int) -> int:
        """How many of ``want`` bytes may be moved now (fires a due trigger first)."""
        if self.trigger_at is not None and not self.triggered and self.trigger_kind != "stall-head":
            if self.pos >= self.trigger_at:
                self._fire()
            else:
                want = min(want, self.trigger_at - self.pos)
        if self.trickle_rate:
            now = time.monotonic()
            if self.trickle_start is None:
                self.trickle_start = now
            if now - self.trickle_start < self.trickle_seconds:
                want = min(want, max(1, self.trickle_rate // 20))
        return want

    def advance(self, n: int) -> None:
        self.pos += n
        if self.trickle_rate and self.trickle_start is not None:
            elapsed = time.monotonic() - self.trickle_start
            if elapsed < self.trickle_seconds:
                self.trickle_bytes += n
                ahead = self.trickle_bytes / self.trickle_rate - elapsed
                if ahead > 0:
                    self.stop.wait(ahead)

    def finish(self) -> None:
        """After the whole body: fire a trigger placed at its end (or not reached)."""
        if self.trigger_at is not None and not self.triggered and self.trigger_kind != "stall-head":
            self._fire()


_tls = threading.local()


def _thread_buffer() -> memoryview:
    mv = getattr(_tls, "mv", None)
    if mv is None:
        mv = _tls.mv = memoryview(bytearray(_BUF_SIZE))
    return mv


# --------------------------------------------------------------------------------------------
# HTTP


class _HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, gcs: GcsTestServer) -> None:
        self.gcs = gcs
        super().__init__(addr, handler)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, _Reset)) or self.gcs._stop.is_set():
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gcs-test-server/1"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _HTTPServer

    # ---- plumbing -------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.gcs = self.server.gcs
        self.gcs._track(self.connection, threading.current_thread(), True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.gcs._track(self.connection, threading.current_thread(), False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_GET

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.no308 = self.headers.get("X-GUploader-No-308", "").strip().lower() == "yes"
        self.fault: Fault | None = None
        self._small: bytes | None = None
        length = self.headers.get("Content-Length")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        try:
            clen = int(length) if length is not None and not chunked else None
            if clen is not None and clen < 0:
                raise ValueError
        except ValueError:
            clen = None
            self.close_connection = True
        self.body = _Body(self.rfile, clen, chunked)
        self.rec = self.gcs._new_record(
            self.command,
            _redact_path(self.path),
            self.headers.get("Content-Range"),
            clen,
            range_header=self.headers.get("Range"),
        )
        try:
            self._route()
        except _HttpError as e:
            self._drain()
            self._error(e.status, e.message, e.reason)
        except _Reset:
            self._rst()
        except OSError as e:
            self.rec.error = f"{type(e).__name__}: {e}"
            self.close_connection = True
        except Exception as e:  # a bug in the server: answer 500 and keep the trace
            self.rec.error = f"{type(e).__name__}: {e}"
            import traceback

            traceback.print_exc(file=sys.stderr)
            try:
                self._drain()
                self._error(500, f"test server bug: {type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                self.close_connection = True
        finally:
            self.rec.bytes_received = self.body.received
            self.gcs._finish_record(self.rec)

    def _pick(self, kind: str, name: str | None = None, body_len: int | None = None) -> Fault | None:
        self.rec.kind = kind
        if name is not None:
            self.rec.name = name
        if body_len is None:
            body_len = self.body.length or 0
        self.fault = self.gcs.faults._pick(kind, name, body_len)
        if self.fault is not None:
            self.rec.fault = self.fault.kind
        self.gcs._touch()
        return self.fault

    def _drain(self) -> None:
        if self.body.ended or self.body.broken:
            if self.body.broken:
                self.close_connection = True
            return
        mv = _thread_buffer()
        while self.body.readinto(mv) == len(mv):
            pass
        if self.body.broken:
            self.close_connection = True

    def _rst(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0)."""
        self.close_connection = True
        self.rec.status = None
        self.gcs._touch()
        if self.gcs.verbose:
            print(
                f"gcs-test-server: {self.command} {self.rec.kind} {self.rec.path} "
                f"{self.rec.content_range or ''} -> connection reset [{self.rec.fault}]",
                file=sys.stderr,
                flush=True,
            )
        if self.fault is not None and self.fault.flush:
            self._wait_acknowledged()
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        for closable in (self.connection, self.rfile):  # wfile holds no reference to the fd
            try:
                closable.close()
            except OSError:
                pass

    def _wait_acknowledged(self, timeout: float = 5.0) -> None:
        """Wait until the peer has acknowledged every byte written (Linux: SIOCOUTQ is 0)."""
        try:
            import fcntl
            import termios
        except ImportError:  # pragma: no cover - not Linux: reset at once
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw = fcntl.ioctl(self.connection.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            except (OSError, ValueError):
                return
            if struct.unpack("i", raw)[0] <= 0 or self.gcs._stop.wait(0.002):
                return

    def _fired(self, position: int) -> None:
        self.gcs._fired(self.rec, position)

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        content_type: str | None = None,
        close: bool = False,
        length: int | None = None,
    ) -> None:
        """Send status line, headers and (small) body in one write."""
        self.rec.status = status
        self.gcs._touch()
        wire_status = status
        lines = []
        if status == 308 and self.no308:
            wire_status = 200
            lines.append("X-Http-Status-Code-Override: 308")
        lines.insert(0, f"HTTP/1.1 {wire_status} {_REASONS.get(wire_status, 'Status')}")
        lines.append(f"Date: {self.date_time_string()}")
        lines.append(f"Server: {self.server_version}")
        lines.extend(f"{k}: {v}" for k, v in headers)
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body) if length is None else length}")
        if close or self.close_connection:
            self.close_connection = True
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command == "HEAD":
            body = b""
        self.wfile.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.wfile.write(body)
        if self.gcs.verbose:
            print(
                f"gcs-test-server: {self.command} {self.rec.kind} {self.rec.path} "
                f"{self.rec.content_range or ''} -> {status}"
                + (f" [{self.rec.fault}]" if self.rec.fault else ""),
                file=sys.stderr,
                flush=True,
            )

    def _json(
        self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = (), close: bool = False
    ) -> None:
        self._send(status, json.dumps(obj).encode(), headers, "application/json; charset=UTF-8", close)

    def _error(self, status: int, message: str, reason: str | None = None, headers=(), close=False) -> None:
        reason = reason or {
            400: "invalid",
            401: "required",
            404: "notFound",
            409: "conflict",
            410: "gone",
            412: "conditionNotMet",
            416: "requestedRangeNotSatisfiable",
            429: "rateLimitExceeded",
        }.get(status, "backendError")
        body = {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason}],
            }
        }
        self.rec.error = self.rec.error or message
        if status == 304:
            return self._send(304, b"", headers, close=close)
        self._json(status, body, headers, close)

    def _apply_status_fault(self, fault: Fault) -> bool:
        """status / unauthorized (and expire outside sessions): answer the fault's status."""
        if fault.kind not in ("status", "unauthorized", "expire", "lost"):
            return False
        headers = []
        if fault.kind == "unauthorized":
            headers.append(("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"'))
        if fault.retry_after is not None or fault.status == 429:
            ra = 1 if fault.retry_after is None else fault.retry_after
            headers.append(("Retry-After", str(int(ra)) if float(ra).is_integer() else str(ra)))
        if fault.read_body:
            self._drain()
            self._error(fault.status or 503, f"injected fault: {fault.kind}", headers=headers)
        else:
            self._error(fault.status or 503, f"injected fault: {fault.kind}", headers=headers, close=True)
        return True

    # ---- routing --------------------------------------------------------------------------

    def _route(self) -> None:
        path, cmd, q = self.raw_path, self.command, self.query
        if path.startswith("/upload/storage/v1/b/"):
            rest = path[len("/upload/storage/v1/b/") :]
            bucket_q, _, tail = rest.partition("/")
            bucket = unquote(bucket_q)
            self.rec.bucket = bucket
            if tail not in ("o", "o/"):
                raise _HttpError(404, "Not Found")
            if "upload_id" in q:
                if cmd == "DELETE":
                    return self._cancel(q["upload_id"])
                if cmd in ("PUT", "POST"):
                    return self._session_put(q["upload_id"])
                raise _HttpError(405, "method not allowed on an upload session")
            if cmd != "POST":
                raise _HttpError(405, "Method Not Allowed")
            utype = q.get("uploadType", "")
            if utype == "resumable":
                return self._initiate(bucket)
            if utype in ("media", "multipart"):
                return self._simple_upload(bucket, utype)
            raise _HttpError(400, f"unsupported uploadType {utype!r}")
        for prefix in ("/storage/v1/b", "/download/storage/v1/b"):
            if path == prefix or path.startswith(prefix + "/"):
                download_path = prefix.startswith("/download")
                rest = path[len(prefix) :].lstrip("/")
                break
        else:
            self._pick("other")
            raise _HttpError(404, "Not Found")
        if not rest:
            if cmd == "POST" and not download_path:
                return self._create_bucket_http()
            self._pick("other")
            raise _HttpError(404 if cmd != "GET" else 501, "bucket listing is not implemented")
        bucket_q, _, tail = rest.partition("/")
        bucket = unquote(bucket_q)
        self.rec.bucket = bucket
        if not tail:
            if cmd in ("GET", "HEAD") and not download_path:
                return self._get_bucket(bucket)
            if cmd == "DELETE" and not download_path:
                return self._delete_bucket(bucket)
            self._pick("other")
            raise _HttpError(405, "Method Not Allowed")
        if tail in ("o", "o/"):
            if cmd == "GET":
                return self._list(bucket)
            self._pick("other")
            raise _HttpError(405, "Method Not Allowed")
        if not tail.startswith("o/"):
            self._pick("other")
            raise _HttpError(404, "Not Found")
        obj = tail[2:]
        if obj.endswith("/compose") and cmd == "POST" and not download_path:
            return self._compose(bucket, unquote(obj[: -len("/compose")]))
        name = unquote(obj)
        if cmd in ("GET", "HEAD"):
            if q.get("alt") == "media" or download_path:
                return self._download(bucket, name)
            return self._get_object(bucket, name)
        if cmd == "DELETE":
            return self._delete_object(bucket, name)
        self._pick("other", name)
        raise _HttpError(405, "Method Not Allowed")

    # ---- buckets & objects ----------------------------------------------------------------

    def _generic_faults(self, kind: str, name: str | None = None) -> bool:
        """Apply a fault to a request with a small body; True if the request was answered.

        reset / stall fire before the body is read, or after it when ``after_bytes`` is set."""
        fault = self._pick(kind, name)
        if fault is None:
            return False
        if self._apply_status_fault(fault):
            return True
        self._pre_body_fault(fault)
        return False

    def _pre_body_fault(self, fault: Fault) -> None:
        if fault.kind not in ("reset", "stall"):
            return
        if fault.after_bytes and self._small is None:
            self._small = self.body.read_small(_MAX_MULTIPART)
        if fault.kind == "reset":
            raise _Reset()
        self.gcs._stop.wait(3.0 if fault.seconds is None else fault.seconds)

    def _read_small(self, limit: int) -> bytes:
        if self._small is not None:
            return self._small
        return self.body.read_small(limit)

    def _create_bucket_http(self) -> None:
        if self._generic_faults("bucket"):
            return
        try:
            meta = json.loads(self._read_small(_MAX_JSON) or b"{}")
        except ValueError:
            raise _HttpError(400, "invalid JSON") from None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not name:
            raise _HttpError(400, "bucket name required")
        with self.gcs._lock:
            if name in self.gcs._buckets:
                raise _HttpError(409, "You already own this bucket. Please select another name.")
        self._json(200, self.gcs.create_bucket(name, **{k: v for k, v in meta.items() if k != "name"}))

    def _get_bucket(self, bucket: str) -> None:
        if self._generic_faults("bucket"):
            return
        with self.gcs._lock:
            res = self.gcs._buckets.get(bucket)
        if res is None:
            raise _HttpError(404, "The specified bucket does not exist.")
        self._json(200, res)

    def _delete_bucket(self, bucket: str) -> None:
        if self._generic_faults("bucket"):
            return
        with self.gcs._lock:
            if bucket not in self.gcs._buckets:
                raise _HttpError(404, "The specified bucket does not exist.")
            if self.gcs._objects.get(bucket):
                raise _HttpError(409, "The bucket you tried to delete is not empty.")
            del self.gcs._buckets[bucket]
            self.gcs._objects.pop(bucket, None)
        self._send(204)

    def _get_object(self, bucket: str, name: str) -> None:
        if self._generic_faults("object", name):
            return
        self._drain()
        obj = self.gcs._lookup(bucket, name, self.query.get("generation"))
        self._check_read_preconditions(obj)
        self._json(200, obj.resource)

    def _check_read_preconditions(self, obj: _Object) -> None:
        gen = int(obj.resource["generation"])
        q = self.query
        if "ifGenerationMatch" in q and _int_param(q, "ifGenerationMatch") != gen:
            raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")
        if "ifGenerationNotMatch" in q and _int_param(q, "ifGenerationNotMatch") == gen:
            raise _HttpError(304 if self.command == "GET" else 412, "Not Modified")

    def _delete_object(self, bucket: str, name: str) -> None:
        if self._generic_faults("delete", name):
            return
        self._drain()
        with self.gcs._lock:
            obj = self.gcs._lookup(bucket, name, self.query.get("generation"))
            gen = int(obj.resource["generation"])
            if "ifGenerationMatch" in self.query and _int_param(self.query, "ifGenerationMatch") != gen:
                raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")
            if obj.resource.get("eventBasedHold") or obj.resource.get("temporaryHold"):
                raise _HttpError(
                    403, f"Object '{bucket}/{name}' is under active Event-Based hold.", "forbidden"
                )
            until = obj.resource.get("retentionExpirationTime")
            if until and _parse_time(until) > time.time():
                raise _HttpError(
                    403,
                    f"Object '{bucket}/{name}' is subject to bucket's retention policy.",
                    "retentionPolicyNotMet",
                )
            self.gcs._remove_object(bucket, name)
        self._send(204)

    def _list(self, bucket: str) -> None:
        if self._generic_faults("list"):
            return
        self._drain()
        prefix = self.query.get("prefix", "")
        delimiter = self.query.get("delimiter", "")
        start = self.query.get("pageToken") or self.query.get("startOffset") or ""
        try:
            max_results = int(self.query.get("maxResults") or 1000)
        except ValueError:
            raise _HttpError(400, "invalid maxResults") from None
        with self.gcs._lock:
            if bucket not in self.gcs._buckets:
                raise _HttpError(404, "The specified bucket does not exist.")
            names = sorted(
                n for n in self.gcs._objects.get(bucket, {}) if n.startswith(prefix) and n >= start
            )
            items, prefixes, next_token = [], set(), None
            for n in names:
                if delimiter:
                    cut = n.find(delimiter, len(prefix))
                    if cut >= 0:
                        prefixes.add(n[: cut + len(delimiter)])
                        continue
                if len(items) >= max_results:
                    next_token = n
                    break
                items.append(self.gcs._objects[bucket][n].resource)
        out: dict[str, Any] = {"kind": "storage#objects", "items": items}
        if prefixes:
            out["prefixes"] = sorted(prefixes)
        if next_token:
            out["nextPageToken"] = next_token
        self._json(200, out)

    # ---- downloads ------------------------------------------------------------------------

    def _download(self, bucket: str, name: str) -> None:
        fault = self._pick("download", name)
        if fault is not None and self._apply_status_fault(fault):
            return
        self._drain()
        with self.gcs._lock:
            obj = self.gcs._lookup(bucket, name, self.query.get("generation"))
            self.gcs._refuse_if_discarded(bucket, name)
            f = open(obj.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        with f:
            self._check_read_preconditions(obj)
            res = obj.resource
            size = int(res["size"])
            start, end = 0, size - 1
            status = 200
            rng = self.headers.get("Range")
            if rng:
                parsed = _parse_range(rng, size)
                if parsed is None:
                    raise _HttpError(416, "The requested range cannot be satisfied.")
                start, end = parsed
                status = 206
            count = max(0, end - start + 1)
            self.rec.range_start = start
            self.rec.bytes_sent = 0
            hashes = [f"crc32c={res['crc32c']}"]
            if "md5Hash" in res:
                hashes.append(f"md5={res['md5Hash']}")
            headers = [
                ("X-Goog-Hash", ",".join(hashes)),
                ("X-Goog-Generation", res["generation"]),
                ("X-Goog-Metageneration", res["metageneration"]),
                ("X-Goog-Stored-Content-Length", res["size"]),
                ("X-Goog-Stored-Content-Encoding", res.get("contentEncoding", "identity")),
                ("X-Goog-Storage-Class", res["storageClass"]),
                ("ETag", f'"{res["etag"]}"'),
                ("Accept-Ranges", "bytes"),
                ("Last-Modified", self.date_time_string(_parse_time(res["updated"]))),
            ]
            accept = self.headers.get("Accept-Encoding", "")
            if res.get("contentEncoding") and "gzip" in accept.lower():
                headers.append(("Content-Encoding", res["contentEncoding"]))
            if res.get("cacheControl"):
                headers.append(("Cache-Control", res["cacheControl"]))
            if res.get("contentDisposition"):
                headers.append(("Content-Disposition", res["contentDisposition"]))
            if status == 206:
                headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            pacer = _Pacer(fault, self.gcs._stop, count, download=True, on_fire=self._fired)
            pacer.head()
            self._send(status, b"", headers, res["contentType"], length=count)
            if self.command == "HEAD" or count == 0:
                if fault is not None and fault.kind == "reset":
                    pacer.finish()
                return
            corrupt = None
            if fault is not None and fault.kind == "corrupt_download":
                corrupt = fault.offset if fault.offset is not None else count // 2
                corrupt = min(max(corrupt, 0), count - 1)
            if fault is None or fault.kind not in ("reset", "stall", "trickle", "corrupt_download"):
                self.rec.bytes_sent = self.connection.sendfile(f, offset=start, count=count)
                return
            mv = _thread_buffer()
            sent = 0
            f.seek(start)
            while sent < count:
                want = pacer.limit(min(len(mv), count - sent))
                n = f.readinto(mv[:want])
                if not n:
                    raise OSError("object file shorter than its size")
                if corrupt is not None and sent <= corrupt < sent + n:
                    mv[corrupt - sent] ^= 0xFF
                self.wfile.write(mv[:n])
                sent += n
                self.rec.bytes_sent = sent
                pacer.advance(n)
            pacer.finish()

    # ---- compose --------------------------------------------------------------------------

    def _compose(self, bucket: str, dest: str) -> None:
        fault = self._pick("compose", dest)
        # Faults that strike after the object is composed: its answer is lost, or its bytes wrong.
        after = fault is not None and (
            fault.kind in ("lost", "corrupt_compose")
            or (
                fault.kind == "reset"
                and fault.after_bytes is not None
                and fault.after_bytes >= (self.body.length or 0)
            )
        )
        if fault is not None and not after:
            if self._apply_status_fault(fault):
                return
            self._pre_body_fault(fault)
        try:
            req = json.loads(self._read_small(_MAX_JSON) or b"{}")
        except ValueError:
            raise _HttpError(400, "invalid JSON") from None
        sources = req.get("sourceObjects") if isinstance(req, dict) else None
        if not sources or not isinstance(sources, list):
            raise _HttpError(400, "sourceObjects required")
        if len(sources) > _MAX_SOURCES:
            raise _HttpError(
                400,
                f"The number of source components provided ({len(sources)}) "
                f"exceeds the maximum ({_MAX_SOURCES})",
            )
        destination = req.get("destination") or {}
        _validate_name(dest)
        self.gcs._check_bucket(bucket)
        files: list = []
        kept: list[tuple[int, str]] = []  # discard mode: (size, crc32c) of each source
        sizes = 0
        try:
            components = 0
            with self.gcs._lock:
                for s in sources:
                    if not isinstance(s, dict) or not s.get("name"):
                        raise _HttpError(400, "source object name required")
                    obj = self.gcs._lookup(bucket, s["name"], s.get("generation"))
                    pre = (s.get("objectPreconditions") or {}).get("ifGenerationMatch")
                    if pre is not None and int(pre) != int(obj.resource["generation"]):
                        raise _HttpError(
                            412, "At least one of the pre-conditions you specified did not hold."
                        )
                    components += int(obj.resource.get("componentCount", 1))
                    sizes += int(obj.resource["size"])
                    if self.gcs.discard:  # no bytes: the sources' CRC32C values combine
                        kept.append((int(obj.resource["size"]), obj.resource["crc32c"]))
                        continue
                    files.append(open(obj.path, "rb", buffering=0))  # noqa: SIM115 - closed below
                self.gcs._check_write_preconditions(bucket, dest, _preconditions(self.query))
            if components > _MAX_COMPONENTS:
                raise _HttpError(400, f"composite objects may have at most {_MAX_COMPONENTS} components")
            tmp = self.gcs._tmp_path()
            crc = size = 0
            corrupt = None
            if fault is not None and fault.kind == "corrupt_compose" and sizes:
                corrupt = min(max(fault.offset if fault.offset is not None else sizes // 2, 0), sizes - 1)
            mv = _thread_buffer()
            if kept:  # for benchmarks only (--discard); composed bytes are hashed below
                from gcsstream.checksums import crc32c_combine

                for n, value in kept:
                    crc = crc32c_combine(crc, int.from_bytes(base64.b64decode(value), "big"), n)
                    size += n
            with open(tmp, "wb", buffering=0) as out:
                for src in files:
                    while True:
                        n = src.readinto(mv)
                        if not n:
                            break
                        if corrupt is not None and size <= corrupt < size + n:
                            mv[corrupt - size] ^= 0xFF
                        crc = _crc_update(crc, mv[:n])
                        out.write(mv[:n])
                        size += n
        finally:
            for src in files:
                src.close()
        meta = {k: v for k, v in destination.items() if k in _META_FIELDS}
        if self.query.get("kmsKeyName"):
            meta["kmsKeyName"] = self.query["kmsKeyName"]
        try:
            res = self.gcs._store_object(
                bucket,
                dest,
                tmp,
                meta,
                size,
                crc,
                None,
                _preconditions(self.query),
                component_count=components,
            )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if after and fault.kind == "reset":
            raise _Reset()
        if after and fault.kind == "lost":
            self._error(fault.status or 503, "injected fault: lost (the object was composed)")
            return
        self._json(200, res)

    # ---- simple uploads -------------------------------------------------------------------

    def _simple_upload(self, bucket: str, utype: str) -> None:
        name = self.query.get("name")
        if self._generic_faults("simple", name):
            return
        self.gcs._check_bucket(bucket)
        pre = _preconditions(self.query)
        tmp = self.gcs._tmp_path()
        try:
            if utype == "media":
                if not name:
                    raise _HttpError(400, "object name required")
                meta: dict[str, Any] = {"contentType": self.headers.get("Content-Type")}
                crc = size = 0
                md5 = hashlib.md5()
                mv = _thread_buffer()
                with open(tmp, "wb", buffering=0) as out:
                    while True:
                        n = self.body.readinto(mv)
                        crc = _crc_update(crc, mv[:n])
                        md5.update(mv[:n])
                        if not self.gcs.discard:
                            out.write(mv[:n])
                        size += n
                        if n < len(mv):
                            break
                if self.body.broken:
                    self.close_connection = True
                    tmp.unlink(missing_ok=True)
                    return
            else:
                meta, data = _parse_multipart(
                    self.headers.get("Content-Type", ""), self._read_small(_MAX_MULTIPART)
                )
                name = meta.get("name") or name
                if not name:
                    raise _HttpError(400, "object name required")
                crc, size, md5 = _crc_update(0, data), len(data), hashlib.md5(data)
                tmp.write_bytes(data)
            _validate_name(name)
            self.rec.name = name
            _check_hash_header(self.headers, crc, lambda: md5.copy())
            meta = {k: v for k, v in meta.items() if k in _META_FIELDS}
            if self.query.get("kmsKeyName"):
                meta["kmsKeyName"] = self.query["kmsKeyName"]
            res = self.gcs._store_object(bucket, name, tmp, meta, size, crc, md5.digest(), pre)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._json(200, res)

    # ---- resumable uploads ----------------------------------------------------------------

    def _initiate(self, bucket: str) -> None:
        # The (small) metadata body is read first so that faults can be targeted by object name.
        raw = self._small = self._read_small(_MAX_JSON)
        try:
            meta = json.loads(raw) if raw.strip() else {}
        except ValueError:
            meta = None
        name = (meta.get("name") if isinstance(meta, dict) else None) or self.query.get("name")
        fault = self._pick("initiate", name)
        if fault is not None:
            if self._apply_status_fault(fault):
                return
            self._pre_body_fault(fault)
        self.gcs._check_bucket(bucket)
        if meta is None:
            raise _HttpError(400, "invalid JSON in the object metadata")
        if not isinstance(meta, dict):
            raise _HttpError(400, "object metadata must be a JSON object")
        if not name:
            raise _HttpError(400, "Required object name is missing")
        _validate_name(name)
        self.rec.name = name
        meta = {k: v for k, v in meta.items() if k in _META_FIELDS}
        if not meta.get("contentType") and self.headers.get("X-Upload-Content-Type"):
            meta["contentType"] = self.headers["X-Upload-Content-Type"]
        if self.query.get("kmsKeyName"):
            meta["kmsKeyName"] = self.query["kmsKeyName"]
        if meta.get("metadata") is not None and not isinstance(meta["metadata"], dict):
            raise _HttpError(400, "metadata must be an object")
        declared = self.headers.get("X-Upload-Content-Length")
        pre = _preconditions(self.query)
        self.gcs._check_write_preconditions(bucket, name, pre)
        sess = self.gcs._new_session(bucket, name, meta)
        sess.preconditions = pre
        if declared is not None:
            try:
                sess.declared_size = int(declared)
                if sess.declared_size < 0:
                    raise ValueError
            except ValueError:
                raise _HttpError(400, "invalid X-Upload-Content-Length") from None
        self.rec.session = redact(sess.upload_id)
        host = self.headers.get("Host") or f"{self.gcs.host}:{self.gcs.port}"
        location = (
            f"http://{host}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
            f"?uploadType=resumable&upload_id={sess.upload_id}"
        )
        self._send(200, b"", [("Location", location), ("X-GUploader-UploadID", sess.upload_id)])

    def _cancel(self, upload_id: str) -> None:
        sess = self.gcs._sessions.get(upload_id)
        self.rec.session = redact(upload_id)
        fault = self._pick("cancel", sess.name if sess else None)
        if fault is not None:
            if self._apply_status_fault(fault):
                return
            self._pre_body_fault(fault)
        self._drain()
        if sess is None:
            raise _HttpError(404, "No such upload session")
        with sess.lock:
            if sess.cancelled or sess.expired:
                raise _HttpError(sess.expire_status if sess.expired else 410, "The upload session is gone.")
            if sess.finalized:
                raise _HttpError(410, "The upload session is already complete.")
            sess.cancelled = True
            sess.writer += 1
            if sess.tail is not None:
                sess.tail.close()
            sess.path.unlink(missing_ok=True)
        self._send(499, b"")

    def _range_headers(self, sess: _Session) -> list[tuple[str, str]]:
        headers = [("X-GUploader-UploadID", sess.upload_id)]
        if sess.persisted > 0:
            headers.append(("Range", f"bytes=0-{sess.persisted - 1}"))
        self.rec.persisted = sess.persisted
        return headers

    def _session_put(self, upload_id: str) -> None:
        sess = self.gcs._sessions.get(upload_id)
        self.rec.session = redact(upload_id)
        cr = self.headers.get("Content-Range")
        blen = self.body.length
        first = last = total = None
        bad_range = None
        if cr is None:
            if blen is None:
                bad_range = "Content-Range or Content-Length required"
            elif blen:
                first, last, total = 0, blen - 1, blen
            else:
                total = 0
        else:
            m = _CONTENT_RANGE_RE.match(cr)
            if not m:
                bad_range = f"invalid Content-Range {cr!r}"
            else:
                if not m.group(1):
                    first, last = int(m.group(2)), int(m.group(3))
                total = None if m.group(4) == "*" else int(m.group(4))
        if first is None and total is None:
            kind = "status"
        elif total is not None and (last is None or last + 1 == total):
            kind = "final"
        else:
            kind = "chunk"
        chunk_len = 0 if first is None else (last - first + 1)
        fault = self._pick(kind, sess.name if sess else None, blen if blen is not None else chunk_len)
        if fault is not None:
            if fault.kind == "expire" and sess is not None:
                with sess.lock:
                    sess.expired = True
                    sess.expire_status = fault.status or 410
                    sess.writer += 1
                    if sess.tail is not None:
                        sess.tail.close()
                if fault.read_body:
                    self._drain()
                return self._error(
                    sess.expire_status, "The upload session has expired.", close=not fault.read_body
                )
            if fault.kind in ("unauthorized", "expire") or (
                fault.kind == "status" and (first is None or not fault.read_body)
            ):
                self._apply_status_fault(fault)
                return
        if sess is None:
            raise _HttpError(404, "No such upload session")
        if sess.cancelled or sess.expired:
            raise _HttpError(sess.expire_status if sess.expired else 410, "The upload session is gone.")
        if sess.finalized:
            if fault is not None and self._apply_status_fault(fault):
                return
            self._drain()
            self.rec.persisted = sess.persisted
            return self._json(200, sess.resource)
        if bad_range:
            raise _HttpError(400, bad_range)
        if first is not None and last < first:
            raise _HttpError(400, f"invalid Content-Range {cr!r}")
        if blen is not None and blen != chunk_len:
            self.close_connection = True
            raise _HttpError(400, f"Content-Length {blen} does not match Content-Range {cr!r}")
        if total is not None:
            if last is not None and last + 1 > total:
                raise _HttpError(400, f"Content-Range {cr!r} goes past the total size")
            if sess.total is not None and total != sess.total:
                raise _HttpError(
                    400, f"total size {total} differs from the one declared before ({sess.total})"
                )
            if sess.declared_size is not None and total != sess.declared_size:
                raise _HttpError(
                    400, f"total size {total} differs from X-Upload-Content-Length {sess.declared_size}"
                )
        if sess.declared_size is not None and last is not None and last + 1 > sess.declared_size:
            raise _HttpError(400, "chunk goes past X-Upload-Content-Length")
        if kind == "chunk" and chunk_len % QUANTUM:
            raise _HttpError(
                400,
                f"Invalid request. The number of bytes uploaded is required to be equal or greater than "
                f"{QUANTUM}, except for the final request (it's recommended to be the exact multiple of "
                f"{QUANTUM} bytes).",
            )

        if first is None:  # status query, or finalize with no body
            pacer = _Pacer(fault, self.gcs._stop, 0, on_fire=self._fired)
            self._drain()
            pacer.finish()
            with sess.lock:
                if sess.cancelled or sess.expired:
                    raise _HttpError(
                        sess.expire_status if sess.expired else 410, "The upload session is gone."
                    )
                if sess.finalized:
                    self.rec.persisted = sess.persisted
                    return self._json(200, sess.resource)
                if total is not None:
                    if sess.persisted > total:
                        raise _HttpError(
                            400, f"{sess.persisted} bytes are persisted, more than the total {total}"
                        )
                    if sess.persisted == total and (fault is None or fault.kind != "partial"):
                        sess.total = total
                        return self._json(200, self._finalize(sess, sess.persisted, sess.crc, None))
                return self._send(308, b"", self._range_headers(sess))
        self._receive(sess, kind, first, chunk_len, total, fault)

    def _receive(
        self, sess: _Session, kind: str, first: int, chunk_len: int, total: int | None, fault: Fault | None
    ) -> None:
        with sess.lock:
            p0, crc = sess.persisted, sess.crc
            sess.writer += 1
            token = sess.writer
            h = sess.md5.copy() if sess.md5 is not None else None
        discard = self.gcs.discard
        if first > p0:
            raise _HttpError(
                400, f"Invalid request. The chunk starts at {first} but only {p0} bytes are persisted."
            )
        if kind == "final" and first + chunk_len < p0:
            raise _HttpError(400, f"total size {first + chunk_len} is less than the {p0} bytes persisted")
        skip = min(p0 - first, chunk_len)
        new_len = chunk_len - skip
        keep = new_len
        fk = fault.kind if fault else None
        if fk == "partial":
            want = new_len // 2 if fault.persist is None else fault.persist
            keep = _floor_q(min(want, max(new_len - 1, 0)))
        elif fk == "status":
            keep = _floor_q(min(fault.persist or 0, new_len if kind == "chunk" else max(new_len - 1, 0)))
        elif fk == "reset" and fault.persist is not None:
            keep = _floor_q(min(fault.persist, new_len))
        pacer = _Pacer(fault, self.gcs._stop, chunk_len, on_fire=self._fired)
        mv = _thread_buffer()
        body = self.body
        reset_hit = False

        def read(view: memoryview) -> int:
            nonlocal reset_hit
            got = 0
            while got < len(view) and not reset_hit:
                try:
                    want = pacer.limit(len(view) - got)
                except _Reset:
                    reset_hit = True
                    break
                n = body.readinto(view[got : got + want])
                pacer.advance(n)
                got += n
                if n < want:
                    break
            return got

        kept = 0
        superseded = False
        self.gcs._busy_add(1)  # pauses MD5 threads while a body is received
        try:
            left = skip
            while left > 0 and not (body.broken or body.ended or reset_hit):
                left -= read(mv[: min(len(mv), left)])
            if left == 0:
                fd = os.open(sess.path, os.O_WRONLY) if not discard else -1
                try:
                    left = new_len
                    while left > 0:
                        want = min(len(mv), left)
                        n = read(mv[:want])
                        left -= n
                        usable = n if n == want else _floor_q(n)
                        usable = max(0, min(usable, keep - kept))
                        if usable:
                            piece = mv[:usable]
                            with sess.lock:
                                if sess.writer != token or sess.cancelled or sess.expired or sess.finalized:
                                    superseded = True
                                    break
                                off = p0 + kept
                                while piece and not discard:
                                    w = os.pwrite(fd, piece, off)
                                    piece, off = piece[w:], off + w
                            crc = _crc_update(crc, mv[:usable])
                            if h is not None:
                                h.update(mv[:usable])
                            kept += usable
                        if n < want:
                            break
                finally:
                    if not discard:
                        os.close(fd)
        finally:
            self.gcs._busy_add(-1)
        if h is not None:
            with sess.lock:
                if sess.writer == token:
                    sess.md5_pending = (p0 + kept, h)
        if not superseded and not reset_hit and left == 0:
            if body.chunked and not body.ended and not body.broken and body.readinto(mv[:1]):
                self._drain()
                raise _HttpError(400, "request body is longer than its Content-Range")
            try:
                pacer.finish()
            except _Reset:
                reset_hit = True
        if reset_hit:
            # The connection is dropped without an answer.  A final chunk that arrived whole is
            # finalized first (the "response lost" case); otherwise the kept prefix is committed.
            if kind == "final" and kept == new_len and left == 0:
                with sess.lock:
                    if sess.writer == token and not (sess.cancelled or sess.expired or sess.finalized):
                        sess.total = total
                        try:
                            self._finalize(sess, p0 + kept, crc, (p0, kept))
                        except _HttpError as e:
                            self.rec.error = e.message
            else:
                self._commit(sess, token, p0, kept, crc)
            raise _Reset()
        if superseded:
            self._drain()
            if sess.cancelled or sess.expired:
                raise _HttpError(sess.expire_status if sess.expired else 410, "The upload session is gone.")
            if sess.finalized:
                return self._json(200, sess.resource)
            raise _HttpError(503, "superseded by a newer request on the same session")
        if left > 0:  # the body ended early
            self._commit(sess, token, p0, kept, crc)
            if body.broken:
                self.close_connection = True
                return
            raise _HttpError(400, "request body is shorter than its Content-Range")
        if fk == "status":
            self._commit(sess, token, p0, kept, crc)
            self._apply_status_fault(fault)
            return
        if fk == "lost":
            with sess.lock:
                if (
                    kind == "final"
                    and sess.writer == token
                    and not (sess.cancelled or sess.expired or sess.finalized)
                ):
                    sess.total = total
                    self._finalize(sess, p0 + kept, crc, (p0, kept))  # a refusal is answered as such
            if kind != "final":
                self._commit(sess, token, p0, kept, crc, total)
            self._apply_status_fault(fault)
            return
        if kind == "final" and kept == new_len:
            with sess.lock:
                if sess.writer != token or sess.cancelled or sess.expired or sess.finalized:
                    raise _HttpError(503, "superseded by a newer request on the same session")
                sess.total = total
                res = self._finalize(sess, p0 + kept, crc, (p0, kept))
            return self._json(200, res)
        self._commit(sess, token, p0, kept, crc, total)
        with sess.lock:
            self._send(308, b"", self._range_headers(sess))

    def _commit(
        self, sess: _Session, token: int, p0: int, kept: int, crc: int, total: int | None = None
    ) -> None:
        with sess.lock:
            if (
                sess.writer != token
                or sess.cancelled
                or sess.expired
                or sess.finalized
                or sess.persisted != p0
            ):
                return
            if total is not None:
                sess.total = total
            if kept:
                sess.persisted = p0 + kept
                sess.crc = crc
                if sess.md5_pending is not None and sess.md5_pending[0] == sess.persisted:
                    sess.md5 = sess.md5_pending[1]
                if sess.tail is not None:
                    sess.tail.advance(sess.persisted)
            self.rec.persisted = sess.persisted

    def _finalize(self, sess: _Session, size: int, crc: int, pending: tuple[int, int] | None) -> dict:
        """Create the object (sess.lock held).  ``pending``: (offset, length) of bytes written by
        this request but not yet committed (informational: they are committed only if every
        check passes, which is why nothing before this point touched ``sess.persisted``)."""
        if sess.declared_size is not None and size != sess.declared_size:
            raise _HttpError(
                400, f"the object has {size} bytes but X-Upload-Content-Length declared {sess.declared_size}"
            )

        md5_cache: list = []

        def md5_upto_size():
            if sess.md5 is not None:  # discard mode: there is no file to hash
                pending = sess.md5_pending
                return (pending[1] if pending and pending[0] == size else sess.md5).copy()
            if not md5_cache:
                h, done = sess.tail.take() if sess.tail is not None else (hashlib.md5(), 0)
                _hash_file(sess.path, done, size, h)
                md5_cache.append(h)
            return md5_cache[0].copy()

        _check_hash_header(self.headers, crc, md5_upto_size)
        md5 = None
        if self.gcs.md5:
            md5 = md5_upto_size().digest()
        if not self.gcs.discard:
            with open(sess.path, "r+b") as f:
                f.truncate(size)
        res = self.gcs._store_object(
            sess.bucket, sess.name, sess.path, sess.meta, size, crc, md5, sess.preconditions
        )
        sess.persisted = size
        sess.crc = crc
        sess.finalized = True
        sess.resource = res
        sess.writer += 1
        if sess.tail is not None:
            sess.tail.close()
        self.rec.persisted = size
        return res


# --------------------------------------------------------------------------------------------
# helpers

_META_FIELDS = (
    "contentType",
    "cacheControl",
    "contentEncoding",
    "contentDisposition",
    "contentLanguage",
    "metadata",
    "storageClass",
    "kmsKeyName",
    "customTime",
    "temporaryHold",
    "eventBasedHold",
)


def _int_param(q: dict, key: str) -> int:
    try:
        return int(q[key])
    except ValueError:
        raise _HttpError(400, f"invalid {key}") from None


def _preconditions(q: dict) -> dict[str, int]:
    return {
        k: _int_param(q, k)
        for k in ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch")
        if k in q
    }


def _validate_name(name: str) -> None:
    if not name or len(name.encode("utf-8", "surrogatepass")) > 1024 or "\r" in name or "\n" in name:
        raise _HttpError(400, "Invalid object name")
    if name in (".", ".."):
        raise _HttpError(400, "Invalid object name")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix
        n = int(m.group(2))
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def _parse_time(ts: str) -> float:
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))


def _hash_file(path: Path, start: int, end: int, h) -> None:
    mv = memoryview(bytearray(min(_BUF_SIZE, max(end - start, 1))))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        pos = start
        while pos < end:
            n = f.readinto(mv[: min(len(mv), end - pos)])
            if not n:
                raise OSError("file shorter than expected")
            h.update(mv[:n])
            pos += n


def _check_hash_header(headers, crc: int, md5_fn: Callable[[], Any]) -> None:
    """Verify X-Goog-Hash (crc32c and/or md5) against the whole object; 400 on a mismatch."""
    values = headers.get_all("X-Goog-Hash") or []
    for value in values:
        for part in value.split(","):
            alg, sep, digest = part.strip().partition("=")
            if not sep:
                continue
            alg = alg.strip().lower()
            digest = digest.strip()
            if alg == "crc32c":
                actual = _crc_b64(crc)
            elif alg == "md5":
                actual = _b64(md5_fn().digest())
            else:
                continue
            if digest != actual:
                raise _HttpError(
                    400,
                    f'Provided {alg.upper()} hash "{digest}" doesn\'t match '
                    f'calculated {alg.upper()} hash "{actual}".',
                )


def _parse_multipart(content_type: str, data: bytes) -> tuple[dict, bytes]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise _HttpError(400, "multipart upload without a boundary")
    delim = b"--" + m.group(1).encode("latin-1")
    parts = data.split(delim)
    bodies = []
    for part in parts[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise _HttpError(400, "malformed multipart part")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        ctype = ""
        for line in head.split(b"\r\n"):
            k, _, v = line.decode("latin-1").partition(":")
            if k.strip().lower() == "content-type":
                ctype = v.strip()
        bodies.append((ctype, content))
    if len(bodies) != 2:
        raise _HttpError(400, "multipart upload needs a metadata part and a media part")
    try:
        meta = json.loads(bodies[0][1] or b"{}")
    except ValueError:
        raise _HttpError(400, "invalid JSON metadata part") from None
    if not isinstance(meta, dict):
        raise _HttpError(400, "invalid JSON metadata part")
    if not meta.get("contentType") and bodies[1][0]:
        meta["contentType"] = bodies[1][0]
    return meta, bodies[1][1]


# --------------------------------------------------------------------------------------------
# the server


class GcsTestServer:
    """The test server.  Use as a context manager (or call :meth:`start` / :meth:`stop`).

    ``data_dir``: where session and object files live (default: a temporary directory removed on
    stop).  ``md5=False`` skips MD5 (resources then have no md5Hash, like composite objects;
    X-Goog-Hash md5 is still verified), for benchmarks of the client alone.  ``discard=True``
    keeps no uploaded bytes, only their size, crc32c and md5Hash (see the module's docstring).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        faults: FaultPlan | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        buckets: Iterable[str] = (),
        md5: bool = True,
        verbose: bool = False,
        discard: bool = False,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="gcs-test-server-"))
        )
        self._faults = faults if faults is not None else FaultPlan()
        self.host = host
        self._port = port
        self.md5 = md5
        self.verbose = verbose
        self.discard = discard
        self._lock = threading.RLock()
        self._buckets: dict[str, dict] = {}
        self._objects: dict[str, dict[str, _Object]] = {}
        self._sessions: dict[str, _Session] = {}
        self._log: list[RequestRecord] = []
        self._log_cond = threading.Condition()
        self._seq = 0
        self._generation = 0
        self._tmp_seq = 0
        self._stop = threading.Event()
        self._busy = 0
        self._idle = threading.Condition()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        for sub in ("sessions", "objects", "tmp"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        for b in buckets:
            self.create_bucket(b)

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> GcsTestServer:
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self._port), _Handler, self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="gcs-test-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for _, t in conns:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for sess in self._sessions.values():
                if sess.tail is not None:
                    sess.tail.close()
        self._httpd = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> GcsTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def faults(self) -> FaultPlan:
        return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        self._faults = plan if plan is not None else FaultPlan()

    def _track(self, conn: socket.socket, thread: threading.Thread, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns[conn] = thread
            else:
                self._conns.pop(conn, None)

    # ---- buckets & objects API ------------------------------------------------------------

    def create_bucket(self, name: str, **fields: Any) -> dict:
        """Create a bucket (idempotent) and return its resource."""
        with self._lock:
            if name in self._buckets:
                return self._buckets[name]
            if len(name) < 3 or len(name) > 222 or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*[a-z0-9]", name):
                raise ValueError(f"invalid bucket name {name!r}")
            now = _rfc3339(time.time())
            res = {
                "kind": "storage#bucket",
                "id": name,
                "name": name,
                "projectNumber": "0",
                "metageneration": "1",
                "location": fields.get("location", "US"),
                "storageClass": fields.get("storageClass", "STANDARD"),
                **{
                    k: fields[k]
                    for k in ("retentionPolicy", "defaultEventBasedHold", "versioning")
                    if k in fields
                },
                "etag": "CAE=",
                "timeCreated": now,
                "updated": now,
                "selfLink": f"{self.url}/storage/v1/b/{name}",
            }
            self._buckets[name] = res
            self._objects.setdefault(name, {})
            (self.data_dir / "objects" / name).mkdir(parents=True, exist_ok=True)
            return res

    def buckets(self) -> list[str]:
        with self._lock:
            return sorted(self._buckets)

    def object_path(self, bucket: str, name: str) -> Path:
        """The file holding the object's bytes (whether or not it exists)."""
        fn = quote(name, safe=" -_~,=+@")
        if fn in (".", "..") or len(fn) > 200:
            fn = "sha256-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        return self.data_dir / "objects" / bucket / fn

    def object_resource(self, bucket: str, name: str) -> dict | None:
        with self._lock:
            obj = self._objects.get(bucket, {}).get(name)
            return json.loads(json.dumps(obj.resource)) if obj else None

    def read_object(self, bucket: str, name: str) -> bytes:
        """The object's bytes (small objects only); KeyError if it does not exist, ValueError if
        the server discards bytes."""
        with self._lock:
            obj = self._objects.get(bucket, {}).get(name)
            if obj is None:
                raise KeyError(f"{bucket}/{name}")
            if self.discard:
                raise ValueError(f"the test server runs with discard=True: {bucket}/{name} has no bytes")
            f = open(obj.path, "rb")  # noqa: SIM115 - opened under the lock, read outside it
        with f:
            return f.read()

    def list_objects(self, bucket: str) -> list[str]:
        with self._lock:
            return sorted(self._objects.get(bucket, {}))

    def put_object(self, bucket: str, name: str, data: bytes, **meta: Any) -> dict:
        """Create an object directly (for download / compose tests)."""
        _validate_name(name)
        self._check_bucket(bucket)
        tmp = self._tmp_path()
        tmp.write_bytes(data)
        md5 = hashlib.md5(data).digest() if self.md5 else None
        return self._store_object(bucket, name, tmp, meta, len(data), _crc_update(0, data), md5, {})

    def delete_object(self, bucket: str, name: str) -> bool:
        with self._lock:
            if name not in self._objects.get(bucket, {}):
                return False
            self._remove_object(bucket, name)
            return True

    # ---- sessions & log API ---------------------------------------------------------------

    def sessions(self) -> list[SessionState]:
        with self._lock:
            sessions = list(self._sessions.values())
        return [s.state() for s in sorted(sessions, key=lambda s: s.created)]

    def session(self, uri_or_id: str) -> SessionState | None:
        """State of a session given its URI or upload id."""
        m = re.search(r"upload_id=([^&\s]+)", uri_or_id)
        uid = unquote(m.group(1)) if m else uri_or_id
        with self._lock:
            s = self._sessions.get(uid)
        return s.state() if s else None

    def expire_session(self, uri_or_id: str, status: int = 410) -> None:
        """Make a session answer ``status`` (410 or 404) from now on."""
        m = re.search(r"upload_id=([^&\s]+)", uri_or_id)
        uid = unquote(m.group(1)) if m else uri_or_id
        with self._lock:
            s = self._sessions[uid]
        with s.lock:
            s.expired = True
            s.expire_status = status
            s.writer += 1
            if s.tail is not None:
                s.tail.close()

    @property
    def requests(self) -> list[RequestRecord]:
        with self._log_cond:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_cond:
            self._log.clear()

    def wait_for_request(
        self, match: Callable[[RequestRecord], bool], timeout: float = 10.0
    ) -> RequestRecord:
        """Wait until a logged request satisfies ``match`` (records are logged when a request
        starts and updated as it is answered); return it, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._log_cond:
            while True:
                for r in self._log:
                    if match(r):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching request")
                self._log_cond.wait(left)

    # ---- internals ------------------------------------------------------------------------

    def _busy_add(self, delta: int) -> None:
        with self._idle:
            self._busy += delta
            if not self._busy:
                self._idle.notify_all()

    def _wait_idle(self) -> None:
        """Wait until no request body is being received (see _Md5Tail)."""
        with self._idle:
            while self._busy and not self._stop.is_set():
                self._idle.wait(0.1)

    def _touch(self) -> None:
        with self._log_cond:
            self._log_cond.notify_all()

    def _new_record(
        self,
        method: str,
        path: str,
        content_range: str | None,
        clen: int | None,
        range_header: str | None = None,
    ) -> RequestRecord:
        with self._log_cond:
            self._seq += 1
            rec = RequestRecord(
                seq=self._seq,
                method=method,
                kind="other",
                path=path,
                content_range=content_range,
                content_length=clen,
                started=time.monotonic(),
                range_header=range_header,
            )
            self._log.append(rec)
            self._log_cond.notify_all()
            return rec

    def _fired(self, rec: RequestRecord, position: int) -> None:
        with self._log_cond:
            rec.fired_at = position
            self._log_cond.notify_all()

    def _finish_record(self, rec: RequestRecord) -> None:
        with self._log_cond:
            rec.finished = time.monotonic()
            rec.done = True
            self._log_cond.notify_all()

    def _check_bucket(self, bucket: str) -> None:
        with self._lock:
            if bucket not in self._buckets:
                raise _HttpError(404, "The specified bucket does not exist.")

    def _lookup(self, bucket: str, name: str, generation: Any = None) -> _Object:
        with self._lock:
            if bucket not in self._buckets:
                raise _HttpError(404, "The specified bucket does not exist.")
            obj = self._objects[bucket].get(name)
            if obj is None or (
                generation not in (None, "") and str(generation) != obj.resource["generation"]
            ):
                raise _HttpError(404, f"No such object: {bucket}/{name}")
            return obj

    def _tmp_path(self) -> Path:
        with self._lock:
            self._tmp_seq += 1
            return self.data_dir / "tmp" / f"{self._tmp_seq}-{secrets.token_hex(4)}"

    def _new_session(self, bucket: str, name: str, meta: dict) -> _Session:
        uid = "ADPyc" + secrets.token_urlsafe(32)
        path = self.data_dir / "sessions" / secrets.token_hex(12)
        path.touch()
        sess = _Session(uid, bucket, name, meta, path)
        if self.md5 and self.discard:
            sess.md5 = hashlib.md5()
        elif self.md5:
            sess.tail = _Md5Tail(path, self)
        with self._lock:
            self._sessions[uid] = sess
        return sess

    def _check_write_preconditions(self, bucket: str, name: str, pre: dict[str, int]) -> None:
        with self._lock:
            obj = self._objects.get(bucket, {}).get(name)
            gen = int(obj.resource["generation"]) if obj else 0
            ok = True
            if "ifGenerationMatch" in pre and pre["ifGenerationMatch"] != gen:
                ok = False
            if "ifGenerationNotMatch" in pre and pre["ifGenerationNotMatch"] == gen:
                ok = False
            if "ifMetagenerationMatch" in pre and (
                obj is None or pre["ifMetagenerationMatch"] != int(obj.resource["metageneration"])
            ):
                ok = False
            if not ok:
                raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")

    def _store_object(
        self,
        bucket: str,
        name: str,
        src: Path,
        meta: dict,
        size: int,
        crc: int,
        md5: bytes | None,
        pre: dict[str, int],
        component_count: int | None = None,
    ) -> dict:
        """Move ``src`` into place as the object's new generation (preconditions re-checked)."""
        with self._lock:
            self._check_bucket(bucket)
            self._check_write_preconditions(bucket, name, pre)
            self._generation = max(self._generation + 1, time.time_ns() // 1000)
            gen = self._generation
            now = _rfc3339(time.time())
            qb, qn = quote(bucket, safe=""), quote(name, safe="")
            res: dict[str, Any] = {
                "kind": "storage#object",
                "id": f"{bucket}/{name}/{gen}",
                "selfLink": f"{self.url}/storage/v1/b/{qb}/o/{qn}",
                "mediaLink": f"{self.url}/download/storage/v1/b/{qb}/o/{qn}?generation={gen}&alt=media",
                "name": name,
                "bucket": bucket,
                "generation": str(gen),
                "metageneration": "1",
                "contentType": meta.get("contentType") or "application/octet-stream",
                "storageClass": meta.get("storageClass") or "STANDARD",
                "size": str(size),
                "crc32c": _crc_b64(crc),
                "etag": _b64(gen.to_bytes(8, "big")).rstrip("="),
                "timeCreated": now,
                "updated": now,
                "timeStorageClassUpdated": now,
            }
            if md5 is not None:
                res["md5Hash"] = _b64(md5)
            for k in (
                "cacheControl",
                "contentEncoding",
                "contentDisposition",
                "contentLanguage",
                "kmsKeyName",
                "customTime",
            ):
                if meta.get(k):
                    res[k] = meta[k]
            if isinstance(meta.get("metadata"), dict):
                md = {str(k): str(v) for k, v in meta["metadata"].items() if v is not None}
                if md:
                    res["metadata"] = md
            if component_count is not None:
                res["componentCount"] = component_count
            bucket_res = self._buckets[bucket]
            if bucket_res.get("defaultEventBasedHold") and "eventBasedHold" not in res:
                res["eventBasedHold"] = True
            period = (bucket_res.get("retentionPolicy") or {}).get("retentionPeriod")
            if period:
                res["retentionExpirationTime"] = _rfc3339(time.time() + int(period))
            path = self.object_path(bucket, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, path)
            self._objects[bucket][name] = _Object(path, res)
            return json.loads(json.dumps(res))

    def _refuse_if_discarded(self, bucket: str, name: str) -> None:
        if self.discard:
            raise _HttpError(
                501, f"the test server runs with --discard: the bytes of {bucket}/{name} were not kept"
            )

    def _remove_object(self, bucket: str, name: str) -> None:
        obj = self._objects[bucket].pop(name)
        obj.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.gcs_test_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="default: a temporary directory removed at exit")
    p.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fault-rate", type=float, default=0.0, help="probability of a random fault per chunk PUT"
    )
    p.add_argument("--fault-kinds", default=",".join(FaultPlan.DEFAULT_RANDOM_KINDS))
    p.add_argument("--no-md5", action="store_true", help="do not compute md5Hash")
    p.add_argument("--discard", action="store_true", help="hash upload bodies and keep no bytes")
    p.add_argument("--verbose", action="store_true", help="one line per request on stderr (ids redacted)")
    args = p.parse_args(argv)

    plan = FaultPlan()
    if args.fault_rate > 0:
        kinds = [k.strip() for k in args.fault_kinds.split(",") if k.strip()]
        plan = FaultPlan.random(args.seed, args.fault_rate, kinds=kinds)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    srv = GcsTestServer(
        data_dir=args.data_dir,
        faults=plan,
        host=args.host,
        port=args.port,
        md5=not args.no_md5,
        verbose=args.verbose,
        discard=args.discard,
    )
    srv.start()
    try:
        for b in args.bucket:
            srv.create_bucket(b)
        print(f"READY {srv.url}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
