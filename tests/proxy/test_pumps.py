"""The threaded shell: blocking ends (plain and TLS over memory BIOs, used by two threads at
once) and ThreadedChannel driving the relay core, on loopback socket pairs."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import pytest
import trio

from proxy.core.relay import ChannelRelay, Command, Limits, RecordData
from proxy.io.ends import FIRST_PLAIN, RECEIVE_SIZE, PlainEnd, TlsEnd, Undelivered, tls_end
from proxy.io.pumps import SINK_GONE_GRACE, ThreadedChannel
from proxy.io.server import ChannelProxy, ChannelStats, Upstream
from tests.proxy.test_attempts import Calls
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply, mini

TIMEOUT = 20.0


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own thread; their results, or the first exception raised."""
    results: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:  # handed to the test thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a pump thread did not finish"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def tls_pair(contexts: tuple[Any, Any]) -> tuple[TlsEnd, TlsEnd]:
    a, b = socket.socketpair()
    server = tls_end(a, contexts[0], server_side=True)
    client = tls_end(b, contexts[1], server_side=False, server_hostname="127.0.0.1")
    in_threads(lambda: server.handshake(TIMEOUT), lambda: client.handshake(TIMEOUT))
    return server, client


def drain(end: PlainEnd, size: int) -> bytes:
    got = bytearray()
    for _ in range(100_000):
        if len(got) >= size:
            break
        data = end.receive()
        if not data:
            break
        got += data
    return bytes(got)


def test_tls_end_full_duplex_from_two_threads(tls_pair_contexts: tuple[Any, Any]) -> None:
    """Each end read in one thread while another thread writes to it: no corruption."""
    server, client = tls_pair(tls_pair_contexts)
    up, down = os.urandom(3 << 20), os.urandom(5 << 20)

    def send(end: TlsEnd, data: bytes) -> None:
        for i in range(0, len(data), 100_000):  # many writes, racing the reads
            end.send(data[i : i + 100_000])

    got = in_threads(
        lambda: send(client, up),
        lambda: send(server, down),
        lambda: drain(server, len(up)),
        lambda: drain(client, len(down)),
    )
    assert hashlib.sha256(got[2]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got[3]).digest() == hashlib.sha256(down).digest()
    client.close()
    assert server.receive() == b""  # a cut without close_notify is the end of the stream
    server.close()


