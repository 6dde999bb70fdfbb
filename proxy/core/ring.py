"""A byte stream from one process to another through a shared buffer (no I/O).

The proxy writes recwire items (proxy/core/recwire.py) into it and the recording process
reads them. A socketpair did the same with two kernel copies per byte, and the proxy had to
hold every chunk until a shipper thread sent it; measured on TLS bulk, holding them alone
cost the proxy 0.4-0.9 CPU s per GB in page faults and wake-ups. Here the forwarding thread
copies the chunk in and drops it at once.

One producer and one consumer. Each end is used by one thread at a time: the proxy's
threads serialise theirs with a lock. Layout of the buffer,
native byte order (both ends are this program on this machine):

    offset   0  head     u64  bytes ever put; only the producer stores it
    offset  64  tail     u64  bytes ever taken; only the consumer stores it
    offset  72  waiting  u64  1 while the consumer sleeps, or is about to
    offset 128  data     `capacity` bytes; byte n of the stream sits at n % capacity

head and tail sit on separate cache lines, so each process stores only to its own. Items
are put whole or not at all, so the consumer never sees half an item.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from mmap import mmap

HEADER = 128
_HEAD, _TAIL, _WAITING = 0, 8, 9  # indexes of the header seen as u64s
_Buffer = bytes | bytearray | memoryview


class _ThreadFences(threading.local):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()


_FENCES = _ThreadFences()


class RingError(ValueError):
    """The ring was given a buffer or an item it cannot hold."""


class ByteRing:
    """Either end of the ring over `buffer` (an mmap, or a bytearray in tests)."""

    def __init__(self, buffer: bytearray | mmap) -> None:
        view = memoryview(buffer)
        if len(view) <= HEADER:
            raise RingError(f"a ring needs more than {HEADER} bytes, got {len(view)}")
        self.capacity = len(view) - HEADER
        self._counters = view[:HEADER].cast("Q")
        self._data = view[HEADER:]
        self._head = self._counters[_HEAD]  # each end caches the counter it alone stores
        self._tail = self._counters[_TAIL]

    @staticmethod
    def fence() -> None:
        """Order the memory accesses before it against those after it, for the other
        process too. The counters are read and stored through a memoryview cast to "Q":
        CPython moves an aligned 8-byte item with one load or store, so it is never seen
        torn. x86-64 keeps stores in order and loads in order, so a consumer that sees a new
        head also sees the bytes before it; weaker CPUs (arm64) may reorder. A lock release
        followed by an acquire orders what comes before it against what comes after: each
        thread has its own lock, always held, for that."""
        lock = _FENCES.lock
        lock.release()
        lock.acquire()

    @staticmethod
    def size_for(capacity: int) -> int:
        """The buffer size for a ring of `capacity` data bytes."""
        return HEADER + capacity

    def used(self) -> int:
        """Bytes put and not yet taken (either end)."""
        return self._counters[_HEAD] - self._counters[_TAIL]

    # -- the producer -------------------------------------------------------------------------
    def put(self, parts: Sequence[_Buffer]) -> bool:
        """Copy the parts in as one item and publish it; False, and nothing put, when the
        ring lacks room now. An item larger than the ring could never go in: an error."""
        size = sum(len(p) for p in parts)
        if size > self.capacity:
            raise RingError(f"an item of {size} bytes cannot fit a {self.capacity}-byte ring")
        head = self._head
        if self.capacity - (head - self._counters[_TAIL]) < size:
            return False
        self.fence()  # the consumer is done reading the bytes we now overwrite
        for part in parts:
            self._copy_in(head, part)
            head += len(part)
        self.fence()  # the bytes are in place before the consumer can see the new head
        self._counters[_HEAD] = self._head = head
        return True

    def consumer_waiting(self) -> bool:
        self.fence()  # the head we stored is seen before we look (see set_waiting)
        return self._counters[_WAITING] != 0

    def _copy_in(self, at: int, part: _Buffer) -> None:
        data, cap, size = self._data, self.capacity, len(part)
        start = at % cap
        if start + size <= cap:
            data[start : start + size] = part
            return
        first = cap - start  # wraps round to the start
        view = memoryview(part)
        data[start:] = view[:first]
        data[: size - first] = view[first:]

    # -- the consumer -------------------------------------------------------------------------
    def readable(self) -> int:
        """Bytes published and not yet taken."""
        n = self._counters[_HEAD] - self._tail
        self.fence()  # read the bytes only after the head that covers them
        return n

    def peek(self, n: int) -> bytes:
        """The next `n` bytes, left in the ring (check readable() first)."""
        return self._copy_out(self._tail, n)

    def take(self, n: int) -> bytes:
        """The next `n` bytes, taken out: their room goes back to the producer."""
        out = self._copy_out(self._tail, n)
        self.skip(n)
        return out

    def skip(self, n: int) -> None:
        self.fence()  # done reading before the producer may overwrite
        self._tail += n
        self._counters[_TAIL] = self._tail

    def set_waiting(self, waiting: bool) -> None:
        """Say the consumer is about to sleep, then look at the ring once more. With a full
        fence on both sides (store, fence, load) either the producer sees the flag and
        rings, or the consumer sees the item: it never sleeps on an item unannounced."""
        self._counters[_WAITING] = int(waiting)
        self.fence()

    def release(self) -> None:
        """Let go of the buffer (an mmap cannot close while views of it live)."""
        self._counters.release()
        self._data.release()

    def _copy_out(self, at: int, n: int) -> bytes:
        data, cap = self._data, self.capacity
        start = at % cap
        if start + n <= cap:
            return bytes(data[start : start + n])
        first = cap - start
        return bytes(data[start:]) + bytes(data[: n - first])  # wraps round


__all__ = ["HEADER", "ByteRing", "RingError"]
