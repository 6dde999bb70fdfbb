"""Helpers that generated dissector modules import; kept tiny so generated code stays flat."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from dissectors.errors import Malformed

U32 = struct.Struct("<I")

# A schema entry describes one member for renderers (names of enums, flags and structs):
# ("field", name, type, array, pointer) or ("switch", name, anon, (entries of its cases)).
SchemaEntry = tuple[Any, ...]


def short(pos: int, size: int, end: int, path: str) -> Malformed:
    return Malformed(pos, path, f"needs {size} bytes, {max(end - pos, 0)} left")


def bad_pointer(pos: int, offset: int, end: int, path: str) -> Malformed:
    if offset == 0:
        return Malformed(pos, path, "NULL pointer in a field that must not be NULL")
    return Malformed(pos, path, f"pointer {offset} is past the end ({end})")


def bad_count(pos: int, count: int, path: str) -> Malformed:
    return Malformed(pos, path, f"array of {count} items does not fit the message")


def no_nul(pos: int, path: str) -> Malformed:
    return Malformed(pos, path, "string has no terminating NUL")


class Writer:
    """Output of generated encoders: the fixed part, then pointed-to data, breadth first."""

    __slots__ = ("out", "pending")

    def __init__(self) -> None:
        self.out = bytearray()
        self.pending: deque[tuple[int, Callable[[Writer, Any], None], Any]] = deque()

    def pointer(self, encode: Callable[[Writer, Any], None], value: Any) -> None:
        self.pending.append((len(self.out), encode, value))
        self.out += b"\0\0\0\0"

    def finish(self) -> bytes:
        while self.pending:
            patch, encode, value = self.pending.popleft()
            U32.pack_into(self.out, patch, len(self.out))
            encode(self, value)
        return bytes(self.out)
