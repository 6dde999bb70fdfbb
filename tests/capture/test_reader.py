"""Capture files in, TCP segments out: formats, link types, damage and errors."""

from __future__ import annotations

import gzip
import io
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spicetap.capture import (
    ACK,
    PSH,
    SYN,
    CaptureError,
    StreamData,
    StreamGap,
    TcpReassembler,
    TcpSegment,
    read_packets,
)
from spicetap.pcap_export import PcapngStreamWriter

from .builders import (
    CLIENT,
    SERVER,
    Frame,
    Pcapng,
    ether,
    ipv4,
    ipv6,
    null,
    sll,
    sll2,
    stream_frames,
    tcp,
    v4_segment,
    write_pcap,
    write_pcap_by_hand,
    write_pcapng,
)

TS = 1_700_000_000.25
CHUNKS = [(True, b"REDQ client link"), (False, b"REDQ server link"), (True, b"x" * 3000)]


def frames() -> list[Frame]:
    return [
        (TS, v4_segment(100, b"hello")),
        (TS + 1, ether(ipv4(CLIENT[0], SERVER[0], b"\0" * 8, p=17))),  # UDP: skipped
        (TS + 2, v4_segment(200, b"back", c2s=False)),
    ]


EXPECTED = [
    TcpSegment(TS, *CLIENT, *SERVER, 100, 1, ACK | PSH, b"hello"),
    TcpSegment(TS + 2, *SERVER, *CLIENT, 200, 1, ACK | PSH, b"back"),
]


def read_all(path: Path) -> list[TcpSegment]:
    with read_packets(path) as reader:
        segments = list(reader)
    assert reader.problem is None
    assert not reader.truncated
    assert reader.segments == len(segments)
    return segments


def reassembled(path: Path) -> dict[tuple[int, str], bytes]:
    reassembler = TcpReassembler()
    out: dict[tuple[int, str], bytes] = {}
    events = [e for s in read_all(path) for e in reassembler.feed(s)] + reassembler.finish()
    for event in events:
        assert not isinstance(event, StreamGap)
        if isinstance(event, StreamData):
            key = (event.conn, event.direction)
            out[key] = out.get(key, b"") + event.data
    return out


def approx(segments: list[TcpSegment]) -> list[tuple[object, ...]]:
    return [(pytest.approx(s.ts, abs=1e-6), *s[1:]) for s in segments]


# -- formats ------------------------------------------------------------------------------


def test_pcap_microseconds(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "a.pcap", frames())
    with read_packets(path) as reader:
        segments = list(reader)
    assert reader.format == "pcap"
    assert (reader.frames, reader.segments) == (3, 2)
    assert approx(segments) == approx(EXPECTED)


def test_pcap_nanoseconds(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "a.pcap", [(TS + 0.123456789, v4_segment(1, b"x"))], nano=True)
    (segment,) = read_all(path)
    assert segment.ts == pytest.approx(TS + 0.123456789, abs=1e-9)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize(
    ("nano", "modified"),
    [(False, False), (True, False), (False, True)],
    ids=["us", "ns", "modified"],
)
def test_pcap_by_hand(tmp_path: Path, order: str, nano: bool, modified: bool) -> None:
    path = write_pcap_by_hand(
        tmp_path / "a.pcap", frames(), order=order, nano=nano, modified=modified
    )
    assert approx(read_all(path)) == approx(EXPECTED)


def test_pcapng_by_dpkt(tmp_path: Path) -> None:
    path = write_pcapng(tmp_path / "a.pcapng", frames())
    with read_packets(path) as reader:
        segments = list(reader)
    assert reader.format == "pcapng"
    assert approx(segments) == approx(EXPECTED)


