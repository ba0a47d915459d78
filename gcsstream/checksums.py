"""Running CRC32C and MD5 of the bytes read, in the service's encoding (base64, big-endian)."""

from __future__ import annotations

import base64
import hashlib

import crc32c as _crc32c


def crc32c_extend(value: int, data: bytes | bytearray | memoryview) -> int:
    """CRC32C of the bytes so far (``value``) followed by ``data``.

    The ``crc32c`` package releases the GIL while it hashes a large buffer (google-crc32c holds
    it), so the reader's hashing overlaps the sender's work, and it takes views without a copy.
    """
    return _crc32c.crc32c(data, value)


_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reflected


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the polynomial, both reflected (zlib's multmodp)."""
    m = 1 << 31
    product = 0
    while True:
        if a & m:
            product ^= b
            if not a & (m - 1):
                return product
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> list[int]:
    # x^(2^k) for every bit of a 64-bit length in bits. zlib wraps its table at 32 entries, which
    # holds for its polynomial only: for Castagnoli's, a wrapped table is wrong from 512 MiB on.
    table, p = [], 1 << 30  # x^1
    for _ in range(67):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _powers()  # x^(2^k) modulo the polynomial, k < 67


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of A+B from CRC32C(A), CRC32C(B) and len(B), without the bytes (zlib's
    crc32_combine for the Castagnoli polynomial): how the parts of a parallel upload are checked
    against the whole stream and each composed object against its sources."""
    p, k, n = 1 << 31, 3, len2  # x^0; 2^3 bits per byte
    while n:
        if n & 1:
            p = _multmodp(_X2N[k], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def encode_crc32c(value: int) -> str:
    """The service's form of a CRC32C: base64 of its four big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def decode_crc32c(text: str) -> int:
    return int.from_bytes(base64.b64decode(text), "big")


class Checksums:
    """CRC32C (always: resume needs it, and it costs little) and optionally MD5, over a stream
    of ``bytes`` chunks updated in order."""

    def __init__(self, *, md5: bool = False) -> None:
        self.crc32c = 0
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None

    def update(self, data: bytes | memoryview) -> None:
        self.crc32c = crc32c_extend(self.crc32c, data)
        if self._md5 is not None:
            self._md5.update(data)

    @property
    def crc32c_b64(self) -> str:
        return encode_crc32c(self.crc32c)

    @property
    def md5_b64(self) -> str | None:
        return None if self._md5 is None else base64.b64encode(self._md5.digest()).decode("ascii")

    def goog_hash_header(self, *, crc32c: bool = True, md5: bool = False) -> str | None:
        """The ``X-Goog-Hash`` value that makes the service refuse a corrupted final object."""
        parts = []
        if crc32c:
            parts.append(f"crc32c={self.crc32c_b64}")
        if md5 and self.md5_b64 is not None:
            parts.append(f"md5={self.md5_b64}")
        return ",".join(parts) or None
