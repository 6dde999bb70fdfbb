"""The byte format between the proxy and its recording process (no I/O).

The proxy hands the recording process what its worker needs: each relayed chunk (connection,
time, direction, bytes) and the few control items per connection (open, close, error, link
events). Chunks get a fixed binary header so the proxy's side does no per-byte Python work;
control items are pickled (both ends are this program, over a private socketpair). The
recording process answers with reports (a session learnt, an archive opened, a failure),
framed as control items.

    chunk:   b"D" conn:u64 time:f64 direction:u8 (0 c2s, 1 s2c) length:u32, then the bytes
    control: b"P" length:u32, then a pickle of the item tuple
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from typing import Any

CHUNK = struct.Struct("<cQdBI")
CONTROL = struct.Struct("<cI")
DIRECTIONS = ("c2s", "s2c")
_DIRECTION_CODE = {"c2s": 0, "s2c": 1}
_CHUNK_TAG, _CONTROL_TAG = b"D", b"P"


class WireError(ValueError):
    """The stream is not what this module writes (a bug or a foreign writer)."""


def chunk_header(conn: int, t: float, direction: str, length: int) -> bytes:
    return CHUNK.pack(_CHUNK_TAG, conn, t, _DIRECTION_CODE[direction], length)


def control(item: tuple[Any, ...]) -> bytes:
    """A control item to the recording process, or a report back from it."""
    body = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return CONTROL.pack(_CONTROL_TAG, len(body)) + body


class ItemParser:
    """Bytes in, item tuples out (the tuples proxy.recorder handles, or reports), from a
    growable buffer that a socket reads straight into (recv_into: one copy fewer)."""

    def __init__(self, size: int = 4 << 20) -> None:
        self.buf = bytearray(size)
        self.start = 0  # first unparsed byte
        self.end = 0  # one past the last received byte
        self.wanted = 0  # the size of the frame being waited for

    def space(self, want: int = 64 * 1024) -> memoryview:
        """Where to receive next: room for `want` bytes and for the whole frame being waited
        for, moving the unparsed tail first. Release the view before the next call."""
        want = max(want, self.wanted - (self.end - self.start))
        if self.start == self.end:
            self.start = self.end = 0
        if len(self.buf) - self.end < want:
            tail = self.end - self.start
            if self.start:
                self.buf[:tail] = self.buf[self.start : self.end]
                self.start, self.end = 0, tail
            if len(self.buf) - self.end < want:
                self.buf.extend(bytes(want - (len(self.buf) - self.end)))
        return memoryview(self.buf)[self.end :]

    def received(self, n: int) -> None:
        self.end += n

    def pending(self) -> int:
        return self.end - self.start

    def items(self) -> Iterator[tuple[Any, ...]]:
        buf, view = self.buf, memoryview(self.buf)
        try:
            while True:
                start, avail = self.start, self.end - self.start
                if avail < CONTROL.size:
                    return
                tag = buf[start : start + 1]
                if tag == _CHUNK_TAG:
                    if avail < CHUNK.size:
                        return
                    _t, conn, t, code, length = CHUNK.unpack_from(buf, start)
                    begin = start + CHUNK.size
                    if self.end - begin < length:
                        self.wanted = CHUNK.size + length
                        return
                    data = bytes(view[begin : begin + length])
                    self.start = begin + length
                    yield ("data", conn, t, DIRECTIONS[code], data)
                elif tag == _CONTROL_TAG:
                    _t, length = CONTROL.unpack_from(buf, start)
                    begin = start + CONTROL.size
                    if self.end - begin < length:
                        self.wanted = CONTROL.size + length
                        return
                    item = pickle.loads(view[begin : begin + length])
                    self.start = begin + length
                    yield tuple(item)
                else:
                    raise WireError(f"unknown item tag {bytes(tag)!r} at byte {start}")
        finally:
            view.release()


__all__ = [
    "DIRECTIONS",
    "ItemParser",
    "WireError",
    "chunk_header",
    "control",
]
