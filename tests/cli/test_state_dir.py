"""The state directory is not trusted blindly: it must be the user's own and private, journal
files that are not well-formed entries of the user's are skipped with one warning each, links
are never followed, and what is printed from a journal is escaped."""

# ruff: noqa: F811 - the fixtures imported from test_resume are taken as arguments

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from gcsstream.journal import MAX_ENTRY_BYTES
from tests.cli.test_resume import (  # noqa: F401 - fixtures
    BUCKET,
    CHUNK,
    env,
    finish,
    gcs,
    interrupted_put,
    last_seq,
    reap_processes,
    server,
    spawn,
)
from tests.conftest import assert_stored, unstamped
from tests.gcs_test_server import GcsTestServer

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def run(args: list[str], env, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["gcsstream", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_group_or_world_writable_state_directory_is_refused(env, tmp_path, state_dir):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 100)
    state_dir.mkdir(mode=0o700)
    state_dir.chmod(0o777)
    r = run(["put", str(src), f"gs://{BUCKET}/o"], env)
    assert r.returncode == 2, r.stderr
    assert f"fix it with `chmod 700 {state_dir}`" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert run(["sessions"], env).returncode == 2
    state_dir.chmod(0o720)
    assert run(["put", str(src), f"gs://{BUCKET}/o"], env).returncode == 2
    state_dir.chmod(0o700)  # the fix works
    assert run(["put", str(src), f"gs://{BUCKET}/o"], env).returncode == 0


@as_root
def test_a_state_directory_of_another_user_is_refused_with_the_chown(env, tmp_path):
    """Run as ``nobody`` (setpriv) with a state directory that root owns and nobody may enter."""
    shared = Path(tempfile.mkdtemp(prefix="gcsstream-state-"))
    try:
        shared.chmod(0o755)
        state = shared / "state"
        state.mkdir(mode=0o755)
        r = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "gcsstream", "sessions"],
            env={**env, "GCSSTREAM_STATE_DIR": str(state)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert f"belongs to uid 0, not to you: fix it with `chown {NOBODY} {state}`" in r.stderr, r.stderr
    finally:
        shutil.rmtree(shared)


def test_created_directories_are_private_whatever_the_umask(env, tmp_path):
    state = tmp_path / "a" / "b" / "state"
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    proc = spawn(
        ["sh", "-c", f'umask 000; exec gcsstream put "{src}" gs://{BUCKET}/umask'],
        {**env, "GCSSTREAM_STATE_DIR": str(state)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    code, _, err = finish(proc)
    assert code == 0, err
    for directory in (tmp_path / "a", tmp_path / "a" / "b", state):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_a_link_at_the_write_probe_is_not_followed(server, env, tmp_path, state_dir):
    """The probe's name has the process id in it: a shell plants the link under its own pid and
    then becomes gcsstream (exec keeps the pid)."""
    state_dir.mkdir(mode=0o700)
    target = tmp_path / "elsewhere" / "created-by-gcsstream"
    target.parent.mkdir()
    src = tmp_path / "f.bin"
    data = os.urandom(1000)
    src.write_bytes(data)
    proc = spawn(
        [
            "sh",
            "-c",
            f'ln -s "{target}" "{state_dir}/.probe.$$" && exec gcsstream put "{src}" gs://{BUCKET}/probe',
        ],
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    code, _, err = finish(proc)
    assert code == 0, err
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    assert_stored(server, BUCKET, "probe", data)


@as_root
def test_a_journal_planted_by_another_user_is_ignored(server, env, tmp_path, state_dir):
    """A journal owned by another uid, naming the victim's file and destination, with its session
    on the planter's host: the victim's put warns once and uploads to the real endpoint."""
    src = tmp_path / "victim.bin"
    data = os.urandom(2 * CHUNK + 1)
    src.write_bytes(data)
    state_dir.mkdir(mode=0o700)
    info = src.stat()
    with GcsTestServer(data_dir=tmp_path / "planter", buckets=[BUCKET]) as planter:
        planted = state_dir / "0badf00d.json"
        planted.write_text(
            json.dumps(
                {
                    "id": "0badf00d",
                    "session_uri": f"{planter.url}/upload/storage/v1/b/{BUCKET}/o?upload_id=x",
                    "destination": f"gs://{BUCKET}/victim",
                    "endpoint": planter.url,
                    "resource": {"name": "victim", "contentType": "application/octet-stream"},
                    "chunk_size": CHUNK,
                    "checksum": "none",
                    "source": {
                        "kind": "file",
                        "path": str(src),
                        "size": info.st_size,
                        "mtime_ns": info.st_mtime_ns,
                    },
                }
            )
        )
        os.chown(planted, NOBODY, NOBODY)
        code, _, err = finish(gcs(f"put --chunk-size {CHUNK} {src} gs://{BUCKET}/victim", env))
        assert code == 0, err
        warnings = [line for line in unstamped(err).splitlines() if line.startswith("gcsstream: warning:")]
        assert warnings == [
            f"gcsstream: warning: the journal {planted} is not used: it belongs to uid {NOBODY}, not to you"
        ]
        assert "continuing" not in err
        assert last_seq(planter) == 0  # neither the file nor the token went there
    assert_stored(server, BUCKET, "victim", data)


def write_entry(path: Path, good: dict, **changes) -> None:
    path.write_text(json.dumps({**good, **changes}))


def test_damaged_or_hostile_journal_files_are_skipped_one_warning_each(server, env, tmp_path, state_dir):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(2 * CHUNK + 1))
    good = interrupted_put(server, env, src, "good")
    good_file = state_dir / f"{good['id']}.json"
    good_data = json.loads(good_file.read_text())
    gone_uri = good_data["session_uri"].split("upload_id=")[0] + "upload_id=unknown"
    bad = {}
    bad["wrong type"] = state_dir / "0000000a.json"
    write_entry(bad["wrong type"], good_data, id="0000000a", persisted="lots")
    bad["a list"] = state_dir / "0000000b.json"
    bad["a list"].write_text("[1, 2]")
    bad["a FIFO"] = state_dir / "0000000c.json"
    os.mkfifo(bad["a FIFO"], 0o600)
    bad["a link to /dev/zero"] = state_dir / "0000000d.json"
    bad["a link to /dev/zero"].symlink_to("/dev/zero")
    bad["an id that is a path"] = state_dir / "0000000e.json"
    write_entry(bad["an id that is a path"], good_data, id="../../x", session_uri=gone_uri)
    # prune must never delete the good entry's file because this one claims its id
    bad["another file's id"] = state_dir / "0000000f.json"
    write_entry(bad["another file's id"], good_data, session_uri=gone_uri)
    bad["too large"] = state_dir / "00000010.json"
    write_entry(
        bad["too large"], good_data, id="00000010", resource={"name": "good", "x": "y" * MAX_ENTRY_BYTES}
    )
    bad["session elsewhere"] = state_dir / "00000011.json"
    write_entry(bad["session elsewhere"], good_data, id="00000011", session_uri="https://attacker.example/u")
    bad["not an id"] = state_dir / "not-an-id.json"
    write_entry(bad["not an id"], good_data, id="not-an-id")
    bad["not JSON"] = state_dir / "00000012.json"
    bad["not JSON"].write_bytes(b"\x00\xff{")
    # a valid entry whose destination holds terminal escapes: listed, escaped
    escaped = state_dir / "00000013.json"
    write_entry(
        escaped, good_data, id="00000013", destination=f"gs://{BUCKET}/\x1b[31mred", session_uri=gone_uri
    )

    r = run(["sessions"], env)
    assert r.returncode == 0, r.stderr
    assert good["id"] in r.stdout and "00000013" in r.stdout
    assert "\x1b" not in r.stdout and "\\x1b[31mred" in r.stdout
    assert len(r.stdout.splitlines()) == 3  # the header and the two valid entries
    warnings = unstamped(r.stderr).splitlines()
    assert len(warnings) == len(bad), r.stderr
    for path in bad.values():
        assert sum(f"the journal {path} is not used" in w for w in warnings) == 1, (path, r.stderr)
    assert all(w.startswith("gcsstream: warning: ") for w in warnings)
    assert "\x1b" not in r.stderr

    # put of an unrelated file is unaffected
    other = tmp_path / "other.bin"
    other_data = os.urandom(CHUNK + 5)
    other.write_bytes(other_data)
    code, _, err = finish(gcs(f"put --chunk-size {CHUNK} {other} gs://{BUCKET}/other", env))
    assert code == 0, err
    assert_stored(server, BUCKET, "other", other_data)

    # prune forgets the gone valid entry (its own file only) and keeps everything else
    r = run(["sessions", "--prune"], env)
    assert r.returncode == 0, r.stderr
    assert "forgot 00000013" in r.stderr
    left = {p.name for p in state_dir.iterdir()} - {"finished"}  # the record of the upload above
    assert left == {good_file.name, f"{good['id']}.lock"} | {p.name for p in bad.values()}, left
    assert json.loads(good_file.read_text()) == good_data
