"""Errors shared by the interpreter, the generated code and the public API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecodeError:
    """Why a body could not be decoded: where (byte offset, field path) and what."""

    offset: int
    path: str
    reason: str

    def __str__(self) -> str:
        where = f" in {self.path}" if self.path else ""
        return f"offset {self.offset}{where}: {self.reason}"


class Malformed(Exception):  # an internal signal, turned into DecodeError by the API
    """Raised inside decoders; the public API turns it into a DecodeError."""

    def __init__(self, offset: int, path: str, reason: str) -> None:
        super().__init__(offset, path, reason)
        self.error = DecodeError(offset, path, reason)


class EncodeError(ValueError):
    """Values given to an encoder do not fit the message's definition."""


def covered_bytes(regions: list[tuple[int, int]]) -> int:
    """Bytes covered by the union of [start, end) regions."""
    total, reach = 0, 0
    for start, end in sorted(regions):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total
