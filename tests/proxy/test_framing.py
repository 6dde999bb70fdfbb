"""The sans-I/O channel framer: link stage variants, both data headers, hostile input."""

from __future__ import annotations

import itertools
import struct
from dataclasses import replace
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dissectors.api import LINK
from proxy.core import framing
from proxy.core.framing import (
    C2S,
    LARGE,
    S2C,
    ChannelError,
    ChannelFramer,
    Event,
    LinkUnit,
    Message,
)


def caps_word(*bits: int) -> int:
    return sum(1 << b for b in bits)


def link_mess(
    common: int, channel_type: int = 2, conn: int = 0x1234, *, channel_caps: int = 0
) -> bytes:
    body = LINK.encode_struct(
        "LinkMess",
        {
            "connection_id": conn,
            "channel_type": channel_type,
            "channel_id": 0,
            "num_common_caps": 1,
            "num_channel_caps": 1,
            "caps_offset": 18,
            "common_caps": [common],
            "channel_caps": [channel_caps],
        },
    )
    return header(len(body)) + body


def link_reply(
    common: int, error: int = 0, *, channel_caps: int | None = None, key: bytes = bytes(162)
) -> bytes:
    channel = [] if channel_caps is None else [channel_caps]
    body = LINK.encode_struct(
        "LinkReply",
        {
            "error": error,
            "pub_key": key,
            "num_common_caps": 1,
            "num_channel_caps": len(channel),
            "caps_offset": 178,
            "common_caps": [common],
            "channel_caps": channel,
        },
    )
    return header(len(body)) + body


def header(size: int, magic: bytes = b"REDQ") -> bytes:
    return LINK.encode_struct(
        "LinkHeader",
        {
            "magic": int.from_bytes(magic, "little"),
            "major_version": 2,
            "minor_version": 2,
            "size": size,
        },
    )


def mini(msg_type: int, body: bytes) -> bytes:
    return struct.pack("<HI", msg_type, len(body)) + body


def full(serial: int, msg_type: int, body: bytes) -> bytes:
    return struct.pack("<QHII", serial, msg_type, len(body), 0) + body


TICKET = bytes(range(128))
OK = struct.pack("<I", 0)


def session(auth_selection: bool, mini_header: bool) -> list[tuple[str, bytes]]:
    bits = [1] + ([0] if auth_selection else []) + ([3] if mini_header else [])
    frame = mini if mini_header else (lambda t, b: full(7, t, b))
    c2s_auth = struct.pack("<I", 1) if auth_selection else b""
    return [
        (C2S, link_mess(caps_word(*bits))),
        (S2C, link_reply(caps_word(*bits))),
        (C2S, c2s_auth + TICKET),
        (S2C, OK + frame(103, b"\x01" * 32) + frame(4, b"ping")),
        (C2S, frame(3, b"pong!")),
    ]


def run(chunks: list[tuple[str, bytes]]) -> tuple[ChannelFramer, list[Event]]:
    f = ChannelFramer()
    events: list[Event] = []
    for d, data in chunks:
        events += f.feed(d, data)
    return f, events


@pytest.mark.parametrize("auth_selection", [False, True])
@pytest.mark.parametrize("mini_header", [False, True])
def test_link_stage_then_messages(auth_selection: bool, mini_header: bool) -> None:
    f, events = run(session(auth_selection, mini_header))
    kinds = [e.kind for e in events if isinstance(e, LinkUnit)]
    expected = ["header", "link_mess", "header", "link_reply"]
    expected += ["auth_mechanism"] if auth_selection else []
    expected += ["ticket", "link_result"]
    assert kinds == expected
    msgs = [e for e in events if isinstance(e, Message)]
    assert [(m.direction, m.msg_type, m.body) for m in msgs] == [
        (S2C, 103, b"\x01" * 32),
        (S2C, 4, b"ping"),
        (C2S, 3, b"pong!"),
    ]
    assert f.mini_header is mini_header
    assert all(m.serial == (None if mini_header else 7) for m in msgs)
    assert (f.channel_type, f.connection_id, f.auth) == (2, 0x1234, "spice")
    ticket = next(e for e in events if isinstance(e, LinkUnit) and e.kind == "ticket")
    assert ticket.data == TICKET


