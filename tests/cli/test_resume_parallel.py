# ruff: noqa: F811 - the fixtures imported from test_resume are parameters here
"""Interrupted parallel uploads continue from their journal: SIGKILL at random points (inside a
part, between parts, during the compose tree), a signal, a changed or shorter stream refused with
everything left as it was, and ``abort`` deleting the parts. Every run reads the object back.

The helpers (process reaping, waiting on the test server's request log) are test_resume's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import google_crc32c
import pytest

from gcsstream.options import parse_size
from tests.cli.test_resume import (  # noqa: F401 - reap_processes and server are fixtures
    BUCKET,
    STALL,
    DirWatch,
    env,
    finish,
    gcs,
    journals,
    kill,
    last_seq,
    reap_processes,
    server,
    sessions,
    stalls,
    wait_nth_request,
)
from tests.conftest import assert_stored, crc32c_b64, unstamped
from tests.gcs_test_server import QUANTUM, Fault, FaultPlan

CONNECTIONS = 4


#: The SIGKILL test's sizes; the slow variant (and the README's measurement) uses 1 GiB.
PART = 2 * QUANTUM
CHUNK = QUANTUM
PARTS = 40  # more than 32: the compose is a tree with intermediate objects
_RANGE = re.compile(r"bytes (\d+)-(\d+)/")


def options(part: int = PART, chunk: int = CHUNK) -> str:
    return f"--parallel {CONNECTIONS} --part-size {part} --chunk-size {chunk} --retry-initial-delay 0.05"


def make_input(path: Path, rng: random.Random, parts: int, part: int) -> bytes:
    """``parts`` whole parts and a short tail, random but cheap (one random block, numbered)."""
    block = rng.randbytes(part)
    data = b"".join(i.to_bytes(8, "big") + block[8:] for i in range(parts))
    data += block[: rng.randrange(1, part)]
    path.write_bytes(data)
    return data


def journal_file(env, entry_id: str) -> dict:
    return json.loads((Path(env["GCSSTREAM_STATE_DIR"]) / f"{entry_id}.json").read_text())


def stored_parts(env, entry_id: str) -> set[int]:
    return {p[0] for p in journal_file(env, entry_id)["parallel"]["parts"]}


def part_bytes_sent(server, name: str, after: int, until: int | None = None) -> dict[int, int]:
    """Bytes of each part's data the client set out to send in requests (after, until]."""
    prefix = f"{name}.gcsstream-parts/"
    sent: dict[int, int] = {}
    for r in server.requests:
        if r.seq <= after or (until is not None and r.seq > until) or not (r.name or "").startswith(prefix):
            continue
        leaf = r.name.rsplit("/", 1)[-1]
        m = _RANGE.match(r.content_range or "") if r.kind in ("chunk", "final") else None
        if m and leaf.isdigit():
            sent[int(leaf)] = sent.get(int(leaf), 0) + int(m.group(2)) + 1 - int(m.group(1))
    return sent


def wait_for_stored_parts(server, n: int, after: int) -> None:
    """Until at least ``n`` parts are journaled as stored: a worker journals its part before it
    takes another, so part ``CONNECTIONS + n - 1`` starts only once ``n`` are done."""
    wait_nth_request(server, "initiate", CONNECTIONS + n, after)


def the_upload(env) -> str:
    (entry,) = sessions(env)
    return entry["id"]


