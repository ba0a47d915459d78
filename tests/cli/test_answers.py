"""The real ``gcsstream put`` against answers that are lost, make no progress, cannot be read or
describe an object it did not create: each once hung, looped forever or deleted a good object."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import assert_stored
from tests.gcs_test_server import QUANTUM, Fault, GcsTestServer
from tests.wrong_server import Behaviour, Reply, WrongServer

BUCKET = "gcsstream-test"
CHUNK = QUANTUM
FAST = "--retry-initial-delay 0.01 --chunk-size 256KiB --no-progress"


def put(url: str, exe: str, src, args: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "STORAGE_EMULATOR_HOST": url}
    command = f"cat {src} | {exe} put {FAST} {args} - gs://{BUCKET}/obj"
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], env=env, capture_output=True, timeout=timeout
    )


@pytest.fixture
def source(tmp_path):
    def make(size: int) -> tuple[object, bytes]:
        data = os.urandom(size)
        path = tmp_path / "src"
        path.write_bytes(data)
        return path, data

    return make


@pytest.mark.parametrize("lost", [2, 3])
@pytest.mark.parametrize("how", ["503", "reset"])
def test_answers_lost_in_a_row_do_not_hang(tmp_path, gcsstream_exe, source, lost, how):
    src, data = source(8 * CHUNK + 12345)
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as server:
        for n in range(2, 2 + lost):  # chunks 2, 3 (, 4): kept whole, their answers lost
            if how == "503":
                server.faults.add(Fault("lost", on="chunk", nth=n))
            else:
                server.faults.add(Fault("reset", on="chunk", nth=n, after_bytes=CHUNK))
        proc = put(server.url, gcsstream_exe, src, "--retry-deadline 30", timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        assert len([k for k, _ in server.faults.history]) == lost
        assert_stored(server, BUCKET, "obj", data)
        assert not [r for r in server.requests if r.kind in ("delete", "cancel")]


def test_a_lost_answer_to_the_final_request_keeps_the_object(tmp_path, gcsstream_exe, source):
    src, data = source(3 * CHUNK + 7)
    with GcsTestServer(data_dir=tmp_path / "server", buckets=[BUCKET]) as server:
        server.faults.add(Fault("lost", on="final"))
        proc = put(server.url, gcsstream_exe, src, "--retry-deadline 30")
        assert proc.returncode == 0, proc.stderr.decode()
        assert server.faults.applied("lost")
        assert_stored(server, BUCKET, "obj", data)
        assert not [r for r in server.requests if r.kind in ("delete", "cancel")]


class NeverKeeps(Behaviour):
    """308 without Range, whatever is sent."""

    def incomplete(self, request, session):
        session.data.clear()
        return Reply(308)


class RangeStaysBehind(Behaviour):
    """Keeps the first chunk, then answers every later one with that same Range."""

    def incomplete(self, request, session):
        del session.data[CHUNK:]
        return Reply(308, {"Range": f"bytes=0-{CHUNK - 1}"})


class NeverFinishes(Behaviour):
    """Answers the final request with a 308 that confirms every byte, forever."""

    def finalize(self, request, session):
        return Reply(308, {"Range": f"bytes=0-{len(session.data) - 1}"})


@pytest.mark.parametrize("behaviour", [NeverKeeps, RangeStaysBehind, NeverFinishes])
def test_a_server_that_makes_no_progress_meets_the_retry_deadline(gcsstream_exe, source, behaviour):
    src, _ = source(3 * CHUNK + 5)
    with WrongServer(behaviour()) as server:
        proc = put(server.url, gcsstream_exe, src, "--retry-deadline 2", timeout=60)
        err = proc.stderr.decode()
        assert proc.returncode == 75, err
        assert "gave up after" in err and "continue with: ... | gcsstream resume" in err
        assert not server.objects


class UnreadableFinal(Behaviour):
    """Creates the object, then answers the final request with ``body`` (cut short, not JSON)."""

    body = b'{"kind": "storage#object", "name": "o'

    def finalize(self, request, session):
        super().finalize(request, session)
        return Reply(200, {"Content-Type": "application/json"}, self.body)


class HtmlFinal(UnreadableFinal):
    body = b"<html><body>OK</body></html>"


@pytest.mark.parametrize("behaviour", [UnreadableFinal, HtmlFinal])
def test_an_unreadable_final_answer_keeps_the_correct_object(gcsstream_exe, source, behaviour):
    src, data = source(2 * CHUNK + 99)
    with WrongServer(behaviour()) as server:
        proc = put(server.url, gcsstream_exe, src, "--retry-deadline 20 --json")
        assert proc.returncode == 0, proc.stderr.decode()
        assert server.read_object(BUCKET, "obj") == data
        assert json.loads(proc.stdout)["bytes"] == len(data)
        assert not server.deleted
        assert server.requests[-1].headers.get("content-range") == "bytes */*"  # asked the session


class NoSizeWhenEmpty(Behaviour):
    """Omits ``size`` from a 0-byte object's resource, as Google's storage-testbench does."""

    def finalize(self, request, session):
        reply = super().finalize(request, session)
        resource = json.loads(reply.body)  # type: ignore[arg-type]
        if resource["size"] == "0":
            del resource["size"]
        return Reply.json(200, resource)


def test_an_empty_object_without_size_is_accepted(gcsstream_exe, source):
    src, _ = source(0)
    with WrongServer(NoSizeWhenEmpty()) as server:
        proc = put(server.url, gcsstream_exe, src, "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        assert json.loads(proc.stdout)["bytes"] == 0
        assert server.read_object(BUCKET, "obj") == b"" and not server.deleted


class FinishedByAnother(Behaviour):
    """Another writer finishes the session (with other bytes) while we are on chunk 2."""

    def session_put(self, request, session):
        if session.finished is None and len(session.data) >= CHUNK:
            session.finished = self.server.store(session.bucket, session.resource, b"theirs")
        return super().session_put(request, session)


def test_an_upload_finished_by_another_writer_is_reported_and_not_deleted(gcsstream_exe, source):
    src, _ = source(4 * CHUNK)
    with WrongServer(FinishedByAnother()) as server:
        proc = put(server.url, gcsstream_exe, src, "--retry-deadline 5")
        err = proc.stderr.decode()
        assert proc.returncode == 3, err
        generation = server.objects[(BUCKET, "obj")][1]["generation"]
        assert f"gs://{BUCKET}/obj#{generation} was not created by this run" in err
        assert server.read_object(BUCKET, "obj") == b"theirs" and not server.deleted


class FinishedWithMalformedGeneration(Behaviour):
    def finalize(self, request, session):
        super().finalize(request, session)
        session.finished = {**session.finished, "generation": "abc"}
        return Reply.json(200, session.finished)


def test_status_of_a_finished_session_with_a_malformed_field_is_a_clear_error(gcsstream_exe, source):
    src, _ = source(CHUNK)
    with WrongServer(FinishedWithMalformedGeneration()) as server:
        put(server.url, gcsstream_exe, src)  # finishes (exit 3: the generation is malformed)
        (session_id,) = server.sessions
        uri = server.session_url(session_id)
        proc = subprocess.run([gcsstream_exe, "status", uri], capture_output=True, timeout=60)
        err = proc.stderr.decode()
        assert proc.returncode == 3, err
        assert "malformed generation" in err and "internal error" not in err


@pytest.mark.parametrize("command", ["status", "resume", "abort"])
def test_commands_by_id_refuse_a_state_directory_others_may_write(gcsstream_exe, tmp_path, command):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    env = {**os.environ, "GCSSTREAM_STATE_DIR": str(shared)}
    proc = subprocess.run([gcsstream_exe, command, "deadbeef"], env=env, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "is writable by other users" in err
    assert list(shared.iterdir()) == []  # no lock file was made in it
