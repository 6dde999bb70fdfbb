"""One captured frame to a TcpSegment: link layer, IPv4/IPv6 and TCP headers.

Theory of operation
-------------------
``make_decoder(linktype)`` returns a function ``decode(buf, off, caplen, ts)`` that reads
the frame ``buf[off:off + caplen]`` in place (no copy but the payload slice) and returns a
TcpSegment, or None for a frame that is not TCP over IP (ARP, UDP, IP fragments, frames
too short for their headers...).

The common case on a loopback or LAN capture, IPv4 without options in Ethernet (or Linux
cooked, or null/loopback), costs one ``struct.unpack_from`` over the link type field, the
IPv4 header and the fixed part of the TCP header together. IPv4 with options, IPv6 and
raw IP take a few more header reads, still by hand. Anything rarer (VLAN, QinQ, MPLS and
PPPoE on Ethernet, IPv6 extension headers) goes through dpkt: general.py, the slow,
general decoder (``decode_with_dpkt``) that the tests hold the fast paths to.

The IP length fields bound the payload (so Ethernet padding never becomes data); a total
length of 0 (TCP segmentation offload) means "to the end of the frame". When the capture
cut the frame short of the IP length (snap length), the segment carries what was
captured and counts the rest in ``snapped``, as long as the fixed 20 bytes of the TCP
header were captured (options may be cut); a frame cut shorter is not a segment.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from .segment import Buffer, TcpSegment

__all__ = [
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_LOOP",
    "LINKTYPE_NULL",
    "LINKTYPE_RAW",
    "Decoder",
    "decode_with_dpkt",
    "linktype_name",
    "make_decoder",
]

LINKTYPE_NULL: Final = 0
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
LINKTYPE_LOOP: Final = 108
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPE_LINUX_SLL2: Final = 276
# DLT_RAW as some BSDs numbered it; pcap files written there may carry these.
_DLT_RAW_BSD: Final = (12, 14)

_NAMES: Final = {
    LINKTYPE_NULL: "null/loopback",
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    12: "raw IP",
    14: "raw IP",
    LINKTYPE_LOOP: "OpenBSD loopback",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}

Decoder = Callable[[Buffer, int, int, float], "TcpSegment | None"]
"""``decode(buf, off, caplen, ts)``: the frame is ``buf[off:off + caplen]``."""

_TCP: Final = 6
_ETHERTYPE_IPV4: Final = 0x0800
_ETHERTYPE_IPV6: Final = 0x86DD
# Ethernet types that may carry IP further in, left to dpkt: 802.1Q, 802.1ad, old QinQ,
# MPLS unicast and multicast, PPPoE session.
_ETHERTYPE_DPKT: Final = frozenset({0x8100, 0x88A8, 0x9100, 0x8847, 0x8848, 0x8864})
# Address families in a null/loopback header: AF_INET, then AF_INET6 as numbered by
# Linux, NetBSD/OpenBSD, FreeBSD and macOS.
_AF_INET: Final = 2
_AF_INET6: Final = (10, 24, 28, 30)
# IPv6 next-header values that are extension headers (left to dpkt).
_IPV6_EXT: Final = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254})

_MASK_FLAGS: Final = 0x1FF
_IP4: Final = struct.Struct("!BxH2xHxB2x4s4s")  # vihl, total length, frag, proto, src, dst
_IP6: Final = struct.Struct("!4xHBx16s16s")  # payload length, next header, src, dst
_TCP_FIXED: Final = struct.Struct("!HHIIH")  # sport, dport, seq, ack, offset+flags
_TCP_MIN: Final = 20
_IP4_MIN: Final = 20
_IP6_HDR: Final = 40

_new_segment: Final = tuple.__new__

# Address text, cached: formatting it per packet would cost more than all the rest.
_CACHE_MAX: Final = 1 << 16
_names4: dict[bytes, str] = {}
_names6: dict[bytes, str] = {}
_pairs4: dict[bytes, tuple[str, str]] = {}


def name4(raw: bytes) -> str:
    """An IPv4 address as text, cached."""
    if len(_names4) >= _CACHE_MAX:
        _names4.clear()
    name = _names4[raw] = str(IPv4Address(raw))
    return name


def _pair4(raw: bytes) -> tuple[str, str]:
    """Source and destination IPv4 addresses, 8 bytes, as text."""
    if len(_pairs4) >= _CACHE_MAX:
        _pairs4.clear()
    names = _pairs4[raw] = (name4(raw[:4]), name4(raw[4:]))
    return names


def name6(raw: bytes) -> str:
    """An IPv6 address as text, cached."""
    if len(_names6) >= _CACHE_MAX:
        _names6.clear()
    name = _names6[raw] = str(IPv6Address(raw))
    return name


def linktype_name(linktype: int) -> str:
    """A short human name for a link type, for messages."""
    return _NAMES.get(linktype, f"link type {linktype}")


def _segment(
    buf: Buffer,
    tcp: int,
    end: int,
    capend: int,
    ts: float,
    src: str,
    dst: str,
) -> TcpSegment | None:
    """The TCP segment at ``buf[tcp:end]``, of which ``buf[:capend]`` was captured."""
    if tcp + _TCP_MIN > capend:
        return None
    sport, dport, seq, ack, offflags = _TCP_FIXED.unpack_from(buf, tcp)
    start = tcp + ((offflags >> 12) << 2)
    if start < tcp + _TCP_MIN or start > end:
        return None
    snapped = 0
    if end > capend:  # cut by the snap length, maybe inside the TCP options
        snapped = end - max(start, capend)
        end = capend
    return _new_segment(
        TcpSegment,
        (ts, src, sport, dst, dport, seq, ack, offflags & _MASK_FLAGS, buf[start:end], snapped),
    )


def _ipv4(buf: Buffer, ip: int, capend: int, ts: float) -> TcpSegment | None:
    """IPv4 at ``buf[ip:capend]``, with or without options."""
    if ip + _IP4_MIN > capend:
        return None
    vihl, total, frag, proto, src, dst = _IP4.unpack_from(buf, ip)
    ihl = (vihl & 0xF) << 2
    if vihl >> 4 != 4 or ihl < _IP4_MIN or proto != _TCP or frag & 0x3FFF:
        return None
    if total:
        if total < ihl:
            return None
        end = ip + total
    else:  # TCP segmentation offload: the length is left to the frame
        end = capend
    name_s = _names4.get(src) or name4(src)
    name_d = _names4.get(dst) or name4(dst)
    return _segment(buf, ip + ihl, end, capend, ts, name_s, name_d)


def _ipv6(buf: Buffer, ip: int, capend: int, ts: float) -> TcpSegment | None:
    """IPv6 at ``buf[ip:capend]``; extension headers are left to dpkt."""
    if ip + _IP6_HDR > capend or buf[ip] >> 4 != 6:
        return None
    plen, nxt, src, dst = _IP6.unpack_from(buf, ip)
    if nxt != _TCP:
        if nxt in _IPV6_EXT:
            return _dpkt_ip6(buf[ip:capend], ts)
        return None
    end = ip + _IP6_HDR + plen if plen else capend
    name_s = _names6.get(src) or name6(src)
    name_d = _names6.get(dst) or name6(dst)
    return _segment(buf, ip + _IP6_HDR, end, capend, ts, name_s, name_d)


def _raw(buf: Buffer, off: int, caplen: int, ts: float) -> TcpSegment | None:
    if caplen < 1:
        return None
    version = buf[off] >> 4
    if version == 4:
        return _ipv4(buf, off, off + caplen, ts)
    if version == 6:
        return _ipv6(buf, off, off + caplen, ts)
    return None


def _raw4(buf: Buffer, off: int, caplen: int, ts: float) -> TcpSegment | None:
    return _ipv4(buf, off, off + caplen, ts)


def _raw6(buf: Buffer, off: int, caplen: int, ts: float) -> TcpSegment | None:
    return _ipv6(buf, off, off + caplen, ts)


def _typed(
    linktype: int,
    ip_off: int,
    type_off: int,
    type_fmt: str,
    v4: frozenset[int],
    v6: frozenset[int],
    to_dpkt: frozenset[int],
) -> Decoder:
    """A decoder for a link header of fixed size with a type field (EtherType, AF_...).

    One fused struct reads the type field, an IPv4 header without options and the fixed
    part of the TCP header; frames that are anything else take the general paths.
    """
    type_size = struct.calcsize("!" + type_fmt)
    fused = struct.Struct(
        f"!{type_off}x{type_fmt}{ip_off - type_off - type_size}x"
        "BxH2xHxB2x8s"  # IPv4 without options; source and destination as one key
        "HHIIH"  # TCP: sport, dport, seq, ack, offset+flags
    )
    unpack_fused = fused.unpack_from
    unpack_type = struct.Struct(f"!{type_off}x{type_fmt}").unpack_from
    fused_min = fused.size + (_TCP_MIN - _TCP_FIXED.size)
    pairs = _pairs4
    pair = _pair4
    new = _new_segment
    segment = TcpSegment
    ip_tcp = ip_off + _IP4_MIN

    def decode(buf: Buffer, off: int, caplen: int, ts: float) -> TcpSegment | None:
        if caplen >= fused_min:
            (ltype, vihl, total, frag, proto, addrs, sport, dport, seq, ack, offflags) = (
                unpack_fused(buf, off)
            )
            if ltype in v4 and vihl == 0x45:
                if proto != _TCP or frag & 0x3FFF:
                    return None
                capend = off + caplen
                end = off + ip_off + total if total else capend
                thl = (offflags >> 12) << 2
                start = off + ip_tcp + thl
                if thl < _TCP_MIN or start > end:
                    return None
                snapped = 0
                if end > capend:  # cut by the snap length, maybe inside the TCP options
                    snapped = end - max(start, capend)
                    end = capend
                names = pairs.get(addrs) or pair(addrs)
                return new(
                    segment,
                    (
                        ts,
                        names[0],
                        sport,
                        names[1],
                        dport,
                        seq,
                        ack,
                        offflags & _MASK_FLAGS,
                        buf[start:end],
                        snapped,
                    ),
                )
        elif caplen >= ip_off:
            ltype = unpack_type(buf, off)[0]
        else:
            return None
        if ltype in v4:
            return _ipv4(buf, off + ip_off, off + caplen, ts)
        if ltype in v6:
            return _ipv6(buf, off + ip_off, off + caplen, ts)
        if ltype in to_dpkt:
            return decode_with_dpkt(linktype, buf[off : off + caplen], ts)
        return None

    return decode


def _swapped(values: tuple[int, ...]) -> frozenset[int]:
    return frozenset(values) | {int.from_bytes(v.to_bytes(4, "big"), "little") for v in values}


# The address families of a null/loopback header, read big-endian: (IPv4, IPv6). The
# null header is in the capturing host's byte order, so both orders are accepted.
NULL_FAMILIES: Final = (_swapped((_AF_INET,)), _swapped(_AF_INET6))
LOOP_FAMILIES: Final = (frozenset({_AF_INET}), frozenset(_AF_INET6))
RAW_LINKTYPES: Final = (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6, *_DLT_RAW_BSD)


def make_decoder(linktype: int) -> Decoder | None:
    """The frame decoder for a link type, or None if the link type is not supported."""
    ether_v4 = frozenset({_ETHERTYPE_IPV4})
    ether_v6 = frozenset({_ETHERTYPE_IPV6})
    none: frozenset[int] = frozenset()
    if linktype == LINKTYPE_ETHERNET:
        return _typed(linktype, 14, 12, "H", ether_v4, ether_v6, _ETHERTYPE_DPKT)
    if linktype == LINKTYPE_LINUX_SLL:
        return _typed(linktype, 16, 14, "H", ether_v4, ether_v6, _ETHERTYPE_DPKT)
    if linktype == LINKTYPE_LINUX_SLL2:
        return _typed(linktype, 20, 0, "H", ether_v4, ether_v6, _ETHERTYPE_DPKT)
    if linktype == LINKTYPE_NULL:  # the family is in the capturing host's byte order
        return _typed(linktype, 4, 0, "I", *NULL_FAMILIES, none)
    if linktype == LINKTYPE_LOOP:
        return _typed(linktype, 4, 0, "I", *LOOP_FAMILIES, none)
    if linktype == LINKTYPE_RAW or linktype in _DLT_RAW_BSD:
        return _raw
    if linktype == LINKTYPE_IPV4:
        return _raw4
    if linktype == LINKTYPE_IPV6:
        return _raw6
    return None


# ---------------------------------------------------------------------------------------
# The general decoder, in general.py: imported when first needed, as dpkt takes 45 ms to
# import and most captures never need it.


def decode_with_dpkt(linktype: int, frame: bytes, ts: float) -> TcpSegment | None:
    """Decode one whole frame with dpkt alone: the general (and slow) path."""
    from . import general  # noqa: PLC0415

    return general.decode(linktype, frame, ts)


def _dpkt_ip6(frame: bytes, ts: float) -> TcpSegment | None:
    from . import general  # noqa: PLC0415

    return general.decode_ipv6(frame, ts)
