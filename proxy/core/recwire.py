"""The byte format between the proxy and its recording process (no I/O).

The proxy hands the recording process what its worker needs: each relayed chunk (connection,
time, direction, bytes) and the few control items per connection (open, close, error, link
events). Chunks get a fixed binary header so the proxy's side does no per-byte Python work;
control items are pickled (both ends are this program). Items go through a ring in shared
memory (proxy/core/ring.py, read by ring_items). The recording process answers over a
socketpair with reports (a session learnt, an archive opened, a failure), framed as
control items (read by ItemParser).

    chunk:   b"D" conn:u64 time:f64 direction:u8 (0 c2s, 1 s2c) length:u32, then the bytes
    control: b"P" length:u32, then a pickle of the item tuple
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from typing import Any

from proxy.core.ring import ByteRing

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
    """Bytes in, control items out (the recording process's reports), from a growable
    buffer that a socket reads straight into (recv_into: one copy fewer)."""

    def __init__(self, size: int = 64 * 1024) -> None:
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
        buf = self.buf
        while self.end - self.start >= CONTROL.size:
            start = self.start
            tag, length = CONTROL.unpack_from(buf, start)
            if tag != _CONTROL_TAG:
                raise WireError(f"unknown item tag {tag!r} at byte {start}")
            begin = start + CONTROL.size
            if self.end - begin < length:
                self.wanted = CONTROL.size + length
                return
            with memoryview(buf) as view:
                item = pickle.loads(view[begin : begin + length])
            self.start = begin + length
            yield tuple(item)


def ring_items(ring: ByteRing, views: bool = False) -> Iterator[tuple[Any, ...]]:
    """The whole items readable in the ring, each taken out as it is read (the producer
    puts items whole: a partial one means a writer that is not ours). views=True: a chunk's
    bytes come as a view into the ring, valid until the next item is asked for (their room
    then goes back to the producer): the consumer copies what it keeps."""
    while True:
        avail = ring.readable()
        if not avail:
            return
        tag = ring.peek(1)
        if tag == _CHUNK_TAG:
            _check(avail, CHUNK.size, "chunk header")
            _t, conn, t, code, length = CHUNK.unpack(ring.peek(CHUNK.size))
            _check(avail, CHUNK.size + length, "chunk")
            ring.skip(CHUNK.size)
            if not views:
                yield ("data", conn, t, DIRECTIONS[code], ring.take(length))
                continue
            data = ring.view(length)
            try:
                yield ("data", conn, t, DIRECTIONS[code], data)
            finally:
                if isinstance(data, memoryview):
                    data.release()
            ring.skip(length)
        elif tag == _CONTROL_TAG:
            _check(avail, CONTROL.size, "control header")
            _t, length = CONTROL.unpack(ring.peek(CONTROL.size))
            _check(avail, CONTROL.size + length, "control item")
            ring.skip(CONTROL.size)
            yield tuple(pickle.loads(ring.take(length)))
        else:
            raise WireError(f"unknown item tag {tag!r} in the ring")


def _check(avail: int, needed: int, what: str) -> None:
    if avail < needed:
        raise WireError(f"a partial {what} in the ring: {avail} of {needed} bytes")


__all__ = [
    "DIRECTIONS",
    "ItemParser",
    "WireError",
    "chunk_header",
    "control",
    "ring_items",
]
