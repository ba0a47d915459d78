"""Keep credentials (and terminal control characters) out of everything gcsstream prints or logs.

A session URI is a bearer credential (whoever has it can write the object) and so is an access
token. Every message and every log record passes through ``redact`` on its way out.
"""

from __future__ import annotations

import re

_PATTERNS = (
    (re.compile(r"(upload_id=)[^&\s\"'<>]+", re.IGNORECASE), r"\1REDACTED"),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1REDACTED"),
    (re.compile(r"(access_token[\"'=:\s]+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1REDACTED"),
    (re.compile(r"\bya29\.[A-Za-z0-9._~+/=-]+"), "ya29.REDACTED"),
)


def redact(text: str) -> str:
    """``text`` with session ids and tokens replaced by REDACTED."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that a journal or a server's answer cannot
    drive the terminal it is printed on."""
    return "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text
    )
