"""Synthetic frames and capture files for the capture tests.

Packets are built with dpkt (which fills in lengths and checksums); files are written
with dpkt's pcap and pcapng writers where they can, and by hand (``Pcapng``) for what
they cannot: big-endian sections, several sections, interfaces with their own clocks,
simple and obsolete packet blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import dpkt

from spicetap.capture import ACK, FIN, PSH, SYN, TcpSegment

Frame = tuple[float, bytes]

CLIENT = ("10.0.0.1", 40000)
SERVER = ("10.0.0.2", 5900)
CLIENT6 = ("2001:db8::1", 40000)
SERVER6 = ("2001:db8::2", 5900)


def tcp(
    sport: int,
    dport: int,
    seq: int,
    ack: int = 0,
    flags: int = ACK,
    payload: bytes = b"",
    opts: bytes = b"",
) -> dpkt.tcp.TCP:
    seg = dpkt.tcp.TCP(
        sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, opts=opts, data=payload
    )
    seg.off = (20 + len(opts)) // 4
    return seg


def ipv4(src: str, dst: str, data: dpkt.Packet | bytes, p: int = 6, **kw: int) -> bytes:
    packet = dpkt.ip.IP(
        src=ip_address(src).packed, dst=ip_address(dst).packed, p=p, data=data, **kw
    )
    packet.len = 20 + len(packet.opts) + len(bytes(data))
    return bytes(packet)


def ipv6(src: str, dst: str, data: dpkt.Packet | bytes, nxt: int = 6) -> bytes:
    packet = dpkt.ip6.IP6(
        src=ip_address(src).packed, dst=ip_address(dst).packed, nxt=nxt, hlim=64, data=data
    )
    packet.plen = len(bytes(data))
    return bytes(packet)


def ether(ip: bytes, ethertype: int = 0x0800) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=ethertype)) + ip


def vlan(ip: bytes, ethertype: int = 0x0800, vid: int = 7) -> bytes:
    return b"\x04" * 6 + b"\x02" * 6 + struct.pack("!HHH", 0x8100, vid, ethertype) + ip


def sll(ip: bytes, protocol: int = 0x0800) -> bytes:
    return struct.pack("!HHH8sH", 0, 772, 6, b"\0" * 8, protocol) + ip


def sll2(ip: bytes, protocol: int = 0x0800) -> bytes:
    return struct.pack("!HHiHBB8s", protocol, 0, 1, 772, 0, 6, b"\0" * 8) + ip


def null(ip: bytes, family: int = 2, order: str = "<") -> bytes:
    return struct.pack(order + "I", family) + ip


def v4_segment(
    seq: int,
    payload: bytes = b"",
    flags: int = ACK | PSH,
    ack: int = 1,
    c2s: bool = True,
    endpoints: tuple[tuple[str, int], tuple[str, int]] = (CLIENT, SERVER),
) -> bytes:
    """An Ethernet/IPv4 frame of one TCP segment, client to server or back."""
    (src, sport), (dst, dport) = endpoints if c2s else endpoints[::-1]
    return ether(ipv4(src, dst, tcp(sport, dport, seq, ack, flags, payload)))


def segment(
    seq: int,
    payload: bytes = b"",
    flags: int = ACK | PSH,
    ack: int = 1,
    c2s: bool = True,
    ts: float = 1.0,
    snapped: int = 0,
    endpoints: tuple[tuple[str, int], tuple[str, int]] = (CLIENT, SERVER),
) -> TcpSegment:
    """A TcpSegment as the reader would give it, for the reassembler tests."""
    (src, sport), (dst, dport) = endpoints if c2s else endpoints[::-1]
    return TcpSegment(ts, src, sport, dst, dport, seq & 0xFFFFFFFF, ack, flags, payload, snapped)


# -- files ------------------------------------------------------------------------------


def write_pcap(
    path: Path,
    frames: Iterable[Frame],
    linktype: int = dpkt.pcap.DLT_EN10MB,
    nano: bool = False,
    snaplen: int = 65535,
) -> Path:
    """A little-endian pcap file, by dpkt's writer."""
    with path.open("wb") as file:
        writer = dpkt.pcap.Writer(file, snaplen=snaplen, linktype=linktype, nano=nano)
        for ts, frame in frames:
            writer.writepkt(frame, ts=ts)
    return path


