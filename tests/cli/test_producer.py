"""An ``--exec`` producer never outlives gcsstream: whatever ends the upload short of success (the
service refusing it, SIGINT, SIGTERM, SIGHUP), the producer's whole process group is stopped,
a member that ignores SIGTERM included, before gcsstream exits.

The producer tells the test its own pid (its group's id) and that of a background child through
a FIFO; the group's members are then read from /proc. Nothing sleeps: the test waits on the FIFO,
on the server's request log and on gcsstream's exit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import assert_stored, unstamped
from tests.gcs_test_server import QUANTUM, Fault, GcsTestServer

BUCKET = "producer"
#: A producer with a child in the background that would run for ever, and a foreground that
#: writes as fast as the upload takes it. ``{fifo}`` receives "LEADER CHILD".
PRODUCER = "sleep 1000 >/dev/null 2>&1 & echo $$ $! > {fifo}; cat /dev/zero"
STALL = 300.0  # the server ends a stall when it stops


@pytest.fixture
def server(tmp_path):
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as srv:
        yield srv


@pytest.fixture
def groups():
    """The producer groups a test saw; whatever is left of them is killed at its end."""
    seen: list[tuple[int, int]] = []
    yield seen
    for leader, child in seen:
        for pid in [leader, child, *members(leader)]:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether ``pid`` is running (a zombie has ended: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


class Run:
    """``gcsstream put --exec PRODUCER gs://producer/obj`` and the producer's pids."""

    def __init__(
        self, exe: str, server, tmp_path: Path, groups: list[tuple[int, int]], producer: str = PRODUCER
    ) -> None:
        fifo = tmp_path / "pids"
        os.mkfifo(fifo)
        # Opened read-write: the producer's open for writing never blocks, and no EOF comes early.
        self._fifo = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        self.proc = subprocess.Popen(
            [exe, "put", "--chunk-size", str(QUANTUM), "--exec", producer.format(fifo=fifo)]
            + [f"gs://{BUCKET}/obj"],
            env={**os.environ, "STORAGE_EMULATOR_HOST": server.url},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._groups = groups

    def pids(self, timeout: float = 60) -> tuple[int, int]:
        """(the producer's pid = its group id, its background child's pid), once it wrote them."""
        ready, _, _ = select.select([self._fifo], [], [], timeout)
        assert ready, "the producer never started"
        leader, child = map(int, os.read(self._fifo, 100).split())
        self._groups.append((leader, child))
        return leader, child

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
            os.close(self._fifo)
        return self.proc.returncode, err


def assert_gone(leader: int, child: int) -> None:
    running = [pid for pid in (leader, child) if alive(pid)]
    assert running == [] and members(leader) == [], f"left running: {running}, group {members(leader)}"


def stream_resume_id(err: str) -> str:
    match = re.search(r"continue with: \.\.\. \| gcsstream resume (\w+) -\n\Z", err)
    assert match, err
    return match.group(1)


def test_producer_group_is_gone_after_the_service_refuses_the_upload(gcsstream_exe, server, tmp_path, groups):
    server.faults.add(Fault("status", status=403, on="chunk", nth=1))
    run = Run(gcsstream_exe, server, tmp_path, groups)
    leader, child = run.pids()
    rc, err = run.finish()
    assert rc == 4, err
    assert "denied (403)" in err
    assert_gone(leader, child)
    assert server.object_resource(BUCKET, "obj") is None


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "terminated"),
        (signal.SIGHUP, 129, "hung up"),
    ],
)
def test_producer_group_is_gone_after_a_signal_and_the_resume_command_is_printed(
    gcsstream_exe, server, tmp_path, groups, sig, code, word
):
    server.faults.add(Fault("stall", on="chunk", nth=1, seconds=STALL))
    run = Run(gcsstream_exe, server, tmp_path, groups)
    leader, child = run.pids()
    server.wait_for_request(lambda r: r.kind == "chunk" and r.fault is not None, 60)
    assert alive(leader) and alive(child)  # the producer is there while the upload runs
    run.proc.send_signal(sig)
    rc, err = run.finish()
    assert rc == code, err
    upload_id = stream_resume_id(err)
    assert unstamped(err).startswith(f"gcsstream: error: {word}; ")
    assert_gone(leader, child)
    listed = subprocess.run([gcsstream_exe, "sessions", "--json"], capture_output=True, text=True, check=True)
    assert [e["id"] for e in json.loads(listed.stdout)] == [upload_id]
    assert server.object_resource(BUCKET, "obj") is None


def test_producer_that_ignores_sigterm_is_killed_after_the_grace_period(
    gcsstream_exe, server, tmp_path, groups
):
    server.faults.add(Fault("status", status=403, on="chunk", nth=1))
    run = Run(gcsstream_exe, server, tmp_path, groups, producer="trap '' TERM; " + PRODUCER)
    leader, child = run.pids()
    rc, err = run.finish(timeout=120)  # PRODUCER_GRACE (5 s) after SIGTERM
    assert rc == 4, err
    assert_gone(leader, child)


def test_a_hangup_that_the_parent_ignores_stays_ignored(gcsstream_exe, server, tmp_path):
    """`nohup gcsstream put ...`: SIGHUP is ignored by the parent, so the upload goes on."""
    data = os.urandom(3 * QUANTUM + 5)
    src = tmp_path / "src"
    src.write_bytes(data)
    server.faults.add(Fault("stall", on="chunk", nth=1, seconds=2))
    proc = subprocess.Popen(
        [gcsstream_exe, "put", "--chunk-size", str(QUANTUM), str(src), f"gs://{BUCKET}/nohup"],
        env={**os.environ, "STORAGE_EMULATOR_HOST": server.url},
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    server.wait_for_request(lambda r: r.kind == "chunk" and r.fault is not None, 60)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert_stored(server, BUCKET, "nohup", data)
