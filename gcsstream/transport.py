"""Authorized HTTP to one Cloud Storage endpoint: endpoint choice, credentials, timeouts.

This is the only module that speaks HTTP; the engine hands it prepared requests and gets
``Response`` objects back, which keeps a fake transport a drop-in for tests. It is also where
the network is kept honest: credentials and data go only to the endpoint's origin (no redirect
is followed), answers are bounded in size and time, and failures that no retry can cure (a
refused certificate, an unusable proxy) become errors at once.

It is built on the standard library's ``http.client``, not on requests and urllib3: those cost a
tenth of a second of start-up on every run (about a tenth of a 1 GiB upload on loopback), and an
upload needs one keep-alive connection, not their pools, adapters and retries.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import select
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from gcsstream import __version__, debuglog
from gcsstream.errors import AuthError, ServiceError, UsageError
from gcsstream.options import UploadOptions, origin
from gcsstream.redact import printable
from gcsstream.retry import (
    RETRYABLE_STATUSES,
    AnswerTooSlow,
    NetworkError,
    ProxyFailed,
    TokenFetchFailed,
    describe_network_error,
    permanent_network_failure,
)

if TYPE_CHECKING:
    from google.auth import credentials as auth_credentials

    from gcsstream.window import StreamedBody

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
USER_AGENT = f"gcsstream/{__version__}"
#: The largest answer read that is not a media download: the service's are a few KiB.
MAX_ANSWER = 1 << 20
_PIECE = 64 * 1024
_SEND_SLICE = 1024 * 1024  # bytes per socket write: each must finish within the io timeout
_SEND_WAKES = 20  # a blocking write (plain TCP) looks at its progress this often per io timeout


class Headers(dict[str, str]):
    """Request headers by lower-case name (what was sent, for ``--debug``)."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class SentRequest:
    """What an answer answered: its method, URL and headers (``Response.request``)."""

    __slots__ = ("method", "url", "headers")

    def __init__(self, method: str, url: str, headers: Headers) -> None:
        self.method = method
        self.url = url
        self.headers = headers


class Response:
    """An answer: status, headers (case-insensitive), and its body.

    The transport reads a metadata answer whole (``content``); a media answer (``stream``) is read
    by its caller with ``read1``, and ``close`` gives its connection back when the request went out
    whole and the answer was read to its end, or drops it.
    """

    def __init__(
        self,
        raw: http.client.HTTPResponse,
        request: SentRequest,
        elapsed: float,
        release: Callable[[bool], None],
        *,
        body_sent: bool = True,
    ) -> None:
        self.raw = raw
        self.status_code: int = raw.status
        self.reason: str = raw.reason
        self.headers = raw.headers
        self.request = request
        self.url = request.url
        self.elapsed = elapsed  # seconds from the request's start to the answer's headers
        self._content: bytes | None = None
        self._release: Callable[[bool], None] | None = release
        self._reusable = body_sent  # an answer to a body cut off leaves the connection unusable

    @property
    def content(self) -> bytes:
        return self._content if self._content is not None else b""

    @property
    def text(self) -> str:
        return self.content.decode(self.headers.get_content_charset() or "utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def read1(self, n: int) -> bytes:
        """At most ``n`` bytes of the body with at most one read from the network; a failure is
        a ``NetworkError`` (retried), and the connection is then not reused."""
        try:
            return self.raw.read1(n)
        except BaseException as exc:
            self._reusable = False
            raise _network_error(exc) from exc

    def close(self) -> None:
        """Done with the answer: its connection is reused if the answer was read to its end."""
        release, self._release = self._release, None
        if release is None:
            return
        raw = self.raw
        if self._reusable:
            _at_end(raw)
        reusable = self._reusable and raw.isclosed()
        if not reusable:
            raw.close()  # it may hold the socket (an answer that closes the connection)
        release(reusable)

    def _broken(self) -> None:
        self._reusable = False
        self.close()


class HTTPTransport(Protocol):
    """What the engine needs from HTTP: one request at a time, a response with status and headers."""

    endpoint: str
    user_project: str | None

    def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | StreamedBody | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response: ...


def resolve_endpoint(endpoint: str | None = None) -> tuple[str, bool]:
    """The endpoint URL, and whether it is an emulator (reached without credentials).

    ``--endpoint`` wins, then ``STORAGE_EMULATOR_HOST``, then the real service. An ``http://``
    endpoint or ``STORAGE_EMULATOR_HOST`` is taken to be an emulator.
    """
    from_env = os.environ.get("STORAGE_EMULATOR_HOST")
    url = endpoint or from_env or DEFAULT_ENDPOINT
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"the endpoint must be an http:// or https:// URL, got {url!r}")
    emulator = url.startswith("http://") or (endpoint is None and bool(from_env))
    return url.rstrip("/"), emulator


