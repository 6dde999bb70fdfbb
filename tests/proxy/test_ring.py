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
from proxy.core.ring import HEADER, PAD, ByteRing, RingError

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


@settings(max_examples=300, deadline=None)
@given(
    ITEMS,
    st.integers(700, 1500),
    st.integers(0, 2000),
    st.one_of(st.none(), st.integers(200, 340)),
    st.booleans(),
)
def test_items_come_out_whole_and_in_order_wherever_the_ring_wraps(
    items: list[tuple[object, ...]], capacity: int, offset: int, hot: int | None, views: bool
) -> None:
    """Plain or elastic (`hot`: laps cut short with padding), whatever the items' sizes.
    With views, a chunk's bytes are a view into the ring (a copy where they wrap round),
    released as the next item is asked for: the consumer copies what it keeps."""
    held: list[memoryview] = []

    def drain(consumer: ByteRing) -> list[tuple[object, ...]]:
        out: list[tuple[object, ...]] = []
        for item in recwire.ring_items(consumer, views=views):
            data = item[4] if item[0] == "data" else None
            if isinstance(data, memoryview):
                held.append(data)
            out.append((*item[:4], bytes(data)) if data is not None else item)
        return out

    producer_buffer = bytearray(ByteRing.size_for(capacity))
    producer, consumer = ByteRing(producer_buffer, hot=hot), ByteRing(producer_buffer)
    # start anywhere in the ring, as after hours of traffic: wraps fall at every position
    if offset % capacity:
        producer.put((b"x" * (offset % capacity),))
        consumer.skip(offset % capacity)
    got: list[tuple[object, ...]] = []
    for item in items:
        parts = encoded(item)
        if not producer.put(parts):  # full: the consumer makes room, then it fits
            got.extend(drain(consumer))
            assert producer.put(parts)
    got.extend(drain(consumer))
    assert got == items
    assert consumer.readable() == 0 and producer.used() == 0
    for view in held:  # each let go once the consumer moved on
        with pytest.raises(ValueError, match="released"):
            bytes(view)


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
    with pytest.raises(RingError, match="PAD"):  # the consumer would take it for padding
        ring.put((bytes([PAD]) + b"x",))
    with pytest.raises(RingError, match="empty"):
        ring.put((b"", b"x"))
    with pytest.raises(RingError, match="hot part"):
        ByteRing(bytearray(ByteRing.size_for(64)), hot=64)


def elastic(capacity: int = 1000, hot: int = 200) -> tuple[ByteRing, ByteRing]:
    buffer = bytearray(ByteRing.size_for(capacity))
    return ByteRing(buffer, hot=hot), ByteRing(buffer)


def test_an_elastic_ring_goes_back_to_the_start_once_the_backlog_is_small() -> None:
    producer, consumer = elastic()
    assert producer.put((b"a" * 150,)) and producer.put((b"b" * 60,))  # up to 210: past hot
    assert producer.cold_puts == 1
    assert consumer.take(150) == b"a" * 150  # 60 bytes left: at most hot/2
    assert producer.put((b"c" * 30,))  # starts the next lap, not at 210
    assert producer.used() == 90  # the padding is not backlog
    assert producer.put((b"d" * 10,))
    assert consumer.take(60) == b"b" * 60
    assert consumer.readable() == 40  # the rest of the lap skipped
    assert consumer.take(40) == b"c" * 30 + b"d" * 10
    assert producer.used() == 0 and producer.cold_puts == 1
    touched = producer._data  # everything since went to the first 40 bytes of the lap
    assert bytes(touched[:40]) == b"c" * 30 + b"d" * 10 and touched[210] == PAD


def test_an_elastic_ring_grows_into_its_cold_part_while_the_backlog_is_big() -> None:
    producer, consumer = elastic()
    for n in range(8):  # nothing taken: the backlog passes hot/2, so no early lap
        assert producer.put((bytes([65 + n]) * 100,))
    assert producer.used() == 800 and producer.cold_puts == 6  # all but the first two
    assert not producer.put((b"z" * 201,))  # and the whole ring is still the limit
    assert consumer.take(800) == b"".join(bytes([65 + n]) * 100 for n in range(8))


