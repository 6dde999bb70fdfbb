"""The TCP reassembler: segments in, stream events out (no files involved)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from spicetap.capture import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamGap,
    StreamOpened,
    TcpReassembler,
    TcpSegment,
)

from .builders import CLIENT, SERVER, segment

DATA = ACK | PSH
CISN = 1000
SISN = 5000


def run(
    segments: Iterable[TcpSegment], reassembler: TcpReassembler | None = None
) -> list[StreamEvent]:
    reassembler = reassembler or TcpReassembler()
    events: list[StreamEvent] = []
    for seg in segments:
        events += reassembler.feed(seg)
    return events + reassembler.finish()


def opening(cisn: int = CISN, sisn: int = SISN, ts: float = 1.0) -> list[TcpSegment]:
    return [
        segment(cisn, flags=SYN, ack=0, ts=ts),
        segment(sisn, flags=SYN | ACK, ack=cisn + 1, c2s=False, ts=ts),
        segment(cisn + 1, flags=ACK, ack=sisn + 1, ts=ts),
    ]


def c2s(
    offset: int, data: bytes, flags: int = DATA, ts: float = 2.0, isn: int = CISN
) -> TcpSegment:
    """Client data at stream offset ``offset``."""
    return segment(isn + 1 + offset, data, flags, ack=SISN + 1, ts=ts)


def s2c(
    offset: int, data: bytes, flags: int = DATA, ts: float = 2.0, isn: int = SISN
) -> TcpSegment:
    return segment(isn + 1 + offset, data, flags, ack=CISN + 1, c2s=False, ts=ts)


def streams(events: list[StreamEvent]) -> dict[tuple[int, str], bytes]:
    out: dict[tuple[int, str], bytes] = {}
    for event in events:
        if isinstance(event, StreamData):
            key = (event.conn, event.direction)
            out[key] = out.get(key, b"") + event.data
    return out


def kinds(events: list[StreamEvent]) -> list[str]:
    return [type(event).__name__ for event in events]


def test_a_whole_conversation() -> None:
    events = run(
        [
            *opening(),
            c2s(0, b"REDQ", ts=2.0),
            s2c(0, b"REDQhello", ts=3.0),
            c2s(4, b"more", ts=4.0),
            c2s(8, b"", FIN | ACK, ts=5.0),
            s2c(9, b"", FIN | ACK, ts=6.0),
            c2s(9, b"", ACK, ts=7.0),  # the last ACK, after the close: ignored
        ]
    )
    assert events == [
        StreamOpened(0, 1.0, CLIENT, SERVER, False),
        StreamData(0, 2.0, "c2s", b"REDQ"),
        StreamData(0, 3.0, "s2c", b"REDQhello"),
        StreamData(0, 4.0, "c2s", b"more"),
        StreamClosed(0, 6.0, "fin"),
    ]


def test_events_are_frozen_dataclasses() -> None:
    events = run([*opening(), c2s(0, b"x")])
    data = events[1]
    assert isinstance(data, StreamData)
    assert data == StreamData(0, 2.0, "c2s", b"x")
    try:
        data.data = b"y"  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("StreamData is not frozen")


def test_retransmission_and_overlap() -> None:
    events = run(
        [
            *opening(),
            c2s(0, b"abcd"),
            c2s(0, b"abcd"),  # retransmitted
            c2s(2, b"cdef"),  # overlaps: only "ef" is new
            c2s(0, b"abcdefgh"),  # repacketized retransmission: only "gh" is new
            c2s(1, b"b"),  # old news
        ]
    )
    assert [e.data for e in events if isinstance(e, StreamData)] == [b"abcd", b"ef", b"gh"]
    assert not any(isinstance(e, StreamGap) for e in events)


def test_out_of_order() -> None:
    events = run(
        [*opening(), c2s(8, b"3333", ts=2.0), c2s(4, b"2222", ts=3.0), c2s(0, b"1111", ts=4.0)]
    )
    assert events[1:4] == [
        StreamData(0, 4.0, "c2s", b"1111"),
        StreamData(0, 4.0, "c2s", b"2222"),
        StreamData(0, 4.0, "c2s", b"3333"),
    ]
    assert events[4] == StreamClosed(0, 4.0, "eof")


def test_out_of_order_with_overlaps_in_the_buffer() -> None:
    events = run(
        [
            *opening(),
            c2s(6, b"ghij"),
            c2s(4, b"efgh"),
            c2s(4, b"ef"),  # a shorter copy at the same offset: the longer one stays
            c2s(0, b"abcdef"),
        ]
    )
    assert streams(events) == {(0, "c2s"): b"abcdefghij"}


def test_a_hole_is_declared_at_the_close() -> None:
    events = run([*opening(), c2s(0, b"aaaa"), c2s(10, b"cccc"), c2s(14, b"", FIN | ACK, ts=3.0)])
    assert events[1:] == [
        StreamData(0, 2.0, "c2s", b"aaaa"),
        StreamGap(0, 3.0, "c2s", 6),
        StreamData(0, 3.0, "c2s", b"cccc"),
        StreamClosed(0, 3.0, "eof"),
    ]


def test_a_hole_is_declared_when_the_buffer_is_full() -> None:
    reassembler = TcpReassembler(max_buffer=8)
    events = run(
        [
            *opening(),
            c2s(0, b"aa"),
            c2s(4, b"cccc", ts=3.0),
            c2s(8, b"dddd", ts=4.0),
            c2s(12, b"e", ts=5.0),
        ],
        reassembler,
    )
    assert events[1:] == [
        StreamData(0, 2.0, "c2s", b"aa"),
        StreamGap(0, 5.0, "c2s", 2),
        StreamData(0, 5.0, "c2s", b"cccc"),
        StreamData(0, 5.0, "c2s", b"dddd"),
        StreamData(0, 5.0, "c2s", b"e"),
        StreamClosed(0, 5.0, "eof"),
    ]
    # The late bytes of the hole are old news by now.
    assert reassembler.feed(c2s(2, b"bb")) == []


def test_lost_data_before_a_fin() -> None:
    events = run(
        [*opening(), c2s(0, b"ab"), c2s(5, b"", FIN | ACK, ts=3.0), s2c(0, b"", FIN | ACK, ts=4.0)]
    )
    assert events[1:] == [
        StreamData(0, 2.0, "c2s", b"ab"),
        StreamGap(0, 4.0, "c2s", 3),
        StreamClosed(0, 4.0, "eof"),
    ]


def test_a_hole_the_receiver_acknowledged_is_declared_at_once() -> None:
    events = run(
        [
            *opening(),
            c2s(0, b"aa"),
            c2s(4, b"cc", ts=3.0),
            segment(SISN + 1, flags=ACK, ack=CISN + 1 + 3, c2s=False, ts=4.0),  # not all of it
            segment(SISN + 1, flags=ACK, ack=CISN + 1 + 4, c2s=False, ts=5.0),
            c2s(6, b"dd", ts=6.0),
        ]
    )
    assert events[1:5] == [
        StreamData(0, 2.0, "c2s", b"aa"),
        StreamGap(0, 5.0, "c2s", 2),
        StreamData(0, 5.0, "c2s", b"cc"),
        StreamData(0, 6.0, "c2s", b"dd"),
    ]


def test_an_acknowledged_fin_closes_despite_a_hole() -> None:
    events = run(
        [
            *opening(),
            c2s(0, b"ab"),
            c2s(5, b"", FIN | ACK, ts=3.0),
            segment(SISN + 1, flags=FIN | ACK, ack=CISN + 1 + 6, c2s=False, ts=4.0),
        ]
    )
    assert events[1:] == [
        StreamData(0, 2.0, "c2s", b"ab"),
        StreamGap(0, 4.0, "c2s", 3),
        StreamClosed(0, 4.0, "fin"),
    ]


def test_rst() -> None:
    reassembler = TcpReassembler()
    events = run([*opening(), c2s(0, b"ab"), s2c(0, b"", RST | ACK, ts=3.0)], reassembler)
    assert events[-1] == StreamClosed(0, 3.0, "rst")
    assert reassembler.feed(c2s(2, b"late")) == []


def test_stray_rst_opens_nothing() -> None:
    assert run([segment(1, flags=RST)]) == []


def test_sequence_wraparound() -> None:
    isn = 2**32 - 3
    events = run(
        [
            *opening(cisn=isn),
            c2s(0, b"abcd", isn=isn),  # seq 2**32 - 2 .. 1
            c2s(8, b"ijkl", isn=isn),  # out of order, after the wrap
            c2s(4, b"efgh", isn=isn),
            c2s(2, b"cdef", isn=isn),  # an old overlap, from before the wrap
        ]
    )
    assert streams(events) == {(0, "c2s"): b"abcdefghijkl"}
    assert not any(isinstance(e, StreamGap) for e in events)


def test_port_reuse_after_close() -> None:
    first = [*opening(), c2s(0, b"one"), s2c(0, b"", RST)]
    second = [*opening(cisn=90000, ts=5.0), c2s(0, b"two", isn=90000)]
    events = run([*first, *second])
    assert [(type(e).__name__, e.conn) for e in events] == [
        ("StreamOpened", 0),
        ("StreamData", 0),
        ("StreamClosed", 0),
        ("StreamOpened", 1),
        ("StreamData", 1),
        ("StreamClosed", 1),
    ]
    assert streams(events) == {(0, "c2s"): b"one", (1, "c2s"): b"two"}


def test_a_new_syn_on_an_open_connection() -> None:
    events = run(
        [*opening(), c2s(0, b"one"), *opening(cisn=90000, ts=5.0), c2s(0, b"two", isn=90000)]
    )
    assert events[2] == StreamClosed(0, 5.0, "eof")
    assert events[3] == StreamOpened(1, 5.0, CLIENT, SERVER, False)
    assert streams(events) == {(0, "c2s"): b"one", (1, "c2s"): b"two"}


def test_retransmitted_syn_is_ignored() -> None:
    events = run([segment(CISN, flags=SYN, ack=0), *opening(), c2s(0, b"x")])
    assert kinds(events) == ["StreamOpened", "StreamData", "StreamClosed"]


def test_midstream_lower_port_is_the_server() -> None:
    events = run([s2c(100, b"from server"), c2s(50, b"from client")])
    assert events[0] == StreamOpened(0, 2.0, CLIENT, SERVER, True)
    assert streams(events) == {(0, "s2c"): b"from server", (0, "c2s"): b"from client"}


def test_midstream_known_server_wins_over_port_order() -> None:
    high_server = ("10.0.0.9", 60000)
    low_client = ("10.0.0.8", 1000)
    ends = (low_client, high_server)
    handshake = [
        segment(1, flags=SYN, ack=0, endpoints=ends),
        segment(2, flags=SYN | ACK, ack=2, c2s=False, endpoints=ends),
    ]
    other_client = ("10.0.0.7", 2000)
    midstream = segment(10, b"x", endpoints=(high_server, other_client))
    events = run([*handshake, midstream])
    assert events[0] == StreamOpened(0, 1.0, low_client, high_server, False)
    assert events[1] == StreamOpened(1, 1.0, other_client, high_server, True)


def test_syn_ack_without_syn() -> None:
    events = run([opening()[1], c2s(0, b"hello"), s2c(0, b"hi")])
    assert events[0] == StreamOpened(0, 1.0, CLIENT, SERVER, False)
    assert streams(events) == {(0, "c2s"): b"hello", (0, "s2c"): b"hi"}


def test_start_from_the_peer_ack_when_the_syn_ack_was_lost() -> None:
    events = run([opening()[0], opening()[2], s2c(5, b"late")])
    assert events[1:] == [
        StreamGap(0, 2.0, "s2c", 5),
        StreamData(0, 2.0, "s2c", b"late"),
        StreamClosed(0, 2.0, "eof"),
    ]


def test_snapped_segment() -> None:
    events = run(
        [*opening(), segment(CISN + 1, b"abc", DATA, ack=SISN + 1, snapped=7), c2s(10, b"next")]
    )
    assert events[1:4] == [
        StreamData(0, 1.0, "c2s", b"abc"),
        StreamGap(0, 1.0, "c2s", 7),
        StreamData(0, 2.0, "c2s", b"next"),
    ]


def test_connection_ids_in_order_of_first_appearance() -> None:
    a = (("10.0.0.1", 40001), SERVER)
    b = (("10.0.0.1", 40002), SERVER)
    events = run(
        [
            segment(1, flags=SYN, ack=0, endpoints=b),
            segment(1, flags=SYN, ack=0, endpoints=a),
            segment(2, b"to b", endpoints=b),
            segment(2, b"to a", endpoints=a),
        ]
    )
    opened = [e for e in events if isinstance(e, StreamOpened)]
    assert [(e.conn, e.client) for e in opened] == [(0, b[0]), (1, a[0])]
    assert streams(events) == {(0, "c2s"): b"to b", (1, "c2s"): b"to a"}
    assert [e.conn for e in events if isinstance(e, StreamClosed)] == [0, 1]


def test_finish_uses_the_last_time_seen() -> None:
    events = run([*opening(), c2s(0, b"x", ts=7.0), s2c(0, b"", ACK, ts=9.0)])
    assert events[-1] == StreamClosed(0, 9.0, "eof")


def test_data_after_the_fin_is_ignored() -> None:
    events = run([*opening(), c2s(0, b"ab", FIN | ACK | PSH), c2s(2, b"zz")])
    assert streams(events) == {(0, "c2s"): b"ab"}


# -- property: any cutting, shuffling and duplicating gives the stream back -------------


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    cuts=st.lists(st.integers(1, 2999), max_size=40),
    seed=st.integers(0, 2**32 - 1),
    isn=st.sampled_from([0, 12345, 2**32 - 100, 2**32 - 1]),
    dropped=st.sets(st.integers(0, 40), max_size=3),
)
def test_random_segmentation(
    data: bytes, cuts: list[int], seed: int, isn: int, dropped: set[int]
) -> None:
    rng = random.Random(seed)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = [(a, data[a:b]) for a, b in itertools.pairwise(bounds)]
    # Retransmissions, some repacketized across piece boundaries.
    extra = []
    for _ in range(rng.randrange(5)):
        a = rng.randrange(len(data))
        b = rng.randrange(a + 1, len(data) + 1)
        extra.append((a, data[a:b]))
    kept = [p for i, p in enumerate(pieces) if i not in dropped or i == 0]
    lost = len(kept) != len(pieces)
    sent = kept + ([] if lost else extra)
    # Reordered within a window of 4.
    order = sorted(range(len(sent)), key=lambda i: i + rng.uniform(0, 4))
    segments = [
        *opening(cisn=isn),
        *(c2s(sent[i][0], sent[i][1], isn=isn) for i in order),
        c2s(len(data), b"", FIN | ACK, isn=isn),
        s2c(0, b"", FIN | ACK),
    ]
    events = run(segments)
    assert isinstance(events[-1], StreamClosed)
    got = bytearray()
    for event in events:
        if isinstance(event, StreamData):
            got += event.data
        elif isinstance(event, StreamGap):
            got += b"\0" * event.missing
    assert len(got) == len(data)
    if not lost:
        assert bytes(got) == data
        assert events[-1].reason == "fin"
        assert not any(isinstance(e, StreamGap) for e in events)
    else:
        expected = bytearray(len(data))
        for offset, piece in kept:
            expected[offset : offset + len(piece)] = piece
        assert bytes(got) == bytes(expected)


# -- property: any segments at all keep the event stream well formed ---------------------

ENDPOINTS = [(CLIENT, SERVER), (("10.0.0.1", 40001), SERVER), ((SERVER[0], 5901), CLIENT)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(ENDPOINTS) - 1),
            st.booleans(),
            st.sampled_from([0, 1, 2, 1000, 2**31, 2**32 - 1]),
            st.integers(0, 40),
            st.integers(0, 0x1F),
            st.binary(max_size=12),
            st.integers(0, 3),
        ),
        max_size=60,
    )
)
def test_any_segments_give_well_formed_events(
    specs: list[tuple[int, bool, int, int, int, bytes, int]],
) -> None:
    segments = [
        segment(
            base + offset,
            payload,
            flags,
            ack=base + offset,
            c2s=c2s,
            ts=float(i),
            snapped=snapped,
            endpoints=ENDPOINTS[which],
        )
        for i, (which, c2s, base, offset, flags, payload, snapped) in enumerate(specs)
    ]
    events = run(segments)
    state: dict[int, str] = {}
    for event in events:
        if isinstance(event, StreamOpened):
            assert event.conn == len(state)
            state[event.conn] = "open"
            continue
        assert state[event.conn] == "open"
        if isinstance(event, StreamClosed):
            state[event.conn] = "closed"
        elif isinstance(event, StreamData):
            assert event.data
        else:
            assert isinstance(event, StreamGap)
            assert event.missing > 0
    assert set(state.values()) <= {"closed"}
