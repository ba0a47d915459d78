"""Authorized HTTP to one Cloud Storage endpoint: endpoint choice, credentials, timeouts.

This is the only module that knows about requests and google-auth sessions; the engine hands
it prepared requests and gets responses back, which keeps a fake transport a drop-in for tests.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Protocol

import google.auth
import requests
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.auth.transport.requests import AuthorizedSession

from gcsstream.errors import AuthError, UsageError

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)


class HTTPTransport(Protocol):
    """What the engine needs from HTTP: one request at a time, a response with status and headers."""

    endpoint: str
    user_project: str | None

    def request(
        self, method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
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
) -> auth_credentials.Credentials:
    """Credentials from a file, or anonymous (emulators), or Application Default Credentials."""
    if credentials_file:
        if not os.path.isfile(credentials_file):
            raise UsageError(f"credentials file {credentials_file}: no such file")
        try:
            creds, _ = google.auth.load_credentials_from_file(credentials_file, scopes=SCOPES)
        except (auth_exceptions.DefaultCredentialsError, ValueError, OSError) as exc:
            raise AuthError(f"credentials file {credentials_file} is not usable: {exc}") from None
        return creds
    if anonymous:
        return auth_credentials.AnonymousCredentials()
    try:
        creds, _ = google.auth.default(scopes=SCOPES)
    except auth_exceptions.DefaultCredentialsError:
        raise AuthError(
            "no Google credentials found: run `gcloud auth application-default login`, "
            "set GOOGLE_APPLICATION_CREDENTIALS, or pass --credentials FILE"
        ) from None
    return creds


class RateLimiter:
    """A token bucket: at most ``rate`` bytes a second on average, bursts of one second's worth."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise UsageError("the rate limit must be positive")
        self.rate = rate
        self._tokens = rate
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


class _PacedBody:
    """A request body handed to the socket in slices, each paid for with the limiter's tokens."""

    SLICE = 64 * 1024

    def __init__(self, data: bytes, limiter: RateLimiter) -> None:
        self._view = memoryview(data)
        self._offset = 0
        self._limiter = limiter

    def __len__(self) -> int:
        return len(self._view)

    def read(self, n: int = -1) -> memoryview:
        size = self.SLICE if n is None or n < 0 else min(n, self.SLICE)
        piece = self._view[self._offset : self._offset + size]
        self._offset += len(piece)
        if piece:
            self._limiter.consume(len(piece))
        else:
            # The end: rewind, so that a request sent again with this same body (google-auth
            # resends it after refreshing credentials on a 401) sends all of it again.
            self._offset = 0
        return piece


class Transport:
    """One keep-alive connection pool to one endpoint; credentials refreshed on 401."""

    def __init__(
        self,
        endpoint: str,
        credentials: auth_credentials.Credentials,
        *,
        user_project: str | None = None,
        connect_timeout: float = 20.0,
        io_timeout: float = 120.0,
        rate_limit: float | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.user_project = user_project
        self._limiter = RateLimiter(rate_limit) if rate_limit else None
        self._session = AuthorizedSession(credentials)
        self._timeout = (connect_timeout, io_timeout)

    @classmethod
    def connect(
        cls,
        endpoint: str | None = None,
        *,
        credentials_file: str | None = None,
        user_project: str | None = None,
        connect_timeout: float = 20.0,
        io_timeout: float = 120.0,
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
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        body = _PacedBody(data, self._limiter) if data and self._limiter else data
        return self._session.request(
            method, url, data=body, headers=headers, timeout=self._timeout, stream=stream
        )

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
