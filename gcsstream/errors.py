"""The error tree. Every failure gcsstream reports is one of these, and each carries its exit code.

The command line maps them to exit codes in one place (``cli.main``); library callers catch the
families they care about. Messages are one line, safe to print: no token, no session URI.
"""

from __future__ import annotations


class GcsstreamError(Exception):
    """Base of every gcsstream error; exit code 1 (anything not covered by a family below)."""

    exit_code = 1


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


def error_for_status(status: int, message: str) -> GcsstreamError:
    """The error family for a final (not retried) HTTP status from the service."""
    if status in (401, 403):
        return AuthError(message)
    if status in (404, 410):
        return NotFoundError(message)
    if status == 412:
        return PreconditionError(message)
    return ServiceError(message)
