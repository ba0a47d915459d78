"""What a source does to the descriptor it reads, beyond reading it."""

from __future__ import annotations

import fcntl
import os

from gcsstream.sources import PIPE_BUFFER, StreamSource, read_full_into


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


class _Trickle:
    """A raw stream that hands out at most ``step`` bytes per call, as a pipe may."""

    def __init__(self, data: bytes, step: int, readinto: bool = True) -> None:
        self.data, self.step, self.at = data, step, 0
        if not readinto:
            self.readinto = None  # type: ignore[assignment]

    def read(self, n: int) -> bytes:
        piece = self.data[self.at : self.at + min(n, self.step)]
        self.at += len(piece)
        return piece

    def readinto(self, buffer: memoryview) -> int:
        piece = self.read(len(buffer))
        buffer[: len(piece)] = piece
        return len(piece)


def test_read_full_into_fills_the_buffer_across_short_reads_and_stops_at_the_end():
    data = os.urandom(10_000)
    for has_readinto in (True, False):  # a caller's file object may have read() only
        source = StreamSource(_Trickle(data, 777, has_readinto), "stream")  # type: ignore[arg-type]
        buffer = bytearray(b"\xff" * 4096)
        got = []
        while n := read_full_into(source, memoryview(buffer)):
            got.append(bytes(buffer[:n]))
        assert [len(g) for g in got] == [4096, 4096, 1808], has_readinto
        assert b"".join(got) == data


def test_read_full_into_copies_from_a_source_without_readinto():
    class Chunks:
        size = None
        description = "chunks"

        def __init__(self) -> None:
            self.pieces = [b"ab", b"cde", b""]

        def read(self, n: int) -> bytes:
            return self.pieces.pop(0)

    buffer = bytearray(8)
    assert read_full_into(Chunks(), memoryview(buffer)) == 5  # type: ignore[arg-type]
    assert buffer[:5] == b"abcde"