def write_pcap_by_hand(
    path: Path,
    frames: Iterable[Frame],
    linktype: int = 1,
    order: str = ">",
    nano: bool = False,
    modified: bool = False,
    snaplen: int = 65535,
) -> Path:
    """A pcap file in any byte order, by hand; ``modified``: the old 0xa1b2cd34 variant."""
    magic = 0xA1B2CD34 if modified else 0xA1B23C4D if nano else 0xA1B2C3D4
    units = 10**9 if nano else 10**6
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for ts, frame in frames:
        ticks = round(ts * units)
        captured = frame[:snaplen]
        out.append(
            struct.pack(order + "IIII", ticks // units, ticks % units, len(captured), len(frame))
        )
        if modified:
            out.append(struct.pack(order + "iHBx", 1, 0x0800, 0))
        out.append(captured)
    path.write_bytes(b"".join(out))
    return path


def write_pcapng(path: Path, frames: Iterable[Frame], linktype: int = 1) -> Path:
    """A pcapng file of one interface, by dpkt's writer (microsecond timestamps)."""
    with path.open("wb") as file:
        writer = dpkt.pcapng.Writer(file, snaplen=65535, linktype=linktype)
        for ts, frame in frames:
            writer.writepkt(frame, ts=ts)
    return path


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


@dataclass
class Pcapng:
    """A pcapng file built block by block, in any byte order."""

    order: str = "<"
    blocks: list[bytes] = field(default_factory=list)

    def block(self, btype: int, body: bytes) -> Pcapng:
        body = _pad(body)
        size = len(body) + 12
        self.blocks.append(
            struct.pack(self.order + "II", btype, size) + body + struct.pack(self.order + "I", size)
        )
        return self

    def section(self, order: str | None = None) -> Pcapng:
        if order is not None:
            self.order = order
        return self.block(0x0A0D0D0A, struct.pack(self.order + "IHHq", 0x1A2B3C4D, 1, 0, -1))

    def interface(
        self,
        linktype: int = 1,
        snaplen: int = 0,
        tsresol: int | None = None,
        tsoffset: int | None = None,
    ) -> Pcapng:
        options = b""
        if tsresol is not None:
            options += struct.pack(self.order + "HH", 9, 1) + _pad(bytes([tsresol]))
        if tsoffset is not None:
            options += struct.pack(self.order + "HHq", 14, 8, tsoffset)
        if options:
            options += struct.pack(self.order + "HH", 0, 0)
        return self.block(1, struct.pack(self.order + "HHI", linktype, 0, snaplen) + options)

    def epb(self, frame: bytes, ticks: int, iface: int = 0, caplen: int | None = None) -> Pcapng:
        data = frame if caplen is None else frame[:caplen]
        head = struct.pack(
            self.order + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(frame)
        )
        return self.block(6, head + _pad(data) + struct.pack(self.order + "HH", 0, 0))

    def spb(self, frame: bytes) -> Pcapng:
        return self.block(3, struct.pack(self.order + "I", len(frame)) + frame)

    def pb(self, frame: bytes, ticks: int, iface: int = 0) -> Pcapng:
        head = struct.pack(
            self.order + "HHIIII", iface, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)
        )
        return self.block(2, head + frame)

    def other(self, btype: int = 5, body: bytes = b"\0" * 8) -> Pcapng:
        return self.block(btype, body)

    def bytes(self) -> bytes:
        return b"".join(self.blocks)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.bytes())
        return path


def stream_frames(
    chunks: Sequence[tuple[bool, bytes]],
    client_isn: int = 1000,
    server_isn: int = 5000,
    close: bool = True,
    ts0: float = 1_700_000_000.0,
    endpoints: tuple[tuple[str, int], tuple[str, int]] = (CLIENT, SERVER),
) -> list[Frame]:
    """A whole Ethernet/IPv4 connection: handshake, the chunks in order, FINs; one frame
    each millisecond from ts0."""
    frames: list[Frame] = []
    seq = {True: client_isn + 1, False: server_isn + 1}
    ts = ts0

    def add(c2s: bool, flags: int, payload: bytes = b"", seq_used: int | None = None) -> None:
        nonlocal ts
        ts += 0.001
        s = seq[c2s] if seq_used is None else seq_used
        segment = v4_segment(s, payload, flags, ack=seq[not c2s], c2s=c2s, endpoints=endpoints)
        frames.append((ts, segment))

    add(True, SYN, seq_used=client_isn)
    add(False, SYN | ACK, seq_used=server_isn)
    add(True, ACK)
    for c2s, data in chunks:
        add(c2s, ACK | PSH, data)
        seq[c2s] += len(data)
    if close:
        add(True, FIN | ACK)
        seq[True] += 1
        add(False, FIN | ACK)
        seq[False] += 1
        add(True, ACK)
    return frames
