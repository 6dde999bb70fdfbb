"""proxy/io/_forward.c with TLS ends: the same forwarding step, decrypting from a TLS source
and encrypting to a TLS sink on the OpenSSL objects that Python's ssl module made, over
real loopback sockets and real handshakes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from typing import Any

import pytest

from proxy.io import _forward, ends
from proxy.io.ends import RECEIVE_SIZE, Forward, PlainEnd, RecordWalk, TlsEnd, tls_end
from tests.proxy.test_forward import forward_until_a_send_is_cut
from tests.proxy.test_pumps import TIMEOUT, drain, in_threads, recv_exactly, tls_pair

LEGS = ["tls-tls", "tls-plain", "plain-tls"]


def bounded(*ends: PlainEnd) -> None:
    """A receive that waits TIMEOUT seconds fails (EAGAIN) instead of hanging the test; the
    sockets stay blocking, as the forwarder needs them."""
    for end in ends:
        end.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(TIMEOUT), 0)
        )


class Legs:
    """viewer -> [source end, forwarder, sink end] -> server; either proxy end TLS or
    plain, as named (source-sink). `viewer` and `server` are the far ends, TLS where the
    proxy's end is."""

    def __init__(self, legs: str, contexts: tuple[Any, Any]) -> None:
        source_tls, sink_tls = (leg == "tls" for leg in legs.split("-"))
        self.source: PlainEnd
        self.sink: PlainEnd
        self.viewer: PlainEnd
        self.server: PlainEnd
        if source_tls:
            self.source, self.viewer = tls_pair(contexts)  # the proxy's end is server side
        else:
            a, b = socket.socketpair()
            self.source, self.viewer = PlainEnd(a), PlainEnd(b)
        if sink_tls:
            self.server, self.sink = tls_pair(contexts)
        else:
            a, b = socket.socketpair()
            self.server, self.sink = PlainEnd(a), PlainEnd(b)
        bounded(self.source, self.viewer, self.sink, self.server)
        forward = self.source.forward_to(self.sink)
        assert isinstance(forward, _forward.Forwarder)
        self.forward: Forward = forward

    def close(self) -> None:
        for end in (self.viewer, self.source, self.sink, self.server):
            end.close()


def forward_until(forward: Forward, size: int) -> tuple[bytes, bool]:
    """Call the forwarder until `size` bytes came: what came, and whether each call
    delivered all it received, with no error."""
    came, whole = b"", True
    for _ in range(100_000):
        if len(came) >= size:
            break
        data, delivered, error, _at = forward()
        if not data:
            break
        came += data
        whole = whole and (delivered, error) == (len(data), 0)
    return came, whole


def test_tls_ends_take_the_c_path_when_the_ssl_module_shares_its_openssl() -> None:
    assert ends.TLS_WITHOUT_C is None
    import _ssl

    assert _forward.shares_openssl(_ssl.__file__)
    assert not _forward.shares_openssl(socket.__file__)  # a module without OpenSSL
    assert ends.why_not_tls_in_c((3, 11, 2), _ssl.__file__) is None
    assert ends.why_not_tls_in_c((3, 14, 0), _ssl.__file__) == (
        "Python 3.14's ssl module is untried"
    )
    assert "does not use the OpenSSL" in str(ends.why_not_tls_in_c((3, 11, 2), None))
    assert "does not use the OpenSSL" in str(ends.why_not_tls_in_c((3, 11, 2), socket.__file__))


@pytest.mark.parametrize("legs", LEGS)
@pytest.mark.parametrize("size", [1, 16 * 1024 + 1, RECEIVE_SIZE + 5, 3 << 20])
def test_each_leg_forwards_the_plaintext_and_hands_it_back(
    legs: str, size: int, tls_pair_contexts: tuple[Any, Any]
) -> None:
    """The server reads exactly what the viewer sent, and the forwarder hands back the
    same plaintext, whole, to be recorded."""
    wire = Legs(legs, tls_pair_contexts)
    message = os.urandom(size)
    got = in_threads(
        lambda: wire.viewer.send(message),
        lambda: forward_until(wire.forward, size),
        lambda: drain(wire.server, size),
    )
    came, whole = got[1]
    assert hashlib.sha256(came).digest() == hashlib.sha256(message).digest()
    assert whole
    assert hashlib.sha256(got[2]).digest() == hashlib.sha256(message).digest()
    for end in (wire.source, wire.sink):  # taken over by C: no Python buffer was made
        assert not isinstance(end, TlsEnd) or (end.core is not None and end._plain is None)
    wire.close()


