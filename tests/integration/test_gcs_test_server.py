"""Self-tests of tests/gcs_test_server.py, driven with raw ``requests`` calls (no gcsstream code)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import google_crc32c
import pytest
import requests
import urllib3

from tests.gcs_test_server import QUANTUM, Fault, FaultPlan, GcsTestServer

Q = QUANTUM
BUCKET = "bkt"
ROOT = Path(__file__).resolve().parents[2]


def crc_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


@pytest.fixture
def srv(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "data") as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def http():
    with requests.Session() as s:
        yield s


def initiate(srv, http, name, *, bucket=BUCKET, query="", headers=None, **meta) -> str:
    r = http.post(
        f"{srv.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable{query}",
        json={"name": name, **meta},
        headers=headers or {},
    )
    assert r.status_code == 200, r.text
    return r.headers["Location"]


def put(http, uri, data: bytes, first: int, total: int | str = "*", **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    last = first + len(data) - 1
    headers["Content-Range"] = f"bytes {first}-{last}/{total}"
    return http.put(uri, data=data, headers=headers, **kw)


def status(http, uri, **kw) -> requests.Response:
    return http.put(uri, data=b"", headers={"Content-Range": "bytes */*"}, **kw)


def media_url(srv, name, bucket=BUCKET) -> str:
    return f"{srv.url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media"


# ------------------------------------------------------------------------------------------------
# protocol


def test_multi_chunk_upload_read_back_and_hashes(srv, http):
    data = os.urandom(5 * Q + 12345)
    name = "dir/sub dir/obj+1.bin"
    uri = initiate(
        srv,
        http,
        name,
        contentType="application/x-tar",
        cacheControl="no-cache",
        contentDisposition="attachment",
        contentEncoding="identity",
        metadata={"k": "v"},
        storageClass="NEARLINE",
    )
    assert uri.startswith(f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&upload_id=")
    r = put(http, uri, data[: 2 * Q], 0)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{2 * Q - 1}"
    r = put(http, uri, data[2 * Q : 4 * Q], 2 * Q)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{4 * Q - 1}"
    hashes = f"crc32c={crc_b64(data)},md5={md5_b64(data)}"
    r = put(http, uri, data[4 * Q :], 4 * Q, len(data), headers={"X-Goog-Hash": hashes})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["kind"] == "storage#object"
    assert res["name"] == name and res["bucket"] == BUCKET
    assert res["size"] == str(len(data))
    assert res["crc32c"] == crc_b64(data) and res["md5Hash"] == md5_b64(data)
    assert isinstance(res["generation"], str) and int(res["generation"]) > 0
    assert res["metageneration"] == "1"
    assert res["contentType"] == "application/x-tar"
    assert res["cacheControl"] == "no-cache" and res["contentDisposition"] == "attachment"
    assert res["metadata"] == {"k": "v"} and res["storageClass"] == "NEARLINE"
    assert res["id"] == f"{BUCKET}/{name}/{res['generation']}"
    assert res["timeCreated"].endswith("Z") and res["updated"]
    assert srv.object_resource(BUCKET, name) == res
    assert srv.object_path(BUCKET, name).read_bytes() == data
    assert srv.read_object(BUCKET, name) == data

    got = http.get(media_url(srv, name))
    assert got.status_code == 200 and got.content == data
    assert got.headers["X-Goog-Hash"] == hashes
    assert got.headers["X-Goog-Generation"] == res["generation"]
    assert got.headers["Content-Length"] == str(len(data))
    meta = http.get(f"{srv.url}/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}")
    assert meta.status_code == 200 and meta.json() == res

    # a second upload of the same name gets a higher generation
    uri2 = initiate(srv, http, name)
    r = put(http, uri2, b"x", 0, 1)
    assert r.status_code == 200 and int(r.json()["generation"]) > int(res["generation"])
    assert r.json()["contentType"] == "application/octet-stream"
    [s1, s2] = srv.sessions()
    assert s1.finalized and s1.persisted == len(data) and s2.finalized


def test_status_query_without_range_when_empty_and_200_after_final(srv, http):
    uri = initiate(srv, http, "o")
    r = status(http, uri)
    assert r.status_code == 308 and "Range" not in r.headers
    r = put(http, uri, b"a" * Q, 0)
    assert r.status_code == 308
    r = status(http, uri)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{Q - 1}"
    r = http.put(uri, data=b"", headers={"Content-Range": f"bytes */{Q}"})  # finalize, no body
    assert r.status_code == 200 and r.json()["size"] == str(Q)
    r = status(http, uri)
    assert r.status_code == 200 and r.json()["size"] == str(Q)
    # more bytes sent to a completed session just get the object again
    r = put(http, uri, b"a" * Q, 0, Q)
    assert r.status_code == 200 and r.json()["generation"] == srv.object_resource(BUCKET, "o")["generation"]


def test_finalize_with_star_total_before_all_bytes_answers_308(srv, http):
    uri = initiate(srv, http, "o")
    put(http, uri, b"a" * Q, 0)
    r = http.put(uri, data=b"", headers={"Content-Range": f"bytes */{3 * Q}"})
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{Q - 1}"
    assert srv.object_resource(BUCKET, "o") is None


def test_resent_overlapping_bytes_are_ignored(srv, http):
    data = os.urandom(3 * Q + 7)
    uri = initiate(srv, http, "o")
    assert put(http, uri, data[:Q], 0).status_code == 308
    r = put(http, uri, data[: 2 * Q], 0)  # resends [0, Q)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{2 * Q - 1}"
    r = put(http, uri, data[Q : 2 * Q], Q)  # entirely already persisted
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{2 * Q - 1}"
    r = put(http, uri, data[Q:], Q, len(data))
    assert r.status_code == 200 and r.json()["crc32c"] == crc_b64(data)
    assert srv.read_object(BUCKET, "o") == data


def test_non_final_chunk_must_be_multiple_of_256k(srv, http):
    uri = initiate(srv, http, "o")
    r = put(http, uri, b"a" * (Q + 1), 0)
    assert r.status_code == 400
    r = put(http, uri, b"a" * 1000, 0, 5000)  # size known but not the last chunk
    assert r.status_code == 400
    r = status(http, uri)
    assert r.status_code == 308 and "Range" not in r.headers
    # the final chunk may have any length
    assert put(http, uri, b"a" * 1000, 0, 1000).status_code == 200


def test_gap_is_rejected(srv, http):
    uri = initiate(srv, http, "o")
    r = put(http, uri, b"a" * Q, Q)
    assert r.status_code == 400
    assert srv.sessions()[0].persisted == 0
    # the connection is still usable
    assert put(http, uri, b"a" * Q, 0).status_code == 308


def test_wrong_x_goog_hash_is_rejected_and_creates_nothing(srv, http):
    data = os.urandom(Q + 100)
    uri = initiate(srv, http, "o")
    assert put(http, uri, data[:Q], 0).status_code == 308
    bad_crc = crc_b64(data + b"x")
    r = put(http, uri, data[Q:], Q, len(data), headers={"X-Goog-Hash": f"crc32c={bad_crc}"})
    assert r.status_code == 400 and "CRC32C" in r.json()["error"]["message"]
    assert srv.object_resource(BUCKET, "o") is None
    assert not srv.object_path(BUCKET, "o").exists()
    # the session is kept, without the rejected final bytes
    r = status(http, uri)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{Q - 1}"
    bad = f"crc32c={crc_b64(data)},md5={md5_b64(b'nope')}"
    r = put(http, uri, data[Q:], Q, len(data), headers={"X-Goog-Hash": bad})
    assert r.status_code == 400 and "MD5" in r.json()["error"]["message"]
    assert srv.object_resource(BUCKET, "o") is None
    good = f"crc32c={crc_b64(data)},md5={md5_b64(data)}"
    r = put(http, uri, data[Q:], Q, len(data), headers={"X-Goog-Hash": good})
    assert r.status_code == 200 and srv.read_object(BUCKET, "o") == data


def test_cancel_answers_499_then_410(srv, http):
    uri = initiate(srv, http, "o")
    assert put(http, uri, b"a" * Q, 0).status_code == 308
    r = http.delete(uri)
    assert r.status_code == 499
    assert status(http, uri).status_code == 410
    assert put(http, uri, b"a" * Q, Q).status_code == 410
    assert http.delete(uri).status_code == 410
    [state] = srv.sessions()
    assert state.cancelled and not state.finalized
    bogus = uri.split("upload_id=")[0] + "upload_id=nope"
    assert status(http, bogus).status_code == 404


def test_if_generation_match(srv, http):
    existing = srv.put_object(BUCKET, "o", b"old")
    r = http.post(
        f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&ifGenerationMatch=0",
        json={"name": "o"},
    )
    assert r.status_code == 412
    r = http.post(
        f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&ifGenerationMatch=12345",
        json={"name": "o"},
    )
    assert r.status_code == 412
    # matching generation: accepted; but checked again at finalize
    uri = initiate(srv, http, "o", query=f"&ifGenerationMatch={existing['generation']}")
    srv.put_object(BUCKET, "o", b"newer")
    r = put(http, uri, b"mine", 0, 4)
    assert r.status_code == 412
    assert srv.read_object(BUCKET, "o") == b"newer"
    # ifGenerationMatch=0 for a new name, object created meanwhile -> 412 at finalize
    uri = initiate(srv, http, "fresh", query="&ifGenerationMatch=0")
    srv.put_object(BUCKET, "fresh", b"racer")
    assert put(http, uri, b"mine", 0, 4).status_code == 412
    uri = initiate(srv, http, "fresh2", query="&ifGenerationMatch=0")
    assert put(http, uri, b"mine", 0, 4).status_code == 200


def test_upload_headers_and_declared_length(srv, http):
    uri = initiate(
        srv,
        http,
        "o",
        headers={"X-Upload-Content-Type": "text/csv", "X-Upload-Content-Length": str(Q + 10)},
    )
    r = put(http, uri, b"a" * Q, 0)
    assert r.status_code == 308
    r = put(http, uri, b"a" * 5, Q, Q + 5)
    assert r.status_code == 400
    r = put(http, uri, b"a" * 10, Q, Q + 10)
    assert r.status_code == 200 and r.json()["contentType"] == "text/csv"
    # name in the query, kmsKeyName in the query
    r = http.post(
        f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&name=q%2Fname&kmsKeyName=kms1&userProject=p",
        data=b"",
    )
    assert r.status_code == 200
    res = http.put(r.headers["Location"], data=b"xyz", headers={"Content-Range": "bytes 0-2/3"}).json()
    assert res["name"] == "q/name" and res["kmsKeyName"] == "kms1"


def test_buckets(srv, http):
    r = http.post(f"{srv.url}/upload/storage/v1/b/nobucket/o?uploadType=resumable", json={"name": "o"})
    assert r.status_code == 404
    r = http.post(f"{srv.url}/storage/v1/b?project=x", json={"name": "made-here"})
    assert r.status_code == 200 and r.json()["name"] == "made-here"
    assert http.post(f"{srv.url}/storage/v1/b?project=x", json={"name": "made-here"}).status_code == 409
    assert http.get(f"{srv.url}/storage/v1/b/made-here").status_code == 200
    initiate(srv, http, "o", bucket="made-here")


def test_range_downloads_delete_and_list(srv, http):
    data = os.urandom(1000)
    srv.put_object(BUCKET, "a/b", data, contentType="text/plain")
    url = media_url(srv, "a/b")
    r = http.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["Content-Range"] == "bytes 10-19/1000" and r.headers["Content-Length"] == "10"
    r = http.get(url, headers={"Range": "bytes=990-"})
    assert r.status_code == 206 and r.content == data[990:]
    r = http.get(url, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = http.get(url, headers={"Range": "bytes=995-2000"})
    assert r.status_code == 206 and r.content == data[995:]
    assert http.get(url, headers={"Range": "bytes=1000-"}).status_code == 416
    r = http.get(f"{srv.url}/download/storage/v1/b/{BUCKET}/o/a%2Fb?alt=media")
    assert r.status_code == 200 and r.content == data and r.headers["Content-Type"] == "text/plain"
    assert http.get(media_url(srv, "missing")).status_code == 404
    assert http.get(f"{srv.url}/storage/v1/b/{BUCKET}/o/missing").status_code == 404

    srv.put_object(BUCKET, "a/c", b"1")
    srv.put_object(BUCKET, "z", b"2")
    names = [i["name"] for i in http.get(f"{srv.url}/storage/v1/b/{BUCKET}/o?prefix=a/").json()["items"]]
    assert names == ["a/b", "a/c"]
    listing = http.get(f"{srv.url}/storage/v1/b/{BUCKET}/o?delimiter=/").json()
    assert [i["name"] for i in listing["items"]] == ["z"] and listing["prefixes"] == ["a/"]

    assert http.delete(f"{srv.url}/storage/v1/b/{BUCKET}/o/a%2Fb").status_code == 204
    assert http.get(url).status_code == 404
    assert srv.object_resource(BUCKET, "a/b") is None
    assert http.delete(f"{srv.url}/storage/v1/b/{BUCKET}/o/a%2Fb").status_code == 404


def test_compose(srv, http):
    parts = [os.urandom(n) for n in (1000, Q, 3)]
    for i, p in enumerate(parts):
        srv.put_object(BUCKET, f"part{i}", p)
    body = {
        "sourceObjects": [{"name": f"part{i}"} for i in range(3)],
        "destination": {"contentType": "application/x-tar", "metadata": {"m": "1"}},
    }
    r = http.post(f"{srv.url}/storage/v1/b/{BUCKET}/o/out%2Fall/compose", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    whole = b"".join(parts)
    assert res["name"] == "out/all" and res["size"] == str(len(whole))
    assert res["crc32c"] == crc_b64(whole)
    assert "md5Hash" not in res and res["componentCount"] == 3
    assert res["contentType"] == "application/x-tar" and res["metadata"] == {"m": "1"}
    assert srv.read_object(BUCKET, "out/all") == whole
    got = http.get(media_url(srv, "out/all"))
    assert got.content == whole and got.headers["X-Goog-Hash"] == f"crc32c={crc_b64(whole)}"
    # a composite of a composite counts its components
    body = {"sourceObjects": [{"name": "out/all"}, {"name": "part0"}], "destination": {}}
    r = http.post(f"{srv.url}/storage/v1/b/{BUCKET}/o/again/compose", json=body)
    assert r.status_code == 200 and r.json()["componentCount"] == 4
    body = {"sourceObjects": [{"name": "part0"}] * 33, "destination": {}}
    assert http.post(f"{srv.url}/storage/v1/b/{BUCKET}/o/x/compose", json=body).status_code == 400
    body = {"sourceObjects": [{"name": "nope"}], "destination": {}}
    assert http.post(f"{srv.url}/storage/v1/b/{BUCKET}/o/x/compose", json=body).status_code == 404
    body = {"sourceObjects": [{"name": "part0"}], "destination": {}}
    r = http.post(f"{srv.url}/storage/v1/b/{BUCKET}/o/again/compose?ifGenerationMatch=0", json=body)
    assert r.status_code == 412


def test_go_client_308_override(srv, http):
    uri = initiate(srv, http, "o")
    r = put(http, uri, b"a" * Q, 0, headers={"X-GUploader-No-308": "yes"})
    assert r.status_code == 200
    assert r.headers["X-Http-Status-Code-Override"] == "308"
    assert r.headers["Range"] == f"bytes=0-{Q - 1}"
    r = http.put(uri, data=b"", headers={"Content-Range": "bytes */*", "X-GUploader-No-308": "yes"})
    assert r.status_code == 200 and r.headers["X-Http-Status-Code-Override"] == "308"
    assert srv.requests[-1].status == 308


def test_chunked_request_body_and_simple_uploads(srv, http):
    data = os.urandom(Q + 77)
    uri = initiate(srv, http, "o")

    def gen():
        yield data[:1000]
        yield data[1000:]

    r = http.put(uri, data=gen(), headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"})
    assert r.status_code == 200 and srv.read_object(BUCKET, "o") == data

    r = http.post(
        f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name=m",
        data=b"media!",
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 200 and r.json()["md5Hash"] == md5_b64(b"media!")
    assert r.json()["contentType"] == "text/plain"
    boundary = "==b=="
    mp = (
        (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            + json.dumps({"name": "mp", "metadata": {"a": "b"}})
            + f"\r\n--{boundary}\r\nContent-Type: image/png\r\n\r\n"
        ).encode()
        + b"PNGDATA"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = http.post(
        f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=multipart",
        data=mp,
        headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
    )
    assert r.status_code == 200, r.text
    assert r.json()["contentType"] == "image/png" and r.json()["metadata"] == {"a": "b"}
    assert srv.read_object(BUCKET, "mp") == b"PNGDATA"


def test_concurrent_uploads(srv):
    datas = {f"c{i}": os.urandom(3 * Q + i + 1) for i in range(4)}
    errors = []

    def upload(name):
        try:
            with requests.Session() as s:
                uri = initiate(srv, s, name)
                data = datas[name]
                for off in range(0, 3 * Q, Q):
                    assert put(s, uri, data[off : off + Q], off).status_code == 308
                assert put(s, uri, data[3 * Q :], 3 * Q, len(data)).status_code == 200
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(n,)) for n in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for name, data in datas.items():
        assert srv.read_object(BUCKET, name) == data


def test_request_log_redacts_session_ids(srv, http):
    uri = initiate(srv, http, "o")
    upload_id = uri.split("upload_id=")[1]
    put(http, uri, b"a" * Q, 0)
    status(http, uri)
    kinds = [(r.method, r.kind, r.status) for r in srv.requests]
    assert kinds == [("POST", "initiate", 200), ("PUT", "chunk", 308), ("PUT", "status", 308)]
    chunk = srv.requests[1]
    assert chunk.content_range == f"bytes 0-{Q - 1}/*" and chunk.bytes_received == Q
    assert chunk.persisted == Q and chunk.name == "o" and chunk.bucket == BUCKET
    text = repr(srv.requests) + repr(srv.sessions())
    assert upload_id not in text and upload_id[:8] not in text
    assert srv.session(uri).persisted == Q


# ------------------------------------------------------------------------------------------------
# faults


def test_fault_status_on_nth_chunk(srv, http):
    srv.faults.add(Fault(kind="status", status=503, on="chunk", nth=2))
    data = os.urandom(3 * Q)
    uri = initiate(srv, http, "o")
    assert put(http, uri, data[:Q], 0).status_code == 308
    r = put(http, uri, data[Q : 2 * Q], Q)
    assert r.status_code == 503
    assert status(http, uri).headers["Range"] == f"bytes=0-{Q - 1}"  # nothing persisted from it
    assert put(http, uri, data[Q : 2 * Q], Q).status_code == 308
    assert put(http, uri, data[2 * Q :], 2 * Q, 3 * Q).status_code == 200
    assert srv.read_object(BUCKET, "o") == data
    faulted = [r for r in srv.requests if r.fault]
    assert [(r.kind, r.status, r.fault) for r in faulted] == [("chunk", 503, "status")]
    assert srv.faults.pending() == []


def test_fault_429_retry_after_and_partial_persist(srv, http):
    srv.faults.add(Fault(kind="status", status=429, retry_after=2))
    srv.faults.add(Fault(kind="status", status=500, persist=Q))
    uri = initiate(srv, http, "o")
    r = put(http, uri, b"a" * 2 * Q, 0)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    r = put(http, uri, b"a" * 2 * Q, 0)
    assert r.status_code == 500
    assert status(http, uri).headers["Range"] == f"bytes=0-{Q - 1}"


def test_fault_status_without_reading_body_and_on_initiate(srv, http):
    srv.faults.add(Fault(kind="status", status=502, on="initiate"))
    srv.faults.add(Fault(kind="status", status=504, on="status", read_body=False))
    r = http.post(f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable", json={"name": "o"})
    assert r.status_code == 502
    uri = initiate(srv, http, "o")
    r = status(http, uri)
    assert r.status_code == 504 and r.headers["Connection"] == "close"
    assert status(http, uri).status_code == 308


def test_fault_reset_mid_body_persists_a_256k_prefix(srv, http):
    srv.faults.add(Fault(kind="reset", after_bytes=Q + 1000))
    data = os.urandom(4 * Q)
    uri = initiate(srv, http, "o")
    with pytest.raises(requests.ConnectionError):
        put(http, uri, data, 0)
    rec = srv.wait_for_request(lambda r: r.fault == "reset" and r.done)
    assert rec.status is None and rec.persisted == Q
    r = status(http, uri)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{Q - 1}"
    assert put(http, uri, data[Q:], Q, 4 * Q).status_code == 200
    assert srv.read_object(BUCKET, "o") == data


def test_fault_reset_after_whole_final_chunk_finalizes(srv, http):
    srv.faults.add(Fault(kind="reset", on="final", after_bytes=10**9))
    uri = initiate(srv, http, "o")
    with pytest.raises(requests.ConnectionError):
        put(http, uri, b"abc", 0, 3)
    r = status(http, uri)
    assert r.status_code == 200 and r.json()["size"] == "3"


def test_fault_stall(srv, http):
    srv.faults.add(Fault(kind="stall", on="status", seconds=30))
    uri = initiate(srv, http, "o")
    t0 = time.monotonic()
    with pytest.raises(requests.Timeout):
        status(http, uri, timeout=0.3)
    assert time.monotonic() - t0 < 5
    # the server still serves other connections meanwhile
    with requests.Session() as other:
        assert status(other, uri).status_code == 308
    srv.wait_for_request(lambda r: r.fault == "stall")
    # stop() must not wait for the 30 s stall (checked by the test's total run time)


def test_fault_stall_mid_chunk_then_client_gives_up(srv, http):
    srv.faults.add(Fault(kind="stall", on="chunk", after_bytes=Q + 5, seconds=30))
    uri = initiate(srv, http, "o")
    with pytest.raises((requests.Timeout, requests.ConnectionError)):
        put(http, uri, os.urandom(64 * Q), 0, timeout=0.3)
    assert status(requests, uri).status_code == 308


def test_a_fired_fault_records_where_it_took_hold(srv, http):
    srv.faults.add(Fault(kind="stall", on="chunk", after_bytes=Q + 5, seconds=30))
    uri = initiate(srv, http, "o")
    with pytest.raises((requests.Timeout, requests.ConnectionError)):
        put(http, uri, os.urandom(4 * Q), 0, timeout=0.5)
    rec = srv.wait_for_request(lambda r: r.fault == "stall" and r.fired_at is not None)
    assert rec.fired_at == Q + 5


def test_a_flushed_download_reset_delivers_exactly_the_bytes_before_it(srv):
    data = os.urandom(3 * Q + 7)
    srv.put_object(BUCKET, "o", data)
    srv.faults.add(Fault(kind="reset", on="download", after_bytes=Q + 5, flush=True))
    got = bytearray()
    with (
        requests.get(media_url(srv, "o"), stream=True, timeout=10) as response,
        pytest.raises(urllib3.exceptions.ProtocolError),  # the reset, after the bytes before it
    ):
        while piece := response.raw.read1(65536):
            got += piece
    assert bytes(got) == data[: Q + 5]
    rec = srv.wait_for_request(lambda r: r.fault == "reset" and r.done)
    assert rec.fired_at == Q + 5 and rec.bytes_sent == Q + 5


def test_fault_partial(srv, http):
    srv.faults.add(Fault(kind="partial", persist=Q))
    srv.faults.add(Fault(kind="partial", persist=0))
    data = os.urandom(4 * Q)
    uri = initiate(srv, http, "o")
    r = put(http, uri, data, 0)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{Q - 1}"
    uri2 = initiate(srv, http, "o2")
    r = put(http, uri2, data, 0)
    assert r.status_code == 308 and "Range" not in r.headers
    # default: half of the new bytes; also on a final chunk (answers 308, no object)
    srv.faults.add(Fault(kind="partial", on="final"))
    r = put(http, uri, data[Q:], Q, 4 * Q)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{Q + Q - 1}"
    assert srv.object_resource(BUCKET, "o") is None
    assert put(http, uri, data[2 * Q :], 2 * Q, 4 * Q).status_code == 200
    assert srv.read_object(BUCKET, "o") == data


def test_fault_expire(srv, http):
    uri = initiate(srv, http, "o")
    assert put(http, uri, b"a" * Q, 0).status_code == 308
    srv.faults.add(Fault(kind="expire", on="put"))
    assert put(http, uri, b"a" * Q, Q).status_code == 410
    assert status(http, uri).status_code == 410
    assert srv.sessions()[0].expired
    uri2 = initiate(srv, http, "o2")
    srv.expire_session(uri2, status=404)
    assert status(http, uri2).status_code == 404


def test_fault_unauthorized_once(srv, http):
    srv.faults.add(Fault(kind="unauthorized", on="put"))
    uri = initiate(srv, http, "o")
    r = put(http, uri, b"a" * Q, 0)
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    assert put(http, uri, b"a" * Q, 0).status_code == 308


def test_fault_trickle(srv, http):
    srv.faults.add(Fault(kind="trickle", rate=Q, seconds=0.5))
    uri = initiate(srv, http, "o")
    t0 = time.monotonic()
    r = put(http, uri, b"a" * 2 * Q, 0)
    elapsed = time.monotonic() - t0
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{2 * Q - 1}"
    assert elapsed >= 0.4


def test_fault_corrupt_download_and_download_faults(srv, http):
    data = os.urandom(10000)
    srv.put_object(BUCKET, "o", data)
    srv.faults.add(Fault(kind="corrupt_download", on="download", offset=1234))
    got = http.get(media_url(srv, "o")).content
    assert len(got) == len(data) and got != data
    assert [i for i in range(len(data)) if got[i] != data[i]] == [1234]
    assert http.get(media_url(srv, "o")).content == data
    srv.faults.add(Fault(kind="reset", on="download", after_bytes=5000))
    with pytest.raises(requests.exceptions.RequestException):
        http.get(media_url(srv, "o")).content  # noqa: B018
    srv.faults.add(Fault(kind="status", on="download", status=503))
    assert http.get(media_url(srv, "o")).status_code == 503
    assert http.get(media_url(srv, "o")).content == data


def test_download_stall_and_trickle(srv, http):
    data = os.urandom(2 * Q)
    srv.put_object(BUCKET, "o", data)
    srv.faults.add(Fault(kind="stall", on="download", seconds=30))
    with pytest.raises(requests.Timeout):
        http.get(media_url(srv, "o"), timeout=0.3)
    srv.faults.add(Fault(kind="trickle", on="download", rate=Q, seconds=0.3))
    t0 = time.monotonic()
    with requests.Session() as other:
        assert other.get(media_url(srv, "o")).content == data
    assert time.monotonic() - t0 >= 0.25


def test_fault_on_initiate_by_name(srv, http):
    srv.faults.add(Fault(kind="reset", on="initiate", name="victim"))
    initiate(srv, http, "bystander")
    with pytest.raises(requests.ConnectionError):
        http.post(f"{srv.url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable", json={"name": "victim"})
    initiate(srv, http, "victim")
    assert [(r.kind, r.name, r.fault) for r in srv.requests] == [
        ("initiate", "bystander", None),
        ("initiate", "victim", "reset"),
        ("initiate", "victim", None),
    ]


def test_fault_targets_by_name_and_times(srv, http):
    srv.faults.add(Fault(kind="status", status=500, on="put", name="b", times=2))
    ua, ub = initiate(srv, http, "a"), initiate(srv, http, "b")
    assert status(http, ua).status_code == 308
    assert status(http, ub).status_code == 500
    assert status(http, ub).status_code == 500
    assert status(http, ub).status_code == 308
    assert srv.faults.applied("status") and not srv.faults.pending()


def test_random_plan_is_deterministic():
    def draws(seed):
        plan = FaultPlan.random(seed=seed, rate=0.3, kinds=FAULT_KINDS_RANDOM)
        out = []
        for _ in range(200):
            f = plan._pick("chunk", "o", 4 * Q)
            out.append(None if f is None else (f.kind, f.status, f.after_bytes, f.persist))
        assert plan._pick("initiate", "o", 10) is None  # only chunk/final by default
        return out

    a, b, c = draws(7), draws(7), draws(8)
    assert a == b and a != c
    n = sum(x is not None for x in a)
    assert 30 < n < 90
    assert {x[0] for x in a if x} == set(FAULT_KINDS_RANDOM)


FAULT_KINDS_RANDOM = ("status", "reset", "partial")


def test_random_faults_with_a_resuming_client(srv):
    """A simple, correct client (status query after every failure) always gets the object."""
    srv.faults = FaultPlan.random(seed=11, rate=0.35)
    data = os.urandom(12 * Q + 5)
    with requests.Session() as s:
        uri = initiate(srv, s, "r")
        offset, done, attempts = 0, False, 0
        while not done:
            attempts += 1
            assert attempts < 200
            end = min(offset + 2 * Q, len(data))
            total = len(data) if end == len(data) else "*"
            try:
                r = put(s, uri, data[offset:end], offset, total)
            except requests.ConnectionError:
                r = None
            if r is not None and r.status_code == 200:
                done = True
                break
            if r is not None and r.status_code == 308:
                rng = r.headers.get("Range")
                offset = int(rng.split("-")[1]) + 1 if rng else 0
                continue
            q = status(s, uri)
            if q.status_code == 200:
                done = True
            else:
                rng = q.headers.get("Range")
                offset = int(rng.split("-")[1]) + 1 if rng else 0
    assert srv.read_object(BUCKET, "r") == data
    assert srv.object_resource(BUCKET, "r")["md5Hash"] == md5_b64(data)
    assert srv.faults.history, "the seed should have produced faults"


# ------------------------------------------------------------------------------------------------
# as a process


def test_cli_ready_line_and_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_test_server", "--port", "0", "--data-dir", str(tmp_path)]
        + ["--bucket", "cli-bkt", "--seed", "3", "--fault-rate", "0.0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[1]
        assert requests.get(f"{url}/storage/v1/b/cli-bkt", timeout=5).status_code == 200
        r = requests.post(
            f"{url}/upload/storage/v1/b/cli-bkt/o?uploadType=resumable", json={"name": "x"}, timeout=5
        )
        requests.put(r.headers["Location"], data=b"hi", headers={"Content-Range": "bytes 0-1/2"}, timeout=5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out == ""  # exactly one line in all
        assert "upload_id" not in err
        assert any(p.read_bytes() == b"hi" for p in (tmp_path / "objects" / "cli-bkt").iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_sigint_with_random_faults(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_test_server", "--data-dir", str(tmp_path), "--fault-rate", "0.5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("READY http://127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------
# discard mode (the benchmarks' sink)


def test_discard_mode_keeps_size_and_hashes_but_no_bytes(tmp_path, gcsstream_exe):
    data = os.urandom(3 * Q + 12345)  # four requests at --chunk-size 256KiB, from a pipe
    with GcsTestServer(data_dir=tmp_path / "data", buckets=[BUCKET], discard=True) as srv:
        env = {**os.environ, "STORAGE_EMULATOR_HOST": srv.url}
        r = subprocess.run(
            [gcsstream_exe, "put", "--chunk-size", "256KiB", "-q", "-", f"gs://{BUCKET}/d"],
            env=env,
            input=data,
            capture_output=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert [q.kind for q in srv.requests if q.kind in ("chunk", "final")] == ["chunk"] * 3 + ["final"]
        with requests.get(f"{srv.url}/storage/v1/b/{BUCKET}/o/d", timeout=5) as meta:
            resource = meta.json()
        assert int(resource["size"]) == len(data)
        assert resource["crc32c"] == crc_b64(data)
        assert resource["md5Hash"] == md5_b64(data)
        stored = sum(p.stat().st_size for p in (tmp_path / "data").rglob("*") if p.is_file())
        assert stored == 0  # nothing of the body reached the disk
        with requests.get(media_url(srv, "d"), timeout=5) as got:
            assert got.status_code == 501
            assert "--discard" in got.json()["error"]["message"]
        with pytest.raises(ValueError, match="discard"):
            srv.read_object(BUCKET, "d")
        r = subprocess.run(
            [gcsstream_exe, "cat", f"gs://{BUCKET}/d"], env=env, capture_output=True, timeout=60
        )
        assert r.returncode != 0 and r.stdout == b""


def test_discard_mode_composes_from_the_sources_checksums(tmp_path, gcsstream_exe):
    """The benchmarks' sink composes too (``put --parallel``): the composite's size and crc32c
    are those of the sources' bytes, though no byte was kept (no md5, as for any composite)."""
    data = os.urandom(5 * Q + 777)  # six parts of 256 KiB
    source = tmp_path / "src.bin"
    source.write_bytes(data)
    with GcsTestServer(data_dir=tmp_path / "data", buckets=[BUCKET], discard=True) as srv:
        env = {**os.environ, "STORAGE_EMULATOR_HOST": srv.url}
        r = subprocess.run(
            [gcsstream_exe, "put", "--parallel", "3", "--part-size", "256KiB", "--chunk-size", "256KiB",
             "-q", str(source), f"gs://{BUCKET}/c"],
            env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with requests.get(f"{srv.url}/storage/v1/b/{BUCKET}/o/c", timeout=5) as meta:
            resource = meta.json()
        assert int(resource["size"]) == len(data) and resource["crc32c"] == crc_b64(data)
        assert resource["componentCount"] == 6 and "md5Hash" not in resource
        assert srv.list_objects(BUCKET) == ["c"]  # the parts were deleted
        stored = sum(p.stat().st_size for p in (tmp_path / "data").rglob("*") if p.is_file())
        assert stored == 0
