"""The wrong server's own correct answers: a real put and cat through it, read back."""

from __future__ import annotations

import hashlib
import os
import subprocess

from tests.wrong_server import WrongServer, crc32c_b64

BUCKET = "gcsstream-test"


def test_correct_behaviour_carries_a_put_and_a_cat(gcsstream_exe, tmp_path):
    data = os.urandom(600 * 1024)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    with WrongServer() as server:
        env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url}
        put = subprocess.run(
            [gcsstream_exe, "put", str(source), f"gs://{BUCKET}/o", "--chunk-size", "256KiB"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert put.returncode == 0, put.stderr
        assert server.read_object(BUCKET, "o") == data
        assert server.objects[(BUCKET, "o")][1]["crc32c"] == crc32c_b64(data)
        cat = subprocess.run(
            [gcsstream_exe, "cat", f"gs://{BUCKET}/o"], env=env, capture_output=True, timeout=60
        )
        assert cat.returncode == 0, cat.stderr
        assert hashlib.sha256(cat.stdout).digest() == hashlib.sha256(data).digest()
        ranged = subprocess.run(
            [gcsstream_exe, "cat", f"gs://{BUCKET}/o", "--range", "10-99"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert ranged.returncode == 0, ranged.stderr
        assert ranged.stdout == data[10:100]
    # A file: one streamed request for its first 512 KiB, and the final one with the rest.
    assert [r.method for r in server.requests].count("PUT") == 2
