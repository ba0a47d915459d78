"""Does drawing progress cost the upload anything? 1 GiB, live bar vs --no-progress.

    .venv/bin/python -m tests.bench.progress [--size 1GiB] [--runs 3]

Both variants run in a pseudo-terminal made by util-linux's ``script`` (so the bar really
renders, and the terminal side is a C program that costs nothing; a Python pty reader such as
pexpect competes for the two cores and skews the result) against the project's test server,
started as a separate process with MD5 off. Runs alternate; the medians of wall time and of
gcsstream's CPU time (user+sys, from /usr/bin/time) are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gcsstream.options import parse_size


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.gcs_test_server",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--bucket",
            "bench",
            "--no-md5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
    except BaseException:
        stop_server(proc)
        raise
    return proc, line.split()[1]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_run(src: Path, url: str, progress: bool, state: Path) -> tuple[float, float]:
    flag = "" if progress else "--no-progress"
    gcsstream = Path(sys.executable).parent / "gcsstream"
    command = f"/usr/bin/time -f 'TIME %e %U %S' {gcsstream} put {flag} {src} gs://bench/obj"
    env = {
        **os.environ,
        "STORAGE_EMULATOR_HOST": url,
        "TERM": "xterm-256color",
        "GCSSTREAM_STATE_DIR": str(state),
    }
    run = subprocess.run(["script", "-qfec", command, "/dev/null"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    wall, user, system = (float(x) for x in run.stdout.rsplit("TIME ", 1)[1].split()[:3])
    return wall, user + system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src.bin"
        with open(src, "wb") as f:
            block = os.urandom(1 << 24)
            for i in range(parse_size(args.size) >> 24):
                f.write(i.to_bytes(8, "big") + block[8:])
        server = None
        try:
            server, url = start_server(work / "data")
            results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for _ in range(args.runs):
                for progress in (True, False):
                    results[progress].append(one_run(src, url, progress, work / "state"))
        finally:
            if server is not None:
                stop_server(server)
    for progress in (True, False):
        walls = [w for w, _ in results[progress]]
        cpus = [c for _, c in results[progress]]
        label = "live progress " if progress else "--no-progress "
        runs = ", ".join(f"{w:.2f}" for w in walls)
        print(f"{label} wall median {statistics.median(walls):5.2f} s (runs {runs})", end="")
        print(f"   CPU median {statistics.median(cpus):5.2f} s")
    on, off = (statistics.median(w for w, _ in results[p]) for p in (True, False))
    print(f"progress costs {100 * (on - off) / off:+.1f}% wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
