"""Peak RSS of ``gcsstream put -`` for piped inputs of different sizes, and read-back checks.

    .venv/bin/python -m tests.bench.memory [--sizes 256MiB,2GiB] [--chunk-size 16MiB]
        [--emulator gcp-storage-emulator|fake-gcs-server|test-server]

Each run pipes ``head -c SIZE /dev/urandom`` through ``tee`` (into a sha256/crc32c hasher) and
``gcsstream put -`` into a server on loopback, then reads the object back (streamed) and compares
its sha256 and crc32c, and the crc32c and size the server reports, with the hasher's. The peak RSS
is that of the gcsstream process alone (its own ru_maxrss, reported by a wrapper), so the server's
memory does not count. The target: under two chunks plus 60 MiB whatever the size.

``--emulator test-server`` uses the project's own tests/gcs_test_server.py, started as a process
on loopback with MD5 off: it streams objects to files, where gcp-storage-emulator (the default)
keeps them in memory and is slow with large ones (146 s for 2 GiB).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c

from gcsstream.options import parse_size
from tests.emulators import EMULATOR_NAMES, Emulator, start_emulator

TEST_SERVER = "test-server"

# Runs gcsstream in-process and prints its own peak RSS (KiB) on fd 3 when it exits.
_WRAPPER = """
import atexit, os, resource, sys
from gcsstream.cli import main
def report():
    os.write(3, str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).encode())
atexit.register(report)
main()
"""

# sha256 and crc32c of its stdin, printed once it ends.
_HASHER = """
import sys, hashlib, google_crc32c
h = hashlib.sha256(); c = 0
while (b := sys.stdin.buffer.read(1 << 24)):
    h.update(b); c = google_crc32c.extend(c, b)
print(h.hexdigest(), c)
"""


def start_test_server(workdir: Path) -> Emulator:
    """tests/gcs_test_server.py as a process on a free port of 127.0.0.1, MD5 off."""
    log_path = workdir / "gcs-test-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gcs_test_server", "--port", "0", "--no-md5"]
            + ["--data-dir", str(workdir / "test-server")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        line = proc.stdout.readline()  # the only line it prints: READY http://127.0.0.1:PORT
        if not line.startswith("READY "):
            raise RuntimeError(f"the test server did not start: {line!r}\n{log_path.read_text()}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    port = int(line.split()[1].rsplit(":", 1)[1])
    return Emulator(TEST_SERVER, port, proc, log_path, workdir)


def start_server(name: str, workdir: Path) -> Emulator:
    return start_test_server(workdir) if name == TEST_SERVER else start_emulator(name, workdir)


def read_back(emulator: Emulator, bucket: str, name: str) -> tuple[int, str, int]:
    """Size, sha256 and crc32c of the stored object, streamed (a 2 GiB object is not held)."""
    size, sha, crc = 0, hashlib.sha256(), 0
    url = emulator.object_url(bucket, name)
    with emulator.session.get(url, params={"alt": "media"}, stream=True, timeout=600) as resp:
        resp.raise_for_status()
        for piece in resp.iter_content(1 << 22):
            size += len(piece)
            sha.update(piece)
            crc = google_crc32c.extend(crc, piece)
    return size, sha.hexdigest(), crc


def measure(emulator: Emulator, size: int, chunk_size: str, workdir: Path) -> dict:
    name = f"bench/{size}.bin"
    rss_path = workdir / "rss"
    py = sys.executable
    # tee copies the stream into the hasher's pipe, handed to bash as an inherited descriptor;
    # the hasher's output is read with communicate() once the pipeline has ended.
    hash_r, hash_w = os.pipe()
    hasher = subprocess.Popen([py, "-c", _HASHER], stdin=hash_r, stdout=subprocess.PIPE, text=True)
    os.close(hash_r)
    try:
        script = (
            f"head -c {size} /dev/urandom {hash_w}>&- "
            f"| tee /dev/fd/{hash_w} "
            f"| {py} -c '{_WRAPPER}' put --quiet --chunk-size {chunk_size} - gs://bench/{name} "
            f"{hash_w}>&- 3> {rss_path}"
        )
        env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.url}
        started = time.monotonic()
        try:
            pipeline = subprocess.Popen(["bash", "-o", "pipefail", "-c", script], env=env, pass_fds=(hash_w,))
        finally:
            os.close(hash_w)  # from now on only the pipeline holds the hasher's write end
        code = pipeline.wait()
        seconds = time.monotonic() - started
        digest, _ = hasher.communicate(timeout=120)  # EOF came when the pipeline ended
    finally:
        if hasher.poll() is None:
            hasher.kill()
            hasher.wait()
    if code != 0 or hasher.returncode != 0:
        raise RuntimeError(f"the pipeline exited with {code}, the hasher with {hasher.returncode}")
    sha, crc = digest.split()
    stored_size, stored_sha, stored_crc = read_back(emulator, "bench", name)
    resource = emulator.object_resource("bench", name)
    crc_b64 = base64.b64encode(int(crc).to_bytes(4, "big")).decode()
    ok = (
        stored_size == size
        and stored_sha == sha
        and stored_crc == int(crc)
        and int(resource["size"]) == size
        and resource.get("crc32c") == crc_b64
    )
    emulator.delete_object("bench", name)
    return {"size": size, "rss_mib": int(rss_path.read_text()) / 1024, "seconds": seconds, "identical": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256MiB,2GiB")
    parser.add_argument("--chunk-size", default="16MiB")
    parser.add_argument("--emulator", default="gcp-storage-emulator", choices=(*EMULATOR_NAMES, TEST_SERVER))
    args = parser.parse_args()
    chunk = parse_size(args.chunk_size)
    budget = 2 * chunk / 2**20 + 60
    rows = []
    with tempfile.TemporaryDirectory() as tmp, start_server(args.emulator, Path(tmp)) as emulator:
        emulator.create_bucket("bench")
        for text in args.sizes.split(","):
            row = measure(emulator, parse_size(text), args.chunk_size, Path(tmp))
            rows.append(row)
            print(
                f"{text:>8}  peak RSS {row['rss_mib']:6.1f} MiB (budget {budget:.0f})  "
                f"{row['seconds']:6.1f} s  read back identical: {row['identical']}",
                flush=True,
            )
    rss = [r["rss_mib"] for r in rows]
    flat = max(rss) <= 1.10 * min(rss)
    print(f"within budget: {max(rss) <= budget}; same within 10% across sizes: {flat}")
    return 0 if max(rss) <= budget and flat and all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
