"""A short record of the uploads that finished in a state directory.

A journal entry is removed when its upload completes, so ``gcsstream status ID`` would otherwise
only know that no unfinished upload has that id. Each completed upload leaves one small file,
``finished/ID.json`` in the state directory: the object it created (destination, generation,
size, checksums), never the session URI (the session is over, and it was a credential). Records
are kept for a week, a session's lifetime, and at most ``KEEP`` of them: older ones are removed
whenever one is added. Files are read as strictly as journal entries (regular, the user's own,
small, well-formed).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gcsstream.errors import GcsstreamError
from gcsstream.journal import SESSION_LIFETIME, Journal, JournalEntry, replace_privately
from gcsstream.session import resource_int

#: The most finished uploads remembered (the newest).
KEEP = 200


@dataclass(frozen=True)
class FinishedUpload:
    """What a completed upload created."""

    id: str
    destination: str
    generation: int
    size: int
    crc32c: str | None
    md5: str | None
    finished: float


def _directory(journal: Journal) -> Path:
    return journal.directory / "finished"


def record_finished(journal: Journal, entry: JournalEntry, resource: dict[str, Any]) -> None:
    """Remember that ``entry``'s upload created the object ``resource`` (best effort: the upload
    has succeeded whatever happens here)."""
    record = FinishedUpload(
        id=entry.id,
        destination=entry.destination,
        generation=resource_int(resource, "generation") or 0,
        size=resource_int(resource, "size") or 0,
        crc32c=resource.get("crc32c") if isinstance(resource.get("crc32c"), str) else None,
        md5=resource.get("md5Hash") if isinstance(resource.get("md5Hash"), str) else None,
        finished=time.time(),
    )
    directory = _directory(journal)
    with contextlib.suppress(OSError, GcsstreamError):
        journal.check_directory()
        Journal._make_private(directory)
        replace_privately(directory / f"{entry.id}.json", json.dumps(asdict(record)).encode(), durable=False)
        _prune(directory)


def _prune(directory: Path) -> None:
    """Remove the records older than a week, and all but the newest ``KEEP``."""
    records = []
    for path in directory.glob("*.json"):
        with contextlib.suppress(OSError):
            records.append((path.lstat().st_mtime, path))
    records.sort(reverse=True)
    now = time.time()
    for rank, (mtime, path) in enumerate(records):
        if rank >= KEEP or now - mtime > SESSION_LIFETIME:
            with contextlib.suppress(OSError):
                path.unlink()


def find_finished(journal: Journal, entry_id: str) -> FinishedUpload | None:
    """The record of the finished upload ``entry_id`` in this state directory, if there is one."""
    try:
        journal.check_directory()
        # journal._path refuses a string that is not an id (NotFoundError) before any file is read.
        raw = Journal._read(_directory(journal) / journal._path(entry_id).name)
        data = json.loads(raw)
    except (OSError, ValueError, GcsstreamError):
        return None
    names = {f.name for f in fields(FinishedUpload)}
    if not isinstance(data, dict) or set(data) != names or data.get("id") != entry_id:
        return None
    checks = {
        "destination": (str,),
        "generation": (int,),
        "size": (int,),
        "crc32c": (str, type(None)),
        "md5": (str, type(None)),
        "finished": (int, float),
    }
    if any(not isinstance(data[k], t) or isinstance(data[k], bool) for k, t in checks.items()):
        return None
    if time.time() - data["finished"] > SESSION_LIFETIME:
        return None
    return FinishedUpload(**data)
