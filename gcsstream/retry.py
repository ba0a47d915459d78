"""When to retry, and how long to wait: truncated exponential backoff with jitter, a deadline."""

from __future__ import annotations

import email.utils
import http.client
import os
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from google.auth import exceptions as auth_exceptions

from gcsstream.errors import AuthError, TransientError
from gcsstream.redact import redact


class HeaderLookup(Protocol):
    """An answer's headers as they are read here: by name, case-insensitively."""

    def get(self, name: str, default: Any = None, /) -> Any: ...


#: Statuses the service documents as transient.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class NetworkError(ConnectionError):
    """An exchange failed on the network (connecting, sending, or reading the answer) in a way a
    retry may cure; the original failure is its cause."""


class ProxyFailed(NetworkError):
    """The proxy the environment names could not be reached or would not open a tunnel: no
    retry cures that (the transport says so at once)."""

    def __init__(self, proxy: str, why: str) -> None:
        super().__init__(f"the proxy {proxy} failed: {why}")
        self.proxy = proxy
        self.why = why


class TokenFetchFailed(auth_exceptions.TransportError):
    """A token could not be fetched from ``host`` for a network reason: retried, and named."""

    def __init__(self, host: str, why: str) -> None:
        super().__init__(f"fetching a token from {host}: {why}")
        self.host = host


class AnswerTooSlow(TimeoutError):
    """An answer kept trickling past the exchange's deadline: a timeout, retried like one."""


#: Network failures that leave a session usable: resets, timeouts, a disconnect mid-body.
RETRYABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    ConnectionError,  # NetworkError (the transport's words for the rest), resets, refusals
    TimeoutError,
    auth_exceptions.TransportError,
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, and exceptions given as first arguments."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [current.__cause__, current.__context__]
        inner += [arg for arg in current.args[:1] if isinstance(arg, BaseException)]
        pending += [e for e in inner if isinstance(e, BaseException)]


def permanent_network_failure(exc: BaseException) -> str | None:
    """Why a network failure cannot be cured by retrying, or None if it may be transient.

    A certificate that does not verify, or a server that does not speak TLS, stays that way for
    the whole retry deadline: say so at once. Other TLS errors (an EOF or a reset during the
    handshake) are network trouble, retried as such. (A proxy that fails is ``ProxyFailed``.)
    """

    if not isinstance(exc, ssl.SSLError):
        return None
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or cause.reason
            return f"its TLS certificate was refused ({why}; REQUESTS_CA_BUNDLE names extra CAs)"
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "doesn't match" in text:
        return "its TLS certificate was refused (REQUESTS_CA_BUNDLE names extra CAs)"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return "it does not speak TLS (an http:// endpoint?)"
    return None


def _credentials_host(exc: BaseException) -> str | None:
    """The host a failed token fetch was sent to."""
    for cause in _causes(exc):
        if isinstance(cause, TokenFetchFailed):
            return cause.host
    return None


def retry_after_seconds(headers: HeaderLookup) -> float | None:
    """The ``Retry-After`` header as seconds (it may be a number or an HTTP date)."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


#: The jitter of every backoff: one generator, not one seeded from the OS per request.
_JITTER = random.Random()
os.register_at_fork(after_in_child=_JITTER.seed)  # forked workers must not retry in step


@dataclass
class Backoff:
    """One run of failures: each ``next_delay`` is longer, until the deadline says stop.

    The deadline counts from the first failure of the run; a success starts a new run.
    """

    initial: float
    maximum: float
    deadline: float
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=lambda: _JITTER)
    attempts: int = 0
    _started: float | None = None

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None when the deadline would pass."""
        now = self.clock()
        if self._started is None:
            self._started = now
        ceiling = min(self.maximum, self.initial * (2**self.attempts))
        delay = self.rng.uniform(ceiling / 2, ceiling)  # jitter keeps clients from retrying in step
        if retry_after is not None:
            delay = max(delay, retry_after)
        self.attempts += 1
        if now + delay - self._started > self.deadline:
            return None
        return delay

    @property
    def elapsed(self) -> float:
        return 0.0 if self._started is None else self.clock() - self._started


