"""gcsstream: stream stdin or files of any size into Google Cloud Storage, verified end to end."""

from gcsstream.api import ObjectWriter, open_upload, upload
from gcsstream.engine import Uploader, UploadResult
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
from gcsstream.options import ObjectMetadata, ObjectURL, UploadOptions, parse_gs_url
from gcsstream.sources import FileSource, IterableSource, StreamSource
from gcsstream.transport import Transport

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "aio":  # imported on first use: the command line never needs asyncio
        import gcsstream.aio

        return gcsstream.aio
    raise AttributeError(f"module 'gcsstream' has no attribute {name!r}")


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
