"""Randomized soak: seeded uploads of random sizes, chunk sizes and sources through the real
``gcsstream put``, with random faults from the protocol-faithful test server.

Each run must end in one of two ways: an object byte-identical to its source (exit 0), or a
documented exit code with the session still open to resume (never cancelled, never finalized
short). Zero corrupt or truncated objects, ever.

CI runs a short version (40 seeds). The full soak, 300 seeds:

    GCSSTREAM_SOAK_RUNS=300 .venv/bin/python -m pytest tests/soak -q

``GCSSTREAM_SOAK_SEED`` picks the first seed, to replay a failing run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import subprocess

import google_crc32c
import pytest

from tests.gcs_test_server import QUANTUM, FaultPlan, GcsTestServer

RUNS = int(os.environ.get("GCSSTREAM_SOAK_RUNS", "40"))
FIRST_SEED = int(os.environ.get("GCSSTREAM_SOAK_SEED", "0"))
BUCKET = "soak"
FAULT_KINDS = ("status", "reset", "partial", "stall", "trickle")
#: What a failed run may exit with: transient after retries (75), and nothing else here,
#: because every fault the server injects is one the service documents as retryable.
ALLOWED_FAILURES = {75}


@pytest.fixture(scope="module")
def server(tmp_path_factory, soak_outcomes):
    with GcsTestServer(data_dir=tmp_path_factory.mktemp("soak"), buckets=[BUCKET]) as srv:
        srv.outcomes = soak_outcomes
        yield srv


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + RUNS))
def test_random_upload_is_whole_or_resumable(server, gcsstream_exe, tmp_path, seed):
    rng = random.Random(seed)
    chunk = QUANTUM * rng.choice([1, 2, 4])
    size = rng.choice([0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk, rng.randrange(6 * chunk)])
    data = rng.randbytes(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    via = rng.choice(["pipe", "file", "redirect"])
    name = f"seed-{seed}"
    server.faults = FaultPlan.random(
        seed, rate=rng.choice([0.1, 0.3, 0.5]), kinds=FAULT_KINDS, on=("chunk", "final"), stall_seconds=1.5
    )
    args = (
        f"--chunk-size {chunk} --retry-initial-delay 0.02 --retry-deadline 4 --io-timeout 0.75 "
        f"--checksum {rng.choice(['crc32c', 'both'])}"
    )
    dest = f"gs://{BUCKET}/{name}"
    command = {
        "pipe": f"cat {src} | {gcsstream_exe} put {args} - {dest}",
        "file": f"{gcsstream_exe} put {args} {src} {dest}",
        "redirect": f"{gcsstream_exe} put {args} - {dest} < {src}",
    }[via]
    env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url}
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], env=env, capture_output=True, timeout=300
    )
    err = proc.stderr.decode()
    server.outcomes["faults"] += len(server.faults.history)
    context = f"seed {seed}: {via}, {size} bytes, chunk {chunk}, faults {server.faults.history}\n{err}"

    resource = server.object_resource(BUCKET, name)
    if resource is not None:  # whatever the exit code, an object that exists must be whole
        stored = server.object_path(BUCKET, name).read_bytes()
        assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest(), f"CORRUPT OBJECT, {context}"
        assert int(resource["size"]) == size
        assert int.from_bytes(base64.b64decode(resource["crc32c"]), "big") == google_crc32c.value(data)
    if proc.returncode == 0:
        assert resource is not None, context
        server.outcomes["whole"] += 1
        return
    assert proc.returncode in ALLOWED_FAILURES, context
    assert err.strip().splitlines()[-1].startswith("gcsstream: error: "), context
    assert "Traceback" not in err
    sessions = [s for s in server.sessions() if s.name == name]
    assert sessions and not any(s.cancelled for s in sessions), f"session not left open, {context}"
    server.outcomes["resumable"] += 1
