"""Peak RSS of ``gcsstream put -`` for piped inputs of different sizes, and read-back checks.

    .venv/bin/python -m tests.bench.memory [--sizes 256MiB,2GiB] [--chunk-size 16MiB]
        [--emulator gcp-storage-emulator|fake-gcs-server]

Each run pipes ``head -c SIZE /dev/urandom`` through ``tee`` (into a sha256/crc32c hasher) and
``gcsstream put -`` into an emulator on loopback, then reads the object back and compares. The
peak RSS is that of the gcsstream process alone (its own ru_maxrss, reported by a wrapper), so
the emulator's memory does not count. The target: under two chunks plus 60 MiB whatever the size.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c

from gcsstream.options import parse_size
from tests.emulators import start_emulator

# Runs gcsstream in-process and prints its own peak RSS (KiB) on fd 3 when it exits.
_WRAPPER = """
import atexit, os, resource, sys
from gcsstream.cli import main
def report():
    os.write(3, str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).encode())
atexit.register(report)
main()
"""


def measure(emulator, size: int, chunk_size: str, workdir: Path) -> dict:
    name = f"bench/{size}.bin"
    rss_path = workdir / "rss"
    digest_path = workdir / "digest"
    hasher = (
        "import sys, hashlib, google_crc32c\n"
        "h = hashlib.sha256(); c = 0\n"
        "while (b := sys.stdin.buffer.read(1 << 24)):\n"
        "    h.update(b); c = google_crc32c.extend(c, b)\n"
        "print(h.hexdigest(), c)\n"
    )
    py = sys.executable
    script = (
        f"head -c {size} /dev/urandom "
        f"| tee >({py} -c '{hasher}' > {digest_path}) "
        f"| {py} -c '{_WRAPPER}' put --quiet --chunk-size {chunk_size} - gs://bench/{name} 3> {rss_path}"
    )
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.url}
    started = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env, check=True)
    seconds = time.monotonic() - started
    while not digest_path.exists() or not digest_path.read_text().strip():
        time.sleep(0.05)  # the hasher in the process substitution finishes a moment later
    sha, crc = digest_path.read_text().split()
    stored = emulator.read_object("bench", name)
    ok = hashlib.sha256(stored).hexdigest() == sha and google_crc32c.value(stored) == int(crc)
    emulator.delete_object("bench", name)
    return {"size": size, "rss_mib": int(rss_path.read_text()) / 1024, "seconds": seconds, "identical": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256MiB,2GiB")
    parser.add_argument("--chunk-size", default="16MiB")
    parser.add_argument("--emulator", default="gcp-storage-emulator")
    args = parser.parse_args()
    chunk = parse_size(args.chunk_size)
    budget = 2 * chunk / 2**20 + 60
    rows = []
    with tempfile.TemporaryDirectory() as tmp, start_emulator(args.emulator, Path(tmp)) as emulator:
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
