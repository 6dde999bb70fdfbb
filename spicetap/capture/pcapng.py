"""pcapng files: sections in either byte order, several interfaces, per-interface clocks.

Theory of operation
-------------------
A pcapng file is a run of blocks, each ``type, total length, body, total length``. A
Section Header Block (SHB) starts every section and fixes its byte order (its type reads
the same both ways; its byte-order magic tells which). Interface Description Blocks (IDB)
declare the section's interfaces, numbered from 0 in order: link type, snap length and,
in options, the timestamp resolution (``if_tsresol``, default microseconds) and offset
(``if_tsoffset``, seconds). Packets come in Enhanced Packet Blocks (EPB: interface,
64-bit timestamp, captured and original length), Simple Packet Blocks (SPB: interface 0,
no timestamp: such a packet is given the time of the packet before it) or the obsolete
Packet Block. Every other block is skipped.

Like the pcap loop, this keeps the file in a local buffer refilled a megabyte at a time.
A block whose length field is impossible, whose trailing length disagrees, or that names
an interface not declared, is damage: reading stops there and the problem is reported.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from .decode import Decoder, make_decoder
from .segment import Buffer, CaptureError, TcpSegment
from .source import MAX_RECORD, READ_ERRORS, Read, ReadStats, read_error, refill

__all__ = ["PCAPNG_MAGIC", "read_pcapng"]

PCAPNG_MAGIC: Final = b"\x0a\x0d\x0d\x0a"
_SHB: Final = 0x0A0D0D0A
_IDB: Final = 1
_PB: Final = 2
_SPB: Final = 3
_EPB: Final = 6
_BOM_LE: Final = b"\x4d\x3c\x2b\x1a"
_BOM_BE: Final = b"\x1a\x2b\x3c\x4d"
_BLOCK_MIN: Final = 12
_SHB_MIN: Final = 28
_IDB_MIN: Final = 20
_EPB_MIN: Final = 32
_SPB_MIN: Final = 16
_OPT_END: Final = 0
_OPT_TSRESOL: Final = 9
_OPT_TSOFFSET: Final = 14
_DEFAULT_UNITS: Final = 1_000_000

_Interface = tuple["Decoder | None", float, float, int, int]
"""decoder (None: link type not supported), seconds per 2**32 units, units per second,
offset (seconds), snap length"""


class _Damage(Exception):
    pass


def _shb_order(buf: Buffer, pos: int) -> str:
    bom = buf[pos + 8 : pos + 12]
    if bom == _BOM_LE:
        return "<"
    if bom == _BOM_BE:
        return ">"
    msg = f"section header with a bad byte-order magic {bom.hex()}"
    raise _Damage(msg)


def _check_shb(buf: Buffer, pos: int, order: str) -> int:
    """The SHB's total length, after checking its version."""
    blen: int = struct.unpack_from(order + "I", buf, pos + 4)[0]
    if blen < _SHB_MIN or blen % 4 or blen > MAX_RECORD:
        msg = f"section header with a bad length {blen}"
        raise _Damage(msg)
    major = struct.unpack_from(order + "H", buf, pos + 12)[0]
    if major != 1:
        msg = f"pcapng version {major} is not supported"
        raise _Damage(msg)
    return blen


def _interface(buf: Buffer, pos: int, blen: int, order: str, stats: ReadStats) -> _Interface:
    """Decode an Interface Description Block."""
    if blen < _IDB_MIN:
        msg = f"interface description block too short ({blen} bytes)"
        raise _Damage(msg)
    linktype, snaplen = struct.unpack_from(order + "H2xI", buf, pos + 8)
    units = _DEFAULT_UNITS
    offset = 0
    opt = pos + 16
    end = pos + blen - 4
    option = struct.Struct(order + "HH")
    while opt + 4 <= end:
        code, size = option.unpack_from(buf, opt)
        if code == _OPT_END:
            break
        value = opt + 4
        if value + size > end:
            msg = "interface description block with an option past its end"
            raise _Damage(msg)
        if code == _OPT_TSRESOL and size >= 1:
            resol = buf[value]
            units = 2 ** (resol & 0x7F) if resol & 0x80 else 10**resol
        elif code == _OPT_TSOFFSET and size >= 8:
            offset = struct.unpack_from(order + "q", buf, value)[0]
        opt = value + ((size + 3) & ~3)
    decode = make_decoder(linktype)
    if decode is None:
        stats.unsupported.add(linktype)
    # ts = (high * 2**32 + low) / units, in floats: the sum is exact to the float's own
    # precision (0.24 us near 2024), and twice as fast as dividing a 64-bit int.
    return (decode, 2**32 / units, float(units), offset, snaplen)


def read_pcapng(buf: Buffer, read: Read, name: str, stats: ReadStats) -> Iterator[TcpSegment]:
    """The TCP segments of a pcapng file: ``buf`` from its start, ``read`` for the rest.

    Checks the first section header, whole, at once (raising CaptureError); the rest is
    read lazily.
    """
    if len(buf) < _SHB_MIN:
        buf = refill(read, buf, 0, _SHB_MIN)
        if len(buf) < _SHB_MIN:
            msg = f"{name}: truncated pcapng section header ({len(buf)} of {_SHB_MIN} bytes)"
            raise CaptureError(msg)
    try:
        blen = _check_shb(buf, 0, _shb_order(buf, 0))
    except _Damage as exc:
        msg = f"{name}: {exc}"
        raise CaptureError(msg) from None
    if len(buf) < blen:  # a file that stops inside its header holds no packet at all
        buf = refill(read, buf, 0, blen)
        if len(buf) < blen:
            msg = f"{name}: truncated pcapng section header ({len(buf)} of {blen} bytes)"
            raise CaptureError(msg)
    return _blocks(buf, read, name, stats)