def describe_network_error(exc: BaseException) -> str:
    """A short reason for a network failure: 'connection reset', 'timed out', ...

    A failed token fetch (google-auth's ``TransportError``) says so, with the token host: the
    wait is for credentials, not for the storage endpoint.
    """
    if isinstance(exc, auth_exceptions.TransportError):
        host = _credentials_host(exc)
        inner = next(
            (c for c in _causes(exc) if c is not exc and not isinstance(c, auth_exceptions.TransportError)),
            None,
        )
        reason = describe_network_error(inner) if inner is not None else "network error"
        return f"fetching credentials{f' from {host}' if host else ''}: {reason}"
    if isinstance(exc, AnswerTooSlow):
        return f"timed out ({exc})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    root: BaseException = exc
    seen = set()
    while id(root) not in seen and (root.__cause__ or root.__context__):
        seen.add(id(root))
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    for cause in (root, exc):
        if isinstance(cause, http.client.RemoteDisconnected):
            return "connection closed by the server"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, BrokenPipeError):
            return "connection closed while sending"
        if isinstance(cause, TimeoutError):  # a write under the io timeout made no progress
            return "timed out"
    text = str(exc)
    if "RemoteDisconnected" in text or "closed connection" in text:
        return "connection closed by the server"
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "name resolution" in text:
        return "cannot resolve the endpoint's host name"
    if isinstance(exc, NetworkError) and text:
        return text
    return f"network error ({type(exc).__name__})"


# -- the retry driver: one loop for uploads and downloads ------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """A transient failure as the driver sees it: why, and how long the service asked to wait."""

    reason: str
    retry_after: float | None = None


class Retryable(Exception):
    """A transient failure, raised by an attempt for the driver to retry: why, and how long the
    service asked to wait (``Retry-After``)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after

    @classmethod
    def from_status(cls, status: int, headers: HeaderLookup) -> Retryable:
        """A retryable status (``RETRYABLE_STATUSES``) as the service answered it."""
        return cls(f"{status} from the service", retry_after_seconds(headers))


def exchange(transport: Any, method: str, url: str, *, what: str, **kwargs: Any) -> Any:
    """One request for an attempt: a network failure or a retryable status becomes ``Retryable``,
    a failed credential refresh ``AuthError`` (naming ``what``); other answers are the caller's."""
    try:
        response = transport.request(method, url, **kwargs)
    except RETRYABLE_EXCEPTIONS as exc:
        raise Retryable(describe_network_error(exc)) from None
    except auth_exceptions.GoogleAuthError as exc:  # refresh failed or is impossible
        raise AuthError(f"credentials for {what} failed: {redact(str(exc))}") from None
    if response.status_code in RETRYABLE_STATUSES:
        raise Retryable.from_status(response.status_code, response.headers)
    return response


def retryable(exc: BaseException) -> Failure | None:
    """The driver's ``transient`` for attempts that raise ``Retryable``: nothing else is retried."""
    return Failure(exc.reason, exc.retry_after) if isinstance(exc, Retryable) else None


def run_with_retries(
    attempt: Callable[[bool], T],
    *,
    transient: Callable[[BaseException], Failure | None],
    initial: float,
    maximum: float,
    deadline: float,
    on_retry: Callable[[Failure, float, int], None] | None = None,
    progress: Callable[[], int] | None = None,
    doing: Callable[[], str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Run ``attempt(retried)`` until it succeeds, fails permanently, or the deadline passes.

    ``transient`` classifies an exception (None: permanent, re-raised as it is). ``progress``
    returns a count that grows when an attempt got somewhere (bytes received): a failure after
    progress starts a new run of failures, with a fresh backoff and deadline. ``doing`` names
    the work for the give-up message (``TransientError``, exit 75).
    """

    def new_run() -> Backoff:
        return Backoff(initial, maximum, deadline, clock, rng or _JITTER)

    backoff = new_run()
    reached = progress() if progress is not None else 0
    retried = False
    while True:
        try:
            return attempt(retried)
        except Exception as exc:
            failure = transient(exc)
            if failure is None:
                raise
            if progress is not None and progress() > reached:
                reached = progress()
                backoff = new_run()
            delay = backoff.next_delay(failure.retry_after)
            if delay is None:
                what = f" {doing()}" if doing is not None else ""
                raise TransientError(
                    f"gave up{what} after {backoff.attempts} attempts over {backoff.elapsed:.0f} s "
                    f"(--retry-deadline {deadline:g}): {failure.reason}"
                ) from None
            if on_retry is not None:
                on_retry(failure, delay, backoff.attempts)
            sleep(delay)
            retried = True
