"""What the caller asks for: the destination object, its metadata, and how to upload it.

Parsing and validation of user input lives here so that the command line and the library
reject the same things with the same messages.
"""

from __future__ import annotations

import mimetypes
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

from gcsstream.errors import UsageError

#: Every chunk but the last must be a multiple of this (the service's rule).
CHUNK_QUANTUM = 256 * 1024
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_RETRY_DEADLINE = 600.0
#: ``--parallel``: the bytes of each part, and the connections that upload parts at once.
DEFAULT_PART_SIZE = 64 * 1024 * 1024
DEFAULT_PARALLEL = 1
MAX_PARALLEL = 64
#: Seconds to keep retrying the deletion of temporary objects (a failed or interrupted run
#: must not hang on a dead network for the whole retry deadline).
CLEANUP_RETRY_DEADLINE = 30.0
#: Temporary objects of a parallel upload: ``OBJECT.gcsstream-parts/RUN_ID/...``.
PARTS_SUFFIX = ".gcsstream-parts"

ChecksumMode = Literal["crc32c", "md5", "both", "none"]
CHECKSUM_MODES: tuple[str, ...] = ("crc32c", "md5", "both", "none")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")

# Compressed files: the type is the compression, and Content-Encoding is never set implicitly
# (it would make the service decompress a .tar.gz on download).
_ENCODING_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


def parse_size(text: str | int) -> int:
    """Bytes from ``16MiB``, ``256KiB``, ``1GiB``, ``16M`` (binary), ``16MB`` (decimal) or ``1048576``."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise UsageError(f"not a size: {text!r} (examples: 262144, 256KiB, 16MiB, 1GiB)")
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if value != int(value):
        raise UsageError(f"not a whole number of bytes: {text!r}")
    return int(value)


def check_chunk_size(chunk_size: int) -> int:
    """A chunk size the service accepts: a positive multiple of 256 KiB."""
    if chunk_size <= 0 or chunk_size % CHUNK_QUANTUM:
        lower = max(CHUNK_QUANTUM, chunk_size // CHUNK_QUANTUM * CHUNK_QUANTUM)
        raise UsageError(
            f"chunk size {chunk_size} is not a positive multiple of 256 KiB "
            f"(262144 bytes); try {format_size(lower)} or {format_size(lower + CHUNK_QUANTUM)}"
        )
    return chunk_size


def check_part_size(part_size: int) -> int:
    """A ``--part-size`` the service accepts for every part but the last: a positive multiple of
    256 KiB (each part is a resumable upload of its own)."""
    try:
        return check_chunk_size(part_size)
    except UsageError as exc:
        raise UsageError(str(exc).replace("chunk size", "part size", 1)) from None


def format_size(size: int) -> str:
    """``size`` in the largest binary unit that holds it exactly, as ``parse_size`` reads it:
    786432 is ``768KiB``, 1048576 ``1MiB``, 1000 ``1000``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


@dataclass(frozen=True)
class ObjectURL:
    """A ``gs://bucket/object`` destination or source."""

    bucket: str
    name: str

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    def parts_prefix(self, run_id: str) -> str:
        """Where a parallel upload to this object keeps its temporary objects: the object's name,
        ``.gcsstream-parts/`` and the run's id, so that they are recognisable and never collide."""
        return f"{self.name}{PARTS_SUFFIX}/{run_id}/"

    def temporary(self, run_id: str, leaf: str) -> ObjectURL:
        """One temporary object of a parallel upload (``leaf``: ``000042``, ``compose-1-000003``)."""
        return ObjectURL(self.bucket, check_object_name(self.parts_prefix(run_id) + leaf))


def check_object_name(name: str) -> str:
    """The service's object-name rules: 1-1024 bytes of UTF-8, no CR/LF, not ``.`` or ``..``."""
    if not name:
        raise UsageError("the object name is empty")
    if "\r" in name or "\n" in name:
        raise UsageError("object names cannot contain carriage returns or newlines")
    if name in (".", ".."):
        raise UsageError(f"{name!r} is not a valid object name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the object name is not valid UTF-8") from None
    if len(encoded) > 1024:
        raise UsageError(f"the object name is {len(encoded)} bytes long; the limit is 1024")
    return name