def test_pcapng_interfaces_with_their_own_link_types_and_clocks(tmp_path: Path) -> None:
    ip = ipv4(CLIENT[0], SERVER[0], tcp(CLIENT[1], SERVER[1], 7, 1, ACK, b"p"))
    file = (
        Pcapng()
        .section()
        .interface(1)  # Ethernet, microseconds
        .interface(101, tsresol=9)  # raw IP, nanoseconds
        .interface(276, tsresol=0x80 | 20, tsoffset=1_000_000_000)  # SLL2, 2**-20 s
        .other(4)  # a name resolution block: skipped
        .epb(ether(ip), 1_700_000_000_500_000, iface=0)
        .epb(ip, 1_700_000_000_123_456_789, iface=1)
        .epb(sll2(ip), 3 << 20, iface=2)
        .other(5)  # interface statistics: skipped
    )
    segments = read_all(file.write(tmp_path / "a.pcapng"))
    assert [s.payload for s in segments] == [b"p"] * 3
    assert segments[0].ts == pytest.approx(1_700_000_000.5)
    assert segments[1].ts == pytest.approx(1_700_000_000.123456789)
    assert segments[2].ts == pytest.approx(1_000_000_003.0)


def test_pcapng_sections_in_both_byte_orders(tmp_path: Path) -> None:
    first = v4_segment(1, b"big")
    second = ether(ipv6("::1", "::2", tcp(1, 2, 3, 4, ACK, b"little")), 0x86DD)
    file = (
        Pcapng(">")
        .section()
        .interface(1)
        .epb(first, 5_000_000)
        .section("<")
        .interface(113)  # interfaces are numbered afresh in a new section
        .epb(sll(v4_segment(2, b"cooked")[14:]), 6_000_000)
        .interface(1)
        .epb(second, 7_000_000, iface=1)
    )
    segments = read_all(file.write(tmp_path / "a.pcapng"))
    assert [(s.payload, s.ts) for s in segments] == [
        (b"big", 5.0),
        (b"cooked", 6.0),
        (b"little", 7.0),
    ]
    assert (segments[2].src, segments[2].dst) == ("::1", "::2")


def test_pcapng_simple_and_obsolete_packet_blocks(tmp_path: Path) -> None:
    file = (
        Pcapng()
        .section()
        .interface(1, snaplen=0)
        .epb(v4_segment(1, b"enhanced"), 9_000_000)
        .spb(v4_segment(2, b"simple"))  # no time of its own: the one before
        .pb(v4_segment(3, b"obsolete"), 10_000_000)
    )
    segments = read_all(file.write(tmp_path / "a.pcapng"))
    assert [(s.payload, s.ts) for s in segments] == [
        (b"enhanced", 9.0),
        (b"simple", 9.0),
        (b"obsolete", 10.0),
    ]


def test_pcapng_unsupported_link_type_is_skipped(tmp_path: Path) -> None:
    file = (
        Pcapng()
        .section()
        .interface(105)  # 802.11
        .interface(1)
        .epb(b"\0" * 40, 1, iface=0)
        .epb(v4_segment(1, b"ok"), 2, iface=1)
    )
    with read_packets(file.write(tmp_path / "a.pcapng")) as reader:
        segments = list(reader)
    assert [s.payload for s in segments] == [b"ok"]
    assert reader.frames == 2
    assert reader.unsupported_linktypes == {105}


def test_gzip(tmp_path: Path) -> None:
    plain = write_pcapng(tmp_path / "a.pcapng", frames())
    packed = tmp_path / "a.pcapng.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with read_packets(packed) as reader:
        assert approx(list(reader)) == approx(EXPECTED)
    assert reader.compressed


# -- link types and IP versions, through a whole connection --------------------------------


@pytest.mark.parametrize(
    ("linktype", "wrap"),
    [
        (1, ether),
        (113, sll),
        (276, sll2),
        (101, lambda ip: ip),
        (0, null),
        (108, lambda ip: null(ip, order=">")),
    ],
)
@pytest.mark.parametrize("writer", [write_pcap, write_pcapng])
def test_link_types_reassemble(tmp_path: Path, linktype: int, wrap: object, writer: object) -> None:
    assert callable(wrap)
    assert callable(writer)
    cooked = [(ts, wrap(frame[14:])) for ts, frame in stream_frames(CHUNKS)]
    path = writer(tmp_path / "a.cap", cooked, linktype=linktype)
    assert reassembled(path) == {
        (0, "c2s"): b"REDQ client link" + b"x" * 3000,
        (0, "s2c"): b"REDQ server link",
    }


