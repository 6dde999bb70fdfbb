"""Classic pcap files: both byte orders, micro- and nanosecond timestamps.

Also the "modified" pcap of some old Linux tools (magic 0xa1b2cd34), whose record
headers carry 8 more bytes. The loop keeps the file in a local ``bytes`` buffer that it
refills a megabyte at a time, and hands each frame to the link type's decoder in place.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from .decode import Decoder, linktype_name, make_decoder
from .segment import Buffer, CaptureError, TcpSegment
from .source import MAX_RECORD, READ_ERRORS, Read, ReadStats, read_error, refill

__all__ = ["PCAP_MAGICS", "read_pcap"]

# First four bytes -> (byte order, timestamp units per second, record header size)
PCAP_MAGICS: Final = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000, 16),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000, 16),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000, 16),
    b"\x34\xcd\xb2\xa1": ("<", 1_000_000, 24),
    b"\xa1\xb2\xcd\x34": (">", 1_000_000, 24),
}
_FILE_HEADER: Final = 24
_LINKTYPE_MASK: Final = 0x03FFFFFF  # the upper bits say whether frames end in an FCS


def read_pcap(buf: Buffer, read: Read, name: str, stats: ReadStats) -> Iterator[TcpSegment]:
    """The TCP segments of a pcap file: ``buf`` from its start, ``read`` for the rest.

    Checks the file header at once (raising CaptureError); the rest is read lazily.
    """
    if len(buf) < _FILE_HEADER:
        buf = refill(read, buf, 0, _FILE_HEADER)
        if len(buf) < _FILE_HEADER:
            msg = f"{name}: truncated pcap file header ({len(buf)} of {_FILE_HEADER} bytes)"
            raise CaptureError(msg)
    endian, units, rec_size = PCAP_MAGICS[bytes(buf[:4])]
    major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack_from(
        endian + "HHiIII", buf, 4
    )
    if major != 2:
        msg = f"{name}: pcap version {major} is not supported"
        raise CaptureError(msg)
    linktype = network & _LINKTYPE_MASK
    decode = make_decoder(linktype)
    if decode is None:
        msg = f"{name}: {linktype_name(linktype)} captures are not supported"
        raise CaptureError(msg)
    return _records(buf, read, endian, float(units), rec_size, decode, name, stats)


def _records(
    buf: Buffer,
    read: Read,
    endian: str,
    units: float,
    rec_size: int,
    decode: Decoder,
    name: str,
    stats: ReadStats,
) -> Iterator[TcpSegment]:
    unpack = struct.Struct(endian + "IIII").unpack_from
    pos = _FILE_HEADER
    n = len(buf)
    base = 0  # the file offset of buf[0]
    frames = segments = 0
    try:
        while True:
            if pos + rec_size > n:
                base += pos
                buf = refill(read, buf, pos, rec_size)
                pos = 0
                n = len(buf)
                if n < rec_size:
                    if n:
                        stats.problem = (
                            f"{name}: truncated at byte {base}: record header cut short"
                            f" ({n} of {rec_size} bytes)"
                        )
                    return
            sec, frac, caplen, _origlen = unpack(buf, pos)
            start = pos + rec_size
            end = start + caplen
            if end > n:
                if caplen > MAX_RECORD:
                    stats.problem = f"{name}: damaged at byte {base + pos}: record length {caplen}"
                    return
                base += pos
                buf = refill(read, buf, pos, rec_size + caplen)
                pos = 0
                n = len(buf)
                start = rec_size
                end = start + caplen
                if end > n:
                    stats.problem = (
                        f"{name}: truncated at byte {base}: packet cut short"
                        f" ({n - rec_size} of {caplen} bytes)"
                    )
                    return
            frames += 1
            segment = decode(buf, start, caplen, sec + frac / units)
            pos = end
            if segment is not None:
                segments += 1
                yield segment
    except READ_ERRORS as exc:
        stats.problem = read_error(name, base + pos, exc)
    finally:
        stats.frames += frames
        stats.segments += segments
