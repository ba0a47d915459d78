"""The README's first command: a real ``tar c | gcsstream put`` into a local emulator, read back.

Run from the repository root: ``python -m tests.demo``. It starts fake-gcs-server on loopback,
creates a bucket, pipes a tar of this repository through the installed ``gcsstream put``, reads
the object back and shows that it is byte-for-byte what tar produced. Exits 1 if it is not.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.emulators import start_fake_gcs_server

REPO = Path(__file__).resolve().parents[1]


def run(command: str, env: dict[str, str]) -> None:
    print(f"$ {command}", flush=True)
    subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env, check=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gcsstream-demo-") as tmp:
        work = Path(tmp)
        with start_fake_gcs_server(work) as emulator:
            emulator.create_bucket("demo-bucket")
            bin_dir = Path(sys.executable).parent
            env = {
                **os.environ,
                "STORAGE_EMULATOR_HOST": emulator.url,
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                # The demo's journal and its record of the finished upload go with the demo,
                # not into the user's own state directory.
                "GCSSTREAM_STATE_DIR": str(work / "state"),
            }
            print(
                f"# fake-gcs-server is listening on {emulator.url} (STORAGE_EMULATOR_HOST); bucket gs://demo-bucket"
            )
            sent = work / "sent.tar"
            run(
                f"tar c -C {shlex.quote(str(REPO))} gcsstream tests README.md "
                f"| tee {shlex.quote(str(sent))} | gcsstream put - gs://demo-bucket/site.tar",
                env,
            )
            back = work / "back.tar"
            back.write_bytes(emulator.read_object("demo-bucket", "site.tar"))
            print(f"# read back gs://demo-bucket/site.tar: {back.stat().st_size} bytes")
            print(f"sha256 sent:      {sha256(sent)}")
            print(f"sha256 read back: {sha256(back)}")
            listing = subprocess.run(
                ["tar", "t", "-f", str(back)], capture_output=True, text=True, check=True
            )
            print(f"# the object is a valid tar of {len(listing.stdout.splitlines())} entries")
            if sha256(sent) != sha256(back):
                print("MISMATCH: the object differs from what was sent", file=sys.stderr)
                return 1
            print("identical: the object is exactly what tar produced")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"demo failed: the command exited with status {exc.returncode}", file=sys.stderr)
        sys.exit(1)