@settings(max_examples=60, deadline=None)
@given(data=st.data(), auth_selection=st.booleans(), mini_header=st.booleans())
def test_any_split_gives_the_same_events(
    data: st.DataObject, auth_selection: bool, mini_header: bool
) -> None:
    whole = session(auth_selection, mini_header)
    _f, expected = run(whole)
    pieces: list[tuple[str, bytes]] = []
    for d, chunk in whole:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(chunk)), max_size=6)))
        bounds = [0, *cuts, len(chunk)]
        pieces += [(d, chunk[a:b]) for a, b in itertools.pairwise(bounds)]
    _f, got = run(pieces)
    assert got == expected


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    mini_header=st.booleans(),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    limit=st.sampled_from([100, 1000]),
)
def test_header_walk_counts_like_framing_under_any_split(
    data: st.DataObject, mini_header: bool, sizes: list[int], limit: int
) -> None:
    """The guard's walk (bodies=False) sees the messages and the size error that full
    framing sees, however the stream is cut, without keeping bodies."""
    frame = mini if mini_header else (lambda t, b: full(7, t, b))
    link = session(False, mini_header)[:4]
    stream = b"".join(frame(100 + i, bytes([i]) * n) for i, n in enumerate(sizes))
    framer, walker = ChannelFramer(limit), ChannelFramer(limit, bodies=False)
    for f in (framer, walker):
        for d, chunk in link:
            f.feed(d, chunk)
    assert walker.walked[S2C] == 2  # the two messages behind the link result
    events = framer.feed(S2C, stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    walked: list[Event] = []
    for a, b in itertools.pairwise(bounds):
        walked += walker.feed(S2C, stream[a:b])
        assert walker.pending(S2C) < 18  # at most a cut header is held, never a body
    messages = [e for e in events if isinstance(e, Message)]
    assert walker.walked[S2C] - 2 == len(messages)

    def where(evs: list[Event]) -> list[tuple[str, int, str]]:  # the walker keeps no bytes
        return [(e.direction, e.offset, e.reason) for e in evs if isinstance(e, ChannelError)]

    assert where(walked) == where(events)


def test_client_ticket_waits_for_the_reply() -> None:
    f = ChannelFramer()
    both = caps_word(0, 1, 3)
    early = f.feed(C2S, link_mess(both) + struct.pack("<I", 1) + TICKET)
    assert [e.kind for e in early if isinstance(e, LinkUnit)] == ["header", "link_mess"]
    later = f.feed(S2C, link_reply(both))
    kinds = [e.kind for e in later if isinstance(e, LinkUnit)]
    assert kinds == ["header", "link_reply", "auth_mechanism", "ticket"]


def test_bad_magic_is_one_error_and_the_rest_ignored() -> None:
    f = ChannelFramer()
    events = f.feed(C2S, header(18, magic=b"HTTP") + b"x" * 18)
    errors = [e for e in events if isinstance(e, ChannelError)]
    assert len(errors) == 1 and "bad link magic" in errors[0].reason
    assert f.feed(C2S, b"more") == []
    assert f.ignored[C2S] == 22


def test_oversized_message_is_refused_before_buffering() -> None:
    f = ChannelFramer(max_message=1000)
    bits = caps_word(1, 3)
    f.feed(C2S, link_mess(bits))
    f.feed(S2C, link_reply(bits) + OK)
    events = f.feed(S2C, struct.pack("<HI", 101, 5000) + b"\0" * 10)
    (err,) = events
    assert isinstance(err, ChannelError) and "5000 bytes exceeds" in err.reason
    assert f.pending(S2C) == 0


def test_link_error_ends_parsing() -> None:
    bits = caps_word(1, 3)
    f, _events = run([(C2S, link_mess(bits)), (S2C, link_reply(bits, error=5))])
    assert f.link_error == 5
    assert f.feed(S2C, b"anything") == []


def test_huge_link_size_and_bad_caps_are_errors() -> None:
    f = ChannelFramer()
    (_hdr, err) = f.feed(C2S, header(1 << 30))
    assert isinstance(err, ChannelError) and "exceeds" in err.reason
    f2 = ChannelFramer()
    body = bytearray(link_mess(caps_word(1))[16:])
    body[10:14] = struct.pack("<I", 1000)  # num_common_caps far beyond the message
    events = f2.feed(C2S, header(len(body)) + bytes(body))
    assert any(isinstance(e, ChannelError) and "capability" in e.reason for e in events)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    mini_header=st.booleans(),
    sizes=st.lists(
        st.one_of(st.integers(0, 300), st.integers(LARGE - 20, 3 * LARGE)),
        min_size=1,
        max_size=6,
    ),
    limit=st.sampled_from([2 * LARGE, 4 * LARGE]),
    truncate=st.integers(0, 3),
    given_as=st.sampled_from(["bytes", "bytearray", "view"]),
    in_python=st.booleans(),
)
def test_large_messages_in_pieces_give_what_the_whole_stream_gives(
    data: st.DataObject,
    mini_header: bool,
    sizes: list[int],
    limit: int,
    truncate: int,
    given_as: str,
    in_python: bool,
) -> None:
    """Messages of LARGE bytes or more, cut anywhere (their header too), are gathered in an
    assembly of their size: the same messages, error, offsets and pending bytes as feeding
    the stream in one piece, including a stream that ends mid-message. A piece given as a
    view while assembling (the recording process's ring) may change right after: nothing
    of it is kept. The C Assembly and the Python one alike."""
    with pytest.MonkeyPatch.context() as patch:
        if in_python:
            patch.setattr(framing, "ASSEMBLY", framing.PyAssembly)
        frame = mini if mini_header else (lambda t, b: full(7, t, b))
        link = session(False, mini_header)[:4]
        stream = b"".join(frame(100 + i, bytes([i + 1]) * n) for i, n in enumerate(sizes))
        stream = stream[: len(stream) - truncate]
        whole, pieces = ChannelFramer(limit), ChannelFramer(limit)
        for f in (whole, pieces):
            for d, chunk in link:
                f.feed(d, chunk)
        expected = whole.feed(S2C, stream)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        got: list[Event] = []
        for a, b in itertools.pairwise([0, *cuts, len(stream)]):
            piece = stream[a:b]
            if given_as == "bytes":
                got += pieces.feed(S2C, piece)
            elif given_as == "bytearray":  # a caller's reused buffer: the framer keeps a copy
                got += pieces.feed(S2C, cast(bytes, bytearray(piece)))
            else:  # as RecordBuilder passes them: a view only to an assembly
                buffer = bytearray(piece)
                with memoryview(buffer) as view:
                    got += pieces.feed(S2C, view if pieces.assembling(S2C) else bytes(buffer))
                    buffer[:] = b"\xee" * len(buffer)  # the ring's room, written over

        def kept(evs: list[Event]) -> list[Event]:  # an error's bytes: only those seen with it
            return [replace(e, data=b"") if isinstance(e, ChannelError) else e for e in evs]

        assert kept(got) == kept(expected)
        # an error carries the unframed bytes seen with it, a prefix of the whole stream's;
        # every unframed byte is counted as ignored, however the stream came
        for mine, theirs in zip(got, expected, strict=True):
            if isinstance(mine, ChannelError) and isinstance(theirs, ChannelError):
                assert mine.data and theirs.data.startswith(mine.data)
        assert pieces.ignored[S2C] == whole.ignored[S2C]
        assert pieces.offset[S2C] == whole.offset[S2C]
        assert pieces.pending(S2C) == whole.pending(S2C)