def _blocks(buf: Buffer, read: Read, name: str, stats: ReadStats) -> Iterator[TcpSegment]:
    pos = 0
    n = len(buf)
    base = 0  # the file offset of buf[0]
    order = "<"
    header = struct.Struct("<II").unpack_from
    epb = struct.Struct("<IIII").unpack_from
    pb = struct.Struct("<H2xIII").unpack_from  # interface (16 bits), drops, ts, ts, caplen
    epb_head = struct.Struct("<IIIIII").unpack_from
    u32 = struct.Struct("<I").unpack_from
    interfaces: list[_Interface] = []
    ts = 0.0
    frames = segments = 0
    try:
        while True:
            # The common case first: a whole Enhanced Packet Block in the buffer.
            if pos + _EPB_MIN <= n:
                btype, blen, iface, high, low, caplen = epb_head(buf, pos)
                end = pos + blen
                if (
                    btype == _EPB
                    and end <= n
                    and caplen <= blen - _EPB_MIN
                    and not blen & 3
                    and u32(buf, end - 4)[0] == blen
                ):
                    try:
                        decode, per_high, units, offset, _snaplen = interfaces[iface]
                    except IndexError:
                        msg = f"packet on undeclared interface {iface}"
                        raise _Damage(msg) from None
                    frames += 1
                    ts = high * per_high + low / units + offset
                    data = pos + 28
                    pos = end
                    if decode is not None:
                        segment = decode(buf, data, caplen, ts)
                        if segment is not None:
                            segments += 1
                            yield segment
                    continue
            if pos + _BLOCK_MIN > n:
                base += pos
                buf = refill(read, buf, pos, _BLOCK_MIN)
                pos = 0
                n = len(buf)
                if n < _BLOCK_MIN:
                    if n:
                        stats.problem = (
                            f"{name}: truncated at byte {base}: block header cut short"
                            f" ({n} of {_BLOCK_MIN} bytes)"
                        )
                    return
            btype, blen = header(buf, pos)
            if btype == _SHB:
                order = _shb_order(buf, pos)
                header = struct.Struct(order + "II").unpack_from
                epb = struct.Struct(order + "IIII").unpack_from
                pb = struct.Struct(order + "H2xIII").unpack_from
                epb_head = struct.Struct(order + "IIIIII").unpack_from
                u32 = struct.Struct(order + "I").unpack_from
                btype, blen = header(buf, pos)
            if blen < _BLOCK_MIN or blen % 4 or blen > MAX_RECORD:
                msg = f"block length {blen}"
                raise _Damage(msg)
            if pos + blen > n:
                base += pos
                buf = refill(read, buf, pos, blen)
                pos = 0
                n = len(buf)
                if blen > n:
                    stats.problem = (
                        f"{name}: truncated at byte {base}: block cut short ({n} of {blen} bytes)"
                    )
                    return
            if u32(buf, pos + blen - 4)[0] != blen:
                msg = f"block length {blen} disagrees with its trailer"
                raise _Damage(msg)

            if btype in (_EPB, _PB):  # the obsolete Packet Block differs only in its header
                if blen < _EPB_MIN:
                    msg = f"packet block too short ({blen} bytes)"
                    raise _Damage(msg)
                iface, high, low, caplen = (epb if btype == _EPB else pb)(buf, pos + 8)
                if caplen > blen - _EPB_MIN:
                    msg = f"packet length {caplen} past its block"
                    raise _Damage(msg)
                try:
                    decode, per_high, units, offset, _snaplen = interfaces[iface]
                except IndexError:
                    msg = f"packet on undeclared interface {iface}"
                    raise _Damage(msg) from None
                frames += 1
                ts = high * per_high + low / units + offset
                if decode is not None:
                    segment = decode(buf, pos + 28, caplen, ts)
                    if segment is not None:
                        segments += 1
                        pos += blen
                        yield segment
                        continue
            elif btype == _IDB:
                interfaces.append(_interface(buf, pos, blen, order, stats))
            elif btype == _SHB:
                _check_shb(buf, pos, order)
                interfaces = []
            elif btype == _SPB:
                if blen < _SPB_MIN:
                    msg = f"simple packet block too short ({blen} bytes)"
                    raise _Damage(msg)
                if not interfaces:
                    msg = "simple packet block before any interface"
                    raise _Damage(msg)
                decode, _per_high, _units, _offset, snaplen = interfaces[0]
                caplen = min(u32(buf, pos + 8)[0], blen - _SPB_MIN)
                if snaplen:
                    caplen = min(caplen, snaplen)
                frames += 1
                if decode is not None:
                    segment = decode(buf, pos + 12, caplen, ts)
                    if segment is not None:
                        segments += 1
                        pos += blen
                        yield segment
                        continue
            pos += blen
    except _Damage as exc:
        stats.problem = f"{name}: damaged at byte {base + pos}: {exc}"
    except READ_ERRORS as exc:
        stats.problem = read_error(name, base + pos, exc)
    finally:
        stats.frames += frames
        stats.segments += segments