def test_ipv6_connection(tmp_path: Path) -> None:
    c, s = ("fd00::1", 50000), ("fd00::2", 5930)
    seq = {True: 10, False: 20}
    out: list[Frame] = []
    for i, (c2s, flags, data) in enumerate(
        [(True, SYN, b""), (False, SYN | ACK, b""), (True, ACK, b"REDQ"), (False, ACK, b"REDQ!")]
    ):
        (src, sport), (dst, dport) = (c, s) if c2s else (s, c)
        body = tcp(sport, dport, seq[c2s], seq[not c2s], flags, data)
        out.append((float(i), ether(ipv6(src, dst, body), 0x86DD)))
        seq[c2s] += len(data) + (1 if flags & SYN else 0)
    assert reassembled(write_pcapng(tmp_path / "a.pcapng", out)) == {
        (0, "c2s"): b"REDQ",
        (0, "s2c"): b"REDQ!",
    }


def test_out_of_order_and_retransmitted_frames(tmp_path: Path) -> None:
    stream = stream_frames([(True, b"aaaa"), (True, b"bbbb"), (True, b"cccc"), (False, b"ok")])
    handshake, data, close = stream[:3], stream[3:7], stream[7:]
    shuffled = [data[2], data[0], data[0], data[1], data[3], data[2]]
    path = write_pcapng(tmp_path / "a.pcapng", [*handshake, *shuffled, *close])
    assert reassembled(path) == {(0, "c2s"): b"aaaabbbbcccc", (0, "s2c"): b"ok"}


def test_a_lost_frame_is_a_gap(tmp_path: Path) -> None:
    stream = stream_frames([(True, b"aaaa"), (True, b"bbbb"), (True, b"cccc")])
    del stream[4]
    reassembler = TcpReassembler()
    events = [
        e for s in read_all(write_pcap(tmp_path / "a.pcap", stream)) for e in reassembler.feed(s)
    ]
    assert [e.missing for e in events if isinstance(e, StreamGap)] == [4]


def test_snap_length(tmp_path: Path) -> None:
    stream = stream_frames([(True, b"a" * 100), (True, b"b" * 100)])
    path = write_pcap_by_hand(tmp_path / "a.pcap", stream, order="<", snaplen=14 + 20 + 20 + 60)
    reassembler = TcpReassembler()
    events = [e for s in read_all(path) for e in reassembler.feed(s)] + reassembler.finish()
    assert [
        (type(e).__name__, getattr(e, "data", getattr(e, "missing", None))) for e in events[1:5]
    ] == [
        ("StreamData", b"a" * 60),
        ("StreamGap", 40),
        ("StreamData", b"b" * 60),
        ("StreamGap", 40),
    ]


# -- damage: the file is good up to a point -------------------------------------------------


@pytest.mark.parametrize("writer", [write_pcap, write_pcapng])
@pytest.mark.parametrize("cut", [1, 7, 20, 60])
def test_truncated_tail(tmp_path: Path, writer: object, cut: int) -> None:
    assert callable(writer)
    good = [(TS + i, v4_segment(1 + i * 10, b"0123456789")) for i in range(5)]
    path = writer(tmp_path / "a.cap", good)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with read_packets(path) as reader:
        segments = list(reader)
    assert len(segments) == 4
    assert reader.truncated
    assert reader.problem is not None
    assert reader.problem.startswith(f"{path}: truncated at byte ")
    assert "\n" not in reader.problem


