"""Shared fixtures: real emulators on loopback, the installed command, read-back checks."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import shutil
import sys
from pathlib import Path

import google_crc32c
import pytest

from tests.emulators import EMULATOR_NAMES, start_emulator

BUCKET = "gcsstream-test"
_names = itertools.count()
#: The UTC timestamp that starts every stderr line when stderr is not a terminal.
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", re.MULTILINE)


def unstamped(text):
    """stderr text (str or bytes) without the timestamp at the start of each line."""
    if isinstance(text, bytes):
        return STAMP.sub("", text.decode()).encode()
    return STAMP.sub("", text)


def emulator_messages(stderr: bytes, emulator) -> str:
    """stderr of a run against ``emulator``, unstamped, less the one line that names the emulator
    (asserting it is there: gcsstream says once per run that the endpoint is not the service)."""
    lines = unstamped(stderr.decode()).splitlines(keepends=True)
    notice = [line for line in lines if f"answers like {emulator.name}, not like Cloud Storage" in line]
    assert len(notice) == 1, lines
    return "".join(line for line in lines if line not in notice)


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Each test has its own journal directory; nothing is written to the user's state dir."""
    directory = tmp_path / "state"
    monkeypatch.setenv("GCSSTREAM_STATE_DIR", str(directory))
    return directory


@pytest.fixture(scope="session", params=EMULATOR_NAMES)
def emulator(request, tmp_path_factory):
    """Each local emulator in turn, started once per test session and stopped at its end."""
    emu = start_emulator(request.param, tmp_path_factory.mktemp(request.param))
    emu.create_bucket(BUCKET)
    yield emu
    emu.stop()


@pytest.fixture
def object_name(request) -> str:
    """A fresh object name per test, with a folder and characters that need URL-encoding."""
    return f"tests/{request.node.name.replace('[', '-').rstrip(']')}/{next(_names)} obj.bin"


@pytest.fixture(scope="session")
def gcsstream_exe() -> str:
    """The installed console script (next to this interpreter, or on PATH)."""
    beside = Path(sys.executable).parent / "gcsstream"
    found = str(beside) if beside.exists() else shutil.which("gcsstream")
    assert found, "gcsstream is not installed: pip install -e '.[test]'"
    return found


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def assert_stored(server, bucket: str, name: str, data: bytes) -> dict:
    """Read the object back and compare bytes (sha256), size and checksums with the source."""
    stored = server.read_object(bucket, name)
    resource = server.object_resource(bucket, name)
    assert len(stored) == len(data)
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    assert int(resource["size"]) == len(data)
    assert resource["crc32c"] == crc32c_b64(data)
    return resource


def hold_a_file_upload(server, held: int) -> None:
    """Faults that leave ``put FILE`` unfinished with ``held`` bytes stored: a file goes out in
    one streamed request, of which the test server keeps ``held`` (whole 256 KiB units, less
    than the request); every later request of the upload is refused with 503 (until the faults
    are cleared), so the run ends with exit 75 when its retries run out."""
    from tests.gcs_test_server import Fault

    server.faults.add(Fault("partial", on="chunk", nth=1, persist=held))
    server.faults.add(Fault("status", status=503, on="put", nth=2, times=10_000))


def stall_a_file_upload(server, held: int, seconds: float = 300) -> None:
    """Faults that hold ``put FILE`` with ``held`` bytes stored: the test server keeps that much
    of the file's streamed request, and stalls the request that follows (``fault == "stall"``
    in its record once it has taken hold), for the test to stop the run there."""
    from tests.gcs_test_server import Fault

    server.faults.add(Fault("partial", on="chunk", nth=1, persist=held))
    server.faults.add(Fault("stall", on="put", nth=2, seconds=seconds))
