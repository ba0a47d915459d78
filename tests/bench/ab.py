"""Paired wall and CPU time of two gcsstream installs piping the same input into one server.

    .venv/bin/python -m tests.bench.ab OTHER_GCSSTREAM [--size 1GiB] [--runs 5] [--chunk-size 16MiB]

OTHER_GCSSTREAM is the console script of another install (e.g. a clone of an older commit with its
own venv: ``git clone -q . /tmp/old && git -C /tmp/old checkout REV && python3 -m venv
/tmp/old/.venv && /tmp/old/.venv/bin/pip install -q -e /tmp/old``). Runs alternate between this
install and the other, ``cat FILE | gcsstream put -`` into tests/gcs_test_server.py (MD5 off, on
loopback), so that both see the same machine load; each object is checked (size and crc32c as
the server reports them) and the medians are printed. CPU is the gcsstream process's user + sys
(from wait4), not the pipe's or the server's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c

from gcsstream.checksums import encode_crc32c
from gcsstream.options import parse_size
from tests.gcs_test_server import GcsTestServer

BUCKET = "bench"


def run_once(exe: str, source: Path, server: GcsTestServer, name: str, chunk: str) -> tuple[float, float]:
    env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url}
    with open(source, "rb") as stdin:
        cat = subprocess.Popen(["cat"], stdin=stdin, stdout=subprocess.PIPE)
        started = time.perf_counter()
        proc = subprocess.Popen(
            [exe, "put", "-", f"gs://{BUCKET}/{name}", "--chunk-size", chunk, "--no-progress", "-q"],
            stdin=cat.stdout,
            env=env,
        )
        assert cat.stdout is not None
        cat.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        cat.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{exe} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="the other install's gcsstream console script")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chunk-size", default="16MiB")
    args = parser.parse_args()
    this = str(Path(sys.executable).parent / "gcsstream")
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="gcsstream-ab-") as tmp:
        source = Path(tmp) / "input"
        crc = 0
        with open(source, "wb") as out:
            for _ in range(0, size, 1 << 24):
                block = os.urandom(min(1 << 24, size - out.tell()))
                crc = google_crc32c.extend(crc, block)
                out.write(block)
        results: dict[str, list[tuple[float, float]]] = {"this": [], "other": []}
        with GcsTestServer(data_dir=Path(tmp) / "server", buckets=[BUCKET], md5=False) as server:
            for i in range(args.runs):
                for label, exe in (("this", this), ("other", args.other))[:: 1 if i % 2 == 0 else -1]:
                    name = f"{label}-{i}"
                    results[label].append(run_once(exe, source, server, name, args.chunk_size))
                    resource = server.object_resource(BUCKET, name)
                    assert int(resource["size"]) == size and resource["crc32c"] == encode_crc32c(crc)
                    server.delete_object(BUCKET, name)
    for label, exe in (("this", this), ("other", args.other)):
        walls = [w for w, _ in results[label]]
        cpus = [c for _, c in results[label]]
        print(
            f"{label:5} {exe}\n      wall median {statistics.median(walls):.2f} s "
            f"(runs {', '.join(f'{w:.2f}' for w in walls)})   CPU median {statistics.median(cpus):.2f} s"
        )
    ratio = statistics.median(w for w, _ in results["this"]) / statistics.median(
        w for w, _ in results["other"]
    )
    print(f"wall this/other: {ratio:.3f}")


if __name__ == "__main__":
    main()
