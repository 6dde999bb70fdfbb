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

A ring may be elastic (`hot`): big enough for a burst, but with only its first `hot` bytes
in use while the consumer keeps up. Pages of shared memory, once touched, stay resident
and cost nothing more; fresh ones cost a page fault each (measured on plain bulk: a 32 MiB
ring overflowing into the proxy's heap cost it 40-110k faults and 0.3-0.5 CPU s per GB).
So the producer goes back to the start early, once the backlog is small again: it puts a
PAD byte where the next item would start, and the next item at the start of the next lap.
The consumer, finding PAD where an item starts, skips to that lap. Items never start with
PAD. After a quiet spell the producer may give the pages past `hot` back (release_cold).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from mmap import MADV_REMOVE, PAGESIZE, mmap

HEADER = 128
PAD = 0  # at an item's start: the rest of this lap is unused
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

    def __init__(self, buffer: bytearray | mmap, hot: int | None = None) -> None:
        """`hot`: make the ring elastic (the producer's end says so; the consumer needs
        nothing to follow)."""
        view = memoryview(buffer)
        if len(view) <= HEADER:
            raise RingError(f"a ring needs more than {HEADER} bytes, got {len(view)}")
        self.capacity = len(view) - HEADER
        if hot is not None and not 0 < hot < self.capacity:
            raise RingError(f"the hot part ({hot}) must be smaller than the ring")
        self.hot = hot
        self._buffer = buffer
        self._counters = view[:HEADER].cast("Q")
        self._data = view[HEADER:]
        self._head = self._counters[_HEAD]  # each end caches the counter it alone stores
        self._tail = self._counters[_TAIL]
        # the producer's: the padding last put (counters, start and end), how far into a
        # lap it may write, and how many items went past `hot`
        self._pad = (0, 0)
        self.reach = self.capacity
        self.cold_puts = 0

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
        """Bytes of items put and not yet taken (the producer's end: padding not counted)."""
        return self._used(self._head, self._counters[_TAIL])

    def _used(self, head: int, tail: int) -> int:
        pad_start, pad_end = self._pad
        # the consumer skips a padding whole, so its tail is never inside one
        return head - tail - (pad_end - pad_start if tail < pad_end else 0)

    # -- the producer -------------------------------------------------------------------------
    def put(self, parts: Sequence[_Buffer]) -> bool:
        """Copy the parts in as one item and publish it; False, and nothing put, when the
        ring lacks room now. An item larger than the ring could never go in: an error."""
        size = sum(len(p) for p in parts)
        cap = self.capacity
        if size > cap:
            raise RingError(f"an item of {size} bytes cannot fit a {cap}-byte ring")
        if size == 0 or len(parts[0]) == 0 or parts[0][0] == PAD:
            raise RingError("an item must not be empty nor start with the PAD byte")
        head, tail = self._head, self._counters[_TAIL]
        pos = head % cap
        at = head  # where the item goes
        past_reach = pos + size > self.reach  # while the cold part is given back
        if past_reach and not pos:
            return False
        if pos:
            hot = self.hot
            early = hot is not None and pos >= hot and self._used(head, tail) <= hot // 2
            if past_reach or early:
                at = head - pos + cap  # the next lap
                if cap - (at - tail) < size:  # the padding still waits for the consumer
                    if past_reach:
                        return False
                    at = head
        if cap - (at + size - tail) < 0:
            return False
        self.fence()  # the consumer is done reading the bytes we now overwrite
        if at != head:
            self._data[pos] = PAD
            self._pad = (head, at)
        end = at
        for part in parts:
            self._copy_in(end, part)
            end += len(part)
        if self.hot is not None and (at % cap) + size > self.hot:
            self.cold_puts += 1
        self.fence()  # the bytes are in place before the consumer can see the new head
        self._counters[_HEAD] = self._head = end
        return True

    def keep_to_hot(self) -> bool:
        """Stop writing past `hot`, if everything not yet taken lies before it: True when
        the cold part may now be given back (release_cold), then reopen_cold()."""
        hot, cap = self.hot, self.capacity
        if hot is None or self.reach != cap:
            return False
        head, tail = self._head, self._counters[_TAIL]
        lap = head - head % cap
        if tail < lap or tail < self._pad[1] or head - lap > hot:
            return False
        self.reach = hot
        return True

    def release_cold(self) -> None:
        """Give the pages past `hot` back to the system (they read as zeros after). Only
        between keep_to_hot() and reopen_cold(): nothing is read or written there then.
        A bytearray buffer (tests) is zeroed instead."""
        assert self.hot is not None and self.reach == self.hot
        start = HEADER + self.hot
        if isinstance(self._buffer, mmap):
            start += -start % PAGESIZE  # madvise wants whole pages
            if start < len(self._buffer):
                self._buffer.madvise(MADV_REMOVE, start, len(self._buffer) - start)
        else:
            self._data[self.hot :] = bytes(self.capacity - self.hot)

    def reopen_cold(self) -> None:
        self.reach = self.capacity

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
        """Bytes published and not yet taken (padding further on included). Call it where
        an item starts: it skips the rest of a lap the producer left unused."""
        n = self._counters[_HEAD] - self._tail
        self.fence()  # read the bytes only after the head that covers them
        if n:
            pos = self._tail % self.capacity
            if self._data[pos] == PAD:
                self.skip(self.capacity - pos)
                n -= self.capacity - pos
        return n

    def peek(self, n: int) -> bytes:
        """The next `n` bytes, left in the ring (check readable() first)."""
        return self._copy_out(self._tail, n)

    def take(self, n: int) -> bytes:
        """The next `n` bytes, taken out: their room goes back to the producer."""
        out = self._copy_out(self._tail, n)
        self.skip(n)
        return out

    def view(self, n: int) -> bytes | memoryview:
        """The next `n` bytes, left in the ring: a view of them where they lie in one piece
        (the producer puts items whole), else a copy. Valid until skip(): then the producer
        may write over them."""
        start = self._tail % self.capacity
        if start + n <= self.capacity:
            return self._data[start : start + n]
        return self._copy_out(self._tail, n)

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

    @property
    def buffer(self) -> bytearray | mmap:
        return self._buffer

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


__all__ = ["HEADER", "PAD", "ByteRing", "RingError"]
