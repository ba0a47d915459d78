"""Recognise the local emulators whose resumable uploads do not behave like the service's.

An upload that succeeds against fake-gcs-server or gcp-storage-emulator proves less than one
against the service: they ignore preconditions on resumable uploads and accept a wrong
X-Goog-Hash, and fake-gcs-server finalizes an object on a status query. A person should hear
that once per run, not read a plain success. Only upload answers are looked at, by their
headers (never their bodies), so watching costs next to nothing.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from typing import Any

#: What each emulator does differently from the service, as the warning says it.
DIFFERENCES = {
    "fake-gcs-server": (
        "it ignores preconditions (--no-clobber, --if-generation-match) on resumable uploads, "
        "accepts a wrong X-Goog-Hash, appends resent bytes again, and a status query "
        "(after a retry, on resume, by status or sessions --prune) finalizes the object"
    ),
    "gcp-storage-emulator": (
        "it ignores preconditions (--no-clobber, --if-generation-match) on resumable uploads "
        "and accepts a wrong X-Goog-Hash"
    ),
}

# gcp-storage-emulator's session ids are BUCKET:NAME:TIMESTAMP (the service's are opaque tokens).
_GCP_EMULATOR_ID = re.compile(r"upload_id=[^&:]+:[^&]*:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def recognise(response: Any) -> str | None:
    """The emulator an answer to an upload request comes from, if its headers give one away."""
    request = response.request
    if request is None or "/upload/" not in request.url:
        return None
    headers = response.headers
    server = headers.get("Server")
    if server is None and "X-GUploader-UploadID" not in headers:
        # fake-gcs-server: no Server header, and an object resource in JSON where the service
        # answers an initiate or a 308 with an empty body.
        json_body = headers.get("Content-Type", "").startswith("application/json")
        if json_body and headers.get("Content-Length", "0") != "0" and response.status_code in (200, 308):
            return "fake-gcs-server"
    if server is not None and server.startswith("BaseHTTP/"):
        urls = (request.url, headers.get("Location", ""))
        if any(_GCP_EMULATOR_ID.search(urllib.parse.unquote_plus(url)) for url in urls):
            return "gcp-storage-emulator"
    return None


class EmulatorNotice:
    """A response hook (``Transport.add_response_hook``) that calls ``say(origin, name,
    differences)`` the first time an answer comes from a known emulator, and never again."""

    def __init__(self, say: Callable[[str, str, str], None]) -> None:
        self._say = say
        self.seen: str | None = None

    def __call__(self, response: Any, *args: Any, **kwargs: Any) -> None:
        if self.seen is not None:
            return
        name = recognise(response)
        if name is not None:
            self.seen = name
            parts = urllib.parse.urlsplit(response.request.url)
            self._say(f"{parts.scheme}://{parts.netloc}", name, DIFFERENCES[name])
