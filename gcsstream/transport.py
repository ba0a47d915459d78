"""Authorized HTTP to one Cloud Storage endpoint: endpoint choice, credentials, timeouts.

This is the only module that knows about requests and google-auth sessions; the engine hands
it prepared requests and gets responses back, which keeps a fake transport a drop-in for tests.
It is also where the network is kept honest: credentials and data go only to the endpoint's
origin (no redirect is followed), answers are bounded in size and time, and failures that no
retry can cure (a refused certificate, an unusable proxy) become errors at once.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import ProxyManager

from gcsstream import debuglog
from gcsstream.errors import AuthError, ServiceError, UsageError
from gcsstream.options import UploadOptions, origin
from gcsstream.retry import AnswerTooSlow, permanent_network_failure

if TYPE_CHECKING:
    from google.auth import credentials as auth_credentials

    from gcsstream.window import StreamedBody

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
#: The largest answer read that is not a media download: the service's are a few KiB.
MAX_ANSWER = 1 << 20
_PIECE = 64 * 1024
_SEND_SLICE = 1024 * 1024  # bytes per socket write: each must finish within the io timeout
_SEND_WAKES = 20  # a blocking write (plain TCP) looks at its progress this often per io timeout


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
    ) -> requests.Response: ...


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
    """A request body handed to the socket in slices, each paid for with a limiter's tokens if any.

    Slices matter even unpaced: one ``sendall`` of a whole chunk must finish within the socket
    timeout, but the io timeout means "no progress for that long", which slices give. The body
    is bytes, or a streamed window's body, whose ``pieces()`` come as the reader gets them.
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
        """The same body from its start, for a request sent again (google-auth's after a 401,
        which may come before the first sending read it all)."""
        return _SlicedBody(self._data, self._limiter)

    def _start(self) -> Iterator[Any]:
        pieces = getattr(self._data, "pieces", None)
        return pieces() if pieces is not None else iter((self._data,))

    def __len__(self) -> int:
        return self._length

    def read(self, n: int = -1) -> memoryview:
        # Whatever urllib3 asks for (16 KiB: a thousand sendall calls per 16 MiB chunk, a third
        # more CPU for the whole upload): unpaced, a whole piece, and the connection's ``send``
        # decides how to write it under the io timeout.
        if not self._view:
            self._drop(self._sent)  # sent: its buffer may go before the next piece is read
            self._view = memoryview(b"")
            piece = next(self._pieces, None)
            if piece is None:
                # The end: rewind, so that a request sent again with this same body (google-auth
                # resends it after refreshing credentials on a 401) sends all of it again.
                self._pieces = self._start()
                return self._view
            self._view = memoryview(piece)
        size = self.PACED_SLICE if self._limiter is not None else len(self._view)
        piece, self._view = self._view[:size], self._view[size:]
        if self._limiter is not None:
            self._limiter.consume(len(piece))
        self._sent = piece
        return piece

    @staticmethod
    def _drop(view: memoryview | None) -> None:
        """Let go of a sent piece's buffer, though urllib3 still names the view: a streamed
        body would otherwise keep one chunk more alive than the window's two."""
        if view is not None:
            try:
                view.release()
            except BufferError:  # still exported (a TLS layer's): it goes with its last user
                pass


def _origin_text(url: str) -> str:
    """``scheme://host:port`` of a URL, for messages: never its path, query or user info."""
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}" if host else repr(url[:40])


