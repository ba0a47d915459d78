"""What a source does to the descriptor it reads, beyond reading it."""

from __future__ import annotations

import fcntl
import os

from gcsstream.sources import PIPE_BUFFER, StreamSource


def test_a_pipe_read_gets_a_wider_buffer_and_its_bytes_intact():
    r, w = os.pipe()
    assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < PIPE_BUFFER  # Linux's default, 64 KiB
    with os.fdopen(r, "rb") as stream:
        source = StreamSource(stream, "stdin")
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) >= PIPE_BUFFER
        os.write(w, b"x" * 100_000)  # more than the old buffer held: a write that no longer blocks
        os.close(w)
        assert source.read(200_000) + source.read(200_000) == b"x" * 100_000


def test_a_regular_file_is_left_as_it_is(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with open(path, "rb") as stream:
        source = StreamSource(stream, "f")
        assert source.size == 3 and source.read(10) == b"abc"
