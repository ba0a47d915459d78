"""Parsing of what users type: sizes, gs:// URLs, metadata, content types."""

from __future__ import annotations

import pytest

from gcsstream.errors import UsageError
from gcsstream.options import (
    ObjectMetadata,
    UploadOptions,
    check_chunk_size,
    guess_content_type,
    parse_gs_url,
    parse_metadata,
    parse_size,
)
from gcsstream.redact import redact


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("262144", 262144),
        ("256KiB", 262144),
        ("16MiB", 16 << 20),
        ("1GiB", 1 << 30),
        ("16M", 16 << 20),
        ("16MB", 16_000_000),
        ("1.5GiB", 3 << 29),
        (" 8 mib ", 8 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "-1", "16XB", "1.5", "12 34"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize("size", [0, -262144, 1, 262143, 262145, 1000000])
def test_chunk_size_must_be_positive_multiple_of_256kib(size):
    with pytest.raises(UsageError, match="multiple of 256 KiB"):
        check_chunk_size(size)
    with pytest.raises(UsageError):
        UploadOptions(chunk_size=size)


def test_chunk_size_error_suggests_valid_values():
    with pytest.raises(UsageError, match="try 1MiB or 1280KiB"):
        check_chunk_size(1_000_000 + 48_576 + 1)


@pytest.mark.parametrize(
    ("url", "bucket", "name"),
    [
        ("gs://bkt/o", "bkt", "o"),
        ("gs://my.bucket-1/a/b/c.tar", "my.bucket-1", "a/b/c.tar"),
        ("gs://bkt/sp ace/ü.txt", "bkt", "sp ace/ü.txt"),
    ],
)
def test_parse_gs_url(url, bucket, name):
    parsed = parse_gs_url(url)
    assert (parsed.bucket, parsed.name) == (bucket, name)
    assert str(parsed) == url


def test_folder_destination_takes_the_source_name():
    assert parse_gs_url("gs://bkt/backups/", default_name="db.dump").name == "backups/db.dump"
    assert parse_gs_url("gs://bkt", default_name="db.dump").name == "db.dump"
    with pytest.raises(UsageError, match="folder"):
        parse_gs_url("gs://bkt/backups/")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("gs:/x", "not a gs:// URL"),
        ("gs://", "no bucket"),
        ("gs://bucket", "no object name"),
        ("s3://b/o", "not a gs:// URL"),
        ("gs://bkt/a\nb", "newlines"),
        ("gs://bkt/" + "x" * 1025, "1024"),
        ("gs://Bad_Bucket/o", "bucket name"),
        ("gs://ab/o", "bucket name"),
        ("gs://bkt/..", "not a valid object"),
    ],
)
def test_parse_gs_url_rejects(url, message):
    with pytest.raises(UsageError, match=message):
        parse_gs_url(url)


def test_parse_metadata():
    assert parse_metadata(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(UsageError):
        parse_metadata(["novalue"])


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("site.tar", "application/x-tar"),
        ("site.tar.gz", "application/gzip"),
        ("db.sql.xz", "application/x-xz"),
        ("page.html", "text/html"),
        ("blob", "application/octet-stream"),
        ("x.json", "application/json"),
    ],
)
def test_guess_content_type(name, content_type):
    assert guess_content_type(name) == content_type


def test_metadata_resource_never_sets_encoding_implicitly():
    body = ObjectMetadata().resource("site.tar.gz")
    assert body == {"name": "site.tar.gz", "contentType": "application/gzip"}


def test_redact_removes_session_ids_and_tokens():
    text = (
        "PUT http://h/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=ABCdef123-_x HTTP/1.1 "
        "Authorization: Bearer ya29.a0secret access_token=zzz"
    )
    out = redact(text)
    assert "ABCdef123" not in out and "ya29.a0secret" not in out and "zzz" not in out
    assert "upload_id=REDACTED" in out
