"""The shared-memory ring between the proxy and its recording process, and the items read
from it: in one process over a bytearray, and across two real processes over a memfd."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core import recwire
from proxy.core.ring import HEADER, ByteRing, RingError

ITEMS = st.lists(
    st.one_of(
        st.tuples(
            st.just("data"),
            st.integers(0, 2**63),
            st.floats(0, 1e6),
            st.sampled_from(["c2s", "s2c"]),
            st.binary(max_size=300),
        ),
        st.tuples(st.just("close"), st.integers(0, 1000), st.floats(0, 1e6), st.text()),
        st.tuples(
            st.just("open"),
            st.integers(0, 1000),
            st.floats(0, 1e6),
            st.tuples(st.just("127.0.0.1"), st.integers(1, 65535)),
        ),
    ),
    max_size=30,
)


def encoded(item: tuple[object, ...]) -> tuple[bytes, ...]:
    """An item as the proxy puts it: a chunk header and its bytes, or a control frame."""
    if item[0] == "data":
        data = item[4]
        assert isinstance(data, bytes)
        header = recwire.chunk_header(item[1], item[2], item[3], len(data))  # type: ignore[arg-type]
        return (header, data)
    return (recwire.control(item),)


@settings(max_examples=200, deadline=None)
@given(ITEMS, st.integers(700, 1500), st.integers(0, 2000))
def test_items_come_out_whole_and_in_order_wherever_the_ring_wraps(
    items: list[tuple[object, ...]], capacity: int, offset: int
) -> None:
    producer_buffer = bytearray(ByteRing.size_for(capacity))
    producer, consumer = ByteRing(producer_buffer), ByteRing(producer_buffer)
    # start anywhere in the ring, as after hours of traffic: wraps fall at every position
    producer.put((b"\0" * (offset % capacity),))
    consumer.skip(offset % capacity)
    got: list[tuple[object, ...]] = []
    for item in items:
        parts = encoded(item)
        if not producer.put(parts):  # full: the consumer makes room, then it fits
            got.extend(recwire.ring_items(consumer))
            assert producer.put(parts)
    got.extend(recwire.ring_items(consumer))
    assert got == items
    assert consumer.readable() == 0 and producer.used() == 0


def test_a_full_ring_refuses_an_item_and_keeps_what_it_holds() -> None:
    buffer = bytearray(ByteRing.size_for(100))
    producer, consumer = ByteRing(buffer), ByteRing(buffer)
    assert producer.put((b"a" * 60,))
    assert not producer.put((b"b" * 41,))  # 40 bytes of room
    assert producer.used() == 60 and consumer.readable() == 60
    assert producer.put((b"c" * 40,))  # exactly full
    assert consumer.take(100) == b"a" * 60 + b"c" * 40
    assert producer.put((b"d" * 30, b"e" * 70))  # room again, wrapping at the end
    assert consumer.take(100) == b"d" * 30 + b"e" * 70


def test_an_item_larger_than_the_ring_is_an_error_not_a_wait() -> None:
    ring = ByteRing(bytearray(ByteRing.size_for(64)))
    with pytest.raises(RingError, match="cannot fit"):
        ring.put((b"x" * 65,))
    with pytest.raises(RingError, match="needs more than"):
        ByteRing(bytearray(HEADER))


def test_a_partial_or_foreign_item_is_a_wire_error() -> None:
    buffer = bytearray(ByteRing.size_for(256))
    producer, consumer = ByteRing(buffer), ByteRing(buffer)
    header, data = encoded(("data", 1, 0.5, "c2s", b"0123456789"))
    producer.put((header, data[:4]))  # not something the proxy does: items go in whole
    with pytest.raises(recwire.WireError, match="partial chunk"):
        list(recwire.ring_items(consumer))
    buffer = bytearray(ByteRing.size_for(256))
    producer, consumer = ByteRing(buffer), ByteRing(buffer)
    producer.put((b"Zjunk",))
    with pytest.raises(recwire.WireError, match="unknown item tag"):
        list(recwire.ring_items(consumer))


def test_the_waiting_flag_is_what_the_producer_sees() -> None:
    buffer = bytearray(ByteRing.size_for(64))
    producer, consumer = ByteRing(buffer), ByteRing(buffer)
    assert not producer.consumer_waiting()
    consumer.set_waiting(True)
    assert producer.consumer_waiting()
    consumer.set_waiting(False)
    assert not producer.consumer_waiting()


CONSUMER = textwrap.dedent(
    """
    import hashlib, mmap, sys, time
    from proxy.core import recwire
    from proxy.core.ring import ByteRing
    fd, expected = int(sys.argv[1]), int(sys.argv[2])
    with mmap.mmap(fd, 0) as memory:
        ring = ByteRing(memory)
        digest, count, deadline = hashlib.sha256(), 0, time.monotonic() + 60
        while count < expected and time.monotonic() < deadline:
            for item in recwire.ring_items(ring):
                digest.update(item[1].to_bytes(8, "little") + item[4])
                count += 1
        print(count, digest.hexdigest())
        ring.release()
    """
)


def test_two_processes_pass_every_byte_in_order_through_a_small_ring() -> None:
    """The real thing: the consumer in another process reads while the producer writes, the
    ring wrapping thousands of times; what comes out hashes to what went in."""
    capacity, count = 4096 + 13, 20_000
    fd = os.memfd_create("spicetap-test-ring")
    os.ftruncate(fd, ByteRing.size_for(capacity))
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, str(fd), str(count)],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    rng = random.Random(7)
    digest = hashlib.sha256()
    with mmap.mmap(fd, 0) as memory:
        ring = ByteRing(memory)
        deadline = time.monotonic() + 60
        for n in range(count):
            data = rng.randbytes(rng.randrange(0, 700))
            parts = (recwire.chunk_header(n, 0.0, "s2c", len(data)), data)
            while not ring.put(parts):  # full: the other process makes room
                assert time.monotonic() < deadline, "the consumer stopped taking"
                time.sleep(0)
            digest.update(n.to_bytes(8, "little") + data)
        out, _err = child.communicate(timeout=60)
        ring.release()
    os.close(fd)
    assert out.split() == [str(count), digest.hexdigest()]


def racing(work: Callable[[int], None], threads: int) -> list[BaseException]:
    """Run work(0..threads-1) in as many threads at once, the GIL handed over as often as
    the interpreter allows; what they raised."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        started = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
        for t in started:
            t.start()
        for t in started:
            t.join(60)
            assert not t.is_alive(), "a racing thread did not finish"
    finally:
        sys.setswitchinterval(before)
    return errors


def test_fences_from_many_threads_at_once_never_raise() -> None:
    """fence() is a release then an acquire of a lock the calling thread holds: with one
    lock shared by all threads, a second thread would release it unheld."""
    ring = ByteRing(bytearray(ByteRing.size_for(64)))

    def hammer(_n: int) -> None:
        for _ in range(20_000):
            ring.fence()

    errors = racing(hammer, 6)
    assert not errors, errors[:2]