class _SendsUnderIoTimeout(HTTPConnection):
    """A connection whose request body is written under the io timeout, like reads.

    urllib3 leaves the connect timeout on the socket while it sends the request, so a server
    that stops reading a chunk would be noticed only after the connect timeout.
    """

    send_timeout: float = UploadOptions.io_timeout

    def connect(self) -> None:
        super().connect()
        if self.sock is not None:
            self.sock.settimeout(self.send_timeout)
        if type(self.sock) is socket.socket:  # plain TCP (not TLS, not a TLS-in-TLS tunnel)
            # For ``_send_blocking``: a blocked write returns (with what it wrote) after a 20th
            # of the io timeout, so that a stall is seen soon after the io timeout, not later.
            wake = self.send_timeout / _SEND_WAKES
            seconds = int(wake)
            timeval = struct.pack("ll", seconds, max(1, int((wake - seconds) * 1e6)))  # 0: never
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def send(self, data: Any) -> None:
        """A request body's piece, written so that only a lack of progress times it out.

        Python's socket timeout bounds a whole ``sendall``, so a large piece goes out in slices
        that each must finish within the io timeout; on a plain socket the piece is instead
        written in blocking mode (one system call for a whole chunk, not one poll and a wake-up
        per slice), bounded by ``SO_SNDTIMEO`` and by the same least progress per io timeout.
        """
        sock = self.sock
        if sock is None or not isinstance(data, memoryview | bytes) or len(data) <= _SEND_SLICE:
            return super().send(data)
        if type(sock) is not socket.socket:  # TLS: a TLS write cannot stop part-way, so slices
            view = memoryview(data)
            for start in range(0, len(view), _SEND_SLICE):
                super().send(view[start : start + _SEND_SLICE])
            return None
        return _send_blocking(sock, data, self.send_timeout)

    def request(self, *args: Any, **kwargs: Any) -> None:
        connect_timeout = self.timeout
        if self.sock is not None:  # a kept-alive connection: urllib3 would apply connect_timeout
            self.timeout = self.send_timeout
        try:
            super().request(*args, **kwargs)
        finally:
            self.timeout = connect_timeout


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


class _TLSSendsUnderIoTimeout(_SendsUnderIoTimeout, HTTPSConnection):
    pass