def test_close_notify_is_the_end_of_the_stream_after_the_data(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    wire = Legs("tls-tls", tls_pair_contexts)
    viewer = wire.viewer
    assert isinstance(viewer, TlsEnd)
    viewer.send(b"last words")
    with viewer.lock, contextlib.suppress(ssl.SSLWantReadError):
        viewer.obj.unwrap()  # close_notify after the data; the answer is not awaited
    viewer.sock.sendall(viewer.outgoing.read())
    came, _ = forward_until(wire.forward, 100)
    assert came == b"last words"
    assert wire.forward()[0] == b""  # and it stays the end
    assert drain(wire.server, 10) == b"last words"
    wire.close()


@pytest.mark.parametrize("reset", [False, True])
def test_a_stream_cut_inside_a_record_is_the_peers_tls_error(
    tls_pair_contexts: tuple[Any, Any], reset: bool
) -> None:
    """Between records a cut is an end like any other; inside one, the peer broke TLS,
    whether the stream ended or was reset (a reset was taken for a plain close)."""
    wire = Legs("tls-plain", tls_pair_contexts)
    wire.viewer.send(b"whole")
    wire.viewer.sock.sendall(b"\x17\x03\x03\x00\x40" + bytes(20))  # 25 bytes of a record
    if reset:  # a Unix socket closed with unread bytes resets its peer (ECONNRESET)
        wire.source.sock.sendall(b"unread")
        wire.viewer.sock.close()
    else:
        wire.viewer.sock.shutdown(socket.SHUT_WR)
    assert wire.forward()[0] == b"whole"
    with pytest.raises(ssl.SSLEOFError) as caught:
        wire.forward()
    assert ends.tls_error_text(caught.value) == (
        "TLS: the connection ended inside a TLS record (25 bytes of it came)"
    )
    wire.close()
    clean = Legs("tls-plain", tls_pair_contexts)
    clean.viewer.send(b"whole")
    clean.viewer.sock.shutdown(socket.SHUT_WR)
    assert clean.forward()[0] == b"whole"
    assert clean.forward()[0] == b""
    clean.close()


def test_a_forged_record_is_an_ssl_error_after_the_plaintext_before_it(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    """Good records and a forged one in one receive: the good plaintext is forwarded and
    handed back first; the next call raises the error in the ssl module's words."""
    wire = Legs("tls-plain", tls_pair_contexts)
    viewer = wire.viewer
    assert isinstance(viewer, TlsEnd)
    with viewer.lock:
        viewer.obj.write(b"genuine")
        records = viewer.outgoing.read()
    viewer.sock.sendall(records + b"\x17\x03\x03\x00\x20" + bytes(32))
    time.sleep(0.1)  # both in the socket: one recv() takes them together
    assert wire.forward()[0] == b"genuine"
    with pytest.raises(ssl.SSLError) as caught:
        wire.forward()
    assert ends.tls_error_text(caught.value) == (
        "TLS: [SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac"
    )
    assert caught.value.reason == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    with pytest.raises(ssl.SSLError):  # and it stays failed
        wire.forward()
    assert recv_exactly(wire.server.sock, 7) == b"genuine"
    wire.close()


def test_an_ends_receive_send_and_forwarder_take_turns_on_it(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    """The link stage receives and sends through the ends, the linked channel through the
    forwarder, and the other direction may keep to the ends (a rewriter) while sending to
    the same end: one OpenSSL state, one crypto lock, ciphertext in order."""
    wire = Legs("tls-tls", tls_pair_contexts)
    wire.viewer.send(b"link message")
    assert wire.source.receive() == b"link message"  # Python, as in the link stage
    wire.sink.send(b"link message")
    stream = os.urandom(2 << 20)
    notes = [b"<note %d>" % i for i in range(200)]

    def python_sends() -> None:  # the other direction's Python path, to the same end
        for note in notes:
            wire.sink.send(note)

    got = in_threads(
        lambda: wire.viewer.send(stream),
        lambda: forward_until(wire.forward, len(stream)),
        python_sends,
        lambda: drain(wire.server, len(b"link message") + len(stream) + sum(map(len, notes))),
    )
    assert got[1] == (stream, True)
    arrived = got[3]
    assert arrived.startswith(b"link message")
    rest = arrived[len(b"link message") :]
    for note in notes:  # each Python send whole, between the forwarder's chunks
        assert rest.count(note) == 1
        rest = rest.replace(note, b"", 1)
    assert rest == stream
    wire.close()


def read_to_the_cut(end: PlainEnd) -> bytes:
    """All the plaintext a TLS end can still read: up to its peer's end, or to a record
    cut short."""
    got = bytearray()
    for _ in range(100_000):
        try:
            data = end.receive()
        except ssl.SSLError:  # the stream ends inside a record: its part is unreadable
            break
        if not data:
            break
        got += data
    return bytes(got)


def test_a_tls_sinks_cut_send_counts_the_records_that_crossed_whole(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    """The server stops reading and the sink is aborted mid-send (what finish() does): the
    forwarder says how much plaintext crossed, exactly what the server can still decrypt
    (the records it got whole), and the errno says why the rest did not."""
    wire = Legs("plain-tls", tls_pair_contexts)

    def feed() -> None:
        for i in range(200):
            wire.viewer.sock.sendall(i.to_bytes(4, "big") * (64 * 1024))

    crossed, error = forward_until_a_send_is_cut(wire.forward, wire.source, wire.sink, feed)
    assert error != 0
    assert read_to_the_cut(wire.server) == crossed
    wire.close()


def test_a_tls_ends_send_cut_part_way_says_how_much_crossed(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    """TlsEnd.send once C has the end (a link-stage answer, a rewriter's output): a cut
    send raises Undelivered with the plaintext the peer can read, as a plain end's does."""
    wire = Legs("plain-tls", tls_pair_contexts)
    big = b"".join(i.to_bytes(4, "big") for i in range(2 << 20))  # 8 MiB, unlike anywhere
    caught: list[BaseException] = []

    def sending() -> None:
        try:
            wire.sink.send(big)
        except OSError as exc:
            caught.append(exc)

    sender = threading.Thread(target=sending)
    sender.start()
    time.sleep(0.5)  # the socket buffers fill up and the send blocks
    wire.sink.abort()
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], ends.Undelivered), caught
    delivered = caught[0].delivered
    assert 0 < delivered < len(big) and delivered % (16 * 1024) == 0  # whole records
    assert read_to_the_cut(wire.server) == big[:delivered]
    wire.close()


def test_an_end_whose_handshake_is_not_done_stays_in_python(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    a, b = socket.socketpair()
    fresh = tls_end(a, tls_pair_contexts[0], server_side=True)
    plain = PlainEnd(b)
    assert fresh.forward_to(plain) is None
    assert plain.forward_to(fresh) is None
    assert fresh.core is None
    lock, walk = _forward.Lock(), _forward.RecordWalk()
    with pytest.raises(TypeError, match=r"not an _ssl\._SSLSocket"):
        _forward.TlsCore(object(), a.fileno(), lock, lock, walk, 1024)
    fresh.close()
    plain.close()


def test_what_the_memory_bios_held_moves_into_c_with_the_connection(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    """The handshake's last receive can bring the first application data with it, already
    in the incoming memory BIO when C takes the end over: it comes out first."""
    source, viewer = tls_pair(tls_pair_contexts)
    assert isinstance(source, TlsEnd)
    viewer.send(b"early")
    time.sleep(0.1)
    source.records.feed(raw := source.sock.recv(65536))  # as the handshake would have
    source.incoming.write(raw)
    a, b = socket.socketpair()
    sink = PlainEnd(a)
    bounded(source, viewer, sink)
    forward = source.forward_to(sink)
    assert forward is not None and source.core is not None
    viewer.send(b" and later")
    came, whole = forward_until(forward, len(b"early and later"))
    assert came == b"early and later" and whole
    assert recv_exactly(b, len(came)) == came
    for end in (source, viewer, sink):
        end.close()
    b.close()


@pytest.mark.parametrize("walk", [RecordWalk, _forward.RecordWalk], ids=["python", "c"])
def test_the_record_walk_knows_whether_a_tls_stream_ends_inside_a_record(walk: Any) -> None:
    records = [b"\x17\x03\x03" + len(body).to_bytes(2, "big") + body
               for body in (b"a" * 300, b"", b"b" * 17000, b"c")]  # fmt: skip
    stream = b"".join(records)
    ends_at = {sum(map(len, records[: i + 1])) for i in range(len(records))}
    for split in range(0, len(stream) + 1, 97):
        for stop in range(split, len(stream) + 1, 1013):
            w = walk()
            w.feed(stream[:split])
            w.feed(stream[split:stop])
            at = max((e for e in ends_at | {0} if e <= stop), default=0)
            assert w.cut == stop - at, (split, stop)
    one_by_one = walk()
    for i in range(len(stream) - 3):  # a byte at a time, headers cut everywhere
        one_by_one.feed(stream[i : i + 1])
    assert one_by_one.cut == len(records[-1]) - 3


def test_a_record_split_across_receives_comes_out_whole(
    tls_pair_contexts: tuple[Any, Any],
) -> None:
    """A receive that ends inside a record, then a long one with the rest and more: the
    record's start waits (in OpenSSL) for its end, and every byte comes out in order."""
    wire = Legs("tls-plain", tls_pair_contexts)
    viewer = wire.viewer
    assert isinstance(viewer, TlsEnd)
    first, second = os.urandom(200_000), os.urandom(RECEIVE_SIZE)
    with viewer.lock:
        viewer.obj.write(first + second)
        ciphertext = viewer.outgoing.read()
    cut = len(first) + 3000  # a few KiB into a record
    server_got: list[bytes] = []
    reader = threading.Thread(
        target=lambda: server_got.append(drain(wire.server, len(first) + len(second)))
    )
    reader.start()
    viewer.sock.sendall(ciphertext[:cut])
    time.sleep(0.1)
    came, _ = forward_until(wire.forward, 1)  # one receive: the whole records of it
    rest = threading.Thread(target=viewer.sock.sendall, args=(ciphertext[cut:],))
    rest.start()
    time.sleep(0.2)  # what the socket holds waits: the next receive takes all it may
    more, whole = forward_until(wire.forward, len(first) + len(second) - len(came))
    rest.join(TIMEOUT)
    reader.join(TIMEOUT)
    assert whole and came + more == first + second
    assert server_got == [first + second]
    wire.close()