@pytest.mark.parametrize("size", [500, 50_000])  # in the first read, or later
def test_truncated_gzip(tmp_path: Path, size: int) -> None:
    rng = random.Random(size)
    good = [(TS + i, v4_segment(1 + i * size, rng.randbytes(size))) for i in range(50)]
    data = gzip.compress(write_pcapng(tmp_path / "a.pcapng", good).read_bytes())
    path = tmp_path / "a.pcapng.gz"
    path.write_bytes(data[: len(data) // 2])
    with read_packets(path) as reader:
        segments = list(reader)
    assert 20 <= len(segments) < 25
    assert [s.payload for s in segments] == [frame[54:] for _, frame in good[: len(segments)]]
    assert reader.problem is not None
    assert reader.problem.startswith(f"{path}: truncated")


def test_several_gzip_members(tmp_path: Path) -> None:
    data = write_pcapng(tmp_path / "a.pcapng", frames()).read_bytes()
    path = tmp_path / "a.pcapng.gz"
    path.write_bytes(gzip.compress(data[:100]) + gzip.compress(data[100:]))
    assert approx(read_all(path)) == approx(EXPECTED)


def test_damaged_block(tmp_path: Path) -> None:
    file = Pcapng().section().interface(1).epb(v4_segment(1, b"ok"), 1).epb(v4_segment(2, b"no"), 2)
    data = bytearray(file.bytes())
    data[-4:] = b"\xff\xff\x00\x00"  # the trailing length of the last block
    path = tmp_path / "a.pcapng"
    path.write_bytes(bytes(data))
    with read_packets(path) as reader:
        segments = list(reader)
    assert [s.payload for s in segments] == [b"ok"]
    assert reader.problem is not None
    assert "damaged at byte" in reader.problem


def test_undeclared_interface(tmp_path: Path) -> None:
    file = (
        Pcapng()
        .section()
        .interface(1)
        .epb(v4_segment(1, b"ok"), 1)
        .epb(v4_segment(2, b"no"), 2, iface=3)
    )
    with read_packets(file.write(tmp_path / "a.pcapng")) as reader:
        assert [s.payload for s in reader] == [b"ok"]
    assert reader.problem is not None
    assert "undeclared interface 3" in reader.problem


def test_garbage_after_good_packets(tmp_path: Path) -> None:
    path = write_pcapng(tmp_path / "a.pcapng", frames())
    path.write_bytes(path.read_bytes() + b"\x06\x00\x00\x00\x03\x00\x00\x00" + b"junk" * 10)
    with read_packets(path) as reader:
        assert len(list(reader)) == 2
    assert reader.problem is not None


# -- files that are not captures at all -------------------------------------------------------


def error_for(path: Path) -> str:
    with pytest.raises(CaptureError) as info:
        read_packets(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ")
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert error_for(tmp_path / "nope.pcapng").endswith("no such file")


def test_directory(tmp_path: Path) -> None:
    assert "directory" in error_for(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    path.write_bytes(b"")
    assert "empty file" in error_for(path)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x00\x01", "2-byte file"),
        (b"hello, this is a text file\n", "not a pcap or pcapng capture (starts with 68656c6c)"),
        (bytes(range(256)) * 10, "not a pcap or pcapng capture"),
        (b"REDQ\x02\x00\x00\x00", "looks like a raw SPICE stream"),
        (b"\x89PNG\r\n\x1a\n", "looks like a PNG image"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated pcap file header (6 of 24 bytes)"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00", "truncated pcapng section header"),
        (b"\x0a\x0d\x0d\x0a" + b"\x1c\0\0\0" + b"XXXX" + bytes(16), "bad byte-order magic"),
        (gzip.compress(b"not a capture either"), "not a pcap or pcapng capture"),
        (gzip.compress(b""), "empty compressed file"),
        (b"\x1f\x8b\x08\x00garbage", "damaged gzip data"),
    ],
)
def test_foreign_files(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "x.pcapng"
    path.write_bytes(content)
    assert words in error_for(path)


def test_a_pcapng_cut_anywhere_in_its_section_header_is_an_error(tmp_path: Path) -> None:
    """Under 28 bytes or not, a file without its whole section header holds no packet."""
    out = io.BytesIO()
    PcapngStreamWriter(out, comment="a section header with options").finish()
    whole = out.getvalue()
    shb = int.from_bytes(whole[4:8], "little")
    assert shb > 29
    for cut in (27, 28, 29, shb // 2, shb - 1):
        path = tmp_path / f"cut{cut}.pcapng"
        path.write_bytes(whole[:cut])
        total = 28 if cut < 28 else shb
        assert error_for(path).endswith(f"truncated pcapng section header ({cut} of {total} bytes)")
    path.write_bytes(whole[:shb])  # a whole header and nothing else: a capture, empty
    with read_packets(path) as reader:
        assert list(reader) == [] and reader.problem is None


def test_unsupported_pcap_link_type(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "a.pcap", frames(), linktype=105)
    assert "link type 105 captures are not supported" in error_for(path)


def test_close_early(tmp_path: Path) -> None:
    path = write_pcapng(tmp_path / "a.pcapng", frames())
    reader = read_packets(path)
    assert next(reader).payload == b"hello"
    reader.close()
    assert list(reader) == []


# -- fuzz: damage anywhere is a CaptureError or a problem, never a traceback ------------------


def _sample(kind: str) -> bytes:
    stream = stream_frames(CHUNKS)
    if kind == "pcapng-by-hand":
        file = Pcapng(">").section().interface(1, tsresol=9)
        for ts, frame in stream:
            file.epb(frame, int(ts * 1e9))
        return file.spb(stream[3][1]).bytes()
    with tempfile.TemporaryDirectory() as tmp:
        writer = write_pcap if kind == "pcap" else write_pcapng
        return writer(Path(tmp) / "x", stream).read_bytes()


SAMPLES = {kind: _sample(kind) for kind in ("pcap", "pcapng", "pcapng-by-hand")}


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(sorted(SAMPLES)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10**6),
    compress=st.booleans(),
)
def test_damage_never_raises_past_the_api(
    tmp_path: Path, kind: str, edits: list[tuple[int, int]], cut: int, compress: bool
) -> None:
    data = bytearray(SAMPLES[kind])
    for where, value in edits:
        data[where % len(data)] = value
    content = bytes(data[: len(data) - cut % len(data)])
    if compress:
        content = gzip.compress(content)
    path = tmp_path / "fuzz"
    path.write_bytes(content)
    try:
        reader = read_packets(path)
    except CaptureError as exc:
        assert "\n" not in str(exc)
        return
    reassembler = TcpReassembler()
    with reader:
        for segment in reader:
            reassembler.feed(segment)
    reassembler.finish()
    assert reader.problem is None or "\n" not in reader.problem


# -- the chunked path: files that cannot be mapped, in tiny chunks ----------------------------


@pytest.mark.parametrize("chunk", [5, 13, 4096])
@pytest.mark.parametrize("writer", [write_pcap, write_pcapng])
def test_chunked_reading_gives_the_same_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, writer: object
) -> None:
    assert callable(writer)
    path = writer(tmp_path / "a.cap", stream_frames(CHUNKS))
    mapped = read_all(path)

    def no_map(*args: object, **kwargs: object) -> object:
        raise OSError("cannot map")

    monkeypatch.setattr("spicetap.capture.reader.mmap.mmap", no_map)
    monkeypatch.setattr("spicetap.capture.reader.CHUNK", chunk)
    monkeypatch.setattr("spicetap.capture.source.CHUNK", chunk)
    assert read_all(path) == mapped
    path.write_bytes(path.read_bytes()[:-3])
    with read_packets(path) as reader:
        assert list(reader) == mapped[:-1]
    assert reader.problem is not None
    assert reader.problem.startswith(f"{path}: truncated at byte ")
