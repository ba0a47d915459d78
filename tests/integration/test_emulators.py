"""The engine against real local emulators (fake-gcs-server, gcp-storage-emulator) on loopback."""

from __future__ import annotations

import io
import os

import pytest

from gcsstream import (
    FileSource,
    IterableSource,
    NotFoundError,
    ObjectMetadata,
    ObjectURL,
    StreamSource,
    Transport,
    Uploader,
    UploadOptions,
)
from tests.conftest import BUCKET, assert_stored, crc32c_b64

Q = 256 * 1024


def upload(emulator, source, name, **options):
    with Transport.connect(emulator.url) as transport:
        return Uploader(transport, UploadOptions(**{"chunk_size": Q, **options})).upload(
            source, ObjectURL(BUCKET, name)
        )


@pytest.mark.parametrize("size", [0, 1, Q, 4 * Q, 2 * Q + Q // 2, 5_000_000], ids=lambda n: f"{n}B")
def test_stream_upload_reads_back_identical(emulator, object_name, size):
    data = os.urandom(size)
    result = upload(emulator, StreamSource(io.BufferedReader(io.BytesIO(data))), object_name, checksum="both")
    assert result.size == size and result.crc32c == crc32c_b64(data)
    assert_stored(emulator, BUCKET, object_name, data)


def test_file_upload_with_known_size(emulator, object_name, tmp_path):
    data = os.urandom(3 * Q + 17)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    result = upload(emulator, FileSource(path), object_name)
    assert result.size == len(data)
    assert_stored(emulator, BUCKET, object_name, data)


def test_iterable_of_odd_pieces(emulator, object_name):
    pieces = [os.urandom(n) for n in (1, 300_000, 7, 500_000, 0, 123)]
    upload(emulator, IterableSource(pieces), object_name, chunk_size=2 * Q)
    assert_stored(emulator, BUCKET, object_name, b"".join(pieces))


def test_exact_multiple_of_default_chunk(emulator, object_name):
    data = os.urandom(2 * 16 * 1024 * 1024)
    upload(emulator, IterableSource([data]), object_name, chunk_size=16 * 1024 * 1024)
    assert_stored(emulator, BUCKET, object_name, data)


def test_metadata_is_stored(emulator, object_name):
    data = b"hello"
    meta = ObjectMetadata(
        content_type="text/plain",
        cache_control="no-store",
        content_disposition="attachment",
        metadata={"origin": "test", "k": "a=b"},
    )
    with Transport.connect(emulator.url) as transport:
        Uploader(transport, UploadOptions(chunk_size=Q)).upload(
            IterableSource([data]), ObjectURL(BUCKET, object_name), meta
        )
    resource = assert_stored(emulator, BUCKET, object_name, data)
    assert resource["contentType"] == "text/plain"
    assert resource["cacheControl"] == "no-store"
    assert resource["contentDisposition"] == "attachment"
    assert resource["metadata"] == {"origin": "test", "k": "a=b"}


def test_unknown_bucket_is_not_found(emulator):
    uploader = Uploader(Transport.connect(emulator.url), UploadOptions(chunk_size=Q))
    with pytest.raises(NotFoundError, match="bucket gs://no-such-bucket not found"):
        uploader.upload(IterableSource([b"x"]), ObjectURL("no-such-bucket", "o"))
