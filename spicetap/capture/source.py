"""What the format readers share: chunked input and the tally of a read."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .segment import Buffer

__all__ = [
    "CHUNK",
    "GZIP_MAGIC",
    "MAX_RECORD",
    "READ_ERRORS",
    "Gunzip",
    "Read",
    "ReadStats",
    "read_error",
    "refill",
]

CHUNK: Final = 1 << 20
"""Bytes asked of the file at a time."""
MAX_RECORD: Final = 64 << 20
"""A record or block longer than this is taken as damage, not read."""

Read = Callable[[int], bytes]
"""A file's ``read(size)``."""

GZIP_MAGIC: Final = b"\x1f\x8b"

READ_ERRORS: Final = (OSError, EOFError, zlib.error)
"""What reading a file (plain or gzip) raises when the disk or the compressed data fails."""


def read_error(name: str, offset: int, exc: BaseException) -> str:
    """The one-line problem for a read that failed near ``offset``."""
    if isinstance(exc, EOFError):
        return f"{name}: truncated compressed data near byte {offset}"
    return f"{name}: read failed near byte {offset}: {exc}"


@dataclass(slots=True)
class ReadStats:
    """The tally of one read, complete once iteration has ended."""

    frames: int = 0
    """Packets read from the file."""
    segments: int = 0
    """TCP segments yielded (the other frames were not TCP over IP, or were cut short)."""
    problem: str | None = None
    """Why reading stopped before the end of the file, one line; None if it did not."""
    unsupported: set[int] = field(default_factory=set)
    """Link types of pcapng interfaces whose packets were skipped."""


def refill(read: Read, buf: Buffer, pos: int, need: int) -> bytes:
    """``buf[pos:]`` and more from ``read``: at least ``need`` bytes unless the file ends.

    The caller's offsets into the new buffer start from 0 at the old ``pos``.
    """
    rest = buf[pos:]
    have = len(rest)
    if have >= need:
        return rest
    parts = [rest] if rest else []  # joining one part is free, two is a copy
    while have < need:
        chunk = read(max(CHUNK, need - have))
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


class Gunzip:
    """gzip data (one member or several), decompressed as it is read.

    Unlike ``gzip.GzipFile``, a read that meets the end of truncated or damaged data
    first returns every byte decompressed before it; the next read raises (EOFError when
    the data ends too soon, zlib.error when it is damaged).
    """

    def __init__(self, read: Read) -> None:
        self._read = read
        self._inflate = zlib.decompressobj(wbits=31)
        self._input = b""
        self._failed: Exception | None = None

    def read(self, size: int) -> bytes:
        if self._failed is not None:
            raise self._failed
        parts: list[bytes] = []
        have = 0
        while have < size:
            if self._inflate.eof:  # the end of a member: another, or the end
                rest = self._inflate.unused_data or self._read(CHUNK)
                if not rest.startswith(GZIP_MAGIC):
                    break
                self._inflate = zlib.decompressobj(wbits=31)
                self._input = rest
            if not self._input:
                self._input = self._read(CHUNK)
                if not self._input:
                    self._failed = EOFError("compressed data ends too soon")
                    break
            try:
                out = self._inflate.decompress(self._input, size - have)
            except zlib.error as exc:
                self._failed = exc
                break
            self._input = self._inflate.unconsumed_tail
            if out:
                parts.append(out)
                have += len(out)
        if not parts and self._failed is not None:
            raise self._failed
        return b"".join(parts)
