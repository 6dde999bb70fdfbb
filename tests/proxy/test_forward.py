"""proxy/io/_forward.c, a plain channel's forwarding step without the GIL, over real
loopback sockets: what it forwards, what it hands back to be recorded, how it reports a
receiving side gone part-way, and that it shares the sink's send lock with Python sends."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.core.relay import RecordData
from proxy.io import _forward, ends
from proxy.io.ends import RECEIVE_SIZE, Forward, PlainEnd
from tests.proxy.test_framing import mini
from tests.proxy.test_pumps import TIMEOUT, Wire, recv_exactly, tcp_pair


def test_the_extension_is_built_and_plain_ends_use_it() -> None:
    """The install builds it: without it the pumps forward in Python, and the tests of the
    channel would not reach the C."""
    assert ends.WITHOUT_C is None
    a, b = socket.socketpair()
    source, sink = PlainEnd(a), PlainEnd(b)
    assert isinstance(sink.send_lock, _forward.Lock)
    assert isinstance(source.forward_to(sink), _forward.Forwarder)
    source.close()
    sink.close()


def test_the_built_extension_is_not_older_than_its_source() -> None:
    source = Path(__file__).resolve().parents[2] / "proxy" / "io" / "_forward.c"
    built = Path(_forward.__file__ or "")
    assert built.stat().st_mtime >= source.stat().st_mtime, f"{built} is older than {source}"


class Pair:
    """viewer -> [source end, forwarder, sink end] -> server, all loopback sockets."""

    def __init__(self) -> None:
        self.viewer, source = socket.socketpair()
        sink, self.server = socket.socketpair()
        self.source, self.sink = PlainEnd(source), PlainEnd(sink)
        forward = self.source.forward_to(self.sink)
        assert forward is not None
        self.forward = forward

    def close(self) -> None:
        for s in (self.viewer, self.server):
            s.close()
        self.source.close()
        self.sink.close()


@pytest.mark.parametrize("size", [1, 16, 16 * 1024 - 1, 16 * 1024, 100_000, RECEIVE_SIZE])
def test_each_call_forwards_one_receive_unchanged_and_hands_it_back(size: int) -> None:
    """Short chunks are copied out of the buffer and long ones take it (a new one is made
    for the next call): all must come back whole, as the server got them."""
    pair = Pair()
    chunks = [bytes((i * 7 + j) % 251 for j in range(size)) for i in range(3)]
    server_got: list[bytes] = []
    reader = threading.Thread(target=lambda: server_got.append(recv_exactly(pair.server, 3 * size)))
    reader.start()
    for chunk in chunks:
        feeder = threading.Thread(target=pair.viewer.sendall, args=(chunk,))
        feeder.start()
        came = b""
        for _ in range(1000):  # a long chunk may come in several receives
            before = time.monotonic()
            data, delivered, error, at = pair.forward()
            assert (delivered, error) == (len(data), 0)
            assert before <= at <= time.monotonic()  # time.monotonic()'s clock
            came += data
            if len(came) >= size:
                break
        feeder.join(TIMEOUT)
        assert came == chunk
    reader.join(TIMEOUT)
    assert server_got == [b"".join(chunks)]
    pair.close()


def test_the_end_of_stream_is_an_empty_chunk_and_a_broken_receive_an_oserror() -> None:
    pair = Pair()
    pair.viewer.shutdown(socket.SHUT_WR)
    assert pair.forward() == (b"", 0, 0, 0.0)
    pair.close()
    viewer, accepted = tcp_pair()
    # a reset, not an orderly close: SO_LINGER with a zero timeout
    viewer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sink_sock, server = socket.socketpair()
    source, sink = PlainEnd(accepted), PlainEnd(sink_sock)
    forward = source.forward_to(sink)
    assert forward is not None
    viewer.close()
    with pytest.raises(ConnectionResetError):
        forward()
    for end in (source, sink):
        end.close()
    server.close()


def forward_until_a_send_is_cut(
    forward: Forward, source: PlainEnd, sink: PlainEnd, feed: Callable[[], None]
) -> tuple[bytes, int]:
    """Forward while `feed` pushes data in and nobody reads the sink's peer, until the
    forwarder blocks in send() with the buffers full; then an abort of the sink (what
    finish() does) cuts that send. What crossed (the chunks delivered whole, then the part
    of the cut one that was), and the errno the cut call gave."""
    outcome: list[tuple[bytes, int, int, float]] = []

    def forwarding() -> None:
        for _ in range(200):  # until a send is cut (8 MiB of socket buffers at most)
            result = forward()
            outcome.append(result)
            if result[1] < len(result[0]):
                return

    def feeding() -> None:
        with contextlib.suppress(OSError):  # the source was shut down as the test ended
            feed()

    threads = [threading.Thread(target=forwarding), threading.Thread(target=feeding)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the sink's buffers fill up
    sink.abort()
    threads[0].join(TIMEOUT)
    assert not threads[0].is_alive()
    source.abort()
    threads[1].join(TIMEOUT)
    data, delivered, error, _at = outcome[-1]
    assert 0 <= delivered < len(data)
    return b"".join(d for d, _n, _e, _t in outcome[:-1]) + data[:delivered], error


def test_a_send_cut_by_the_receiving_sides_end_says_how_much_crossed() -> None:
    """The count the forwarder gives is what the server can still read, and the errno says
    why the rest did not cross."""
    pair = Pair()
    big = bytes(range(256)) * 1024  # 256 KiB per receive at most

    def feed() -> None:
        for _ in range(200):
            pair.viewer.sendall(big)

    crossed, error = forward_until_a_send_is_cut(pair.forward, pair.source, pair.sink, feed)
    assert error != 0
    pair.server.settimeout(TIMEOUT)
    read = bytearray()
    for _ in range(100_000):
        more = pair.server.recv(1 << 20)
        if not more:
            break
        read += more
    assert bytes(read) == crossed
    pair.close()


def test_forwarding_waits_for_a_python_send_holding_the_sinks_lock() -> None:
    """A send from Python (a link-stage reply, say) and the forwarder's must not interleave
    on the wire: both take the sink's send lock, the forwarder without the GIL."""
    pair = Pair()
    done = threading.Event()

    def forwarding() -> None:
        pair.forward()
        done.set()

    with pair.sink.send_lock:
        thread = threading.Thread(target=forwarding)
        thread.start()
        pair.viewer.sendall(b"after")
        assert not done.wait(0.3)  # received, but its send waits for the lock
        pair.sink.sock.sendall(b"first")
    thread.join(TIMEOUT)
    assert done.is_set()
    assert recv_exactly(pair.server, 10) == b"firstafter"
    pair.close()