def parse_gs_url(url: str, *, default_name: str | None = None) -> ObjectURL:
    """Parse ``gs://BUCKET/OBJECT``.

    A name ending in ``/`` names a folder: ``default_name`` (a source file's base name) is
    appended to it, as ``cp`` does; without one that is a usage error.
    """
    if not url.startswith("gs://"):
        raise UsageError(f"not a gs:// URL: {url!r} (expected gs://BUCKET/OBJECT)")
    bucket, sep, name = url[len("gs://") :].partition("/")
    if not bucket:
        raise UsageError(f"no bucket in {url!r} (expected gs://BUCKET/OBJECT)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise UsageError(f"not a valid bucket name: {bucket!r}")
    if not sep or not name:
        if default_name is None:
            raise UsageError(f"no object name in {url!r} (expected gs://BUCKET/OBJECT)")
        name = default_name
    elif name.endswith("/"):
        if default_name is None:
            raise UsageError(f"{url!r} names a folder; give the object's full name")
        name += default_name
    return ObjectURL(bucket, check_object_name(name))


def guess_content_type(name: str) -> str:
    """The content type for an object name, as browsers and ``gsutil`` would guess it."""
    mime, encoding = mimetypes.guess_type(name, strict=False)
    if encoding:
        return _ENCODING_TYPES.get(encoding, "application/octet-stream")
    return mime or "application/octet-stream"


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings to a dict; the value may contain ``=``."""
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"metadata must be KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


@dataclass(frozen=True)
class ObjectMetadata:
    """The object resource fields set at upload time (the initiate request's JSON body)."""

    content_type: str | None = None
    cache_control: str | None = None
    content_encoding: str | None = None
    content_disposition: str | None = None
    storage_class: str | None = None
    kms_key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def resource(self, name: str) -> dict[str, object]:
        """The JSON body of the initiate request."""
        body: dict[str, object] = {"name": name}
        for key, value in (
            ("contentType", self.content_type or guess_content_type(name)),
            ("cacheControl", self.cache_control),
            ("contentEncoding", self.content_encoding),
            ("contentDisposition", self.content_disposition),
            ("storageClass", self.storage_class),
            ("kmsKeyName", self.kms_key),
        ):
            if value:
                body[key] = value
        if self.metadata:
            body["metadata"] = dict(self.metadata)
        return body

    @classmethod
    def from_resource(cls, resource: dict[str, Any]) -> ObjectMetadata:
        """The metadata a ``resource`` body (a journal's) asks for: what resuming a parallel
        upload gives its final compose."""

        def text(key: str) -> str | None:
            value = resource.get(key)
            return value if isinstance(value, str) else None

        custom = resource.get("metadata")
        return cls(
            content_type=text("contentType"),
            cache_control=text("cacheControl"),
            content_encoding=text("contentEncoding"),
            content_disposition=text("contentDisposition"),
            storage_class=text("storageClass"),
            kms_key=text("kmsKeyName"),
            metadata={str(k): str(v) for k, v in custom.items()} if isinstance(custom, dict) else {},
        )


@dataclass(frozen=True)
class UploadOptions:
    """How to upload: chunking, checksums, preconditions, retry and timeouts."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    checksum: ChecksumMode = "crc32c"
    if_generation_match: int | None = None
    retry_deadline: float = DEFAULT_RETRY_DEADLINE
    #: First backoff delay; doubles per failed attempt up to ``retry_max_delay``, with jitter.
    retry_initial_delay: float = 1.0
    retry_max_delay: float = 32.0
    #: Seconds to connect, and to wait for each read or write on the socket to make progress.
    connect_timeout: float = 20.0
    io_timeout: float = 120.0
    #: Exact size of the source when known in advance; the upload fails if it differs.
    expected_size: int | None = None

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        if self.checksum not in CHECKSUM_MODES:
            modes = f"{', '.join(CHECKSUM_MODES[:-1])} or {CHECKSUM_MODES[-1]}"
            raise UsageError(f"the checksum must be {modes}, not {self.checksum!r}")
        if self.retry_deadline < 0:
            raise UsageError("the retry deadline cannot be negative")

    @property
    def use_crc32c(self) -> bool:
        return self.checksum in ("crc32c", "both")

    @property
    def use_md5(self) -> bool:
        return self.checksum in ("md5", "both")


@dataclass(frozen=True)
class ParallelOptions:
    """``--parallel N``: how many parts upload at once, and how large each part is."""

    parallel: int = DEFAULT_PARALLEL
    part_size: int = DEFAULT_PART_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise UsageError(f"--parallel must be between 1 and {MAX_PARALLEL}, not {self.parallel}")
        check_part_size(self.part_size)

    def check(self, options: UploadOptions) -> None:
        """Refuse what a composed object cannot honour."""
        if options.use_md5:
            raise UsageError(
                f"--checksum {options.checksum} cannot be used with --parallel: a composed object has "
                "no MD5 (its CRC32C is verified end to end instead)"
            )


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port), default port filled in: the unit credentials are bound to."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port
