"""The resume journal: what it takes to continue an upload after the process is gone.

One JSON file per unfinished upload in the state directory (``GCSSTREAM_STATE_DIR``, else
``$XDG_STATE_HOME/gcsstream``, else ``~/.local/state/gcsstream``). It holds the session URI,
a bearer credential, so the directory is 0700 and the files 0600. Each update is atomic
(temporary file, fsync, rename): a journal is never half-written, and after a crash it is at
most one chunk behind the service, which ``resume`` corrects by asking the service.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gcsstream.errors import NotFoundError, UsageError

#: Sessions live for up to a week on the service.
SESSION_LIFETIME = 7 * 24 * 3600


def state_dir() -> Path:
    explicit = os.environ.get("GCSSTREAM_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "gcsstream"


@dataclass
class JournalEntry:
    """One unfinished upload."""

    id: str
    session_uri: str
    destination: str
    endpoint: str
    #: The initiate request's JSON body (name, contentType, metadata, ...).
    resource: dict[str, Any]
    chunk_size: int
    checksum: str
    #: {"kind": "file", "path": ..., "size": ..., "mtime_ns": ...} or {"kind": "stream"}.
    source: dict[str, Any]
    persisted: int = 0
    persisted_crc32c: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def is_stream(self) -> bool:
        return self.source.get("kind") != "file"

    @property
    def expired(self) -> bool:
        return time.time() - self.created > SESSION_LIFETIME


class Journal:
    """The journal files of one state directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or state_dir()

    def new_entry(self, **fields: Any) -> JournalEntry:
        """An entry with a fresh short id, written to disk before the first byte is sent."""
        self._ensure_directory()
        while True:
            entry_id = secrets.token_hex(4)
            if not self._path(entry_id).exists():
                break
        entry = JournalEntry(id=entry_id, **fields)
        self.write(entry)
        return entry

    def write(self, entry: JournalEntry) -> None:
        entry.updated = time.time()
        path = self._path(entry.id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = json.dumps(asdict(entry), indent=1).encode()
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # left by a crashed process with our pid
            # O_EXCL|O_NOFOLLOW: in a shared state directory, a planted file or symlink at this
            # name must not receive the session URI.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_directory()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise UsageError(
                f"cannot write the journal in {self.directory}: {exc.strerror or exc} "
                "(set GCSSTREAM_STATE_DIR to a writable directory)"
            ) from None

    def _sync_directory(self) -> None:
        """Make the rename durable, so that a power loss cannot bring back an older journal.

        Best effort: some network and FUSE file systems refuse to sync a directory, and the
        rename has happened anyway (the journal is then as durable as that file system allows).
        """
        with contextlib.suppress(OSError):
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self, entry_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(entry_id).unlink()

    def load(self, entry_id: str) -> JournalEntry:
        try:
            data = json.loads(self._path(entry_id).read_text())
        except FileNotFoundError:
            raise NotFoundError(
                f"no unfinished upload with id {entry_id!r} (see `gcsstream sessions`)"
            ) from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"the journal of {entry_id} is unreadable: {exc}") from None
        return JournalEntry(**data)

    def entries(self) -> list[JournalEntry]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(NotFoundError, UsageError, TypeError):
                found.append(self.load(path.stem))
        return sorted(found, key=lambda e: e.created)

    def find_for_file(self, destination: str, path: str, size: int, mtime_ns: int) -> JournalEntry | None:
        """An unfinished upload of this same, unchanged file to this destination."""
        for entry in self.entries():
            src = entry.source
            if (
                entry.destination == destination
                and src.get("kind") == "file"
                and src.get("path") == path
                and src.get("size") == size
                and src.get("mtime_ns") == mtime_ns
                and not entry.expired
            ):
                return entry
        return None

    def check_writable(self) -> None:
        """Fail now, before any upload starts, if journals cannot be written."""
        self._ensure_directory()

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.directory / f".probe.{os.getpid()}"
            probe.touch(mode=0o600)
            probe.unlink()
        except OSError as exc:
            raise UsageError(
                f"the state directory {self.directory} is not writable: {exc.strerror or exc} "
                "(set GCSSTREAM_STATE_DIR to a writable directory)"
            ) from None

    def _path(self, entry_id: str) -> Path:
        if not entry_id or not all(c in "0123456789abcdef" for c in entry_id):
            raise NotFoundError(f"{entry_id!r} is not an upload id (see `gcsstream sessions`)")
        return self.directory / f"{entry_id}.json"


class JournalRecorder:
    """Keeps a journal entry in step with an upload (the engine's ``SessionRecorder``).

    For a new upload the entry is created when the session exists, before the first byte is
    sent; for a resumed one it is the existing entry.
    """

    def __init__(self, journal: Journal, entry: JournalEntry | None = None, **fields: Any) -> None:
        self.journal = journal
        self.entry = entry
        self._fields = fields

    def started(self, session_uri: str) -> None:
        if self.entry is None:
            self.entry = self.journal.new_entry(session_uri=session_uri, **self._fields)

    def persisted(self, offset: int, crc32c: int) -> None:
        assert self.entry is not None
        self.entry.persisted, self.entry.persisted_crc32c = offset, crc32c
        self.journal.write(self.entry)

    def finished(self) -> None:
        if self.entry is not None:
            self.journal.remove(self.entry.id)