def test_a_tls_ends_plaintext_buffer_grows_only_for_a_bulk_stream(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    """A channel of small messages keeps a one-record buffer per end (resident memory: 200
    channels of 50 sessions once held 256 KiB in each); a bulk stream grows it, doubling,
    to RECEIVE_SIZE, and every byte still comes through in order."""
    server, client = tls_pair(tls_pair_contexts)
    for i in range(50):
        message = i.to_bytes(2, "little") * 8
        client.send(message)
        assert drain(server, len(message)) == message
    assert server._plain is not None and len(server._plain) == FIRST_PLAIN
    bulk = os.urandom(4 << 20)
    got = in_threads(lambda: client.send(bulk), lambda: drain(server, len(bulk)))
    assert got[1] == bulk
    assert server._plain is not None and len(server._plain) == RECEIVE_SIZE
    assert client._plain is None  # made at an end's first receive: this one made none
    client.close()
    server.close()


def test_tls_close_notify_ends_the_stream_after_the_data(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    server, client = tls_pair(tls_pair_contexts)
    client.send(b"last words")
    with client.lock:  # a clean TLS close: close_notify after the data
        # our close_notify goes out; the peer's answer is not awaited
        with contextlib.suppress(ssl.SSLWantReadError):
            client.obj.unwrap()
        client.sock.sendall(client.outgoing.read())
    got = in_threads(lambda: drain(server, 100))[0]
    assert got == b"last words"
    assert in_threads(server.receive) == [b""]  # and again: the end stays the end
    client.close()
    server.close()


def test_tls_handshake_times_out_and_fails_on_a_closed_peer(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    a, b = socket.socketpair()
    with pytest.raises(TimeoutError):
        tls_end(a, tls_pair_contexts[0], server_side=True).handshake(0.2)
    b.close()
    with pytest.raises(ConnectionResetError):
        tls_end(a, tls_pair_contexts[0], server_side=True).handshake(1.0)
    a.close()


def test_abort_wakes_a_blocked_receive() -> None:
    a, b = socket.socketpair()
    end = PlainEnd(a)
    timer = threading.Timer(0.1, end.abort)
    timer.start()
    assert in_threads(end.receive) == [b""]
    end.close()
    b.close()


class Wire:
    """A ThreadedChannel between a test viewer and a test server (socket pairs)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.viewer, viewer_side = socket.socketpair()
        self.server, server_side = socket.socketpair()
        self.effects: list[Command] = []
        self.relay = ChannelRelay(limits or Limits(), 0.0)
        self.ends = (PlainEnd(viewer_side), PlainEnd(server_side))
        self.channel = ThreadedChannel(0, self.relay, *self.ends, self.effect, self.nope)
        self.threads = [
            threading.Thread(target=self.channel.pump, args=(d,)) for d in ("c2s", "s2c")
        ]
        for t in self.threads:
            t.start()

    def effect(self, cmd: Command) -> str | None:
        self.effects.append(cmd)
        return None

    def nope(self, cmd: Command) -> list[Command]:
        raise AssertionError("no migration here")

    def link(self) -> None:
        bits = caps_word(1, 3)
        self.viewer.sendall(link_mess(bits))
        assert recv_exactly(self.server, len(link_mess(bits))) == link_mess(bits)
        self.server.sendall(link_reply(bits))
        assert recv_exactly(self.viewer, len(link_reply(bits))) == link_reply(bits)
        self.viewer.sendall(TICKET)
        assert recv_exactly(self.server, len(TICKET)) == TICKET
        self.server.sendall(OK)
        assert recv_exactly(self.viewer, len(OK)) == OK

    def join(self) -> None:
        for t in self.threads:
            t.join(TIMEOUT)
            assert not t.is_alive()
        for end in self.ends:
            end.close()
        self.viewer.close()
        self.server.close()

    def recorded(self, direction: str) -> bytes:
        return b"".join(
            c.data for c in self.effects if isinstance(c, RecordData) and c.direction == direction
        )


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(TIMEOUT)
    got = bytearray()
    while len(got) < size:
        data = sock.recv(size - len(got))
        assert data, "closed early"
        got += data
    return bytes(got)


def test_threaded_channel_forwards_and_records_both_ways_then_closes() -> None:
    wire = Wire()
    wire.link()
    pings = b"".join(mini(4, i.to_bytes(4, "little")) for i in range(2000))
    wire.server.sendall(pings)
    assert recv_exactly(wire.viewer, len(pings)) == pings
    pongs = b"".join(mini(3, i.to_bytes(4, "little")) for i in range(2000))
    wire.viewer.sendall(pongs)
    assert recv_exactly(wire.server, len(pongs)) == pongs
    wire.server.shutdown(socket.SHUT_RDWR)  # the server leaves: the viewer's side ends too
    assert wire.viewer.recv(10) == b""
    wire.join()
    assert wire.channel.reason == "server closed"
    assert wire.recorded("s2c").endswith(pings) and wire.recorded("c2s").endswith(pongs)
    assert wire.relay.messages == {"c2s": 2000, "s2c": 2000}


def test_threaded_channel_closes_on_a_protocol_error_and_on_tick() -> None:
    wire = Wire(Limits(max_message=1000))
    wire.link()
    wire.server.sendall(mini(101, b"")[:2] + (5000).to_bytes(4, "little"))
    assert wire.viewer.recv(100)  # forwarded first (dissection never delays forwarding)
    assert wire.viewer.recv(10) == b""  # ... then the channel was closed
    wire.join()
    assert wire.channel.reason is not None and "5000 bytes exceeds" in wire.channel.reason
    idle = Wire(Limits(link_timeout=0.5))
    idle.viewer.sendall(link_mess(caps_word(1))[:10])
    for _ in range(100):
        idle.channel.tick(idle.relay.started + 1.0)
        if idle.channel.reason:
            break
    idle.join()
    assert idle.channel.reason == "link stage not finished after 0.5 s"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bug_in_one_direction_ends_the_whole_channel_at_once() -> None:
    """The other pump is blocked on its own peer: it must be woken, not left to wait for a
    viewer that may never close (the pump's exception still reaches the shell's log)."""
    wire = Wire()
    wire.link()
    received = wire.relay.received

    def broken(direction: str, data: bytes, now: float, *, sent: bool = False) -> list[Command]:
        if direction == "s2c":
            raise AttributeError("a bug")
        return received(direction, data, now, sent=sent)

    wire.relay.received = broken  # type: ignore[method-assign]
    wire.server.sendall(mini(4, b"ping"))
    wire.viewer.settimeout(TIMEOUT)
    for _ in range(10):  # the ping may come first (forwarded before it is looked at)
        if wire.viewer.recv(100) == b"":
            break
    else:
        raise AssertionError("the viewer's side stayed open")
    wire.join()
    assert wire.channel.reason == "spicetap internal error (AttributeError)"


class GoneEnd(PlainEnd):
    """A viewer end whose peer has gone: every send fails, as on a reset connection."""

    def send(self, data: bytes) -> None:
        raise BrokenPipeError("viewer gone")


class Collecting:
    """Stands for the recording process's front: what it was handed, by direction."""

    def __init__(self) -> None:
        self.got: dict[str, bytes] = {"c2s": b"", "s2c": b""}

    def data(self, conn: int, t: float, direction: str, data: bytes) -> bool:
        self.got[direction] += data
        return True

    def error(self, conn: int, t: float, direction: str, reason: str) -> None:
        pass

    def opened(self, *args: Any) -> None:
        pass

    def closed(self, *args: Any) -> None:
        pass


def _recorded_channel(viewer_end: type[PlainEnd]) -> tuple[
    Collecting, ChannelRelay, ThreadedChannel, socket.socket, socket.socket,
    tuple[PlainEnd, PlainEnd], list[threading.Thread],
]:  # fmt: skip
    """A ThreadedChannel recording through ChannelProxy's effects into a Collecting, its
    viewer end of the given kind, both pumps started."""
    recorder = Collecting()
    proxy = ChannelProxy(Limits(), cast(Any, recorder))
    relay = ChannelRelay(Limits(), 0.0)
    stats = ChannelStats(0, ("127.0.0.1", 1), "test", 0.0, relay)
    viewer, viewer_side = socket.socketpair()
    server, server_side = socket.socketpair()
    ends = (viewer_end(viewer_side), PlainEnd(server_side))
    channel = ThreadedChannel(0, relay, *ends, partial(proxy._effect, stats), lambda c: [])
    threads = [threading.Thread(target=channel.pump, args=(d,)) for d in ("c2s", "s2c")]
    for t in threads:
        t.start()
    return recorder, relay, channel, viewer, server, ends, threads


def test_bytes_the_viewer_never_got_are_neither_counted_nor_recorded() -> None:
    """In the link stage the relay forwards through commands. When the viewer has gone,
    the server's answer is not delivered: it must not count as relayed either, so the
    counters and the archive agree (a flaky SASL test found them 38 bytes apart)."""
    recorder, relay, channel, viewer, server, ends, threads = _recorded_channel(GoneEnd)
    bits = caps_word(1, 3)
    viewer.sendall(link_mess(bits))
    assert recv_exactly(server, len(link_mess(bits))) == link_mess(bits)
    server.sendall(link_reply(bits))  # forwarding it to the gone viewer fails
    _until(lambda: bool(channel.broken))
    viewer.close()  # then its connection ends, as a gone viewer's does
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert channel.reason == "viewer closed during the link stage"
    assert relay.bytes == {"c2s": len(link_mess(bits)), "s2c": 0}
    assert recorder.got == {"c2s": link_mess(bits), "s2c": b""}
    for s in (viewer, server, *ends):
        s.close()


def _until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for a pump thread to make `condition` true."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _link_stage(bits: int) -> list[tuple[str, bytes]]:
    """A ticket link stage with these caps on both sides, unit by unit, in order."""
    return [("c2s", link_mess(bits)), ("s2c", link_reply(bits)), ("c2s", TICKET), ("s2c", OK)]


def _linked(viewer: socket.socket, server: socket.socket, relay: ChannelRelay, bits: int) -> None:
    for direction, data in _link_stage(bits):
        sender, receiver = (viewer, server) if direction == "c2s" else (server, viewer)
        sender.sendall(data)
        assert recv_exactly(receiver, len(data)) == data
    assert relay.linked


def test_what_a_viewer_sent_just_before_it_went_still_reaches_the_server() -> None:
    """The viewer sends half a message and goes; a send to it fails before its pump has
    read those bytes. They reach the server and the archive all the same, and the channel
    ends for the viewer's own reason, as TCP without spicetap would have it (found by the
    hostile-peers test's WebSocket viewer, whose close frame came with its last bytes)."""
    CutEnd.take = 10**9
    recorder, relay, channel, viewer, server, ends, threads = _recorded_channel(CutEnd)
    bits = caps_word(1, 3)
    _linked(viewer, server, relay, bits)
    CutEnd.take = 0  # the viewer is gone for what comes now
    server.sendall(mini(4, b"p" * 40))
    _until(lambda: bool(channel.broken))
    half = mini(4, b"q" * 40)[:20]
    viewer.sendall(half)
    viewer.shutdown(socket.SHUT_WR)
    assert recv_exactly(server, len(half)) == half
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert channel.reason == "viewer vanished in the middle of a message (26 more were due)"
    assert recorder.got["c2s"].endswith(half)
    for s in (viewer, server, *ends):
        s.close()


def test_a_side_found_gone_that_never_ends_its_stream_is_closed_after_a_grace() -> None:
    """A send found the viewer gone, but its stream stays open (nothing says so): the
    relay's timer ends the channel SINK_GONE_GRACE later."""
    CutEnd.take = 10**9
    _recorder, relay, channel, viewer, server, ends, threads = _recorded_channel(CutEnd)
    _linked(viewer, server, relay, caps_word(1, 3))
    CutEnd.take = 0
    server.sendall(mini(4, b"p" * 40))
    _until(lambda: channel.broken_at is not None)
    at = cast(float, channel.broken_at)
    channel.tick(at + SINK_GONE_GRACE / 2)
    assert channel.reason is None
    channel.tick(at + SINK_GONE_GRACE + 0.1)
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert channel.reason == "viewer closed"
    for s in (viewer, server, *ends):
        s.close()


class CutEnd(PlainEnd):
    """A viewer end whose connection breaks part-way through a send: the first `take`
    bytes reach the viewer, then the send fails."""

    take = 5

    def send(self, data: bytes) -> None:
        self.sock.sendall(data[: self.take])
        if self.take < len(data):
            raise Undelivered(self.take, BrokenPipeError("viewer gone"))


@pytest.mark.parametrize("linked", [False, True])
def test_the_part_of_a_chunk_that_crossed_before_a_break_is_counted_and_recorded(
    linked: bool,
) -> None:
    """A send cut short still delivered its first bytes: they are in the archive and the
    counters, the rest in neither. In the link stage (the Forward command's path) and
    once linked (the pump forwards first)."""
    CutEnd.take = 10**9  # whole sends until the test says otherwise
    recorder, relay, channel, viewer, server, ends, threads = _recorded_channel(CutEnd)
    bits = caps_word(1, 3)
    viewer.sendall(link_mess(bits))
    assert recv_exactly(server, len(link_mess(bits))) == link_mess(bits)
    before = b""
    if linked:
        server.sendall(link_reply(bits))
        before = recv_exactly(viewer, len(link_reply(bits)))
        viewer.sendall(TICKET)
        assert recv_exactly(server, len(TICKET)) == TICKET
        server.sendall(OK)
        before += recv_exactly(viewer, len(OK))
        assert relay.linked
        chunk = mini(4, b"p" * 40)
    else:
        chunk = link_reply(bits)
    CutEnd.take = 7
    server.sendall(chunk)
    _until(lambda: bool(channel.broken))
    viewer.shutdown(socket.SHUT_WR)  # it sends nothing more: the channel then ends
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    got = before + recv_exactly(viewer, 7)
    assert channel.reason == "viewer closed" + ("" if linked else " during the link stage")
    assert recorder.got["s2c"] == got and got.endswith(chunk[:7])
    assert relay.bytes["s2c"] == len(got)
    for s in (viewer, server, *ends):
        s.close()


def test_a_plain_end_says_how_much_crossed_when_the_connection_breaks_mid_send() -> None:
    """Real sockets: the viewer reads a little, then the proxy aborts the end (as finish()
    does); the blocked send returns short and Undelivered says how much the socket took,
    which the viewer can then read in full."""
    ours, theirs = socket.socketpair()
    end = PlainEnd(ours)
    data = bytes(range(256)) * (16 << 12)  # 16 MiB: far more than the socket buffers hold
    outcome: list[BaseException] = []

    def sender() -> None:
        try:
            end.send(data)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=sender)
    thread.start()
    theirs.settimeout(TIMEOUT)
    got = bytearray(theirs.recv(65536))
    time.sleep(0.2)  # the sender blocks with the buffers full
    end.abort()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    (exc,) = outcome
    assert isinstance(exc, Undelivered) and 0 < exc.delivered < len(data)
    while chunk := theirs.recv(1 << 20):
        got += chunk
    assert bytes(got) == data[: exc.delivered]
    ours.close()
    theirs.close()


def test_the_trio_shell_records_the_part_of_a_send_cut_by_the_channels_end() -> None:
    """The CONNECT and WebSocket fronts' shell, over real sockets: the server sends 8 MiB,
    the viewer has read a little when it breaks the protocol; the channel ends mid-send,
    and the archive holds exactly the server's bytes the viewer could still read."""
    from proxy.io.server import Upstream

    recorder = Collecting()
    proxy = ChannelProxy(Limits(), cast(Any, recorder))
    viewer, viewer_side = tcp_pair()
    server, server_side = tcp_pair()
    bits = caps_word(1, 3)
    big = bytes(range(256)) * (1 << 15)  # 8 MiB: far more than the socket buffers hold
    got = bytearray()

    def peers() -> None:
        viewer.sendall(link_mess(bits))
        assert recv_exactly(server, len(link_mess(bits))) == link_mess(bits)
        server.sendall(link_reply(bits))
        got.extend(recv_exactly(viewer, len(link_reply(bits))))
        viewer.sendall(TICKET)
        assert recv_exactly(server, len(TICKET)) == TICKET
        server.sendall(OK)
        got.extend(recv_exactly(viewer, len(OK)))
        sender = threading.Thread(target=_send_quietly, args=(server, mini(4, big)))
        sender.start()
        got.extend(recv_exactly(viewer, 100_000))
        viewer.sendall(mini(101, b"")[:2] + b"\xff\xff\xff\xff")  # a 4 GiB message: closed
        while chunk := viewer.recv(1 << 20):
            got.extend(chunk)
        server.close()  # the proxy has closed its side: the sender's send fails
        sender.join(TIMEOUT)

    async def main() -> None:
        async def open_upstream() -> trio.abc.Stream:
            return trio.SocketStream(trio.socket.from_stdlib_socket(server_side))

        stream = trio.SocketStream(trio.socket.from_stdlib_socket(viewer_side))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, peers)
            with trio.fail_after(TIMEOUT):
                await proxy.handle(stream, Upstream(open_upstream, "test"))

    viewer.settimeout(TIMEOUT)
    trio.run(main)
    assert len(got) < len(big)  # the send was cut
    assert recorder.got["s2c"] == bytes(got)
    viewer.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on loopback (the shell reads their addresses)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        other, _ = listener.accept()
    return one, other


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_the_trio_shell_says_a_forged_tls_record_is_the_viewers_error(
    tls_pair_contexts: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The CONNECT front's shell with TLS towards the viewer (trio's SSLStream): a forged
    record ends the channel as the viewer's TLS error, recorded on its side, not as a
    close."""
    from proxy.io.server import Upstream

    errors: list[tuple[str, str]] = []

    class Errors(Collecting):
        def error(self, conn: int, t: float, direction: str, reason: str) -> None:
            errors.append((direction, reason))

    proxy = ChannelProxy(Limits(), cast(Any, Errors()))
    viewer, viewer_side = tcp_pair()
    server, server_side = tcp_pair()
    bits = caps_word(1, 3)

    def tls_viewer() -> None:
        client = tls_end(viewer, tls_pair_contexts[1], server_side=False,
                         server_hostname="127.0.0.1")  # fmt: skip
        client.handshake(TIMEOUT)
        client.send(link_mess(bits))
        assert recv_exactly(server, len(link_mess(bits))) == link_mess(bits)
        viewer.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))  # forged application data
        with contextlib.suppress(OSError):
            while viewer.recv(65536):
                pass

    async def main() -> None:
        async def open_upstream() -> trio.abc.Stream:
            return trio.SocketStream(trio.socket.from_stdlib_socket(server_side))

        tcp = trio.SocketStream(trio.socket.from_stdlib_socket(viewer_side))
        stream = trio.SSLStream(tcp, tls_pair_contexts[0], server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, tls_viewer)
            with trio.fail_after(TIMEOUT):
                await proxy.handle(stream, Upstream(open_upstream, "test"), viewer_tls=True)

    viewer.settimeout(TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="spicetap.proxy"):
        trio.run(main)
    ((direction, reason),) = errors
    assert direction == "c2s" and reason.startswith("viewer broke the protocol: TLS: [SSL: ")
    assert "viewer broke the protocol: TLS:" in caplog.text
    for s in (viewer, server):
        s.close()


class _SendsGone(trio.abc.Stream):
    """The proxy's end of a viewer that can no longer be sent to once `gone` is set (a
    WebSocket after the browser's close frame), while what it sent is still read."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.gone = False
        self.refused = trio.Event()  # a send was refused

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.gone:
            self.refused.set()
            raise trio.BrokenResourceError("WebSocket is closing")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


class _TrioChannel:
    """One channel through the trio shell (CONNECT, WebSocket), recorded into a Calls:
    the test holds the viewer's and the server's ends of in-memory streams, the viewer's
    proxy end a _SendsGone."""

    def __init__(self) -> None:
        self.calls = Calls()
        self.proxy = ChannelProxy(Limits(), cast(Any, self.calls))
        self.viewer, viewer_side = trio.testing.memory_stream_pair()
        proxy_side, self.server = trio.testing.memory_stream_pair()
        self.wrapped = _SendsGone(viewer_side)

        async def open_server() -> trio.abc.Stream:
            return proxy_side

        self.upstream = Upstream(open_server, "test")

    async def handle(self) -> None:
        await self.proxy.handle(
            self.wrapped, self.upstream, insertion="connect", client=("127.0.0.1", 1)
        )

    def closed(self) -> list[str]:
        return [args[2] for name, args in self.calls.calls if name == "closed"]

    async def link(self) -> None:
        """The link stage, each message seen to reach the other side."""
        for direction, data in _link_stage(caps_word(1, 3)):
            sender, receiver = (
                (self.viewer, self.server) if direction == "c2s" else (self.server, self.viewer)
            )
            await sender.send_all(data)
            assert await _receive(receiver, len(data)) == data


async def _receive(stream: trio.abc.Stream, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = await stream.receive_some(size - len(got))
        assert chunk, "the stream ended"
        got += chunk
    return got


def test_the_trio_shell_relays_what_a_viewer_sent_before_a_send_found_it_gone() -> None:
    """As the threaded shell's test above, through the trio shell (CONNECT, WebSocket): a
    send to the viewer fails first, then its last half message and its end arrive. The
    server gets them, and the channel ends for the viewer's own reason."""
    ch = _TrioChannel()
    half = mini(4, b"q" * 40)[:20]

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ch.handle)
                await ch.link()
                ch.wrapped.gone = True
                await ch.server.send_all(mini(4, b"p" * 40))
                await ch.wrapped.refused.wait()
                await ch.viewer.send_all(half)
                await ch.viewer.send_eof()
                assert await _receive(ch.server, len(half)) == half

    trio.run(main)
    assert ch.closed() == ["viewer vanished in the middle of a message (26 more were due)"]
    calls = ch.calls.calls
    sent = b"".join(args[3] for name, args in calls if name == "data" and args[2] == "c2s")
    assert sent.endswith(half)


def test_the_trio_shell_ends_a_channel_whose_gone_side_never_ends_its_stream() -> None:
    """A send found the viewer gone, but its stream stays open: SINK_GONE_GRACE later the
    channel ends all the same (trio's clock jumps over the wait)."""
    ch = _TrioChannel()

    async def main() -> None:
        bits = caps_word(1, 3)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ch.handle)
                await ch.viewer.send_all(link_mess(bits))
                assert await _receive(ch.server, len(link_mess(bits))) == link_mess(bits)
                ch.wrapped.gone = True
                await ch.server.send_all(link_reply(bits))  # its forward to the viewer fails
                await ch.wrapped.refused.wait()
                started = trio.current_time()
            assert trio.current_time() - started >= SINK_GONE_GRACE

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert ch.closed() == ["viewer closed during the link stage"]


def test_both_shells_end_a_channel_when_the_operator_says() -> None:
    """DELETE /api/sessions/ID: the trio shell's channel (CONNECT, WebSocket) ends at once
    with the operator's reason, not at its ticker's next turn (trio's clock, virtual here,
    would then have moved on); the threaded shell's likewise (the next test)."""
    ch = _TrioChannel()
    waited: list[float] = []

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ch.handle)
                await ch.link()
                (stats,) = ch.proxy.state.channels.values()
                asked = trio.current_time()
                stats.end("ended by the operator")
            waited.append(trio.current_time() - asked)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert waited == [0.0]
    assert ch.closed() == ["ended by the operator"]


def test_the_threaded_shell_ends_a_channel_when_the_operator_says() -> None:
    _recorder, relay, channel, viewer, server, ends, pumps = _recorded_channel(PlainEnd)
    relay.ending = "ended by the operator"  # as ChannelStats.end says it
    channel.tick(time.monotonic())
    for pump in pumps:
        pump.join(TIMEOUT)
    assert relay.closed and channel.reason == "ended by the operator"
    assert not any(pump.is_alive() for pump in pumps)
    for s in (viewer, server, *ends):
        s.close()
