"""Randomized soak: seeded uploads of random sizes, chunk sizes and sources through the real
``gcsstream put``, with random faults from the protocol-faithful test server.

Each run must end in one of two ways: an object byte-identical to its source (exit 0), or a
documented exit code with the session still open, and the command printed on the last line of
stderr then completes it (faults cleared, the same file or stream fed again) into an object
byte-identical to its source. Zero corrupt or truncated objects, ever. About one seed in five
also gets a fault that repeats until the retries give up, so that CI resumes some runs too.

The default run (and CI) has the first 40 seeds; the full soak is marked ``slow`` and takes the
seeds after them, up to ``GCSSTREAM_SOAK_RUNS`` (300 by default):

    .venv/bin/python -m pytest tests/soak -m slow -q

``GCSSTREAM_SOAK_SEED`` picks the first seed, to replay a failing run.
"""

from __future__ import annotations

import os
import random
import re
import subprocess

import pytest

from tests.conftest import assert_stored, unstamped
from tests.gcs_test_server import QUANTUM, Fault, FaultPlan, GcsTestServer

#: Seeds in the default run; the ``slow`` soak goes on to ``RUNS``.
SHORT_RUNS = 40
RUNS = int(os.environ.get("GCSSTREAM_SOAK_RUNS", "300"))
FIRST_SEED = int(os.environ.get("GCSSTREAM_SOAK_SEED", "0"))
BUCKET = "soak"
FAULT_KINDS = ("status", "reset", "partial", "stall", "trickle", "lost")
#: What a failed run may exit with: transient after retries (75), and nothing else here,
#: because every fault the server injects is one the service documents as retryable.
ALLOWED_FAILURES = {75}
_CONTINUE = re.compile(r"; continue with: (\.\.\. \| )?gcsstream resume ([0-9a-f]+)( -)?$")


@pytest.fixture(scope="module")
def server(tmp_path_factory, soak_outcomes):
    with GcsTestServer(data_dir=tmp_path_factory.mktemp("soak"), buckets=[BUCKET]) as srv:
        srv.outcomes = soak_outcomes
        yield srv


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], env=env, capture_output=True, timeout=300
    )


@pytest.mark.parametrize(
    "seed",
    [
        seed if seed < FIRST_SEED + SHORT_RUNS else pytest.param(seed, marks=pytest.mark.slow)
        for seed in range(FIRST_SEED, FIRST_SEED + max(RUNS, SHORT_RUNS))
    ],
)
def test_random_upload_is_whole_or_resumable(server, gcsstream_exe, tmp_path, state_dir, seed):
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
    deadline = 4
    if rng.random() < 0.2:  # from the n-th PUT on, every PUT fails: the retries give up
        nth = rng.randint(1, max(1, -(-size // chunk)))  # at most the number of data requests
        server.faults.add(Fault("status", status=503, on="put", nth=nth, times=1 << 30))
        deadline = 1
    args = (
        f"--chunk-size {chunk} --retry-initial-delay 0.02 --retry-deadline {deadline} --io-timeout 0.75 "
        f"--checksum {rng.choice(['crc32c', 'both'])}"
    )
    dest = f"gs://{BUCKET}/{name}"
    feed = {"pipe": f"cat {src} | {{}}", "file": "{}", "redirect": f"{{}} < {src}"}[via]
    target = str(src) if via == "file" else "-"
    env = {**os.environ, "STORAGE_EMULATOR_HOST": server.url}
    proc = run(feed.format(f"{gcsstream_exe} put {args} {target} {dest}"), env)
    err = proc.stderr.decode()
    server.outcomes["faults"] += len(server.faults.history)
    for _, fault in server.faults.history:
        kinds = server.outcomes["kinds"]
        kinds[fault.kind] = kinds.get(fault.kind, 0) + 1
    context = f"seed {seed}: {via}, {size} bytes, chunk {chunk}, faults {server.faults.history}\n{err}"

    if server.object_resource(BUCKET, name) is not None:  # whatever the exit code, it must be whole
        assert_stored(server, BUCKET, name, data)
    if proc.returncode == 0:
        assert server.object_resource(BUCKET, name) is not None, context
        assert not list(state_dir.glob("*.json")), "the journal outlived the upload"
        server.outcomes["whole"] += 1
        return
    assert proc.returncode in ALLOWED_FAILURES, context
    last = unstamped(err).strip().splitlines()[-1]
    assert last.startswith("gcsstream: error: "), context
    assert "Traceback" not in err
    (session,) = [s for s in server.sessions() if s.name == name]
    # (finalized is possible: the final request's answer lost, then every status query failed)
    assert not session.cancelled, f"session not left open, {context}"

    # The printed command completes the upload once the faults are gone.
    continued = _CONTINUE.search(last)
    assert continued, f"no resume command, {context}"
    stream, upload_id = bool(continued.group(1)), continued.group(2)
    assert stream == (via != "file") and bool(continued.group(3)) == stream, context
    server.faults = FaultPlan()
    held, after = session.persisted, max(r.seq for r in server.requests)
    resumed = run(feed.format(f"{gcsstream_exe} resume {upload_id}{' -' if stream else ''}"), env)
    assert resumed.returncode == 0, f"{context}\nresume: {resumed.stderr.decode()}"
    assert_stored(server, BUCKET, name, data)
    (session,) = [s for s in server.sessions() if s.name == name]
    assert session.finalized
    sent_from = [
        int(r.content_range.split()[1].split("-")[0])
        for r in server.requests
        if r.seq > after
        and r.name == name
        and r.kind in ("chunk", "final")
        and "-" in (r.content_range or "")
    ]
    assert all(first >= held for first in sent_from), f"resent held bytes: {sent_from} < {held}, {context}"
    assert not list(state_dir.glob("*.json")), "the journal outlived the upload"
    server.outcomes["resumed"] += 1
