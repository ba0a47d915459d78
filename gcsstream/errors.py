"""The error tree. Every failure gcsstream reports is one of these, and each carries its exit code.

The command line maps them to exit codes in one place (``cli.main``); library callers catch the
families they care about. Messages are one line, safe to print: no token, no session URI.
"""

from __future__ import annotations

import json
import re
import signal
from typing import Any

from gcsstream.redact import redact


class GcsstreamError(Exception):
    """Base of every gcsstream error; exit code 1 (anything not covered by a family below)."""

    exit_code = 1
    #: The resumable session the failed upload left open, if any: pass it back as ``session_uri=``
    #: to continue. A credential: it is never part of the message (``str``) nor of ``repr``.
    session_uri: str | None = None
    #: The journal id of the upload, when it has one (``gcsstream resume ID``).
    upload_id: str | None = None


class UsageError(GcsstreamError):
    """The request cannot be carried out as given: bad URL, option, source or chunk size."""

    exit_code = 2


class SourceError(GcsstreamError):
    """Reading the source failed (I/O error, producer failed, wrong size); the session was cancelled."""

    exit_code = 1


class IntegrityError(GcsstreamError):
    """Checksums or sizes disagree between what was read and what the service stored."""

    exit_code = 3


class PrefixMismatch(IntegrityError):
    """On resume, the re-supplied input differs from what the service already holds.

    The session is left untouched: resume again with the right input.
    """


class AuthError(GcsstreamError):
    """No usable credentials, or the service refused them (401, 403)."""

    exit_code = 4


class NotFoundError(GcsstreamError):
    """The bucket, object or upload session does not exist (404, 410)."""

    exit_code = 5


class PreconditionError(GcsstreamError):
    """A generation precondition failed (412), e.g. ``--no-clobber`` on an existing object."""

    exit_code = 6


class ServiceError(GcsstreamError):
    """The service answered with an error that retrying cannot fix."""

    exit_code = 1


class SinkError(GcsstreamError):
    """Writing the output failed (a full disk, an I/O error): not the network's fault, not retried."""

    exit_code = 1


class OutputClosed(SinkError):
    """The reader of the output went away (``cat | head``): stop quietly, as if killed by SIGPIPE."""

    exit_code = 141


class TransientError(GcsstreamError):
    """Retries ran out (deadline reached); the upload session is left open to be resumed."""

    exit_code = 75


class Interrupted(GcsstreamError):
    """Stopped by a signal; the upload session is left open to be resumed."""

    exit_code = 130


class Terminated(Interrupted):
    """Stopped by SIGTERM; the upload session is left open to be resumed."""

    exit_code = 143


class HungUp(Interrupted):
    """Stopped by SIGHUP (the terminal went away); the upload session is left open to be resumed."""

    exit_code = 129


#: The error and the word for a run stopped by each signal that stops one cleanly.
STOPPED_BY: dict[int, tuple[type[Interrupted], str]] = {
    signal.SIGINT: (Interrupted, "interrupted"),
    signal.SIGTERM: (Terminated, "terminated"),
    signal.SIGHUP: (HungUp, "hung up"),
}


class Busy(GcsstreamError):
    """Another process is driving this upload (it holds the journal entry's lock); exit code 7."""

    exit_code = 7
    #: The process holding the lock, when known.
    pid: int | None = None


def error_for_status(status: int, message: str) -> GcsstreamError:
    """The error family for a final (not retried) HTTP status from the service."""
    if status in (401, 403):
        return AuthError(message)
    if status in (404, 410):
        return NotFoundError(message)
    if status == 412:
        return PreconditionError(message)
    return ServiceError(message)


_XML_FIELD = re.compile(r"<(Code|Message|Details)>(.*?)</\1>", re.DOTALL | re.IGNORECASE)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")


def service_message(response: Any) -> str:
    """The service's one-line explanation of an error response (a transport ``Response``).

    Bodies come in several shapes: JSON ``{"error": {"message": ..., "errors": [{"reason": ...,
    "message": ...}]}}`` (or only ``errors``, or ``{"error": "text"}``), the XML API's
    ``<Error><Code>..</Code><Message>..</Message></Error>``, an HTML page from a proxy, plain
    text, or nothing (then the status line's reason).
    """
    text = (response.text or "").strip()
    message = _json_message(text) or _markup_message(text) or (text.splitlines()[0] if text else "")
    message = " ".join(message.split()) or str(response.reason or f"HTTP {response.status_code}")
    return redact(message[:300])


def _json_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, str):
        return error
    if not isinstance(error, dict):
        return ""
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    details = [e for e in error.get("errors") or () if isinstance(e, dict)]
    reasons = [str(e["reason"]) for e in details if e.get("reason")]
    if not message:
        message = next((str(e["message"]) for e in details if e.get("message")), "")
    if reasons and not any(reason in message for reason in reasons):
        message = f"{message} ({', '.join(reasons)})" if message else ", ".join(reasons)
    return message


def _markup_message(text: str) -> str:
    if not text.startswith("<"):
        return ""
    fields = {name.lower(): value.strip() for name, value in _XML_FIELD.findall(text)}
    if fields:
        return ": ".join(v for v in (fields.get("code"), fields.get("message"), fields.get("details")) if v)
    title = _HTML_TITLE.search(text)
    if title and title.group(1).strip():
        return title.group(1)
    return _TAG.sub(" ", text)


def is_hash_mismatch(message: str) -> bool:
    """Whether a 400 to a request carrying X-Goog-Hash says the checksums disagree.

    The service words it ``Provided CRC32C "..." doesn't match calculated CRC32C "..."``; any
    other 400 (an invalid argument, bad metadata) is not an integrity failure.
    """
    lowered = message.lower()
    return "match" in lowered and any(word in lowered for word in ("crc32c", "md5", "hash", "checksum"))
