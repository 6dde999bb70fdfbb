"""The general decoder: a whole frame parsed by dpkt, from the link layer up.

Slow (tens of microseconds a frame) but broad: decode.py hands it the frames its fast
paths leave (VLAN, QinQ, MPLS and PPPoE on Ethernet, IPv6 extension headers), and the
tests hold every fast path to it. Imported only when first needed: dpkt takes 45 ms to
import.
"""

from __future__ import annotations

import dpkt

from .decode import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LOOP_FAMILIES,
    NULL_FAMILIES,
    RAW_LINKTYPES,
    name4,
    name6,
)
from .segment import TcpSegment

__all__ = ["decode", "decode_ipv6"]

_TCP = 6
_IPV6_FRAGMENT = 44


def decode(linktype: int, frame: bytes, ts: float) -> TcpSegment | None:
    """The TCP segment in one whole frame, or None."""
    try:
        return _ip(_network(linktype, frame), ts)
    except Exception:  # dpkt raises many kinds on malformed frames
        return None


def decode_ipv6(packet: bytes, ts: float) -> TcpSegment | None:
    """The TCP segment in an IPv6 packet (with extension headers), or None."""
    try:
        return _ipv6(dpkt.ip6.IP6(packet), ts)
    except Exception:  # dpkt raises many kinds on malformed frames
        return None


def _network(linktype: int, frame: bytes) -> object:
    """The network layer packet in a frame, as dpkt parses it (or None)."""
    if linktype == LINKTYPE_ETHERNET:
        return dpkt.ethernet.Ethernet(frame).data
    if linktype == LINKTYPE_LINUX_SLL:
        return dpkt.sll.SLL(frame).data
    if linktype == LINKTYPE_LINUX_SLL2:
        return dpkt.sll2.SLL2(frame).data
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(frame) < 5:
            return None
        v4, v6 = NULL_FAMILIES if linktype == LINKTYPE_NULL else LOOP_FAMILIES
        family = int.from_bytes(frame[:4], "big")
        version = frame[4] >> 4
        if (family in v4 and version == 4) or (family in v6 and version == 6):
            return _parse_ip(frame[4:])
        return None
    if linktype in RAW_LINKTYPES:
        return _parse_ip(frame)
    return None


def _parse_ip(packet: bytes) -> object:
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        return dpkt.ip.IP(packet)
    if version == 6:
        return dpkt.ip6.IP6(packet)
    return None


def _ip(packet: object, ts: float) -> TcpSegment | None:
    if isinstance(packet, dpkt.ip.IP):
        return _ipv4(packet, ts)
    if isinstance(packet, dpkt.ip6.IP6):
        return _ipv6(packet, ts)
    return None


def _ipv4(ip: dpkt.ip.IP, ts: float) -> TcpSegment | None:
    if ip.v != 4 or ip.p != _TCP or ip.mf or ip.offset:
        return None
    tcp = ip.data
    if not isinstance(tcp, dpkt.tcp.TCP):
        return None
    wire: int = ip.len - ip.hl * 4 if ip.len else len(bytes(tcp))
    return _tcp(tcp, wire, ts, name4(ip.src), name4(ip.dst))


def _ipv6(ip6: dpkt.ip6.IP6, ts: float) -> TcpSegment | None:
    if getattr(ip6, "p", ip6.nxt) != _TCP or _IPV6_FRAGMENT in ip6.extension_hdrs:
        return None
    tcp = ip6.data
    if not isinstance(tcp, dpkt.tcp.TCP):
        return None
    extensions: int = sum(header.length for header in ip6.all_extension_headers)
    wire: int = ip6.plen - extensions if ip6.plen else len(bytes(tcp))
    return _tcp(tcp, wire, ts, name6(ip6.src), name6(ip6.dst))


def _tcp(tcp: dpkt.tcp.TCP, wire: int, ts: float, src: str, dst: str) -> TcpSegment:
    """``wire``: the length of the TCP segment (header and payload) on the wire."""
    payload = bytes(tcp.data)
    snapped = max(0, wire - tcp.off * 4 - len(payload))
    return TcpSegment(
        ts, src, tcp.sport, dst, tcp.dport, tcp.seq, tcp.ack, tcp.flags, payload, snapped
    )
