"""Just enough pcapng reading to reassemble the TCP streams of a loopback capture.

The harness checks captures with this independent, stdlib-only reader rather
than with the project's own code (which is what the captures will test) or
with tshark (whose SPICE dissector loses sync on several channels).

Supports what dumpcap writes on Linux: Section Header, Interface Description
and Enhanced/Simple Packet blocks; Ethernet (lo) and Linux cooked v1/v2 link
types; IPv4 and IPv6; TCP. Streams are rebuilt by sequence number, so
retransmitted bytes are dropped and lost bytes are counted as gaps.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SHB, IDB, SPB, EPB = 0x0A0D0D0A, 1, 3, 6
LINK_ETHERNET, LINK_SLL, LINK_SLL2 = 1, 113, 276
SYN, FIN, RST, ACK = 0x02, 0x01, 0x04, 0x10


@dataclass(frozen=True)
class TcpSegment:
    time: float
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    flags: int
    payload: bytes


def _network_payload(link: int, frame: bytes) -> tuple[int, bytes] | None:
    """(ethertype, network-layer bytes) of one captured frame."""
    if link == LINK_ETHERNET and len(frame) >= 14:
        ethertype, offset = struct.unpack_from(">H", frame, 12)[0], 14
        while ethertype == 0x8100 and len(frame) >= offset + 4:  # VLAN tag
            ethertype = struct.unpack_from(">H", frame, offset + 2)[0]
            offset += 4
        return ethertype, frame[offset:]
    if link == LINK_SLL and len(frame) >= 16:
        return struct.unpack_from(">H", frame, 14)[0], frame[16:]
    if link == LINK_SLL2 and len(frame) >= 20:
        return struct.unpack_from(">H", frame, 0)[0], frame[20:]
    return None


def _tcp(time: float, ethertype: int, packet: bytes) -> TcpSegment | None:
    if ethertype == 0x0800 and len(packet) >= 20 and packet[9] == 6:
        ihl = (packet[0] & 0x0F) * 4
        total = struct.unpack_from(">H", packet, 2)[0]
        src = str(ipaddress.IPv4Address(packet[12:16]))
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        segment = packet[ihl:total]
    elif ethertype == 0x86DD and len(packet) >= 40 and packet[6] == 6:  # no extension headers
        length = struct.unpack_from(">H", packet, 4)[0]
        src = str(ipaddress.IPv6Address(packet[8:24]))
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        segment = packet[40 : 40 + length]
    else:
        return None
    if len(segment) < 20:
        return None
    sport, dport, seq = struct.unpack_from(">HHI", segment, 0)
    data_offset = (segment[12] >> 4) * 4
    return TcpSegment(time, (src, sport), (dst, dport), seq, segment[13], segment[data_offset:])


def _timestamp_unit(options: bytes, order: str) -> float:
    """if_tsresol (option 9) of an Interface Description block; default microseconds."""
    pos = 0
    while pos + 4 <= len(options):
        code, length = struct.unpack_from(order + "HH", options, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:
            value = options[pos + 4]
            return 2.0 ** -(value & 0x7F) if value & 0x80 else 10.0**-value
        pos += 4 + (length + 3) // 4 * 4
    return 1e-6


def read_tcp_segments(path: Path) -> Iterator[TcpSegment]:
    data = path.read_bytes()
    pos, order = 0, "<"
    links: list[int] = []  # link type per interface
    tsres: list[float] = []  # seconds per timestamp unit per interface
    while pos + 12 <= len(data):
        btype = struct.unpack_from(order + "I", data, pos)[0]
        if btype == SHB:  # byte order may change per section
            order = "<" if struct.unpack_from("<I", data, pos + 8)[0] == 0x1A2B3C4D else ">"
            links, tsres = [], []
        length = struct.unpack_from(order + "I", data, pos + 4)[0]
        if length < 12 or pos + length > len(data):
            break  # truncated tail: keep what was complete
        body = data[pos + 8 : pos + length - 4]
        if btype == IDB:
            links.append(struct.unpack_from(order + "H", body, 0)[0])
            tsres.append(_timestamp_unit(body[8:], order))
        elif btype == EPB:
            iface, hi, lo, caplen = struct.unpack_from(order + "IIII", body, 0)
            frame, link = body[20 : 20 + caplen], links[iface]
            t = ((hi << 32) | lo) * tsres[iface]
            parsed = _network_payload(link, frame)
            seg = _tcp(t, *parsed) if parsed else None
            if seg:
                yield seg
        elif btype == SPB and links:
            parsed = _network_payload(links[0], body[4:])
            seg = _tcp(0.0, *parsed) if parsed else None
            if seg:
                yield seg
        pos += length


@dataclass
class _Direction:
    next_seq: int | None = None
    data: bytearray = field(default_factory=bytearray)
    gaps: int = 0

    def add(self, seq: int, flags: int, payload: bytes) -> None:
        if flags & SYN:
            self.next_seq = (seq + 1) & 0xFFFFFFFF
            return
        if self.next_seq is None:  # joined mid-stream
            self.next_seq = seq
        ahead = (seq - self.next_seq) & 0xFFFFFFFF
        if ahead >= 0x80000000:  # starts before what we have: retransmitted bytes
            payload = payload[0x100000000 - ahead :]
            ahead = 0
        elif ahead:
            self.gaps += ahead  # bytes the capture missed; the stream is damaged
        if payload:
            self.data += payload
            self.next_seq = (self.next_seq + ahead + len(payload)) & 0xFFFFFFFF


@dataclass
class TcpStream:
    """One TCP connection: client is whoever sent the first SYN."""

    client: tuple[str, int]
    server: tuple[str, int]
    start: float
    to_server: _Direction = field(default_factory=_Direction)
    to_client: _Direction = field(default_factory=_Direction)
    closed: bool = False

    @property
    def client_bytes(self) -> bytes:
        return bytes(self.to_server.data)

    @property
    def server_bytes(self) -> bytes:
        return bytes(self.to_client.data)


def tcp_streams(path: Path, server_ports: set[int] | None = None) -> list[TcpStream]:
    """Streams opened (SYN seen) in the capture, in order of their SYN."""
    streams: dict[tuple[tuple[str, int], tuple[str, int]], TcpStream] = {}
    order: list[TcpStream] = []
    for seg in read_tcp_segments(path):
        key = (seg.src, seg.dst)
        stream = streams.get(key) or streams.get((seg.dst, seg.src))
        if seg.flags & SYN and not seg.flags & ACK:
            if server_ports is not None and seg.dst[1] not in server_ports:
                continue
            stream = TcpStream(seg.src, seg.dst, seg.time)
            streams[key] = stream
            order.append(stream)
        if stream is None:
            continue
        direction = stream.to_server if seg.src == stream.client else stream.to_client
        direction.add(seg.seq, seg.flags, seg.payload)
        if seg.flags & (FIN | RST):
            stream.closed = True
    return order
