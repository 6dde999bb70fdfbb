"""Plaintext TCP streams out, as a pcapng file that Wireshark and tshark read.

The engine of ``spicetap export pcap``: spicetap records the plaintext bytes of every
channel connection (even a TLS one), and this module wraps them in synthetic Ethernet,
IP and TCP headers, so Wireshark's SPICE dissector can show a session. No I/O of its
own beyond ``out.write``; no clock (time comes in with every call)::

    with open("session.pcapng", "wb") as f:
        w = PcapngStreamWriter(f, comment="spicetap session 3")
        client, server = w.open(0, ts, ("10.0.0.5", 40112), ("10.0.0.1", 5930))
        w.data(0, ts, "c2s", b"REDQ...")        # any size: split into segments
        w.data(0, ts, "s2c", b"REDQ...")
        w.close(0, ts)                          # FIN/ACK both ways
        w.finish()                              # flushes; ``out`` stays open

Theory of operation
-------------------
The file is one section (SHB, with the optional comment) and one interface (IDB):
Ethernet with all-zero MAC addresses, exactly what a Linux loopback capture holds (the
link type tshark and every other reader handle best, IPv4 and IPv6 alike), nanosecond
timestamps (``if_tsresol`` 9). Every packet is one Enhanced Packet Block, written as
soon as it is made: the writer keeps a few integers per open connection and never
holds payload.

``open`` writes the handshake (SYN, SYN/ACK, ACK; MSS and window-scale options, so
the receive window is 8 MiB). ``data`` cuts the payload into segments of at most
``MAX_SEGMENT`` (65000) bytes, PSH|ACK, with true sequence and acknowledgement
numbers; before the unacknowledged bytes of one direction pass ``ACK_EVERY``, the
receiver sends a pure ACK, as a real peer would, so Wireshark's TCP analysis sees
neither a full window nor bytes in flight without end. ``close`` writes FIN/ACK,
FIN/ACK, ACK (``by`` says which side starts). IPv4 and TCP checksums are correct
(Wireshark checks them when asked). An empty payload writes nothing.

Endpoints. ``Endpoint`` is a NamedTuple ``(host, port)``, so the reassembler's
``(address, port)`` tuples are accepted as they are. ``None`` means unknown: the writer
makes up a loopback address of the other side's family (127.0.0.1 or ::1), port 5930
for a server and the next ephemeral port (49152 up) for a client. Every connection of
a file gets its own 4-tuple: when a (client, server) pair was already used in this file
(an archive that recorded the same addresses twice, reused ports, unknown endpoints),
the client port is replaced by the next free ephemeral port. ``open`` returns the
endpoints actually written, so a caller can tell the user which stream is which.

What Wireshark needs (tshark 4.0, checked by tests/test_pcap_export.py). Its SPICE
dissector finds the streams by heuristics (the "REDQ" magic) on any port but 5900 and
5901, which go to VNC: hence 5930 for made-up servers; a real server on 5900 needs
``-d tcp.port==5900,spice`` (Decode As). Its link stage wants one unit per TCP segment
(an auth mechanism and a ticket in one segment lose the whole channel): give each link
unit (header and link message, reply, auth mechanism, ticket, result) its own ``data``
call, and the ticket its 128 bytes (zeros if the archive kept no secret). Messages
after the link stage may be joined or cut anywhere.

Time. Timestamps (float seconds since the epoch: a double holds today's dates to about
0.2 µs) are written in nanoseconds, clamped so that they never go back within a file.
Calls must come in time order across all connections; several connections may be open
at once.

Errors. Misuse (an unknown or already open connection id, a direction other than
"c2s" and "s2c", an address that does not parse, client and server of different IP
versions, a call after ``finish``) raises ``ValueError``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Final, NamedTuple

__all__ = ["ACK_EVERY", "MAX_SEGMENT", "SERVER_PORT", "Endpoint", "PcapngStreamWriter"]

MAX_SEGMENT: Final = 65000
ACK_EVERY: Final = 4 * MAX_SEGMENT
SERVER_PORT: Final = 5930  # not 5900-5901, which Wireshark gives to VNC
EPHEMERAL: Final = (49152, 65535)
_WINDOW_SHIFT: Final = 7  # 65535 << 7: an 8 MiB window, above ACK_EVERY
_SYN_OPTIONS: Final = struct.pack("!BBHBBBB", 2, 4, 65495, 1, 3, 3, _WINDOW_SHIFT)
_FIN, _SYN, _PSH, _ACK = 0x01, 0x02, 0x08, 0x10

_SHB = struct.Struct("<IHHq")  # byte-order magic, version, section length (unknown)
_IDB = struct.Struct("<HHI")  # link type, reserved, snap length
_EPB = struct.Struct("<IIIIIII")  # type, length, interface, ts high, ts low, caplen, len
_TRAILER = struct.Struct("<I")
_ETHER = bytes(12)  # destination and source MAC: zero, as on Linux loopback
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_LINKTYPE_ETHERNET: Final = 1
_LOOPBACK: Final = {4: "127.0.0.1", 6: "::1"}
_SNAPLEN: Final = 262144


class Endpoint(NamedTuple):
    host: str  # IPv4 or IPv6 text
    port: int


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def _block(block_type: int, fixed: bytes, options: bytes) -> bytes:
    """An SHB or IDB: type, length, the fixed fields, options (and their end), length."""
    length = 12 + len(fixed) + len(options) + 4
    head = struct.pack("<II", block_type, length)
    return head + fixed + options + _option(0, b"") + _TRAILER.pack(length)


def _checksum(*parts: bytes | memoryview) -> int:
    """Internet checksum of the parts, each but the last of even length.

    The 16-bit ones' complement sum of a byte string is its value as one big-endian
    integer modulo 0xFFFF (2**16 == 1 mod 0xFFFF): ``int.from_bytes`` does in C what
    a loop over words would do in Python.
    """
    total = 0
    for part in parts:
        value = int.from_bytes(part, "big")
        total += value << 8 if len(part) % 2 else value
    rest = total % 0xFFFF
    return 0 if total and not rest else 0xFFFF - rest


@dataclass
class _Conn:
    addrs: tuple[bytes, bytes]  # packed client and server address
    ports: tuple[int, int]
    nxt: list[int]  # next sequence number: [client, server]
    unacked: list[int] = field(default_factory=lambda: [0, 0])


class PcapngStreamWriter:
    """Writes pcapng to ``out`` (binary, open for writing) as the calls come."""

    def __init__(self, out: BinaryIO, *, comment: str | None = None) -> None:
        self._out = out
        self._conns: dict[int, _Conn] = {}
        self._used: set[tuple[bytes, int, bytes, int]] = set()
        self._ephemeral = EPHEMERAL[0]
        self._last_ns = 0
        self._ip_id = 0
        self._finished = False
        self.packets = 0
        shb = _option(4, b"spicetap")
        if comment is not None:
            shb = _option(1, comment.encode()) + shb
        out.write(_block(0x0A0D0D0A, _SHB.pack(0x1A2B3C4D, 1, 0, -1), shb))
        idb = _option(2, b"spicetap") + _option(9, b"\x09")  # if_name, if_tsresol: ns
        out.write(_block(1, _IDB.pack(_LINKTYPE_ETHERNET, 0, _SNAPLEN), idb))

    def open(
        self,
        conn: int,
        ts: float,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
    ) -> tuple[Endpoint, Endpoint]:
        """Start connection ``conn`` with a handshake; return the endpoints written."""
        self._alive()
        if conn in self._conns:
            raise ValueError(f"connection {conn} is already open")
        if server is None:
            version = 4 if client is None else _address(client[0]).version
            server = (_LOOPBACK[version], SERVER_PORT)
        saddr = _address(server[0])
        if client is None:
            client = (_LOOPBACK[saddr.version], self._next_ephemeral())
        caddr = _address(client[0])
        if caddr.version != saddr.version:
            raise ValueError(f"client {client[0]} and server {server[0]}: IPv4 and IPv6 mixed")
        sport, cport = server[1], client[1]
        if not (0 < sport < 65536 and 0 < cport < 65536):
            raise ValueError(f"bad port in {client} or {server}")
        # A 4-tuple used before in this file would merge two streams in Wireshark.
        for _ in range(EPHEMERAL[1] - EPHEMERAL[0] + 2):
            key = (caddr.packed, cport, saddr.packed, sport)
            if key not in self._used and (caddr, cport) != (saddr, sport):
                break
            cport = self._next_ephemeral()
        else:
            raise ValueError(f"no client port left for a new connection to {server}")
        self._used.add(key)
        c = _Conn((caddr.packed, saddr.packed), (cport, sport), [_isn(conn, 0), _isn(conn, 1)])
        self._conns[conn] = c
        ns = self._ns(ts)
        self._segment(ns, c, 0, _SYN, b"", _SYN_OPTIONS)
        self._segment(ns, c, 1, _SYN | _ACK, b"", _SYN_OPTIONS)
        self._segment(ns, c, 0, _ACK, b"")
        return Endpoint(str(caddr), cport), Endpoint(str(saddr), sport)

    def data(self, conn: int, ts: float, direction: str, payload: bytes) -> None:
        """Bytes of one direction, in order: PSH|ACK segments of at most MAX_SEGMENT."""
        c = self._conn(conn)
        side = _side(direction)
        ns = self._ns(ts)
        view = memoryview(payload)
        for start in range(0, len(view), MAX_SEGMENT):
            chunk = view[start : start + MAX_SEGMENT]
            if c.unacked[side] + len(chunk) > ACK_EVERY:
                self._segment(ns, c, 1 - side, _ACK, b"")
            self._segment(ns, c, side, _PSH | _ACK, chunk)

    def close(self, conn: int, ts: float, *, by: str = "c2s") -> None:
        """End ``conn``: FIN/ACK from ``by``'s sender, FIN/ACK back, the last ACK."""
        c = self._conn(conn)
        side = _side(by)
        ns = self._ns(ts)
        self._segment(ns, c, side, _FIN | _ACK, b"")
        self._segment(ns, c, 1 - side, _FIN | _ACK, b"")
        self._segment(ns, c, side, _ACK, b"")
        del self._conns[conn]

    def finish(self) -> None:
        """Flush. Connections still open stay so (the recording stopped while they ran)."""
        self._alive()
        self._finished = True
        self._out.flush()

    def _alive(self) -> None:
        if self._finished:
            raise ValueError("the pcapng writer is finished")

    def _conn(self, conn: int) -> _Conn:
        self._alive()
        c = self._conns.get(conn)
        if c is None:
            raise ValueError(f"connection {conn} is not open")
        return c

    def _next_ephemeral(self) -> int:
        port = self._ephemeral
        self._ephemeral = port + 1 if port < EPHEMERAL[1] else EPHEMERAL[0]
        return port

    def _ns(self, ts: float) -> int:
        self._last_ns = max(self._last_ns, round(ts * 1e9))
        return self._last_ns

    def _segment(
        self,
        ns: int,
        c: _Conn,
        side: int,
        flags: int,
        payload: bytes | memoryview,
        options: bytes = b"",
    ) -> None:
        """Write one TCP segment from ``side`` (0 client, 1 server) and advance its seq."""
        src, dst = c.addrs[side], c.addrs[1 - side]
        seq, ackno = c.nxt[side], c.nxt[1 - side] if flags & _ACK else 0
        tcp_len = _TCP.size + len(options) + len(payload)
        header = _TCP.pack(
            c.ports[side], c.ports[1 - side], seq, ackno,
            (_TCP.size + len(options)) << 2, flags, 65535, 0, 0,
        ) + options  # fmt: skip
        if len(src) == 4:
            pseudo = src + dst + struct.pack("!BBH", 0, 6, tcp_len)
            self._ip_id = (self._ip_id + 1) & 0xFFFF
            ip = _IPV4.pack(0x45, 0, 20 + tcp_len, self._ip_id, 0x4000, 64, 6, 0, src, dst)
            ip = ip[:10] + _checksum(ip).to_bytes(2, "big") + ip[12:]
            ether = _ETHER + b"\x08\x00"
        else:
            pseudo = src + dst + struct.pack("!IxxxB", tcp_len, 6)
            ip = _IPV6.pack(6 << 28, tcp_len, 6, 64, src, dst)
            ether = _ETHER + b"\x86\xdd"
        csum = _checksum(pseudo, header, payload)
        header = header[:16] + csum.to_bytes(2, "big") + header[18:]
        size = len(ether) + len(ip) + tcp_len
        pad = -size % 4
        epb = _EPB.pack(6, _EPB.size + size + pad + 4, 0, ns >> 32, ns & 0xFFFFFFFF, size, size)
        tail = bytes(pad) + _TRAILER.pack(_EPB.size + size + pad + 4)
        if len(payload) < 4096:  # one write; a large payload is not copied
            self._out.write(b"".join((epb, ether, ip, header, payload, tail)))
        else:
            self._out.write(epb + ether + ip + header)
            self._out.write(payload)
            self._out.write(tail)
        self.packets += 1
        advance = len(payload) + (1 if flags & (_SYN | _FIN) else 0)
        c.nxt[side] = (seq + advance) & 0xFFFFFFFF
        c.unacked[side] += len(payload)
        if flags & _ACK:
            c.unacked[1 - side] = 0


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {host!r}") from None


def _isn(conn: int, side: int) -> int:
    """A fixed initial sequence number per connection and side, spread over 32 bits."""
    return (conn * 0x9E3779B1 + side * 0x7F4A7C15 + 0x1000) & 0xFFFFFFFF


def _side(direction: str) -> int:
    if direction == "c2s":
        return 0
    if direction == "s2c":
        return 1
    raise ValueError(f"direction must be 'c2s' or 's2c', not {direction!r}")
