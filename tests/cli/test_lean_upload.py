"""An upload loads only what it uses: no credentials machinery where there are no credentials,
no terminal drawing where there is no terminal, and never requests or urllib3 (the transport is
http.client's): each costs start-up on every cron run."""

from __future__ import annotations

import os

from tests.cli import test_faults
from tests.conftest import assert_stored
from tests.gcs_test_server import GcsTestServer
from tests.unit.test_startup import heavy_in, imported

BUCKET = "lean"
service_account = test_faults.service_account  # the fixture: a key whose tokens come from loopback
#: What the transport replaced: requests with urllib3, and google-resumable-media's requests flavour.
HTTP_LIBRARIES = ("requests", "urllib3", "google.resumable_media.requests", "google.auth.transport.requests")


def test_an_anonymous_piped_upload_loads_no_auth_transport_crypto_or_rich(tmp_path, gcsstream_exe):
    data = os.urandom(300_000)
    src = tmp_path / "src"
    src.write_bytes(data)
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as server:
        env = {"STORAGE_EMULATOR_HOST": server.url}
        modules, out = imported(["bash", "-c", f"{gcsstream_exe} put - gs://{BUCKET}/o < {src}"], env)
        assert "uploaded gs://lean/o" in out, out
        assert heavy_in(modules, ("google.auth.transport", "google.oauth2", "cryptography", "rich")) == []
        # google-auth's credentials module imports asyncio: an anonymous upload needs neither
        assert heavy_in(modules, ("google.auth.credentials", "asyncio")) == []
        assert heavy_in(modules, HTTP_LIBRARIES) == []
        assert "gcsstream.engine" in modules and "http.client" in modules  # it did load what it uses
        assert_stored(server, BUCKET, "o", data)


def test_an_upload_with_credentials_signs_and_sends_without_requests(
    tmp_path, gcsstream_exe, service_account
):
    key, tokens = service_account
    data = os.urandom(300_000)
    src = tmp_path / "src"
    src.write_bytes(data)
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as server:
        argv = [
            gcsstream_exe,
            "put",
            str(src),
            f"gs://{BUCKET}/o",
            "--credentials",
            str(key),
            "--endpoint",
            server.url,
        ]
        modules, out = imported(argv)
        assert "uploaded gs://lean/o" in out, out
        assert len(tokens.tokens) == 1, "a token was fetched, through google-auth's transport interface"
        assert "google.oauth2.service_account" in modules
        assert heavy_in(modules, HTTP_LIBRARIES) == []
        assert_stored(server, BUCKET, "o", data)