def test_an_early_lap_that_would_not_fit_waits_for_an_ordinary_wrap() -> None:
    producer, consumer = elastic(capacity=400, hot=150)
    assert producer.put((b"a" * 150,)) and producer.put((b"b" * 70,))
    consumer.skip(150)  # 70 left (<= hot/2); the next lap would leave 220 - 70 = 150 bytes
    assert producer.put((b"c" * 160,))  # too big for that: goes on at 220, wrapping at 400
    assert consumer.take(230) == b"b" * 70 + b"c" * 160


def test_the_cold_part_is_given_back_only_when_nothing_lies_there() -> None:
    producer, consumer = elastic()
    assert producer.put((b"a" * 300,))  # reaches past hot
    assert not producer.keep_to_hot()  # unread bytes in the cold part
    consumer.skip(300)
    assert not producer.keep_to_hot()  # the producer itself is past hot
    assert producer.put((b"b" * 50,))  # an early lap: back at the start
    assert not producer.keep_to_hot()  # the padding is not skipped yet
    assert consumer.readable() == 50  # skips it: an item starts there
    assert consumer.take(50) == b"b" * 50
    assert producer.keep_to_hot()
    producer.release_cold()
    assert bytes(producer._data[200:]) == bytes(800)
    assert producer.put((b"c" * 140,))  # at 50-190, before hot
    assert not producer.put((b"d" * 60,))  # not past hot, and the next lap has 50 bytes
    assert producer.put((b"d" * 20,))  # the next lap, not past hot
    assert bytes(producer._data[200:]) == bytes(800)  # the cold part untouched
    producer.reopen_cold()
    assert consumer.readable() == 140 + 810 + 20  # c, the padding, d
    assert consumer.take(140) == b"c" * 140
    assert consumer.readable() == 20 and consumer.take(20) == b"d" * 20


def test_release_cold_gives_shared_memory_pages_back() -> None:
    """On a memfd the pages past hot go back to the system: they read as zeros after, and
    the file's resident size shrinks."""
    capacity, hot = 64 * mmap.PAGESIZE, 8 * mmap.PAGESIZE
    fd = os.memfd_create("spicetap-test-ring")
    try:
        os.ftruncate(fd, ByteRing.size_for(capacity))
        with mmap.mmap(fd, 0) as memory:
            producer, consumer = ByteRing(memory, hot=hot), ByteRing(memory)
            try:
                chunk = b"x" * (4 * mmap.PAGESIZE - 100)
                for _ in range(16):  # the whole ring, every page touched, the backlog big
                    assert producer.put((chunk,))
                consumer.skip(16 * len(chunk))
                assert os.fstat(fd).st_blocks * 512 >= capacity - 16 * 100
                assert producer.put((b"y" * 100,))  # an early lap
                assert consumer.readable() == 100 and consumer.take(100) == b"y" * 100
                assert producer.keep_to_hot()
                producer.release_cold()
                producer.reopen_cold()
                assert os.fstat(fd).st_blocks * 512 <= hot + 2 * mmap.PAGESIZE
                assert not any(memory[HEADER + hot + mmap.PAGESIZE :])
            finally:
                producer.release()
                consumer.release()
    finally:
        os.close(fd)


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


@pytest.mark.parametrize("hot", [None, 1500])
def test_two_processes_pass_every_byte_in_order_through_a_small_ring(hot: int | None) -> None:
    """The real thing: the consumer in another process reads while the producer writes, the
    ring wrapping thousands of times (elastic: laps cut short as the backlog allows); what
    comes out hashes to what went in."""
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
        ring = ByteRing(memory, hot=hot)
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


def test_a_chunk_comes_as_a_view_into_the_ring_until_the_next_item() -> None:
    """The recording process's way: no copy out of the ring; the chunk's room goes back to
    the producer only once the consumer asks for what follows."""
    buffer = bytearray(ByteRing.size_for(4096))
    producer, consumer = ByteRing(buffer), ByteRing(buffer)
    assert producer.put(encoded(("data", 1, 0.5, "s2c", b"abc")))
    assert producer.put(encoded(("close", 1, 0.6, "done")))
    items = recwire.ring_items(consumer, views=True)
    chunk = next(items)
    view = chunk[4]
    assert isinstance(view, memoryview) and view.obj is buffer and bytes(view) == b"abc"
    held = producer.used()
    assert next(items) == ("close", 1, 0.6, "done")
    assert held > 0 and producer.used() == 0  # the chunk's room is back, with the close's
    with pytest.raises(ValueError, match="released"):
        bytes(view)
