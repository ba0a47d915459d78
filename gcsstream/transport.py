"""Authorized HTTP to one Cloud Storage endpoint: endpoint choice, credentials, timeouts.

This is the only module that knows about requests and google-auth sessions; the engine hands
it prepared requests and gets responses back, which keeps a fake transport a drop-in for tests.
"""

from __future__ import annotations

import os
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
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.user_project = user_project
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
        )

    def request(
        self, method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> requests.Response:
        return self._session.request(method, url, data=data, headers=headers, timeout=self._timeout)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
