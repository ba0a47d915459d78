"""The one error mapping: what the service's error answers become, worded after what happened.

Canned ``requests.Response`` objects built in-process, in each shape the service (or a proxy in
front of it) answers with."""

from __future__ import annotations

import json

import pytest
import requests

from gcsstream.engine import Uploader, service_message
from gcsstream.errors import (
    AuthError,
    GcsstreamError,
    IntegrityError,
    PreconditionError,
    ServiceError,
)
from gcsstream.options import ObjectURL, UploadOptions

DEST = ObjectURL("bkt", "dir/obj.bin")
HASH = {"X-Goog-Hash": "crc32c=AAAAAA==", "Content-Range": "bytes 0-9/10"}


def response(status: int, body: object = b"", *, content_type: str = "application/json", reason: str = ""):
    r = requests.Response()
    r.status_code = status
    r.reason = reason or requests.status_codes._codes[status][0].replace("_", " ").title()
    r._content = json.dumps(body).encode() if isinstance(body, (dict, list)) else body  # type: ignore[assignment]
    r.headers["Content-Type"] = content_type
    r.encoding = "utf-8"
    return r


def error_for(resp, method: str = "PUT", headers: dict[str, str] | None = None, **options) -> GcsstreamError:
    uploader = Uploader(None, UploadOptions(**options))  # type: ignore[arg-type] - no request is sent
    return uploader._error_for(resp, method, headers or {}, DEST)


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        pytest.param(
            {"error": {"code": 403, "message": "Access denied.", "errors": [{"reason": "forbidden"}]}},
            "application/json",
            "Access denied. (forbidden)",
            id="json-message-and-reason",
        ),
        pytest.param(
            {"error": {"errors": [{"reason": "invalid", "message": "Invalid argument: metadata too large"}]}},
            "application/json",
            "Invalid argument: metadata too large (invalid)",
            id="json-nested-errors-only",
        ),
        pytest.param({"error": "invalid_grant"}, "application/json", "invalid_grant", id="json-error-string"),
        pytest.param(
            b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
            b"<Message>Access denied.</Message><Details>no storage.objects.create</Details></Error>",
            "application/xml",
            "AccessDenied: Access denied.: no storage.objects.create",
            id="xml",
        ),
        pytest.param(
            b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>\n"
            b"<body><h1>Bad</h1></body></html>",
            "text/html",
            "502 Bad Gateway",
            id="html",
        ),
        pytest.param(
            b"  quota exceeded for today\nsecond line", "text/plain", "quota exceeded for today", id="text"
        ),
        pytest.param(b"", "text/plain", "Forbidden", id="empty-body-reason"),
    ],
)
def test_service_message_of_each_body_shape(body, content_type, expected):
    assert service_message(response(403, body, content_type=content_type)) == expected


def test_service_message_never_shows_a_session_uri():
    body = {"error": {"message": "bad session http://h/upload/storage/v1/b/b/o?upload_id=SECRET123"}}
    message = service_message(response(400, body))
    assert "SECRET123" not in message and "upload_id=REDACTED" in message


def test_412_without_a_precondition_says_so():
    error = error_for(response(412, {"error": {"code": 412, "message": "Precondition Failed"}}))
    assert isinstance(error, PreconditionError)
    assert "generation None" not in str(error)
    assert str(error) == (
        "the service answered 412 (precondition failed) for gs://bkt/dir/obj.bin, though no "
        "precondition was given: Precondition Failed"
    )


def test_412_with_a_generation_names_it():
    error = error_for(response(412, {"error": {"message": "Precondition Failed"}}), if_generation_match=7)
    assert str(error) == "gs://bkt/dir/obj.bin is not at generation 7 (Precondition Failed)"


def test_400_on_the_final_request_that_is_not_a_hash_mismatch_is_not_an_integrity_error():
    body = {"error": {"code": 400, "message": "Invalid argument.", "errors": [{"reason": "invalid"}]}}
    error = error_for(response(400, body), headers=HASH)
    assert type(error) is ServiceError
    assert str(error) == (
        "the service refused a request of the upload to gs://bkt/dir/obj.bin (400): "
        "Invalid argument. (invalid)"
    )


def test_400_hash_mismatch_on_the_final_request_is_an_integrity_error():
    message = 'Provided CRC32C "AAAAAA==" doesn\'t match calculated CRC32C "q8gP3w==".'
    error = error_for(response(400, {"error": {"code": 400, "message": message}}), headers=HASH)
    assert isinstance(error, IntegrityError)
    assert str(error) == f"the service refused gs://bkt/dir/obj.bin: {message} (no object was created)"


def test_nested_error_body_reaches_the_message():
    body = {"error": {"errors": [{"reason": "accountDisabled", "message": "The account is disabled."}]}}
    error = error_for(response(403, body))
    assert isinstance(error, AuthError)
    assert str(error) == (
        "access to gs://bkt/dir/obj.bin denied (403): The account is disabled. (accountDisabled)"
    )


def test_session_uri_is_an_attribute_never_in_the_message():
    error = ServiceError("boom")
    assert GcsstreamError.session_uri is None and GcsstreamError.upload_id is None
    error.session_uri = "http://h/upload?upload_id=SECRET"
    assert "SECRET" not in str(error) and "SECRET" not in repr(error)
