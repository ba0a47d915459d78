"""An upload loads only what it uses: no credentials machinery where there are no credentials,
and no terminal drawing where there is no terminal (both cost start-up on every cron run)."""

from __future__ import annotations

import os

from tests.conftest import assert_stored
from tests.gcs_test_server import GcsTestServer
from tests.unit.test_startup import heavy_in, imported

BUCKET = "lean"


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
        assert "gcsstream.engine" in modules and "requests" in modules  # it did load what it uses
        assert_stored(server, BUCKET, "o", data)
