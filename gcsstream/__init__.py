"""gcsstream: stream stdin or files of any size into Google Cloud Storage, verified end to end."""

from typing import TYPE_CHECKING

from gcsstream.errors import (
    AuthError,
    Busy,
    GcsstreamError,
    IntegrityError,
    Interrupted,
    NotFoundError,
    PreconditionError,
    ServiceError,
    SourceError,
    TransientError,
    UsageError,
)

if TYPE_CHECKING:
    from gcsstream.api import ObjectWriter, open_upload, upload
    from gcsstream.engine import Uploader, UploadResult
    from gcsstream.options import ObjectMetadata, ObjectURL, ParallelOptions, UploadOptions, parse_gs_url
    from gcsstream.parallel import ParallelUploader
    from gcsstream.sources import FileSource, IterableSource, StreamSource
    from gcsstream.transport import Transport

__version__ = "0.1.0"


#: Where each lazily exported name lives. They load on first use, so that the command line's
#: start-up (--version, --help, completion) never imports requests, google-auth or asyncio.
_LAZY = {
    "ObjectWriter": "gcsstream.api",
    "open_upload": "gcsstream.api",
    "upload": "gcsstream.api",
    "Uploader": "gcsstream.engine",
    "UploadResult": "gcsstream.engine",
    "ObjectMetadata": "gcsstream.options",
    "ObjectURL": "gcsstream.options",
    "ParallelOptions": "gcsstream.options",
    "ParallelUploader": "gcsstream.parallel",
    "UploadOptions": "gcsstream.options",
    "parse_gs_url": "gcsstream.options",
    "FileSource": "gcsstream.sources",
    "IterableSource": "gcsstream.sources",
    "StreamSource": "gcsstream.sources",
    "Transport": "gcsstream.transport",
}


def __getattr__(name: str) -> object:
    import importlib

    if name == "aio":
        return importlib.import_module("gcsstream.aio")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gcsstream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "aio"})


__all__ = [
    "AuthError",
    "Busy",
    "FileSource",
    "GcsstreamError",
    "IntegrityError",
    "Interrupted",
    "IterableSource",
    "NotFoundError",
    "ObjectWriter",
    "ObjectMetadata",
    "ObjectURL",
    "ParallelOptions",
    "ParallelUploader",
    "PreconditionError",
    "ServiceError",
    "SourceError",
    "StreamSource",
    "Transport",
    "TransientError",
    "UploadOptions",
    "UploadResult",
    "UsageError",
    "Uploader",
    "__version__",
    "open_upload",
    "parse_gs_url",
    "upload",
]