def kill_at_random_points(server, env, tmp_path, stalls, seed: int, parts: int, part: int, chunk: int):
    rng = random.Random(seed)
    src = tmp_path / "src.bin"
    data = make_input(src, rng, parts, part)
    name = f"par{seed}"
    put = f"put {options(part, chunk)} - gs://{BUCKET}/{name}"
    resume = f"resume {{}} - --chunk-size {chunk} --retry-initial-delay 0.05"
    starts: list[int] = []
    held: list[set[int]] = []  # the parts the journal holds as stored before each resume

    # 1. once the k-th part is stored
    k = rng.randint(2, parts // 4)
    starts.append(last_seq(server))
    proc = gcs(put, env, src)
    wait_nth_request(server, "final", k, starts[-1])
    kill(proc)
    upload = the_upload(env)
    assert len(upload) == 16
    held.append(stored_parts(env, upload))

    # 2. at the start of the k-th chunk request of a resume (inside a part)
    k = rng.randint(1, 2 * CONNECTIONS)
    starts.append(last_seq(server))
    proc = gcs(resume.format(upload), env, src)
    wait_nth_request(server, "chunk", k, starts[-1])
    kill(proc)
    held.append(stored_parts(env, upload))

    # 3. during the compose tree: the n-th compose request is held up, then the process killed
    n = rng.randint(1, 2)
    server.faults.add(Fault("stall", on="compose", nth=n, seconds=STALL))
    starts.append(last_seq(server))
    proc = gcs(resume.format(upload), env, src)
    server.wait_for_request(lambda r: r.kind == "compose" and r.fault == "stall", 120)
    kill(proc)
    held.append(stored_parts(env, upload))
    assert server.object_resource(BUCKET, name) is None

    # 4. the last resume completes
    starts.append(last_seq(server))
    code, _, err = finish(gcs(resume.format(upload), env, src))
    assert code == 0, err
    resource = assert_stored(server, BUCKET, name, data)
    assert hashlib.sha256(server.read_object(BUCKET, name)).digest() == hashlib.sha256(data).digest()
    assert resource["crc32c"] == crc32c_b64(data) and resource["componentCount"] == -(-len(data) // part)
    assert server.list_objects(BUCKET) == [name]  # no temporary object is left
    assert journals(env) == []

    # A part the journal held as stored is never sent again; at most one part per connection
    # (the parts in flight at the kill) is re-sent per interruption.
    for i, stored in enumerate(held):
        sent = part_bytes_sent(server, name, starts[i + 1], starts[i + 2] if i + 2 < len(starts) else None)
        assert not stored & set(sent), f"resume {i + 1} re-sent stored parts {sorted(stored & set(sent))}"
    total = sum(part_bytes_sent(server, name, starts[0]).values())
    assert len(data) <= total <= len(data) + len(held) * CONNECTIONS * part


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_three_random_points_then_resume_each_time(server, env, tmp_path, stalls, seed):
    kill_at_random_points(server, env, tmp_path, stalls, seed, PARTS, PART, CHUNK)


@pytest.mark.slow
def test_sigkill_a_1gib_parallel_upload_at_three_random_points(server, env, tmp_path, stalls):
    """Issue 12's target: 1 GiB from a pipe, --parallel 4, killed three times and resumed."""
    part = parse_size(os.environ.get("GCSSTREAM_PARALLEL_KILL_PART", "16MiB"))
    size = parse_size(os.environ.get("GCSSTREAM_PARALLEL_KILL_SIZE", "1GiB"))
    kill_at_random_points(server, env, tmp_path, stalls, 7, size // part, part, part // 4)


def _killed_with_parts(server, env, tmp_path, name: str, stored: int = 3) -> tuple[Path, bytes, str]:
    src = tmp_path / "src.bin"
    data = make_input(src, random.Random(name), 12, PART)
    start = last_seq(server)
    proc = gcs(f"put {options()} - gs://{BUCKET}/{name}", env, src)
    wait_for_stored_parts(server, stored, start)
    kill(proc)
    return src, data, the_upload(env)


def resume_changed(server, env, tmp_path, data: bytes, upload: str, at: int) -> tuple[int, str, set[str]]:
    """``resume`` from the input with its byte at ``at`` flipped: the exit code, stderr, and the
    kinds of the requests it made."""
    changed = tmp_path / "changed.bin"
    flipped = bytearray(data)
    flipped[at] ^= 1
    changed.write_bytes(bytes(flipped))
    start = last_seq(server)
    code, _, err = finish(gcs(f"resume {upload} -", env, changed))
    return code, err, {r.kind for r in server.requests if r.seq > start}


def test_a_changed_stream_is_refused_before_anything_is_sent(server, env, tmp_path):
    src, data, upload = _killed_with_parts(server, env, tmp_path, "changed")
    first = min(stored_parts(env, upload))
    before = journal_file(env, upload)
    objects = server.list_objects(BUCKET)
    code, err, kinds = resume_changed(server, env, tmp_path, data, upload, first * PART + 1000)
    assert code == 3, err
    assert f"the input differs from what upload {upload} stored: part {first} " in err
    assert "the upload is left as it was" in err
    assert kinds <= {"bucket", "status"}, kinds  # nothing was sent, nothing deleted or cancelled
    assert journal_file(env, upload) == before and server.list_objects(BUCKET) == objects

    shorter = tmp_path / "short.bin"
    shorter.write_bytes(data[: max(stored_parts(env, upload)) * PART])
    code, _, err = finish(gcs(f"resume {upload} -", env, shorter))
    assert code == 3, err
    end = (max(stored_parts(env, upload)) + 1) * PART  # the end of its last stored part at least
    ended = f"the input ended after {len(shorter.read_bytes())} bytes, but upload {upload} has sent"
    sent = re.search(rf"{ended} bytes of it up to offset (\d+)", err)
    assert sent and int(sent.group(1)) >= end, err
    assert journal_file(env, upload) == before and server.list_objects(BUCKET) == objects

    code, _, err = finish(gcs(f"resume {upload} -", env, src))  # the same stream: it finishes
    assert code == 0, err
    assert_stored(server, BUCKET, "changed", data)
    assert server.list_objects(BUCKET) == ["changed"] and journals(env) == []


def wait_for_journal(env, upload: str, done, timeout: float = 60) -> dict:
    """Until the upload's journal satisfies ``done`` (each write replaces the file: an event)."""
    with DirWatch(Path(env["GCSSTREAM_STATE_DIR"]), DirWatch.IN_MOVED_TO) as watch:
        deadline = time.monotonic() + timeout
        while not done(entry := journal_file(env, upload)):
            left = deadline - time.monotonic()
            assert left > 0, f"the journal never got there: {entry}"
            watch.wait(left)
    return entry


def test_a_stream_changed_inside_a_running_part_is_refused_before_anything_is_sent(
    server, env, tmp_path, stalls
):
    """The journal has what each running part's session confirmed: a resume checks the input
    against it before it sends a byte, and leaves the sessions as they were."""
    src = tmp_path / "src.bin"
    data = make_input(src, random.Random("running"), 12, PART)
    server.faults.add(Fault("stall", on="final", times=CONNECTIONS, seconds=STALL))
    start = last_seq(server)
    proc = gcs(f"put {options()} - gs://{BUCKET}/running", env, src)
    wait_nth_request(server, "final", CONNECTIONS, start)  # every part has its first chunk stored
    (upload,) = journals(env)
    entry = wait_for_journal(
        env, upload, lambda e: len([p for p in e["parallel"]["running"] if len(p) == 4]) == CONNECTIONS
    )
    kill(proc)
    assert entry["schema"] == 4 and entry["parallel"]["parts"] == []
    assert all(p[2] == CHUNK for p in entry["parallel"]["running"])
    before = journal_file(env, upload)

    # A byte in part 2's first chunk, which its session holds:
    code, err, kinds = resume_changed(server, env, tmp_path, data, upload, 2 * PART + 1000)
    assert code == 3, err
    assert f"the input differs from what upload {upload} sent: the session of part 2 confirmed" in err
    assert "the upload is left as it was" in err
    assert kinds <= {"bucket"}, kinds  # not one part was sent, no session asked or cancelled
    assert journal_file(env, upload) == before and server.list_objects(BUCKET) == []

    start = last_seq(server)
    code, _, err = finish(gcs(f"resume {upload} -", env, src))  # the same stream: it finishes
    assert code == 0, err
    assert_stored(server, BUCKET, "running", data)
    sent = part_bytes_sent(server, "running", start)
    assert all(sent[i] == PART - CHUNK for i in range(CONNECTIONS)), sent  # the sessions went on
    assert server.list_objects(BUCKET) == ["running"] and journals(env) == []


def test_a_session_holding_less_than_the_journal_says_is_continued_from_there(server, env, tmp_path):
    """A part's session that answers with fewer bytes than its journal recorded (a service that
    lost some): the part's bytes are all in memory, so it goes on from what the service holds,
    where a single upload is refused; before, the whole upload was deleted."""
    src = tmp_path / "src.bin"
    part, chunk = 4 * QUANTUM, QUANTUM
    data = make_input(src, random.Random("behind"), 3, part)
    # Part 0's second chunk keeps failing: the run stops resumably with one chunk confirmed.
    server.faults.add(
        Fault(
            "status", status=503, on="chunk", name_like="behind.gcsstream-parts/*/000000", nth=2, times=10_000
        )
    )
    code, _, err = finish(
        gcs(f"put {options(part, chunk)} --retry-deadline 1 - gs://{BUCKET}/behind", env, src)
    )
    assert code == 75, err
    server.faults = FaultPlan()
    (upload,) = journals(env)
    path = Path(env["GCSSTREAM_STATE_DIR"]) / f"{upload}.json"
    entry = json.loads(path.read_text())
    (running,) = [p for p in entry["parallel"]["running"] if p[0] == 0]
    assert running[2:] == [chunk, google_crc32c.value(data[:chunk])]
    running[2:] = [2 * chunk, google_crc32c.value(data[: 2 * chunk])]  # more than the service holds
    path.write_text(json.dumps(entry))
    start = last_seq(server)
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 0, err
    assert part_bytes_sent(server, "behind", start)[0] == part - chunk  # from what it holds
    assert_stored(server, BUCKET, "behind", data)
    assert server.list_objects(BUCKET) == ["behind"] and journals(env) == []


def test_a_journal_with_more_holes_than_memory_for_them_is_refused(server, env, tmp_path):
    """The parts before the last one checked are held until the check: at most N-1 of them."""
    src, _, upload = _killed_with_parts(server, env, tmp_path, "holes", stored=5)
    path = Path(env["GCSSTREAM_STATE_DIR"]) / f"{upload}.json"
    entry = json.loads(path.read_text())
    par = entry["parallel"]
    last = max(p[0] for p in par["parts"])
    assert last >= CONNECTIONS
    par["parts"] = [p for p in par["parts"] if p[0] == last]
    par["running"] = [p for p in par["running"] if p[0] > last]
    path.write_text(json.dumps(entry))
    before = path.read_text()
    start = last_seq(server)
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 2, err
    held = re.search(rf"upload {upload} cannot be continued: (\d+) of its parts before its last stored", err)
    assert held and int(held.group(1)) >= last > CONNECTIONS - 1, err
    assert {r.kind for r in server.requests if r.seq > start} <= {"bucket"} and path.read_text() == before


def test_abort_deletes_the_parts_and_forgets_the_upload(server, env, tmp_path):
    _, _, upload = _killed_with_parts(server, env, tmp_path, "aborted")
    (entry,) = sessions(env)
    assert entry["parts"] >= 3 and entry["destination"] == f"gs://{BUCKET}/aborted"
    assert any(name.startswith(f"aborted.gcsstream-parts/{upload}/") for name in server.list_objects(BUCKET))
    table = subprocess.run(["gcsstream", "sessions"], env=env, capture_output=True, text=True, check=True)
    assert re.search(rf"^{upload} +[\d.]+ MiB in {entry['parts']} parts ", table.stdout, re.M), table.stdout
    status = subprocess.run(["gcsstream", "status", upload], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"{upload} gs://{BUCKET}/aborted: {entry['parts']} parts ("), (
        status.stdout
    )
    running = [item[1] for item in journal_file(env, upload)["parallel"]["running"]]
    code, _, err = finish(gcs(f"abort {upload}", env))
    assert code == 0, err
    assert unstamped(err) == f"gcsstream: aborted {upload} (gs://{BUCKET}/aborted)\n"
    assert server.list_objects(BUCKET) == [] and journals(env) == []
    # Every journaled session is cancelled (one started as the process was killed, before it was
    # journaled, holds no object and expires).
    journaled = [s for s in server.sessions() if any(s.upload_id in uri for uri in running)]
    assert len(journaled) == len(running) and all(s.cancelled or s.finalized for s in journaled)


def test_abort_refused_by_the_service_keeps_the_upload_and_forget_drops_it(server, env, tmp_path):
    """An account that may not delete: abort keeps the entry and says how to drop it; --forget
    drops it and names what is left, which stays as it is."""
    _, _, upload = _killed_with_parts(server, env, tmp_path, "refused")
    server.faults.add(Fault("status", on="delete", status=403, times=1000))
    objects = server.list_objects(BUCKET)
    code, _, err = finish(gcs(f"abort {upload}", env))
    assert code == 1, err
    assert f"it is kept: run `gcsstream abort {upload}` again, or with --forget" in err
    assert journals(env) == [upload] and server.list_objects(BUCKET) == objects
    code, out, err = finish(gcs(f"abort {upload} --forget --json", env))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["upload"] == upload and summary["aborted"] is False
    assert (
        f"of upload {upload} could not be deleted: gs://{BUCKET}/refused.gcsstream-parts/{upload}/"
        in summary["left"]
    )
    assert journals(env) == [] and server.list_objects(BUCKET) == objects
    server.faults = FaultPlan()
    code, _, err = finish(gcs(f"abort {upload}", env))
    assert code == 5 and "no unfinished upload" in err, err


def test_abort_forget_drops_an_upload_whose_parts_cannot_even_be_listed(server, env, tmp_path):
    # Found by a new user: --forget forgot a one-stream upload the service could not be asked
    # about, but not a parallel one (listing its parts failed first).
    _, _, upload = _killed_with_parts(server, env, tmp_path, "unlisted")
    server.faults.add(Fault("status", on="list", status=403, times=1000))
    objects = server.list_objects(BUCKET)
    code, out, err = finish(gcs(f"abort {upload} --json", env))
    assert code == 4 and journals(env) == [upload], err
    assert json.loads(out)["upload"] == upload  # the failure names the upload it kept
    code, out, err = finish(gcs(f"abort {upload} --forget --json", env))
    assert code == 0, err
    left = json.loads(out)["left"]
    assert left.endswith(
        f"what it left under gs://{BUCKET}/unlisted.gcsstream-parts/{upload}/ is not known: delete it"
    )
    assert journals(env) == [] and server.list_objects(BUCKET) == objects


def test_restart_keeps_an_old_upload_whose_parts_it_may_not_delete(server, env, tmp_path):
    src = tmp_path / "src.bin"
    data = make_input(src, random.Random("restarted"), 12, PART)
    start = last_seq(server)
    proc = gcs(f"put {options()} {src} gs://{BUCKET}/restarted", env)
    wait_for_stored_parts(server, 3, start)
    kill(proc)
    upload = the_upload(env)
    server.faults.add(Fault("status", on="delete", status=403, times=1000, name_like=f"*/{upload}/*"))
    code, _, err = finish(gcs(f"put {options()} --restart {src} gs://{BUCKET}/restarted", env))
    assert code == 0, err
    assert_stored(server, BUCKET, "restarted", data)
    assert any(r.kind == "delete" and r.status == 403 for r in server.requests)
    assert upload in journals(env)  # kept, with its parts, for `abort`


def _as_if_stored_unheard(env, upload: str) -> tuple[int, str]:
    """As if the killed run's last request of a stored part had created it unheard and its
    session had since expired (a week later): the journal has the part as running, on a
    session the service no longer knows. Returns the part's index and temporary object."""
    path = Path(env["GCSSTREAM_STATE_DIR"]) / f"{upload}.json"
    entry = json.loads(path.read_text())
    par = entry["parallel"]
    index = max(p[0] for p in par["parts"])
    par["parts"] = [p for p in par["parts"] if p[0] != index]
    gone = f"{entry['endpoint']}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&upload_id=expired"
    par["running"] = sorted([*par["running"], [index, gone]])
    path.write_text(json.dumps(entry))
    name = f"{entry['destination'].removeprefix(f'gs://{BUCKET}/')}.gcsstream-parts/{upload}/{index:06d}"
    return index, name


def test_a_part_whose_session_expired_after_it_was_stored_is_taken_as_it_is(server, env, tmp_path):
    src, data, upload = _killed_with_parts(server, env, tmp_path, "expired")
    index, name = _as_if_stored_unheard(env, upload)
    assert name in server.list_objects(BUCKET)
    start = last_seq(server)
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 0, err
    refused = [r for r in server.requests if r.seq > start and r.name == name and r.status == 412]
    assert refused, "the part was not found existing"  # a fresh session for it: 412, then adopted
    assert not [r for r in server.requests if r.seq > start and r.name == name and r.kind == "final"]
    assert_stored(server, BUCKET, "expired", data)
    assert server.list_objects(BUCKET) == ["expired"] and journals(env) == []


def test_a_failed_look_at_an_existing_part_is_retried(server, env, tmp_path):
    """A 503 reading the part found existing is retried like any request, not taken for the
    input's failure (which deleted every part and forgot the upload)."""
    src, data, upload = _killed_with_parts(server, env, tmp_path, "looked")
    _, name = _as_if_stored_unheard(env, upload)
    server.faults.add(Fault("status", on="object", name=name, status=503))
    code, _, err = finish(gcs(f"resume {upload} - --retry-initial-delay 0.05", env, src))
    assert code == 0, err
    assert [r.status for r in server.requests if r.kind == "object" and r.name == name][:2] == [503, 200]
    assert_stored(server, BUCKET, "looked", data)
    assert server.list_objects(BUCKET) == ["looked"] and journals(env) == []


def test_a_signal_stops_the_retried_look_at_an_existing_part(server, env, tmp_path):
    """Found in review: the look at a part found existing retried with the run's plain sleep, so
    a stopped run's worker went on asking (through the stop's grace, and after a library call
    had returned) instead of stopping with the run."""
    src, data, upload = _killed_with_parts(server, env, tmp_path, "stopped")
    _, name = _as_if_stored_unheard(env, upload)
    server.faults.add(Fault("status", on="object", name=name, status=503, times=10_000))
    proc = gcs(f"resume {upload} - --retry-initial-delay 0.05 --retry-deadline 300", env, src)

    def looks():
        return [r for r in server.requests if r.kind == "object" and r.name == name]

    server.wait_for_request(lambda r: r.kind == "object" and r.name == name and r.status == 503, 60)
    server.wait_for_request(lambda r: len(looks()) >= 2, 60)  # its retries have begun
    asked = len(looks())
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc, timeout=60)
    assert code == 143, err
    assert len(looks()) <= asked + 1, [r.seq for r in looks()]  # the one in flight at most
    server.faults = FaultPlan()
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 0, err
    assert_stored(server, BUCKET, "stopped", data)
    assert server.list_objects(BUCKET) == ["stopped"] and journals(env) == []


def test_a_part_stored_by_another_session_at_its_last_request_is_taken_as_it_is(server, env, tmp_path):
    """The part's fresh session meets the part at its final request (412), after its first
    chunk went back to the reader: the part is still recognised by all of its bytes."""
    src, data, upload = _killed_with_parts(server, env, tmp_path, "late")
    index, name = _as_if_stored_unheard(env, upload)
    assert server.delete_object(BUCKET, name)
    server.faults.add(Fault("stall", on="final", name=name, seconds=2.0))
    start = last_seq(server)
    proc = gcs(f"resume {upload} -", env, src)
    server.wait_for_request(lambda r: r.seq > start and r.kind == "final" and r.name == name, 120)
    server.put_object(BUCKET, name, data[index * PART : (index + 1) * PART])  # while it is held up
    code, _, err = finish(proc)
    assert code == 0, err
    finals = [r.status for r in server.requests if r.seq > start and r.kind == "final" and r.name == name]
    assert finals == [412]
    assert_stored(server, BUCKET, "late", data)
    assert server.list_objects(BUCKET) == ["late"] and journals(env) == []


def test_an_existing_part_with_other_bytes_is_refused_as_another_input(server, env, tmp_path):
    src, data, upload = _killed_with_parts(server, env, tmp_path, "other")
    index, name = _as_if_stored_unheard(env, upload)
    changed = tmp_path / "changed.bin"
    flipped = bytearray(data)
    flipped[index * PART + 7] ^= 1
    changed.write_bytes(bytes(flipped))
    code, _, err = finish(gcs(f"resume {upload} -", env, changed))
    assert code == 3, err
    assert f"the input differs from what upload {upload} stored as gs://{BUCKET}/{name}" in err
    assert name in server.list_objects(BUCKET)  # left as it was, for a resume with the same input
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 0, err
    assert_stored(server, BUCKET, "other", data)
    assert server.list_objects(BUCKET) == ["other"] and journals(env) == []


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_keeps_the_parts_for_resume(server, env, tmp_path, sig, code, word):
    src = tmp_path / "src.bin"
    data = make_input(src, random.Random(sig), 12, PART)
    start = last_seq(server)
    server.faults.add(Fault("stall", on="final", nth=3, seconds=STALL))
    proc = gcs(f"put {options()} - gs://{BUCKET}/sig", env, src)
    wait_nth_request(server, "final", 1, start)
    server.wait_for_request(lambda r: r.kind == "final" and r.fault == "stall", 60)
    (upload,) = journals(env)
    wait_for_journal(env, upload, lambda e: len(e["parallel"]["parts"]) >= 1)  # one part is stored
    proc.send_signal(sig)
    returncode, _, err = finish(proc, timeout=60)
    assert returncode == code, err
    assert the_upload(env) == upload
    match = re.fullmatch(
        rf"gcsstream: error: {word}; (\d+) parts? \(.+\) (are|is) stored; continue with: "
        rf"\.\.\. \| gcsstream resume {upload} -\n",
        unstamped(err),
    )
    assert match, err
    assert int(match.group(1)) == len(stored_parts(env, upload)) >= 1
    assert not any(r.kind == "cancel" for r in server.requests)  # the sessions are kept
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 0, err
    assert_stored(server, BUCKET, "sig", data)
    assert server.list_objects(BUCKET) == ["sig"] and journals(env) == []


def test_a_file_is_continued_by_running_the_same_put_again(server, env, tmp_path):
    src, data, upload = _killed_with_parts(server, env, tmp_path, "file")
    finish(gcs(f"abort {upload}", env))
    start = last_seq(server)
    proc = gcs(f"put {options()} {src} gs://{BUCKET}/file", env)
    wait_for_stored_parts(server, 3, start)
    kill(proc)
    upload = the_upload(env)
    stored = stored_parts(env, upload)
    start = last_seq(server)
    code, _, err = finish(gcs(f"put {options()} {src} gs://{BUCKET}/file", env))
    assert code == 0, err
    assert f"continuing the unfinished upload {upload} of this file" in err
    assert not stored & set(part_bytes_sent(server, "file", start))
    assert_stored(server, BUCKET, "file", data)
    assert server.list_objects(BUCKET) == ["file"] and journals(env) == []


def test_a_resume_refused_before_any_part_moves_leaves_the_upload_as_it_was(server, env, tmp_path):
    # Found in review: a resumed run failing before its parts were re-read (here the bucket
    # check) forgot its journal entry and left the stored parts in the bucket, out of reach.
    src, data, upload = _killed_with_parts(server, env, tmp_path, "kept")
    before, objects = journal_file(env, upload), server.list_objects(BUCKET)
    server.faults.add(Fault("status", status=400, on="bucket"))
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 1, err
    assert journal_file(env, upload) == before and server.list_objects(BUCKET) == objects
    code, _, err = finish(gcs(f"resume {upload} -", env, src))
    assert code == 0, err
    assert_stored(server, BUCKET, "kept", data)
    assert server.list_objects(BUCKET) == ["kept"] and journals(env) == []


def test_a_put_of_another_kind_names_the_parallel_upload_it_leaves(server, env, tmp_path):
    src = tmp_path / "src.bin"
    data = make_input(src, random.Random(5), 12, PART)
    start = last_seq(server)
    proc = gcs(f"put {options()} {src} gs://{BUCKET}/kind", env)
    wait_for_stored_parts(server, 2, start)
    kill(proc)
    upload = the_upload(env)
    code, _, err = finish(gcs(f"put --chunk-size {CHUNK} {src} gs://{BUCKET}/kind", env))
    assert code == 0, err
    assert (
        f"not continuing the unfinished upload {upload} of this file (--parallel or --part-size "
        f"differ): starting a new upload; {upload} is left as it was" in unstamped(err)
    )
    assert_stored(server, BUCKET, "kind", data)
    assert journals(env) == [upload]


def test_intermediates_left_after_a_success_keep_the_upload_for_abort(server, env, tmp_path):
    """Every part deleted, but not the compose tree's intermediates: the entry stays, so that
    `sessions` lists the upload and `abort` deletes them; nothing is left only in a message."""
    src = tmp_path / "src.bin"
    data = make_input(src, random.Random(10), PARTS, PART)
    server.faults.add(
        Fault("status", status=403, on="delete", name_like="tree.gcsstream-parts/*/compose-*", times=2)
    )
    code, _, err = finish(gcs(f"put {options()} - gs://{BUCKET}/tree", env, src))
    assert code == 0, err
    assert_stored(server, BUCKET, "tree", data)
    left = [n for n in server.list_objects(BUCKET) if n != "tree"]
    assert len(left) == 2 and all("/compose-" in n for n in left)
    (entry,) = sessions(env)
    upload = entry["id"]
    assert f"(`gcsstream abort {upload}` deletes them)" in err
    assert journal_file(env, upload)["parallel"]["composed"] > 0
    code, _, err = finish(gcs(f"abort {upload}", env))
    assert code == 0, err
    assert server.list_objects(BUCKET) == ["tree"] and journals(env) == []


def test_parts_left_after_a_success_are_listed_and_aborted_not_resumed(server, env, tmp_path):
    src = tmp_path / "src.bin"
    data = make_input(src, random.Random(9), 6, PART)
    server.faults.add(Fault("status", status=403, on="delete", times=2))
    code, _, err = finish(gcs(f"put {options()} - gs://{BUCKET}/left", env, src))
    assert code == 0, err
    assert_stored(server, BUCKET, "left", data)
    upload = the_upload(env)
    assert "could not be deleted" in err and f"(`gcsstream abort {upload}` deletes them)" in err
    left = [n for n in server.list_objects(BUCKET) if n != "left"]
    (entry,) = sessions(env)
    assert entry["parts"] == len(left) == 2  # listed by `sessions`
    assert journal_file(env, upload)["parallel"]["composed"] > 0
    generation = server.object_resource(BUCKET, "left")["generation"]
    code, _, err = finish(gcs(f"resume {upload} -", env, src))  # it must not compose again
    assert code == 2, err
    assert f"upload {upload} has finished: it created gs://{BUCKET}/left generation" in err
    assert server.object_resource(BUCKET, "left")["generation"] == generation
    code, _, err = finish(gcs(f"abort {upload}", env))
    assert code == 0, err
    assert server.list_objects(BUCKET) == ["left"] and journals(env) == []
