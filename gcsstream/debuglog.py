"""``--debug``: each HTTP exchange on stderr, as ``curl -v`` or ``gsutil -D`` shows it, minus secrets.

A request line and the request headers that decide what the service does (``>``), then the
status and the response headers that say what it did (``<``), each line timestamped. The
Authorization header is never shown; URLs and ``Location`` go through ``redact`` (no
``upload_id``); ``X-GUploader-UploadID`` is replaced whole. The transport installs
``log_exchange`` as a response hook only when this logger is enabled, so an exchange costs
nothing more without ``--debug``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from gcsstream.redact import redact

LOGGER = logging.getLogger("gcsstream.http")

#: Request headers shown: ranges, sizes, checksums, preconditions (others are noise).
REQUEST_HEADERS = (
    "Content-Range",
    "Content-Length",
    "Content-Type",
    "Content-Encoding",
    "Range",
    "X-Goog-Hash",
    "X-Upload-Content-Length",
    "X-Upload-Content-Type",
    "X-Goog-If-Generation-Match",
    "X-Goog-If-Metageneration-Match",
    "X-Goog-User-Project",
)
#: Response headers shown: what was persisted, where the session is, what came back.
RESPONSE_HEADERS = (
    "Range",
    "Location",
    "X-GUploader-UploadID",
    "Content-Range",
    "Content-Length",
    "Content-Type",
    "Content-Encoding",
    "X-Goog-Hash",
    "X-Goog-Generation",
    "X-Goog-Stored-Content-Length",
    "X-Goog-Stored-Content-Encoding",
    "Retry-After",
    "Server",
)
#: Headers whose whole value is a credential (the session id).
SECRET_HEADERS = frozenset({"x-guploader-uploadid"})


class RedactingFilter(logging.Filter):
    """Redacts each record's final message (google-auth and others log request URLs). It lives
    here, not in redact.py, so that start-up, which redacts messages, never imports logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = redact(record.getMessage())
        record.msg, record.args = message, None
        return True


def enabled() -> bool:
    return LOGGER.isEnabledFor(logging.DEBUG)


def install(stream: Any = None) -> None:
    """Send debug logging (ours and the libraries') to stderr, redacted and timestamped."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    formatter = logging.Formatter("%(asctime)s gcsstream: debug: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.DEBUG, handlers=[handler], force=True)


def log_exchange(response: Any, *args: Any, **kwargs: Any) -> None:
    """A response hook (``Transport.add_response_hook``): log the exchange that produced ``response``."""
    request = response.request
    arrived = time.time()
    took = response.elapsed
    _emit(arrived - took, f"> {request.method} {request.url}")
    for name in REQUEST_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            _emit(arrived - took, f"> {name}: {value}")
    reason = f" {response.reason}" if response.reason else ""
    _emit(arrived, f"< {response.status_code}{reason} ({took * 1000:.0f} ms)")
    for name in RESPONSE_HEADERS:
        value = response.headers.get(name)
        if value is not None:
            _emit(arrived, f"< {name}: {'REDACTED' if name.lower() in SECRET_HEADERS else value}")


def _emit(when: float, text: str) -> None:
    record = LOGGER.makeRecord(LOGGER.name, logging.DEBUG, __file__, 0, redact(text), (), None)
    record.created = when
    LOGGER.handle(record)