def test_a_large_message_in_pieces_is_built_from_one_join() -> None:
    """Its builder gets exactly the message (start 0, end the whole object), not a
    snapshot of the stream that the small message after it shares."""
    calls: list[tuple[int, int, int]] = []
    f, _ = run(session(False, True)[:4])
    big, small = mini(200, b"x" * (2 * LARGE)), mini(201, b"tail")
    stream = big + small
    for a in range(0, len(stream), 50_000):
        f.feed_built(
            S2C,
            stream[a : a + 50_000],
            lambda _d, t, data, start, _b, end, _s, _l: calls.append((t, end - start, len(data))),
        )
    assert calls == [(200, len(big), len(big)), (201, len(small), len(small))]
    assert f.pending(S2C) == 0


def test_truncated_message_stays_pending() -> None:
    bits = caps_word(1, 3)
    f, _ = run([(C2S, link_mess(bits)), (S2C, link_reply(bits) + OK)])
    assert f.feed(S2C, mini(101, b"abcdef")[:-2]) == []
    assert f.pending(S2C) == 10


@pytest.mark.parametrize("mini_header", [False, True])
def test_feed_built_slices_each_message_from_the_snapshot(mini_header: bool) -> None:
    def build(
        d: str,
        msg_type: int,
        data: bytes,
        start: int,
        body: int,
        end: int,
        serial: int | None,
        sub_list: int,
    ) -> tuple[object, ...]:
        return ("built", d, msg_type, data[body:end], data[start:end], serial, sub_list)

    chunks = session(auth_selection=True, mini_header=mini_header)
    _f, expected = run(chunks)
    f = ChannelFramer()
    built = []
    linked = []
    for d, data in chunks:
        built += f.feed_built(d, data, build)
        linked.append(f.linked)
    assert linked == [False, False, False, True, True]  # from the server's link result on
    assert [ev for ev in built if not isinstance(ev, tuple)] == [
        ev for ev in expected if not isinstance(ev, Message)
    ]
    assert [ev[1:] for ev in built if isinstance(ev, tuple)] == [
        tuple(ev) for ev in expected if isinstance(ev, Message)
    ]
