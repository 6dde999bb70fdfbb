"""The frame decoders: each fast path against dpkt, the general decoder."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spicetap.capture import ACK, FIN, PSH, SYN, TcpSegment, decode_with_dpkt, make_decoder

from .builders import (
    CLIENT,
    CLIENT6,
    SERVER,
    SERVER6,
    ether,
    ipv4,
    ipv6,
    null,
    sll,
    sll2,
    tcp,
    vlan,
)

C, S = CLIENT[0], SERVER[0]
C6, S6 = CLIENT6[0], SERVER6[0]


def both(linktype: int, frame: bytes, ts: float = 12.5) -> TcpSegment | None:
    """Decode with the fast path, at an offset inside a bigger buffer, and check that
    dpkt agrees; return the result."""
    decode = make_decoder(linktype)
    assert decode is not None
    buf = b"junk" + frame + b"trailing junk"
    fast = decode(buf, 4, len(frame), ts)
    assert fast == decode_with_dpkt(linktype, frame, ts)
    return fast


def seg4(payload: bytes = b"data", **kw: int) -> bytes:
    return ipv4(C, S, tcp(40000, 5900, 1234, 5678, ACK | PSH, payload), **kw)


def seg6(payload: bytes = b"data") -> bytes:
    return ipv6(C6, S6, tcp(40000, 5900, 1234, 5678, ACK | PSH, payload))


EXPECTED4 = TcpSegment(12.5, C, 40000, S, 5900, 1234, 5678, ACK | PSH, b"data", 0)
EXPECTED6 = TcpSegment(12.5, C6, 40000, S6, 5900, 1234, 5678, ACK | PSH, b"data", 0)


@pytest.mark.parametrize(
    ("linktype", "frame", "expected"),
    [
        (1, ether(seg4()), EXPECTED4),
        (1, ether(seg6(), 0x86DD), EXPECTED6),
        (113, sll(seg4()), EXPECTED4),
        (113, sll(seg6(), 0x86DD), EXPECTED6),
        (276, sll2(seg4()), EXPECTED4),
        (276, sll2(seg6(), 0x86DD), EXPECTED6),
        (101, seg4(), EXPECTED4),
        (101, seg6(), EXPECTED6),
        (12, seg4(), EXPECTED4),
        (14, seg6(), EXPECTED6),
        (228, seg4(), EXPECTED4),
        (229, seg6(), EXPECTED6),
        (0, null(seg4()), EXPECTED4),
        (0, null(seg4(), order=">"), EXPECTED4),
        (0, null(seg6(), 30), EXPECTED6),
        (0, null(seg6(), 24, order=">"), EXPECTED6),
        (108, null(seg4(), order=">"), EXPECTED4),
        (108, null(seg6(), 28, order=">"), EXPECTED6),
        (1, vlan(seg4()), EXPECTED4),
        (1, vlan(seg6(), 0x86DD), EXPECTED6),
    ],
)
def test_link_types(linktype: int, frame: bytes, expected: TcpSegment) -> None:
    assert both(linktype, frame) == expected


def test_ethernet_padding_is_not_payload() -> None:
    frame = ether(ipv4(C, S, tcp(1, 2, 3, 4, ACK)))
    padded = frame + b"\0" * (60 - len(frame))
    result = both(1, padded)
    assert result is not None
    assert result.payload == b""


def test_ip_and_tcp_options() -> None:
    options = b"\x01\x01\x08\x0a" + b"\x00" * 8  # NOP NOP timestamps
    packet = dpkt.ip.IP(
        src=bytes([10, 0, 0, 1]),
        dst=bytes([10, 0, 0, 2]),
        p=6,
        opts=b"\x94\x04\x00\x00",  # router alert
        data=tcp(40000, 5900, 1234, 5678, ACK | PSH, b"data", opts=options),
    )
    packet.hl = 6
    packet.len = 24 + 32 + 4
    assert both(1, ether(bytes(packet))) == EXPECTED4


def test_ipv6_extension_header() -> None:
    hop_by_hop = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next: TCP; PadN
    body = hop_by_hop + bytes(tcp(40000, 5900, 1234, 5678, ACK | PSH, b"data"))
    assert both(1, ether(ipv6(C6, S6, body, nxt=0), 0x86DD)) == EXPECTED6


@pytest.mark.parametrize(
    "frame",
    [
        ether(ipv4(C, S, bytes(dpkt.udp.UDP(sport=1, dport=2, data=b"x")), p=17)),
        ether(b"\x00\x01" * 14, 0x0806),  # ARP
        ether(seg4(), 0x1234),
        ether(seg4(offset=8)),  # a later fragment
        ether(seg4(mf=1)),  # the first fragment
        ether(seg4()[:30]),  # cut inside the TCP header
        ether(seg6()[:50], 0x86DD),
        ether(ipv6(C6, S6, bytes(8), nxt=17), 0x86DD),
        b"\x00" * 10,
        b"",
    ],
)
def test_not_tcp(frame: bytes) -> None:
    assert both(1, frame) is None


def test_ipv6_fragment_header_is_skipped() -> None:
    fragment = bytes([6, 0, 0, 1, 0, 0, 0, 1])  # next: TCP, offset 0, more fragments
    body = fragment + bytes(tcp(40000, 5900, 1234, 5678, ACK | PSH, b"data"))
    assert both(1, ether(ipv6(C6, S6, body, nxt=44), 0x86DD)) is None


def test_snapped_payload() -> None:
    frame = ether(seg4(b"0123456789"))
    result = both(1, frame[:-4])
    assert result is not None
    assert (result.payload, result.snapped) == (b"012345", 4)


def test_snapped_inside_tcp_options() -> None:
    options = b"\x01\x01\x08\x0a" + b"\x00" * 8
    frame = ether(ipv4(C, S, tcp(40000, 5900, 1, 2, ACK, b"0123456789", opts=options)))
    result = both(1, frame[: 14 + 20 + 24])
    assert result is not None
    assert (result.payload, result.snapped, result.seq) == (b"", 10, 1)


def test_segmentation_offload_zero_length() -> None:
    packet = bytearray(seg4(b"x" * 3000))
    packet[2:4] = b"\0\0"  # the IPv4 total length, as captured before TSO splits it
    result = both(1, ether(bytes(packet)))
    assert result is not None
    assert (len(result.payload), result.snapped) == (3000, 0)


def test_flags_and_unsupported_linktype() -> None:
    frame = ether(ipv4(C, S, tcp(1, 2, 3, 4, SYN | FIN)))
    result = both(1, frame)
    assert result is not None
    assert result.flags == SYN | FIN
    assert make_decoder(105) is None
    assert decode_with_dpkt(105, frame, 0.0) is None


# -- property: every fast path agrees with dpkt -------------------------------------------

LINKS = {
    1: lambda ip, v6: ether(ip, 0x86DD if v6 else 0x0800),
    113: lambda ip, v6: sll(ip, 0x86DD if v6 else 0x0800),
    276: lambda ip, v6: sll2(ip, 0x86DD if v6 else 0x0800),
    101: lambda ip, v6: ip,
    0: lambda ip, v6: null(ip, 30 if v6 else 2),
    108: lambda ip, v6: null(ip, 24 if v6 else 2, ">"),
}


@settings(max_examples=300, deadline=None)
@given(
    linktype=st.sampled_from(sorted(LINKS)),
    v6=st.booleans(),
    ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    numbers=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    flags=st.integers(0, 0x1FF),
    payload=st.binary(max_size=64),
    tcp_options=st.integers(0, 10),
    ip_options=st.integers(0, 10),
    cut=st.integers(0, 120),
    pad=st.integers(0, 20),
)
def test_fast_paths_agree_with_dpkt(
    linktype: int,
    v6: bool,
    ports: tuple[int, int],
    numbers: tuple[int, int],
    flags: int,
    payload: bytes,
    tcp_options: int,
    ip_options: int,
    cut: int,
    pad: int,
) -> None:
    segment = tcp(*ports, *numbers, flags, payload, opts=b"\x01" * (4 * tcp_options))
    if v6:
        ip = ipv6(C6, S6, segment)
    else:
        packet = dpkt.ip.IP(
            src=bytes([10, 0, 0, 1]),
            dst=bytes([10, 0, 0, 2]),
            p=6,
            opts=b"\x01" * (4 * ip_options),
            data=segment,
        )
        packet.hl = 5 + ip_options
        packet.len = 20 + 4 * ip_options + len(bytes(segment))
        ip = bytes(packet)
    frame = LINKS[linktype](ip, v6) + b"\0" * pad
    frame = frame[: max(0, len(frame) - cut)]
    result = both(linktype, frame)
    if cut <= pad:  # only padding was cut
        assert result is not None
        assert result.payload == payload
        assert (result.sport, result.dport, result.seq, result.ack) == (*ports, *numbers)
        assert result.flags == flags


def test_null_header_byte_order_is_read_both_ways() -> None:
    for order in "<>":
        frame = struct.pack(order + "I", 2) + seg4()
        assert both(0, frame) == EXPECTED4
