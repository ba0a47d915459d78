"""The resume journal: what it takes to continue an upload after the process is gone.

One JSON file per unfinished upload in the state directory (``GCSSTREAM_STATE_DIR``, else
``$XDG_STATE_HOME/gcsstream``, else ``~/.local/state/gcsstream``). It holds the session URI,
a bearer credential, and it decides where bytes and a token are sent, so the directory must be
the user's own and private (0700; checked like ssh's StrictModes) and every file is opened
without following links and validated strictly: a file that is not a well-formed entry owned by
the user is skipped with a warning. Each update is atomic (temporary file, fsync, rename): a
journal is never half-written. Updates are written in the background, at most one chunk behind
what the engine has confirmed (the service may also hold the chunk in flight); ``resume``
corrects that by asking the service.

One process drives an upload at a time: each entry has a lock file (``ID.lock``, an advisory
``flock`` held for the whole run, with the holder's pid in it). A second process is refused with
``Busy`` rather than racing the first (which could make it delete the object the first made).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gcsstream.errors import Busy, Interrupted, NotFoundError, UsageError
from gcsstream.options import CHECKSUM_MODES, CHUNK_QUANTUM, MAX_PARALLEL, ObjectURL, origin, parse_gs_url
from gcsstream.threads import HelperThread

#: Sessions live for up to a week on the service.
SESSION_LIFETIME = 7 * 24 * 3600
#: A single upload's entry is a few hundred bytes; a parallel one's about 40 bytes per part (some
#: 100,000 parts). Anything larger is not one of ours.
MAX_ENTRY_BYTES = 4 * 1024 * 1024
#: The newest entry format this gcsstream reads and writes. 1: no ``schema`` field; 2: the field;
#: 3: parallel uploads (a ``parallel`` record of parts); 4: a running part with the bytes its session
#: confirmed. An entry is written in the oldest schema that holds it, so an older gcsstream still
#: reads single uploads' entries. An entry of a newer schema is skipped, never rewritten or removed.
SCHEMA = 5
#: The schema of an entry that records a prefix sent in a streamed request (``sent``).
_SENT_SCHEMA = 5
#: The schema of a parallel upload's entry whose running parts have confirmed bytes.
_CONFIRMED_PARTS_SCHEMA = 4
#: The schema of a parallel upload's entry whose running parts have confirmed nothing.
_PARTS_SCHEMA = 3
#: The schema of an entry without parts.
_SINGLE_SCHEMA = 2
_ID_RE = re.compile(r"^[0-9a-f]{1,32}$")

log = logging.getLogger("gcsstream.journal")


#: How many prefixes sent unconfirmed an entry keeps (``JournalEntry.sent``).
SENT_KEPT = 8


def _sent_pairs(value: Any) -> list[tuple[int, int]]:
    """``sent`` as read: ascending ``[length, crc32c]`` pairs of non-negative integers."""
    pairs: list[tuple[int, int]] = []
    if not isinstance(value, list) or len(value) > SENT_KEPT:
        raise ValueError(f"'sent' is not a list of at most {SENT_KEPT} pairs")
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(_non_negative_int(n) for n in pair)) or (
            pairs and pair[0] <= pairs[-1][0]
        ):
            raise ValueError("'sent' is not ascending [length, crc32c] pairs")
        pairs.append((pair[0], pair[1]))
    return pairs


def state_dir() -> Path:
    explicit = os.environ.get("GCSSTREAM_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "gcsstream"


@dataclass(frozen=True)
class UploadSettings:
    """What an upload writes and where: everything that must match for a run to continue a
    journaled session (the session fixed them when it was started)."""

    destination: str
    endpoint: str
    #: The initiate request's JSON body (name, contentType, metadata, storageClass, kmsKeyName...).
    resource: dict[str, Any]
    checksum: str = "crc32c"
    if_generation_match: int | None = None
    gzip: bool = False
    expected_size: int | None = None

    def differences(self, other: UploadSettings) -> list[str]:
        """The names of the settings in which ``other`` differs from these."""
        names = {
            "destination": "destination",
            "endpoint": "endpoint",
            "checksum": "--checksum",
            "if_generation_match": "precondition (--no-clobber, --if-generation-match)",
            "gzip": "--gzip",
            "expected_size": "--size",
        }
        found = [label for key, label in names.items() if getattr(self, key) != getattr(other, key)]
        for key in sorted(set(self.resource) | set(other.resource)):
            if self.resource.get(key) != other.resource.get(key):
                found.append({"metadata": "--metadata"}.get(key, key))
        return found


@dataclass(frozen=True)
class FinishedPart:
    """A part of a parallel upload that is stored, as a temporary object, and verified. Its
    object's name and its offset in the stream follow from its index (``JournalEntry.part_name``,
    ``part_size``): they are never read from the file, so a journal cannot name another object."""

    index: int
    size: int
    #: CRC32C of its bytes (checked against the re-read stream before it is skipped on resume).
    crc32c: int
    #: The generation of its temporary object (the one deleted once it is composed).
    generation: int


@dataclass(frozen=True)
class RunningPart:
    """A part of a parallel upload whose resumable session was open when the entry was written."""

    index: int
    #: Its session: a credential, like a single upload's ``session_uri``.
    session_uri: str
    #: The bytes its session had confirmed (at most a chunk behind), and their CRC32C: a resume
    #: checks the re-read stream against them before it sends anything.
    confirmed: int = 0
    crc32c: int = 0


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_http_url(url: Any) -> bool:
    return (
        isinstance(url, str)
        and url.startswith(("http://", "https://"))
        and bool(urllib.parse.urlsplit(url).netloc)
    )


def _on_endpoint(url: Any, endpoint: str) -> bool:
    return _is_http_url(url) and origin(url) == origin(endpoint)


def _parallel_from_json(data: dict[str, Any], schema: int) -> dict[str, Any]:
    """The fields of a parallel upload's ``parallel`` record, validated: every part but the
    stream's last is ``part_size`` long, sessions are on the endpoint, no part is both finished
    and running, and no more parts run than there are connections."""
    record = data.pop("parallel")
    keys = {"part_size", "connections", "parts", "running"}
    if not isinstance(record, dict) or not keys <= set(record) <= keys | {"composed"}:
        raise ValueError("'parallel' is not a parallel upload's record")
    part_size, connections = record["part_size"], record["connections"]
    if not (_non_negative_int(part_size) and part_size > 0 and part_size % CHUNK_QUANTUM == 0):
        raise ValueError("'part_size' is not a positive multiple of 256 KiB")
    if not (_non_negative_int(connections) and 2 <= connections <= MAX_PARALLEL):
        raise ValueError(f"'connections' is not between 2 and {MAX_PARALLEL}")
    finished: list[FinishedPart] = []
    running: list[RunningPart] = []
    for key, widths in (("parts", (4,)), ("running", (2, 4) if schema >= 4 else (2,))):
        listed = record[key]
        if not isinstance(listed, list):
            raise ValueError(f"{key!r} is not a list")
        previous = -1
        for item in listed:
            if not isinstance(item, list) or len(item) not in widths:
                raise ValueError(f"{key!r} holds something that is not a part")
            if not _non_negative_int(item[0]) or item[0] <= previous:
                raise ValueError(f"{key!r} are not in order")
            previous = item[0]
            if key == "parts":
                if not all(_non_negative_int(v) for v in item):
                    raise ValueError("a part's fields are not non-negative integers")
                if not (0 < item[1] <= part_size and item[2] < 1 << 32):
                    raise ValueError("a part's size or crc32c is out of range")
                finished.append(FinishedPart(*item))
            else:
                if not _on_endpoint(item[1], data["endpoint"]):
                    raise ValueError("a running part's session URI is not on its endpoint")
                confirmed, crc = item[2:] or (0, 0)
                if not (_non_negative_int(confirmed) and _non_negative_int(crc) and crc < 1 << 32):
                    raise ValueError("a running part's confirmed bytes or crc32c are not valid")
                # Any offset below the part's size: a service may confirm one off the 256 KiB grid.
                if confirmed >= part_size or (crc and not confirmed):
                    raise ValueError("a running part's confirmed bytes are out of range")
                running.append(RunningPart(item[0], item[1], confirmed, crc))
    done = {p.index for p in finished}
    if done & {p.index for p in running}:
        raise ValueError("a part is both finished and running")
    if len(running) > connections:
        raise ValueError("more parts are running than it has connections")
    short = [p for p in finished if p.size < part_size]
    last = max(done, default=-1)
    if short and (short[0].index != last or any(p.index > last for p in running)):
        raise ValueError("a part other than the stream's last is shorter than 'part_size'")
    composed = record.get("composed", 0)
    if not _non_negative_int(composed) or (composed and running):
        raise ValueError("'composed' is not the generation of a finished upload's object")
    return {
        "part_size": part_size,
        "connections": connections,
        "parts": finished,
        "running": running,
        "composed": composed,
    }


@dataclass
class JournalEntry:
    """One unfinished upload, with the settings it was started with."""

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
    if_generation_match: int | None = None
    gzip: bool = False
    expected_size: int | None = None
    persisted: int = 0
    persisted_crc32c: int = 0
    #: Longer prefixes that went out in a streamed request (a file's), not yet confirmed, as
    #: ``(length, crc32c)``, ascending, the last ``SENT_KEPT``: the service holds only bytes sent,
    #: so if it holds at least a length, it holds those bytes (resume checks them).
    sent: list[tuple[int, int]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    #: The format of the entry (``SCHEMA``); one read from an older schema is upgraded in memory.
    schema: int = SCHEMA
    #: A parallel upload's part size and connections (0 for an upload through one session, whose
    #: ``session_uri`` is then set), its finished parts, in order, and its parts still running.
    part_size: int = 0
    connections: int = 0
    parts: list[FinishedPart] = field(default_factory=list)
    running: list[RunningPart] = field(default_factory=list)
    #: A parallel upload that composed its object (this generation) but could not delete the
    #: temporary objects ``parts`` lists: nothing to resume, only to ``abort`` (0: not composed).
    composed: int = 0

    @property
    def is_parallel(self) -> bool:
        return self.part_size > 0

    def part_name(self, index: int) -> ObjectURL:
        """The temporary object of a parallel upload's part ``index`` (derived, never stored)."""
        return parse_gs_url(self.destination).temporary(self.id, f"{index:06d}")

    def to_json(self) -> dict[str, Any]:
        """The entry as written: the oldest schema that holds it."""
        data = asdict(self)
        for key in ("part_size", "connections", "parts", "running", "composed"):
            del data[key]
        if self.sent and not self.is_parallel:
            data["sent"] = [list(pair) for pair in self.sent]
        else:
            del data["sent"]
        if not self.is_parallel:
            data["schema"] = _SENT_SCHEMA if self.sent else _SINGLE_SCHEMA
            return data
        confirmed = any(p.confirmed for p in self.running)
        data["schema"] = _CONFIRMED_PARTS_SCHEMA if confirmed else _PARTS_SCHEMA
        data["parallel"] = {
            "part_size": self.part_size,
            "connections": self.connections,
            "parts": [[p.index, p.size, p.crc32c, p.generation] for p in self.parts],
            "running": [
                [p.index, p.session_uri, *((p.confirmed, p.crc32c) if p.confirmed else ())]
                for p in self.running
            ],
            **({"composed": self.composed} if self.composed else {}),
        }
        return data

    @property
    def is_stream(self) -> bool:
        return self.source.get("kind") != "file"

    @property
    def expired(self) -> bool:
        """A session's lifetime is over (a parallel upload's parts are objects: they stay)."""
        return not self.is_parallel and time.time() - self.created > SESSION_LIFETIME

    @property
    def settings(self) -> UploadSettings:
        return UploadSettings(
            destination=self.destination,
            endpoint=self.endpoint,
            resource=self.resource,
            checksum=self.checksum,
            if_generation_match=self.if_generation_match,
            gzip=self.gzip,
            expected_size=self.expected_size,
        )

    @classmethod
    def from_json(cls, data: Any, entry_id: str) -> JournalEntry:
        """A validated entry, or ValueError saying what is wrong (every field is checked)."""
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but a {type(data).__name__}")
        data = dict(data)
        schema = data.pop("schema", 1)
        if not _non_negative_int(schema) or schema < 1:
            raise ValueError("'schema' is not a positive integer")
        if schema > SCHEMA:
            raise ValueError(
                f"it was written by a newer gcsstream (journal schema {schema}; this one reads up to "
                f"{SCHEMA}): use that version to resume it; it is left as it is"
            )
        for key in ("part_size", "connections", "parts", "running", "composed"):  # in ``parallel``
            if key in data:
                raise ValueError(f"unknown field {key!r}")
        parallel = "parallel" in data
        if parallel and schema < 3:
            raise ValueError("unknown field 'parallel'")
        if "gzip" not in data and isinstance(data.get("source"), dict):  # journals before 0.x
            data["gzip"] = bool(data["source"].get("gzip"))
        if "sent" in data:
            if schema < _SENT_SCHEMA:
                raise ValueError("unknown field 'sent'")
            data["sent"] = _sent_pairs(data["sent"])
        ints = {"chunk_size", "persisted", "persisted_crc32c"}
        optional_ints = {"if_generation_match", "expected_size"}
        strings = {"id", "session_uri", "destination", "endpoint", "checksum"}
        for key in data:
            if key not in cls.__dataclass_fields__ and key != "parallel":
                raise ValueError(f"unknown field {key!r}")
        for key in (
            "id",
            "session_uri",
            "destination",
            "endpoint",
            "resource",
            "chunk_size",
            "checksum",
            "source",
        ):
            if key not in data:
                raise ValueError(f"no {key!r} field")
        for key, value in data.items():
            if key in strings and not isinstance(value, str):
                raise ValueError(f"{key!r} is not a string")
            if key in ints | optional_ints and not (
                (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
                or (value is None and key in optional_ints)
            ):
                raise ValueError(f"{key!r} is not a non-negative integer")
            if key in ("created", "updated") and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ValueError(f"{key!r} is not a number")
            if key in ("resource", "source") and not isinstance(value, dict):
                raise ValueError(f"{key!r} is not an object")
            if key == "gzip" and not isinstance(value, bool):
                raise ValueError("'gzip' is not true or false")
        if data["id"] != entry_id:
            raise ValueError(f"its id {data['id']!r} is not its file name")
        if data["checksum"] not in CHECKSUM_MODES:
            raise ValueError("'checksum' is not a checksum mode")
        if not _is_http_url(data["endpoint"]):
            raise ValueError("'endpoint' is not an http(s) URL")
        if parallel:  # its sessions are its parts'
            if data["session_uri"]:
                raise ValueError("a parallel upload's entry has a session URI")
        elif not _is_http_url(data["session_uri"]):
            raise ValueError("'session_uri' is not an http(s) URL")
        elif origin(data["session_uri"]) != origin(data["endpoint"]):
            raise ValueError("its session URI is not on its endpoint")
        try:
            parse_gs_url(data["destination"])
        except UsageError:
            raise ValueError("'destination' is not a gs://BUCKET/OBJECT URL") from None
        if not isinstance(data["resource"].get("name"), str):
            raise ValueError("'resource' has no object name")
        source = data["source"]
        if source.get("kind") == "file" and not (
            isinstance(source.get("path"), str)
            and isinstance(source.get("size"), int)
            and isinstance(source.get("mtime_ns"), int)
        ):
            raise ValueError("'source' is not a file's path, size and mtime")
        fields = _parallel_from_json(data, schema) if parallel else {}
        entry = cls(**data, **fields, schema=SCHEMA)
        if parallel:
            try:
                entry.part_name(0)
            except UsageError:
                raise ValueError("its object name is too long for a parallel upload") from None
        return entry


def _encoded(entry: JournalEntry) -> bytes:
    """The bytes of an entry's file: readable JSON, compact for a parallel upload's many parts."""
    data = entry.to_json()
    raw = (
        json.dumps(data, separators=(",", ":")) if entry.is_parallel else json.dumps(data, indent=1)
    ).encode()
    if len(raw) > MAX_ENTRY_BYTES:
        raise UsageError(
            f"upload {entry.id} has too many parts to journal ({len(entry.parts) + len(entry.running)}): "
            "use a larger --part-size"
        )
    return raw


class EntryLock:
    """An advisory lock on one entry (``ID.lock``), held until ``release`` or process exit."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self, *, forget: bool = False) -> None:
        """Release the lock; with ``forget`` (the entry is gone), remove the lock file first."""
        if self._fd is None:
            return
        if forget:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


class Journal:
    """The journal files of one state directory.

    ``warn`` is told, once per file, about each file skipped as damaged or foreign.
    """

    def __init__(self, directory: Path | None = None, *, warn: Callable[[str], None] | None = None) -> None:
        self.directory = directory or state_dir()
        self._warn = warn or log.warning
        self._warned: set[str] = set()
        self._locks: dict[str, EntryLock] = {}
        #: The background writer of each entry this process writes behind its run (``unlock``).
        self._writers: dict[str, _BackgroundWriter] = {}

    # -- the directory ----------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail now, before any upload starts, if journals cannot be written safely."""
        self._ensure_directory()

    def _ensure_directory(self) -> None:
        try:
            self._make_private(self.directory)
            self.check_directory()
            # O_EXCL|O_NOFOLLOW: the probe never follows a link planted at its name.
            probe = self.directory / f".probe.{os.getpid()}"
            for _ in range(2):
                try:
                    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                except FileExistsError:
                    probe.unlink()  # a leftover (or a link): removing a link leaves its target alone
                    continue
                os.close(fd)
                probe.unlink()
                break
        except OSError as exc:
            raise UsageError(
                f"the state directory {self.directory} is not writable: {exc.strerror or exc} "
                "(set GCSSTREAM_STATE_DIR to a writable directory)"
            ) from None

    @staticmethod
    def _make_private(directory: Path) -> None:
        """Create the directory and missing parents 0700, whatever the umask."""
        missing = []
        path = directory.absolute()
        while not path.exists() and not path.is_symlink() and path != path.parent:
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
                os.chmod(path, 0o700)

    def check_directory(self) -> None:
        """Refuse a state directory another user could write to (ssh's StrictModes)."""
        try:
            info = os.stat(self.directory)
        except FileNotFoundError:
            return
        uid = os.geteuid()
        if not stat.S_ISDIR(info.st_mode):
            raise UsageError(f"the state directory {self.directory} is not writable: it is not a directory")
        if info.st_uid != uid:
            raise UsageError(
                f"the state directory {self.directory} belongs to uid {info.st_uid}, not to you: "
                f"fix it with `chown {uid} {self.directory}` or set GCSSTREAM_STATE_DIR"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UsageError(
                f"the state directory {self.directory} is writable by other users "
                f"(mode {stat.S_IMODE(info.st_mode):o}): fix it with `chmod 700 {self.directory}`"
            )

    # -- entries ----------------------------------------------------------------------------------

    def new_entry(self, *, id_bytes: int = 4, **fields: Any) -> JournalEntry:
        """An entry with a fresh id (``id_bytes`` random bytes: short to type, longer where it
        also names temporary objects), locked by this process, written before the first byte."""
        self._ensure_directory()
        while True:
            entry_id = secrets.token_hex(id_bytes)
            if self._path(entry_id).exists() or self._lock_path(entry_id).exists():
                continue
            try:
                self.lock(entry_id)
            except Busy:
                continue
            if not self._path(entry_id).exists():
                break
            self.unlock(entry_id)
        entry = JournalEntry(id=entry_id, **fields)
        self.write(entry)
        return entry

    def write(self, entry: JournalEntry) -> None:
        entry.updated = time.time()
        try:
            replace_privately(self._path(entry.id), _encoded(entry), durable=True)
            self._sync_directory()
        except OSError as exc:
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
        """Forget an entry (and release its lock if this process holds it)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(entry_id).unlink()
        self._writers.pop(entry_id, None)
        lock = self._locks.pop(entry_id, None)
        if lock is not None:
            lock.release(forget=True)

    def load(self, entry_id: str) -> JournalEntry:
        path = self._path(entry_id)
        self.check_directory()
        try:
            raw = self._read(path)
        except FileNotFoundError:
            raise NotFoundError(
                f"no unfinished upload with id {entry_id!r} (see `gcsstream sessions`)"
            ) from None
        except OSError as exc:
            raise UsageError(f"the journal of {entry_id} is unreadable: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"the journal {path} is not used: {exc}") from None
        try:
            return JournalEntry.from_json(json.loads(raw), entry_id)
        except ValueError as exc:
            raise UsageError(f"the journal {path} is not used: {exc}") from None

    @staticmethod
    def _read(path: Path) -> bytes:
        """The bytes of a journal file, which must be a regular file of ours, of bounded size.

        O_NOFOLLOW: not a link to elsewhere; O_NONBLOCK: a FIFO planted there cannot hang us.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError("it is a symbolic link") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("it is not a regular file")
            if info.st_uid != os.geteuid():
                raise ValueError(f"it belongs to uid {info.st_uid}, not to you")
            if info.st_size > MAX_ENTRY_BYTES:
                raise ValueError(f"it is larger than {MAX_ENTRY_BYTES} bytes")
            raw = os.read(fd, MAX_ENTRY_BYTES + 1)
            if len(raw) > MAX_ENTRY_BYTES:
                raise ValueError(f"it is larger than {MAX_ENTRY_BYTES} bytes")
            return raw
        finally:
            os.close(fd)

    def entries(self) -> list[JournalEntry]:
        """Every valid entry; each file that is not one is skipped with one warning."""
        if not self.directory.is_dir():
            return []
        self.check_directory()
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(self.load(path.stem))
            except NotFoundError as exc:
                if path.exists() or path.is_symlink():  # a name that is not an id
                    self._skip(path, str(exc))
            except UsageError as exc:
                self._skip(path, str(exc))
        return sorted(found, key=lambda e: e.created)

    def _skip(self, path: Path, why: str) -> None:
        if str(path) not in self._warned:
            self._warned.add(str(path))
            prefix = f"the journal {path} is not used: "
            self._warn(why if why.startswith(prefix) else f"{prefix}{why}")

    # -- locks ------------------------------------------------------------------------------------

    def lock(self, entry_id: str) -> EntryLock:
        """Take the entry's lock for this process, or raise ``Busy`` naming the holder."""
        if entry_id in self._locks:
            return self._locks[entry_id]
        path = self._lock_path(entry_id)
        for attempt in range(50):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise UsageError(f"cannot lock upload {entry_id} ({path}): {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                if pid is not None and _alive(pid) or attempt == 49:
                    busy = Busy(
                        f"upload {entry_id} is being driven by process {pid or '(unknown)'}; "
                        "let it finish (see `gcsstream sessions`)"
                    )
                    busy.upload_id, busy.pid = entry_id, pid
                    raise busy from None
                time.sleep(0.02)  # a `sessions` listing probing it for a moment, not a driver
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed it as we opened it: lock the current file
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            lock = self._locks[entry_id] = EntryLock(path, fd)
            return lock
        raise Busy(f"upload {entry_id} is locked")  # pragma: no cover - the loop raises first

    def unlock(self, entry_id: str) -> None:
        """Release an entry's lock; while a write of it is still in flight (one that outlasted
        ``JOURNAL_WRITE_TIMEOUT``), once that write has ended: another process that took the
        upload over meanwhile would have its entry replaced by this one's older state."""
        writer = self._writers.get(entry_id)
        if writer is not None:
            writer.when_done(lambda: self._unlock_now(entry_id))
        else:
            self._unlock_now(entry_id)

    def _unlock_now(self, entry_id: str) -> None:
        self._writers.pop(entry_id, None)
        lock = self._locks.pop(entry_id, None)
        if lock is not None:
            lock.release(forget=not self._path(entry_id).exists())

    def writes_behind(self, entry_id: str, writer: _BackgroundWriter) -> None:
        """``writer`` writes this entry in the background: ``unlock`` waits for its last write."""
        self._writers[entry_id] = writer

    def unlock_all(self) -> None:
        for entry_id in list(self._locks):
            self.unlock(entry_id)

    def holder(self, entry_id: str) -> int | None:
        """The pid of another process driving this upload, or None."""
        if entry_id in self._locks:
            return None
        try:
            fd = os.open(
                self._lock_path(entry_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        finally:
            os.close(fd)
        return None

    def _path(self, entry_id: str) -> Path:
        if not _ID_RE.match(entry_id or ""):
            raise NotFoundError(f"{entry_id!r} is not an upload id (see `gcsstream sessions`)")
        return self.directory / f"{entry_id}.json"

    def _lock_path(self, entry_id: str) -> Path:
        return self._path(entry_id).with_suffix(".lock")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_privately(path: Path, data: bytes, *, durable: bool) -> None:
    """Put ``data`` at ``path`` atomically: a private (0600) temporary file beside it, renamed over
    it (after an fsync if ``durable``). The temporary file is opened O_EXCL|O_NOFOLLOW, so a file
    or symlink planted at its name never receives the data; it is removed if anything fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a crashed process with our pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class JournalRecorder:
    """Keeps a journal entry in step with an upload (the engine's ``SessionRecorder``).

    For a new upload the entry is created (and locked) when the session exists, before the first
    byte is sent; for a resumed one it is the existing entry, locked by ``jobs.claim_entry``.

    Confirmed offsets are written by a background thread, so that the two fsyncs of an update
    never delay the next chunk's send: the write for chunk k overlaps the sending of chunk k+1,
    and ``persisted`` for chunk k+1 first waits for it. The journal is so at most one chunk
    behind what the engine has confirmed (and ``resume`` asks the service anyway). ``flush`` and
    ``finished`` wait for the write in flight, so the lock is never released under it.
    """

    def __init__(self, journal: Journal, entry: JournalEntry | None = None, **fields: Any) -> None:
        self.journal = journal
        self.entry = entry
        self._fields = fields
        self._writer: _BackgroundWriter | None = None
        #: How far beyond the last prefix sent the next one must be to be recorded (``sent``).
        self._sent_step = entry.chunk_size if entry is not None else int(fields.get("chunk_size", 1))
        #: The prefixes sent, as recorded (the entry's may lag while a write is in flight).
        self._sent: list[tuple[int, int]] = list(entry.sent) if entry is not None else []

    @classmethod
    def for_new(
        cls, journal: Journal, settings: UploadSettings, *, chunk_size: int, source: dict[str, Any]
    ) -> JournalRecorder:
        """A recorder that journals a new upload with these settings."""
        return cls(journal, **asdict(settings), chunk_size=chunk_size, source=source)

    def started(self, session_uri: str) -> None:
        if self.entry is None:
            self.entry = self.journal.new_entry(session_uri=session_uri, **self._fields)

    def persisted(self, offset: int, crc32c: int) -> None:
        # The prefixes sent go too: below ``offset`` they are confirmed, and above it they were
        # not kept (what goes out again may be read again), or are another run's (a resume).
        assert self.entry is not None
        self._sent, self._sent_step = [], self.entry.chunk_size
        self._record(persisted=offset, persisted_crc32c=crc32c, sent=[])

    def _record(self, **fields: Any) -> None:
        assert self.entry is not None
        if self._writer is None:
            self._writer = _BackgroundWriter(self.journal.write)
            self.journal.writes_behind(self.entry.id, self._writer)
        # First the write in flight: ``entry`` never runs ahead of the disk by more than the write
        # being made, so what an interrupted run prints is what ``resume`` will read.
        self._writer.wait()
        for name, value in fields.items():
            setattr(self.entry, name, value)
        # A copy: the writer serializes it while the engine goes on updating ``entry``.
        self._writer.submit(replace(self.entry))

    def sent(self, offset: int, crc32c: int) -> None:
        """A streamed request has sent the first ``offset`` bytes (not yet confirmed).

        Kept spread out, not only the newest: a prefix is recorded once it is ``_sent_step``
        beyond the last one, and when ``SENT_KEPT`` are exceeded every other one goes and the
        step doubles, so that one at most about an eighth of the way below the newest is left
        for a service that holds less (socket buffers, a kill). That is a few dozen writes a
        file, and none waits for the disk: the sender never stalls on the journal. While a write
        is in flight they are only kept in memory, for the next write or ``flush``."""
        assert self.entry is not None
        last = self._sent[-1][0] if self._sent else self.entry.persisted
        if offset < last + self._sent_step:
            return
        pairs = [*self._sent, (offset, crc32c)]
        if len(pairs) > SENT_KEPT:
            pairs, self._sent_step = pairs[::2], self._sent_step * 2
        self._sent = pairs
        if self._writer is None or not self._writer.busy:
            self._record(sent=list(pairs))

    def flush(self) -> None:
        """Wait (bounded) for the entry to be on disk as last recorded; raise if it could not be."""
        if self.entry is not None and self._sent != self.entry.sent:
            self._record(sent=list(self._sent))  # prefixes sent while a write was in flight
        if self._writer is not None:
            self._writer.wait()

    def finished(self) -> None:
        entry = self.entry
        remove = (lambda: self.journal.remove(entry.id)) if entry is not None else (lambda: None)
        if self._writer is None:
            remove()
        else:
            # A write that outlasts the timeout would bring the entry back after its removal, and
            # the lock must not be released under it: the writer removes it once that write ends.
            self._writer.when_idle(remove)
        self.done = True

    #: The upload completed or was cancelled: its entry is gone, nothing is left to resume.
    done = False


class PartsRecorder:
    """Keeps a parallel upload's journal entry in step with its parts.

    The entry is created (and locked) before the first part starts, with an id of 16 hex digits
    that also names the temporary objects; for a resumed upload it is the existing entry, claimed
    by ``jobs.claim_entry``. A part's session is journaled before its first byte is sent
    (``part_started``, called from the part's worker), and a verified part before its worker
    takes another (``part_finished``): each write is waited for (bounded), so what the journal
    says is stored is stored. What a running part's session confirmed is written behind it
    (``part_persisted``). Calls from the workers are serialized.
    """

    def __init__(self, journal: Journal, entry: JournalEntry | None = None, **fields: Any) -> None:
        self.journal = journal
        self.entry = entry
        self._fields = fields
        self._lock = threading.Lock()
        self._writer = _BackgroundWriter(journal.write)
        self.done = False
        self.closed = False

    @classmethod
    def for_new(
        cls,
        journal: Journal,
        settings: UploadSettings,
        *,
        chunk_size: int,
        source: dict[str, Any],
        part_size: int,
        connections: int,
    ) -> PartsRecorder:
        return cls(
            journal,
            **asdict(settings),
            chunk_size=chunk_size,
            source=source,
            part_size=part_size,
            connections=connections,
        )

    def started(self) -> JournalEntry:
        """The run's entry: created now for a new upload (its id names the temporary objects)."""
        if self.entry is None:
            self.entry = self.journal.new_entry(id_bytes=8, session_uri="", **self._fields)
        return self.entry

    def close(self) -> None:
        """The run is over for the journal: a worker still running writes nothing more (the
        entry may be another process's by then), and starts no session."""
        with self._lock:
            self.closed = True
        with contextlib.suppress(UsageError):  # a write behind a part lands before the entry is let go
            self._writer.wait()

    def part_started(self, index: int, session_uri: str) -> None:
        with self._lock:
            if self.closed:
                raise Interrupted("the upload was stopped")
            entry = self.started()
            if any(p.index == index and p.session_uri == session_uri for p in entry.running):
                return
            running = [p for p in entry.running if p.index != index] + [RunningPart(index, session_uri)]
            entry.running = sorted(running, key=lambda p: p.index)
            self._write()

    def part_persisted(self, index: int, confirmed: int, crc32c: int) -> None:
        """A running part's session confirmed its first ``confirmed`` bytes. Written behind the
        sender (waiting only for the write before it), so the journal lags by about a chunk."""
        with self._lock:
            entry = self.entry
            if self.closed or entry is None:
                return
            if not any(p.index == index for p in entry.running):
                return
            entry.running = [
                RunningPart(p.index, p.session_uri, confirmed, crc32c) if p.index == index else p
                for p in entry.running
            ]
            self._write(behind=True)

    def part_finished(self, index: int, size: int, crc32c: int, generation: int) -> None:
        with self._lock:
            if self.closed:
                return  # its session is journaled as running: a resume finds it finished
            entry = self.started()
            # A short part ends the stream: no part after it runs (a shorter stream resumed).
            short = size < entry.part_size
            entry.running = [p for p in entry.running if p.index != index and not (short and p.index > index)]
            parts = [p for p in entry.parts if p.index != index] + [
                FinishedPart(index, size, crc32c, generation)
            ]
            entry.parts = sorted(parts, key=lambda p: p.index)
            entry.persisted = sum(p.size for p in entry.parts)
            self._write()

    def keep_only(self, indexes: set[int], *, composed: int = 0) -> None:
        """After a run's cleanup: only these finished parts are left (no session runs); with
        ``composed``, the object was created (generation) and the entry is kept for ``abort``."""
        with self._lock:
            self.closed = True
            if self.entry is None:
                return
            self.entry.composed = composed
            self.entry.running = []
            self.entry.parts = [p for p in self.entry.parts if p.index in indexes]
            self.entry.persisted = sum(p.size for p in self.entry.parts)
            self._write()

    def _write(self, *, behind: bool = False) -> None:
        """Write the entry after the write before it; ``behind``: without waiting for this one."""
        assert self.entry is not None
        self.journal.writes_behind(self.entry.id, self._writer)
        self._writer.wait()
        self._writer.submit(
            replace(self.entry, parts=list(self.entry.parts), running=list(self.entry.running))
        )
        if not behind:
            self._writer.wait()

    def flush(self) -> None:
        self._writer.wait()

    def finished(self) -> None:
        """The upload completed, or was given up with nothing left: forget its entry."""
        with self._lock:
            self.closed = True
            entry = self.entry
            if entry is not None:
                self._writer.when_idle(lambda: self.journal.remove(entry.id))
            self.done = True


#: Seconds a journal write may take before the run goes on without it (a hung file system).
JOURNAL_WRITE_TIMEOUT = 30.0


class _BackgroundWriter:
    """Writes journal entries on a thread of its own, one at a time.

    The thread lives as long as writes keep coming (it ends after ``_IDLE`` seconds without one,
    and the next write starts another): starting a thread per write cost the sender about 0.2 ms
    a chunk, waiting for the new thread to be scheduled on a busy machine.
    """

    _IDLE = 1.0

    def __init__(self, write: Callable[[JournalEntry], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._busy = False  # a write is pending or in flight
        self._pending: JournalEntry | None = None
        self._thread: HelperThread | None = None
        self._error: UsageError | None = None
        self._then: list[Callable[[], None]] = []  # to run once the write in flight has ended

    def submit(self, entry: JournalEntry) -> None:
        """Start writing ``entry``; the previous write must be done (``wait``)."""
        with self._cond:
            self._pending, self._busy = entry, True
            if self._thread is None:
                thread = HelperThread(self._serve, name="gcsstream-journal")
                try:
                    thread.start()
                except BaseException:
                    if thread.ident is None:  # not started (no threads left): nothing is in flight
                        self._pending, self._busy = None, False
                    else:  # interrupted once it had started: it serves the write
                        self._thread = thread
                    raise
                self._thread = thread
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """A write is pending or in flight."""
        with self._cond:
            return self._busy

    def wait(self) -> None:
        """Until no write is in flight (bounded); raise the error of the last one, if any."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy, timeout=JOURNAL_WRITE_TIMEOUT):
                raise UsageError(
                    f"a journal write has not finished after {JOURNAL_WRITE_TIMEOUT:.0f} s: "
                    "the state directory's file system is not answering"
                )
            error, self._error = self._error, None
        if error is not None:
            raise error

    def when_idle(self, then: Callable[[], None]) -> None:
        """Run ``then`` once no write is in flight: now, or when a write that outlasted the
        timeout ends (on the writer's thread). Errors of the last write are dropped."""
        with self._cond:
            if self._cond.wait_for(lambda: not self._busy, timeout=JOURNAL_WRITE_TIMEOUT):
                self._error = None
        self.when_done(then)

    def when_done(self, then: Callable[[], None]) -> None:
        """Run ``then`` now if no write is in flight, else when it ends (on the writer's thread)."""
        with self._cond:
            if self._busy:
                self._then.append(then)
                return
        then()

    def _serve(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending is not None, timeout=self._IDLE):
                    self._thread = None  # idle: the next submit starts another thread
                    return
                entry, self._pending = self._pending, None
            assert entry is not None
            self._run(entry)

    def _run(self, entry: JournalEntry) -> None:
        error = None
        try:
            self._write(entry)
        except UsageError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - any failure of the write stops the upload, as it did inline
            error = UsageError(f"cannot write the journal: {exc}")
        finally:
            while True:  # what was left to run after this write, then idle (at once, so none is missed)
                with self._cond:
                    thens, self._then = self._then, []
                    if not thens:
                        self._busy = False
                        self._error = error
                        self._cond.notify_all()
                        break
                for then in thens:
                    with contextlib.suppress(Exception):
                        then()