def test_a_lock_released_when_not_held_is_an_error() -> None:
    lock = _forward.Lock()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()
    assert lock.acquire()
    lock.release()
    with lock:
        pass


def test_a_linked_channel_forwards_through_the_c_path_and_records_it_all() -> None:
    """Many small messages each way and one bulk burst, through a ThreadedChannel whose ends
    are plain: the pumps take the C path once linked, and the records hold every byte."""
    wire = Wire()
    wire.link()
    assert wire.ends[0].forward_to(wire.ends[1]) is not None
    pings = b"".join(mini(4, i.to_bytes(4, "little")) for i in range(3000))
    for i in range(0, len(pings), 1000):  # many receives, not one
        wire.server.sendall(pings[i : i + 1000])
    assert recv_exactly(wire.viewer, len(pings)) == pings
    bulk = mini(101, bytes(range(256)) * 4096)  # 1 MiB and a header
    sender = threading.Thread(target=wire.server.sendall, args=(bulk,))
    sender.start()  # more than the sockets buffer: read while it is sent
    assert recv_exactly(wire.viewer, len(bulk)) == bulk
    sender.join(TIMEOUT)
    inputs = b"".join(mini(3, i.to_bytes(4, "little")) for i in range(3000))
    wire.viewer.sendall(inputs)
    assert recv_exactly(wire.server, len(inputs)) == inputs
    wire.viewer.shutdown(socket.SHUT_RDWR)
    wire.join()
    assert wire.channel.reason == "viewer closed"
    assert wire.recorded("s2c").endswith(pings + bulk)
    assert wire.recorded("c2s").endswith(inputs)
    assert wire.relay.messages == {"c2s": 3000, "s2c": 3001}
    for direction in ("c2s", "s2c"):  # the C path's arrival times: one clock, in order
        times = [
            c.time for c in wire.effects if isinstance(c, RecordData) and c.direction == direction
        ]
        assert times == sorted(times) and 0 < times[0] <= time.monotonic()