class _TimedAdapter(HTTPAdapter):
    """requests' adapter, its connection pools making ``_SendsUnderIoTimeout`` connections."""

    def __init__(self, send_timeout: float) -> None:
        settings = {"send_timeout": send_timeout}
        self._pools: dict[str, type[HTTPConnectionPool]] = {
            "http": type("Pool", (HTTPConnectionPool,), {
                "ConnectionCls": type("Connection", (_SendsUnderIoTimeout,), settings)
            }),
            "https": type("TLSPool", (HTTPSConnectionPool,), {
                "ConnectionCls": type("TLSConnection", (_TLSSendsUnderIoTimeout,), settings)
            }),
        }  # fmt: skip
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):  # a SOCKS manager keeps its own pools
            manager.pool_classes_by_scheme = self._pools
        return manager


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (scheme://host:port only), if any."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    return _origin_text(proxy) if proxy else None


def _settle_environment(session: requests.Session, endpoint: str) -> None:
    """Read the environment's proxy (``HTTPS_PROXY``, ``NO_PROXY``...) and CA bundle
    (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``) for the endpoint once, not on every request.

    requests otherwise scans the environment twice and looks for ``~/.netrc`` per request, a
    fifth of a small chunk's CPU; every request goes to the endpoint's origin, so one answer
    serves them all. ``~/.netrc`` is no longer consulted: its basic auth would replace the token.
    """
    session.proxies.update(requests.utils.get_environ_proxies(endpoint))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False


_S = TypeVar("_S", bound=requests.Session)


def _timed_session(session: _S, send_timeout: float) -> _S:
    for prefix in ("https://", "http://"):
        session.mount(prefix, _TimedAdapter(send_timeout))
    return session


def _authorized_session() -> Any:
    """google-auth's session, each of whose sends (its own resend after refreshing the token on a
    401 included) starts the body afresh: a 401 answered before the body was read left it
    half-consumed, and the resend sent the rest as if it began at the first byte."""
    from google.auth.transport.requests import AuthorizedSession

    class _Authorized(AuthorizedSession):  # type: ignore[misc]
        def request(self, method: Any, url: Any, data: Any = None, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            if isinstance(data, _SlicedBody):
                data = data.again()
            return super().request(method, url, data, *args, **kwargs)

    return _Authorized


def _is_anonymous(credentials: auth_credentials.Credentials) -> bool:
    from google.auth import credentials as auth_credentials

    return isinstance(credentials, auth_credentials.AnonymousCredentials)


class Transport:
    """One keep-alive connection pool to one endpoint; credentials (None: anonymous) refreshed on 401.

    Every exchange goes through ``request``, the one place that enforces where requests may go
    and how long and how large their answers may be.
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
        # Token fetches: the same timeouts, and no redirect (the signed grant stays with its host).
        self._token_session = _timed_session(requests.Session(), io_timeout)
        self._token_session.max_redirects = 0
        self._session: requests.Session
        if credentials is None or _is_anonymous(credentials):
            # Nothing to sign or refresh: a plain session, and google-auth's requests transport
            # (which loads its service-account crypto, about 0.1 s) stays unimported.
            self._session = _timed_session(requests.Session(), io_timeout)
        else:
            from google.auth.transport.requests import Request as AuthRequest

            self._session = _timed_session(
                _authorized_session()(credentials, auth_request=AuthRequest(self._token_session)), io_timeout
            )
        _settle_environment(self._session, self.endpoint)
        self._io_timeout = io_timeout
        self._timeout = (connect_timeout, io_timeout)
        if debuglog.enabled():  # --debug: each exchange on stderr, redacted (no cost otherwise)
            self._session.hooks["response"].append(debuglog.log_exchange)

    def add_response_hook(self, hook: Any) -> None:
        """Call ``hook(response)`` on each answer's headers, before its body is read."""
        self._session.hooks["response"].append(hook)

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
    ) -> requests.Response:
        """One exchange with the endpoint's origin, and never with anywhere else.

        A URL on another origin is refused before anything is sent; no redirect is followed, and
        an answer that redirects or names another origin in ``Location`` is refused: the
        Authorization header and the data go only to the endpoint. ``stream`` (media downloads)
        hands the body back unread; any other answer is read here, at most ``MAX_ANSWER`` bytes
        and within ``io_timeout`` of its headers (``AnswerTooSlow``, retried like a timeout).
        """
        if origin(url) != self._origin:
            raise self._refused("the upload session is on", url)
        body: Any = _SlicedBody(data, self._limiter) if data else data  # read() like a file
        try:
            response = self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                stream=True,
                allow_redirects=False,
            )
        except (requests.exceptions.SSLError, requests.exceptions.ProxyError) as exc:
            why = permanent_network_failure(exc, proxy=_proxy_for(url))
            if why is None:
                raise
            raise ServiceError(f"cannot reach {_origin_text(url)}: {why}") from None
        try:
            self._check_answer(response, url)
            if not stream or response.status_code >= 400:  # an error's body is metadata too
                self._read_answer(response)
        except BaseException:
            response.close()  # unread: the connection is dropped, not reused
            raise
        return response

    def _check_answer(self, response: requests.Response, url: str) -> None:
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

    def _read_answer(self, response: requests.Response) -> None:
        """Read a metadata answer into ``response.content``: bounded in size and in time."""
        deadline = time.monotonic() + self._io_timeout
        pieces: list[bytes] = []
        size = 0
        while piece := response.raw.read1(_PIECE, decode_content=True):
            pieces.append(piece)
            size += len(piece)
            if size > MAX_ANSWER:
                raise ServiceError(
                    f"the service's answer ({response.status_code}) is larger than "
                    f"{MAX_ANSWER >> 20} MiB; stopped reading it"
                )
            if time.monotonic() > deadline:
                raise AnswerTooSlow(f"the answer was still arriving {self._io_timeout:g} s after it began")
        response._content = b"".join(pieces)
        response._content_consumed = True
        response.close()  # read to the end: the connection goes back to the pool

    def _refused(self, what: str, url: str) -> ServiceError:
        return ServiceError(
            f"{what} {_origin_text(url)}, not the endpoint's origin {_origin_text(self.endpoint)}; "
            "refusing to send credentials or data there"
        )

    def close(self) -> None:
        self._session.close()
        self._token_session.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
