"""The pieces of ``--parallel`` that need no server: CRC32C combination, part and temporary
names, the compose and list URLs, the options refused."""

from __future__ import annotations

import os
import random

import google_crc32c
import pytest

from gcsstream.checksums import crc32c_combine
from gcsstream.errors import UsageError
from gcsstream.options import (
    DEFAULT_PART_SIZE,
    ObjectURL,
    ParallelOptions,
    UploadOptions,
    check_part_size,
)
from gcsstream.parallel import _PartBytes
from gcsstream.session import compose_url, list_url


@pytest.mark.parametrize(("a", "b"), [(0, 0), (0, 9), (9, 0), (1, 1), (1000, 333), (262144, 1 << 20)])
def test_crc32c_combine_equals_the_crc32c_of_the_concatenation(a, b):
    rng = random.Random(a * 7 + b)
    first, second = rng.randbytes(a), rng.randbytes(b)
    combined = crc32c_combine(google_crc32c.value(first), google_crc32c.value(second), len(second))
    assert combined == google_crc32c.value(first + second)


@pytest.mark.parametrize("length", [(1 << 29) - 1, 1 << 29, (1 << 31) + 5])
def test_crc32c_combine_holds_for_sources_of_512mib_and_more(length):
    # Found by the 1 GiB parallel resume: the table of x^(2^k) wrapped at 32 entries as zlib's
    # does, which is wrong for Castagnoli's polynomial from 2^32 bits on, so a composed object
    # of 512 MiB sources (a tree above 32 parts of 16 MiB; of 64 MiB parts above 2 GiB) was
    # judged wrong and deleted. The reference hashes the bytes: random head, zeros after.
    head, first = random.Random(length).randbytes(1000), b"the bytes before"
    zeros = bytes(1 << 24)

    def crc_of(start: int) -> int:  # CRC32C of head + zeros, up to ``length`` bytes, after ``start``
        crc = google_crc32c.extend(start, head)
        left = length - len(head)
        while left:
            crc = google_crc32c.extend(crc, zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))
        return crc

    whole = crc_of(google_crc32c.value(first))
    assert crc32c_combine(google_crc32c.value(first), crc_of(0), length) == whole


def test_crc32c_combine_folds_many_parts():
    parts = [os.urandom(n) for n in (5, 262144, 0, 77, 1 << 16)]
    crc = 0
    for part in parts:
        crc = crc32c_combine(crc, google_crc32c.value(part), len(part))
    assert crc == google_crc32c.value(b"".join(parts))


def test_temporary_names_are_under_the_destination():
    dest = ObjectURL("b", "backups/db.dump")
    assert dest.parts_prefix("abc123") == "backups/db.dump.gcsstream-parts/abc123/"
    assert dest.temporary("abc123", "000042") == ObjectURL(
        "b", "backups/db.dump.gcsstream-parts/abc123/000042"
    )
    with pytest.raises(UsageError):
        ObjectURL("b", "x" * 1000).temporary("abc123", "000042")


def test_compose_and_list_urls():
    dest = ObjectURL("my-bucket", "a b/c")
    assert compose_url("https://e", dest) == "https://e/storage/v1/b/my-bucket/o/a%20b%2Fc/compose"
    assert compose_url("https://e", dest, if_generation_match=0, kms_key="k/1", user_project="p") == (
        "https://e/storage/v1/b/my-bucket/o/a%20b%2Fc/compose?ifGenerationMatch=0&kmsKeyName=k%2F1&userProject=p"
    )
    assert list_url("https://e", "my-bucket", "a b/", page_token="t") == (
        "https://e/storage/v1/b/my-bucket/o?prefix=a+b%2F&pageToken=t"
    )


def test_parallel_options():
    assert ParallelOptions().parallel == 1 and ParallelOptions().part_size == DEFAULT_PART_SIZE == 64 << 20
    for bad in (0, -1, 65):
        with pytest.raises(UsageError, match="--parallel must be between 1 and 64"):
            ParallelOptions(bad)
    with pytest.raises(UsageError, match="part size 100000 is not a positive multiple of 256 KiB"):
        check_part_size(100_000)
    with pytest.raises(UsageError, match="no MD5"):
        ParallelOptions(2).check(UploadOptions(checksum="md5"))
    ParallelOptions(2).check(UploadOptions(checksum="crc32c"))


def test_progress_shows_the_parts_in_flight():
    from gcsstream.events import ChunkPersisted, PartFinished, PartStarted, UploadStarted
    from gcsstream.progress import ProgressState

    state = ProgressState("gs://b/o")
    assert state.parts() == ""  # one stream: nothing about parts
    state.record(UploadStarted("gs://b/o", None, 1 << 20))
    for index in range(3):
        state.record(PartStarted(index, index << 20, 1 << 20))
    state.record(PartFinished(0, 1 << 20))
    state.record(ChunkPersisted(3 << 19, 3 << 20, None))
    assert state.parts() == ", parts: 2 in flight, 1 stored"
    assert state.snapshot()[0] == 3 << 19


def _part_of(*sizes: int) -> _PartBytes:
    data = _PartBytes()
    for i, size in enumerate(sizes):
        data.add(bytes([i]) * size, f"buffer{i}")  # type: ignore[arg-type]
    return data


def test_a_part_gives_back_the_pieces_the_service_confirmed_of_what_it_sent():
    data = _part_of(16, 16, 16, 5)
    assert data.confirmed(16) == []  # nothing sent yet: a Range alone frees nothing
    data.sending(0)
    assert data.confirmed(8) == []  # inside the first piece: it may be sent again from byte 8
    assert data.whole
    assert data.confirmed(20) == ["buffer0"]
    assert not data.whole  # the part can no longer be sent again from its start
    assert data.confirmed(20) == [] and data.confirmed(48) == ["buffer1", "buffer2"]
    assert data.release_all() == ["buffer3"] and data.release_all() == []


def test_a_resumed_part_keeps_the_pieces_it_only_hashed():
    # Its session held 20 bytes: the engine hashes the first 20 and sends from there. A piece
    # below that was never sent by this attempt, so it is kept (it may be being hashed still).
    data = _part_of(16, 16, 16)
    data.sending(20)
    assert data.confirmed(48) == [] and data.whole
    assert data.release_all() == ["buffer0", "buffer1", "buffer2"]