def load_credentials(
    credentials_file: str | None = None, *, anonymous: bool = False
) -> auth_credentials.Credentials | None:
    """Credentials from a file, or None for anonymous (emulators), or Application Default
    Credentials. google-auth's credentials (and the asyncio they import) load only when needed."""
    if anonymous and not credentials_file:
        return None
    import google.auth
    from google.auth import exceptions as auth_exceptions

    if credentials_file:
        if not os.path.isfile(credentials_file):
            raise UsageError(f"credentials file {credentials_file}: no such file")
        try:
            creds, _ = google.auth.load_credentials_from_file(credentials_file, scopes=SCOPES)
        except (auth_exceptions.DefaultCredentialsError, ValueError, OSError) as exc:
            raise AuthError(f"credentials file {credentials_file} is not usable: {exc}") from None
        return creds
    try:
        creds, _ = google.auth.default(scopes=SCOPES)
    except auth_exceptions.DefaultCredentialsError:
        raise AuthError(
            "no Google credentials found: run `gcloud auth application-default login`, "
            "set GOOGLE_APPLICATION_CREDENTIALS, or pass --credentials FILE"
        ) from None
    return creds


class RateLimiter:
    """A token bucket: at most ``rate`` bytes a second on average, bursts of one second's worth
    after a pause. It starts empty: a full one let the first second carry twice the cap (a 100 MiB
    upload at 20M averaged 24 MiB/s)."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise UsageError("the rate limit must be positive")
        self.rate = rate
        self._tokens = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class _SlicedBody:
    """A request body handed to the socket piece by piece, each paid for with a limiter's tokens.

    The body is bytes, or a streamed window's body, whose ``pieces()`` come as the reader gets
    them; a sent piece's buffer is let go before the next is read. Unpaced, a piece goes out
    whole (the connection's ``send`` writes it under the io timeout); paced, in 64 KiB slices.
    """

    PACED_SLICE = 64 * 1024

    def __init__(self, data: Any, limiter: RateLimiter | None) -> None:
        self._data = data
        self._length = len(data)
        self._limiter = limiter
        self._pieces = self._start()
        self._view = memoryview(b"")
        self._sent: memoryview | None = None

    def again(self) -> _SlicedBody:
        """The same body from its start, for a request sent again (after a 401's refresh)."""
        return _SlicedBody(self._data, self._limiter)

    def _start(self) -> Iterator[Any]:
        pieces = getattr(self._data, "pieces", None)
        return pieces() if pieces is not None else iter((self._data,))

    def __len__(self) -> int:
        return self._length

    def read(self, n: int = -1) -> memoryview:
        if not self._view:
            self._drop(self._sent)  # sent: its buffer may go before the next piece is read
            self._view = memoryview(b"")
            piece = next(self._pieces, None)
            if piece is None:
                return self._view
            self._view = memoryview(piece)
        size = self.PACED_SLICE if self._limiter is not None else len(self._view)
        piece, self._view = self._view[:size], self._view[size:]
        if self._limiter is not None:
            self._limiter.consume(len(piece))
        self._sent = piece
        return piece

    def close(self) -> None:
        """Done with this sending (a 401 is sent again from a fresh body): let its piece go."""
        self._drop(self._sent)
        self._sent, self._view = None, memoryview(b"")
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    @staticmethod
    def _drop(view: memoryview | None) -> None:
        """Let go of a sent piece's buffer: a streamed body would otherwise keep one chunk more
        alive than the window's two."""
        if view is not None:
            try:
                view.release()
            except BufferError:  # still exported (a TLS layer's): it goes with its last user
                pass


def _origin_text(url: str) -> str:
    """``scheme://host:port`` of a URL, for messages: never its path, query or user info."""
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}" if host else repr(url[:40])


# -- the network's settings: proxies and certificate authorities, read once ------------------------


class _Proxy:
    """An ``http://`` proxy from the environment: where it is, and its basic credentials."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = "http://" + url
        parts = urllib.parse.urlsplit(url)
        self.scheme = parts.scheme.lower()
        self.host = parts.hostname or ""
        try:
            self.port = parts.port or (443 if self.scheme == "https" else 80)
        except ValueError:
            self.port = -1
        self.text = f"{self.scheme}://{self.host}:{self.port}"  # never its credentials
        self.authorization: str | None = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self.authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def unusable(self) -> str | None:
        if self.scheme != "http":
            return f"gcsstream reaches proxies over http:// only, not {self.scheme}://"
        if not self.host or self.port < 0:
            return "its address cannot be read"
        return None


def _proxy_for(url: str) -> _Proxy | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``...).

    The environment is looked at first for any ``*_proxy`` at all: the many runs without one
    pay nothing for the rules.
    """
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return None
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    parts = urllib.parse.urlsplit(url)
    if _bypassed(parts.hostname or "", parts.port, proxies.get("no", "")):
        return None
    chosen = proxies.get(parts.scheme.lower()) or proxies.get("all")
    return _Proxy(chosen) if chosen else None


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` exempts ``host``, as requests read it: ``*``; a domain and its
    subdomains (``example.com``, ``.example.com``), optionally with ``:port``; an IP address or
    a CIDR block (``10.0.0.0/8``)."""
    import ipaddress

    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.replace(" ", ",").split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if address is not None and address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


_tls_contexts: dict[str | None, ssl.SSLContext] = {}


def _tls_context() -> ssl.SSLContext:
    """Certificate verification as requests did it: ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``
    if set (a file or a directory), else certifi's bundle, else the system's."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
    context = _tls_contexts.get(bundle)
    if context is None:
        if bundle is None:
            try:
                import certifi

                bundle_file: str | None = certifi.where()
            except ImportError:
                bundle_file = None
            context = ssl.create_default_context(cafile=bundle_file)
        else:
            variable = "REQUESTS_CA_BUNDLE" if os.environ.get("REQUESTS_CA_BUNDLE") else "CURL_CA_BUNDLE"
            try:
                if os.path.isdir(bundle):
                    context = ssl.create_default_context(capath=bundle)
                else:
                    context = ssl.create_default_context(cafile=bundle)
            except (OSError, ssl.SSLError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no certificate in it"
                raise UsageError(f"{variable}={bundle!r} cannot be used: {why}") from None
        _tls_contexts[bundle] = context
    return context


# -- connections whose sends and reads are held to the io timeout -------------------------------


class _HeaderDeadline(io.RawIOBase):
    """The socket as an answer reads it, its status line and headers held to one deadline.

    A socket timeout bounds each read, not their sum: a server that trickles its headers (or
    sends ``100 Continue`` forever) would otherwise hold the request without end. The first byte
    may take the io timeout to come, as before; the rest of the headers must follow within the
    io timeout of it. The body is read with the socket's plain timeout.
    """

    def __init__(self, inner: Any, sock: socket.socket) -> None:
        super().__init__()
        self._inner = inner
        self._sock = sock
        self._timeout = sock.gettimeout()
        self.deadline: float | None = None
        self.timing = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.timing and self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise AnswerTooSlow(
                    f"the answer's headers were still arriving {self._timeout:g} s after they began"
                )
            self._sock.settimeout(min(remaining, self._timeout or remaining))
        n = self._inner.readinto(buffer)
        if self.timing and self.deadline is None and n and self._timeout:
            self.deadline = time.monotonic() + self._timeout
        return n

    def end_of_headers(self) -> None:
        if self.timing:
            self.timing = False
            self._sock.settimeout(self._timeout)

    def close(self) -> None:
        self._inner.close()
        super().close()


class _Answer(http.client.HTTPResponse):
    """``http.client``'s response, reading its headers under ``_HeaderDeadline``."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self._deadline = _HeaderDeadline(self.fp.detach(), sock)  # detached: not closed with it
        self.fp = io.BufferedReader(self._deadline)

    def begin(self) -> None:
        try:
            super().begin()
        finally:
            self._deadline.end_of_headers()


#: How http.client reports a proxy's answer to CONNECT other than 200.
_TUNNEL_REFUSED = re.compile(r"Tunnel connection failed: (\d{3})")


class _Connection(http.client.HTTPConnection):
    """A keep-alive connection that writes request bodies under the io timeout, like reads.

    It connects within the connect timeout, then every read and write must make progress within
    the io timeout. Through a proxy, a failure to reach the proxy or to open its tunnel is
    ``ProxyFailed``: no retry cures it.
    """

    tunnelled = False  # an http:// endpoint's requests go to its proxy in absolute form
    response_class = _Answer

    def __init__(
        self, url: str, connect_timeout: float, io_timeout: float, proxy: _Proxy | None, **tls: Any
    ) -> None:
        _, host, port = origin(url)
        self.proxy = proxy
        self.io_timeout = io_timeout
        self.where = _origin_text(url)  # the endpoint, for messages (not the proxy)
        if proxy is None:
            super().__init__(host, port, timeout=connect_timeout, **tls)
            return
        super().__init__(proxy.host, proxy.port, timeout=connect_timeout, **tls)
        if self.tunnelled:
            headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
            self.set_tunnel(host, port, headers)

    def connect(self) -> None:
        """Connect (through the proxy, and TLS if https). A failure to reach the proxy or open
        its tunnel is ``ProxyFailed``; a certificate or protocol no retry cures is a
        ``ServiceError``; any other failure a retryable network error."""
        try:
            super().connect()
        except NetworkError:  # ProxyFailed, or a busy proxy's answer to CONNECT (retried)
            raise
        except OSError as exc:
            self.close()
            if self.proxy is not None and not isinstance(exc, ssl.SSLError):  # the proxy or its tunnel
                raise ProxyFailed(self.proxy.text, describe_network_error(exc)) from exc
            why = permanent_network_failure(exc)
            if why is not None:
                raise ServiceError(f"cannot reach {self.where}: {why}") from None
            _raise_network_error(exc)
        sock = self.sock
        sock.settimeout(self.io_timeout)
        if type(sock) is socket.socket:  # plain TCP (not TLS)
            # For ``_send_blocking``: a blocked write returns (with what it wrote) after a 20th
            # of the io timeout, so that a stall is seen soon after the io timeout, not later.
            wake = self.io_timeout / _SEND_WAKES
            seconds = int(wake)
            timeval = struct.pack("ll", seconds, max(1, int((wake - seconds) * 1e6)))  # 0: never
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def _tunnel(self) -> None:
        try:
            super()._tunnel()  # type: ignore[misc]
        except OSError as exc:
            self.close()
            assert self.proxy is not None
            answered = _TUNNEL_REFUSED.match(str(exc))
            if answered and int(answered.group(1)) in RETRYABLE_STATUSES:  # busy, not refusing
                raise NetworkError(
                    f"the proxy {self.proxy.text} answered {answered.group(1)} to CONNECT"
                ) from exc
            why = printable(str(exc))[:200] if not exc.errno else describe_network_error(exc)
            raise ProxyFailed(self.proxy.text, why or describe_network_error(exc)) from exc

    def request_form(self, url: str) -> tuple[str, dict[str, str]]:
        """The request target for ``url`` and the headers the proxy needs: an http:// endpoint's
        proxy takes the whole URL (and its credentials in each request); otherwise the path."""
        if self.proxy is not None and not self.tunnelled:
            credentials = self.proxy.authorization
            return url, {"Proxy-Authorization": credentials} if credentials else {}
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")), {}

    def send(self, data: Any) -> None:
        """A request's piece, written so that only a lack of progress times it out.

        Python's socket timeout bounds a whole ``sendall``, so a large piece goes out in slices
        that each must finish within the io timeout; on a plain socket the piece is instead
        written in blocking mode (one system call for a whole chunk, not one poll and a wake-up
        per slice), bounded by ``SO_SNDTIMEO`` and by the same least progress per io timeout.
        """
        sock = self.sock
        if sock is None or len(data) <= _SEND_SLICE:
            return super().send(data)
        if type(sock) is not socket.socket:  # TLS: a TLS write cannot stop part-way, so slices
            view = memoryview(data)
            for start in range(0, len(view), _SEND_SLICE):
                sock.sendall(view[start : start + _SEND_SLICE])
            return None
        return _send_blocking(sock, data, self.io_timeout)

    def dropped(self) -> bool:
        """An idle connection the server has closed (or sent something unasked on)."""
        sock = self.sock
        if sock is None:
            return False  # not connected: the next request connects
        pending = getattr(sock, "pending", None)
        try:
            return bool((pending is not None and pending()) or select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True


class _TLSConnection(_Connection, http.client.HTTPSConnection):
    tunnelled = True  # through a proxy: CONNECT, then TLS to the endpoint inside the tunnel

    def __init__(self, url: str, connect_timeout: float, io_timeout: float, proxy: _Proxy | None) -> None:
        super().__init__(url, connect_timeout, io_timeout, proxy, context=_tls_context())


def _send_blocking(sock: socket.socket, data: memoryview | bytes, timeout: float) -> None:
    """Write all of ``data``, failing with ``TimeoutError`` (as a socket timeout does) when the
    next ``_SEND_SLICE`` bytes did not go out within ``timeout`` of the last ones, as with sliced
    writes: a peer that stops reading, or trickles, ends the request after about the io timeout.

    Each write returns at least every ``timeout / _SEND_WAKES`` (``SO_SNDTIMEO``) with what it
    wrote; a write that returns late could have hidden a stall that began right after its start,
    and counting its bytes as fresh progress would let the stall last two io timeouts.
    """
    view = memoryview(data).cast("B")
    sock.settimeout(None)  # blocking; SO_SNDTIMEO (set at connect) wakes each write
    try:
        deadline, owed = time.monotonic() + timeout, _SEND_SLICE
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:  # nothing could be written for the whole SO_SNDTIMEO
                sent = 0
            view = view[sent:]
            owed -= sent
            now = time.monotonic()
            if owed <= 0:  # a slice's worth went out: the next slice has the io timeout
                deadline, owed = now + timeout, owed % _SEND_SLICE or _SEND_SLICE
            elif view and now >= deadline:
                raise TimeoutError(f"the request went out too slowly: under 1 MiB in {timeout:g} s")
    finally:
        sock.settimeout(timeout)


def _connection(url: str, connect_timeout: float, io_timeout: float) -> _Connection:
    """A connection to ``url``'s origin, through the environment's proxy for it if any."""
    proxy = _proxy_for(url)
    if proxy is not None and (why := proxy.unusable()) is not None:
        raise ProxyFailed(proxy.text, why)
    kind = _TLSConnection if origin(url)[0] == "https" else _Connection
    return kind(url, connect_timeout, io_timeout, proxy)


def _network_error(exc: BaseException) -> BaseException:
    """The error to raise for a failure of an exchange under way: a retryable ``NetworkError`` in
    words of ours (a server's text never reaches the terminal through it), or ``exc`` itself when
    it already is one (resets, timeouts), or is no network failure at all (a bug, a source error).
    """
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return exc
    if isinstance(exc, http.client.ImproperConnectionState):
        return exc  # a connection used out of turn: a bug of ours, not retried
    if isinstance(exc, http.client.InvalidURL):
        return UsageError("a request URL is not valid (a space, a control character or a bad port in it)")
    if isinstance(exc, http.client.IncompleteRead):
        return NetworkError("the answer was cut short")
    if isinstance(exc, http.client.LineTooLong):
        return NetworkError("the answer's status line or a header was too long")
    if isinstance(exc, http.client.BadStatusLine):
        return NetworkError("the answer's status line could not be read")
    if isinstance(exc, http.client.HTTPException):
        return NetworkError("the answer could not be read (too many headers, or not HTTP)")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        return NetworkError(f"TLS failure ({printable(str(reason))[:80]})" if reason else "TLS failure")
    if isinstance(exc, OSError):
        return NetworkError(printable(exc.strerror or type(exc).__name__)[:200])
    return exc


def _raise_network_error(exc: BaseException) -> NoReturn:
    """Raise ``exc`` as ``_network_error`` words it (itself, if it already is one)."""
    error = _network_error(exc)
    if error is exc:
        raise exc
    raise error from exc


def _read_bounded(
    raw: http.client.HTTPResponse, status: int, io_timeout: float, what: str = "the service's answer"
) -> bytes:
    """A metadata answer's body: at most ``MAX_ANSWER`` bytes (decoded, if gzip or deflate), all
    within ``io_timeout``."""
    deadline = time.monotonic() + io_timeout
    encoding = (raw.headers.get("Content-Encoding") or "identity").strip().lower()
    inflate = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        import zlib

        inflate = zlib.decompressobj(zlib.MAX_WBITS | (16 if "gzip" in encoding else 32))
    pieces: list[bytes] = []
    size = 0
    while piece := raw.read1(_PIECE):
        if inflate is not None:
            piece = inflate.decompress(piece, MAX_ANSWER + 1 - size)
        pieces.append(piece)
        size += len(piece)
        if size > MAX_ANSWER or (inflate is not None and inflate.unconsumed_tail):
            raise ServiceError(f"{what} ({status}) is larger than {MAX_ANSWER >> 20} MiB; stopped reading it")
        if time.monotonic() > deadline:
            raise AnswerTooSlow(f"the answer was still arriving {io_timeout:g} s after it began")
    if raw.length:  # Content-Length promised more than came before the connection closed
        raise NetworkError("the answer was cut short")
    _at_end(raw)
    return b"".join(pieces)


#: How a write fails when the server has closed the connection (TLS says EOF; a stall is not one).
_CUT_OFF = (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _early_answer(conn: _Connection, cut: OSError) -> http.client.HTTPResponse:
    """The answer a server sent before it stopped reading the body (a 401, a 400 about the
    range), which says more than the broken write; the write's failure if there is none."""
    try:
        return conn.getresponse()
    except (OSError, http.client.HTTPException):
        raise cut from None


def _at_end(raw: http.client.HTTPResponse) -> None:
    """Mark an answer read to its last byte as done (``read1`` does not), so that its connection
    can carry the next request."""
    if not raw.isclosed() and raw.length == 0:
        raw.read()


def _token_request(connect_timeout: float, io_timeout: float) -> Any:
    """google-auth's transport for fetching tokens: the same timeouts and proxies, no redirect
    followed, the answer bounded, and a failure that names the token host."""
    from google.auth import exceptions as auth_exceptions
    from google.auth import transport as auth_transport

    class _TokenResponse(auth_transport.Response):  # type: ignore[misc]
        def __init__(self, status: int, headers: Any, data: bytes) -> None:
            self._status, self._headers, self._data = status, headers, data

        status = property(lambda self: self._status)
        headers = property(lambda self: self._headers)
        data = property(lambda self: self._data)

    class _TokenRequest(auth_transport.Request):  # type: ignore[misc]
        def __call__(
            self,
            url: str,
            method: str = "GET",
            body: Any = None,
            headers: Any = None,
            timeout: Any = None,
            **kwargs: Any,
        ) -> Any:
            # google-auth's own timeout (a few seconds for the metadata server) when it is shorter
            wait = (
                min(io_timeout, timeout) if isinstance(timeout, (int, float)) and timeout > 0 else io_timeout
            )
            parts = urllib.parse.urlsplit(url)
            host = printable(parts.netloc)[:100]
            try:
                conn = _connection(url, min(connect_timeout, wait), wait)
                try:
                    target, for_proxy = conn.request_form(url)
                    sent = {**(headers or {}), **for_proxy}
                    conn.connect()
                    conn.request(method, target, body=body, headers=sent)
                    raw = conn.getresponse()
                    if 300 <= raw.status < 400:
                        raise auth_exceptions.RefreshError(
                            f"the token endpoint {host} answered {raw.status} (a redirect; not followed)"
                        )
                    data = _read_bounded(raw, raw.status, wait, what=f"the token endpoint {host}'s answer")
                finally:
                    conn.close()
            except ProxyFailed as exc:  # no retry cures it
                raise auth_exceptions.RefreshError(f"fetching a token from {host}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                error = _network_error(exc)
                if not isinstance(error, (ConnectionError, TimeoutError)):
                    raise error from None
                raise TokenFetchFailed(host, describe_network_error(error)) from exc
            return _TokenResponse(raw.status, raw.headers, data)

    return _TokenRequest()


class Transport:
    """Keep-alive connections to one endpoint; credentials (None: anonymous) refreshed on 401.

    Every exchange goes through ``request``, the one place that enforces where requests may go
    and how long and how large their answers may be. Requests are sent one at a time by each
    thread; a connection is reused once its answer was read to the end.
    """

    def __init__(
        self,
        endpoint: str,
        credentials: auth_credentials.Credentials | None,
        *,
        user_project: str | None = None,
        connect_timeout: float = UploadOptions.connect_timeout,
        io_timeout: float = UploadOptions.io_timeout,
        rate_limit: float | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.user_project = user_project
        self._origin = origin(self.endpoint)
        self._limiter = RateLimiter(rate_limit) if rate_limit else None
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._credentials = None if credentials is None or _is_anonymous(credentials) else credentials
        # Nothing to sign or refresh for anonymous: google-auth's transport stays unimported.
        self._auth_request = (
            _token_request(connect_timeout, io_timeout) if self._credentials is not None else None
        )
        parts = urllib.parse.urlsplit(self.endpoint)
        self._host_header = parts.netloc.rpartition("@")[2]
        if parts.scheme == "https":
            _tls_context()  # a CA bundle that cannot be used fails here, before any input is read
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._hooks: list[Callable[[Response], Any]] = []
        if debuglog.enabled():  # --debug: each exchange on stderr, redacted (no cost otherwise)
            self._hooks.append(debuglog.log_exchange)

    def add_response_hook(self, hook: Callable[[Response], Any]) -> None:
        """Call ``hook(response)`` on each answer's headers, before its body is read."""
        self._hooks.append(hook)

    @classmethod
    def connect(
        cls,
        endpoint: str | None = None,
        *,
        credentials_file: str | None = None,
        user_project: str | None = None,
        connect_timeout: float = UploadOptions.connect_timeout,
        io_timeout: float = UploadOptions.io_timeout,
        anonymous: bool = False,
        rate_limit: float | None = None,
    ) -> Transport:
        """A transport for ``endpoint`` (see ``resolve_endpoint``) with the right credentials.

        ``anonymous`` skips credentials even for the real service: a session URI is its own
        credential.
        """
        url, emulator = resolve_endpoint(endpoint)
        creds = load_credentials(credentials_file, anonymous=emulator or anonymous)
        return cls(
            url,
            creds,
            user_project=user_project,
            connect_timeout=connect_timeout,
            io_timeout=io_timeout,
            rate_limit=rate_limit,
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | StreamedBody | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> Response:
        """One exchange with the endpoint's origin, and never with anywhere else.

        A URL on another origin is refused before anything is sent; no redirect is followed, and
        an answer that redirects or names another origin in ``Location`` is refused: the
        Authorization header and the data go only to the endpoint. ``stream`` (media downloads)
        hands the body back unread; any other answer is read here, at most ``MAX_ANSWER`` bytes
        and within ``io_timeout`` of its headers (``AnswerTooSlow``, retried like a timeout).
        A 401 refreshes the credentials once and sends the request again, body from its start.
        """
        if origin(url) != self._origin:
            raise self._refused("the upload session is on", url)
        body = _SlicedBody(data, self._limiter) if data else None
        try:
            response = self._exchange(method, url, body, headers or {})
            if response.status_code == 401 and self._credentials is not None:
                self._finish(response, url, stream=False)
                if body is not None:
                    body.close()
                    body = body.again()
                self._credentials.refresh(self._auth_request)
                response = self._exchange(method, url, body, headers or {})
            self._finish(response, url, stream=stream)
        except ProxyFailed as exc:
            where = _origin_text(url)
            raise ServiceError(f"cannot reach {where}: the proxy {exc.proxy} failed: {exc.why}") from None
        except (OSError, http.client.HTTPException) as exc:
            _raise_network_error(exc)
        return response

    def _exchange(self, method: str, url: str, body: _SlicedBody | None, headers: dict[str, str]) -> Response:
        """Send one request on an idle (or new) connection; the answer's headers come back."""
        sent = Headers({"host": self._host_header, "user-agent": USER_AGENT, "accept-encoding": "identity"})
        for name, value in headers.items():
            sent[name.lower()] = value
        if body is not None or method not in ("GET", "HEAD"):
            sent["content-length"] = str(len(body) if body is not None else 0)
        if self._credentials is not None:
            self._credentials.before_request(self._auth_request, method, url, sent)
        conn = self._take()
        target, for_proxy = conn.request_form(url)
        started = time.monotonic()
        body_sent = True
        try:
            if conn.sock is None:
                conn.connect()  # here, not inside a send: its failures are told apart
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in {**for_proxy, **sent}.items():
                conn.putheader(name, value)
            conn.endheaders()
            try:
                while body is not None and (piece := body.read()):
                    conn.send(piece)
            except _CUT_OFF as cut:  # the server stopped reading: it may have answered first
                body_sent = False
                raw = _early_answer(conn, cut)
            else:
                raw = conn.getresponse()
            if raw.status == 407 and conn.proxy is not None:  # the proxy's refusal, not the service's
                raise ProxyFailed(conn.proxy.text, f"407 {printable(raw.reason)[:80]}".rstrip())
        except BaseException:
            conn.close()
            raise
        response = Response(
            raw,
            SentRequest(method, url, sent),
            time.monotonic() - started,
            lambda reusable: self._give_back(conn, reusable),
            body_sent=body_sent,
        )
        try:
            for hook in self._hooks:
                hook(response)
        except BaseException:
            response._broken()
            raise
        return response

    def _finish(self, response: Response, url: str, *, stream: bool) -> None:
        """Check the answer, and read it unless it is a media answer (an error's body is read)."""
        try:
            self._check_answer(response, url)
            if not stream or response.status_code >= 400:  # an error's body is metadata too
                response._content = _read_bounded(response.raw, response.status_code, self._io_timeout)
                response.close()  # read to the end: the connection is kept for the next request
        except BaseException:
            response._broken()  # unread or broken: the connection is dropped, not reused
            raise

    def _take(self) -> _Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.dropped():
                    return conn
                conn.close()
        return _connection(self.endpoint, self._connect_timeout, self._io_timeout)

    def _give_back(self, conn: _Connection, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _check_answer(self, response: Response, url: str) -> None:
        """Refuse a redirect, and a ``Location`` on another origin (the session URI's origin)."""
        status = response.status_code
        location = response.headers.get("Location")
        if location and origin(urllib.parse.urljoin(url, location)) != self._origin:
            raise self._refused("the service pointed gcsstream at", urllib.parse.urljoin(url, location))
        if 300 <= status < 400 and not (status == 308 and not location):
            # A 308 without Location is the resumable protocol's "incomplete", not a redirect.
            raise ServiceError(
                f"the service answered {status} with a redirect; gcsstream never follows redirects "
                "(the service does not send them)"
            )

    def _refused(self, what: str, url: str) -> ServiceError:
        return ServiceError(
            f"{what} {_origin_text(url)}, not the endpoint's origin {_origin_text(self.endpoint)}; "
            "refusing to send credentials or data there"
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_anonymous(credentials: auth_credentials.Credentials) -> bool:
    from google.auth import credentials as auth_credentials

    return isinstance(credentials, auth_credentials.AnonymousCredentials)
