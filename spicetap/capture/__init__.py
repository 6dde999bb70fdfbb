"""Reading captures: pcap and pcapng files in, reassembled TCP streams out.

The input layer of ``spicetap show CAPTURE``. Two parts, used together::

    from spicetap.capture import TcpReassembler, read_packets

    reassembler = TcpReassembler()
    with read_packets("capture.pcapng") as reader:   # CaptureError: cannot read at all
        for segment in reader:
            for event in reassembler.feed(segment):
                ...
    for event in reassembler.finish():
        ...
    if reader.problem:                                  # a truncated or damaged tail
        print("warning:", reader.problem)

``read_packets(path) -> CaptureReader`` (reader.py) iterates TcpSegments, in file order;
  ``read_packets(piped)`` reads a pipe (``Piped``, piped.py: standard input or a named
  pipe) as it comes, for live captures (``tcpdump -U -w - | spicetap show -``).
  Formats: pcap (both byte orders; micro- and nanosecond; the old "modified" variant) and
  pcapng (sections in either byte order, SHB/IDB/EPB/SPB and the obsolete PB, several
  interfaces, per-interface ``if_tsresol``/``if_tsoffset``), either of them gzip'd.
  Link types: Ethernet (VLAN/QinQ/MPLS/PPPoE through dpkt), Linux cooked SLL and SLL2,
  raw IP (101, 12, 14, 228, 229), null/loopback (0) and OpenBSD loopback (108). IPv4
  and IPv6 (extension headers through dpkt). Not TCP, IP fragments and frames too short
  for their headers are skipped (``frames - segments`` of them).
  Errors: a file that is missing, unreadable, empty, cut inside its header, or not a
  capture raises ``CaptureError`` at ``read_packets``, its message one line naming the
  file and the problem. A good file with a truncated or damaged tail yields every packet
  before the damage, then stops; ``reader.truncated`` is then True and ``reader.problem``
  says what and where, in one line. Never a traceback for bad input.

``TcpSegment`` (segment.py), a NamedTuple (for speed: see its docstring): ts (float
  seconds), src, sport, dst, dport, seq, ack, flags (int; FIN, SYN, RST, PSH, ACK),
  payload (bytes), snapped (payload bytes the capture's snap length cut off).

``TcpReassembler`` (reassembly.py), pure, no I/O: ``feed(segment) -> list[StreamEvent]``,
  ``finish() -> list[StreamEvent]`` at the end of the capture. Events, frozen
  dataclasses: ``StreamOpened(conn, ts, client, server, midstream)``,
  ``StreamData(conn, ts, direction, data)``, ``StreamGap(conn, ts, direction, missing)``,
  ``StreamClosed(conn, ts, reason)``, with direction "c2s" or "s2c", reason "fin", "rst"
  or "eof", client and server (address, port). Connection ids are 0, 1, 2... in order of
  first appearance. Handles retransmissions and overlaps (first copy wins),
  out-of-order segments (buffered up to ``max_buffer`` bytes per direction, default
  16 MiB, then the hole is declared a gap), sequence wraparound, port reuse (a new SYN
  is a new connection), and streams whose handshake was not captured (client/server by
  heuristics: see the module docstring).

The decoders (decode.py) read the common headers by hand with precompiled structs, and
leave the rare ones to dpkt; ``decode_with_dpkt`` decodes everything with dpkt alone and
is the tests' oracle for the fast paths.
"""

from .decode import decode_with_dpkt, linktype_name, make_decoder
from .reader import CaptureReader, read_packets
from .reassembly import (
    CloseReason,
    Direction,
    Endpoint,
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamGap,
    StreamOpened,
    TcpReassembler,
)
from .segment import ACK, FIN, PSH, RST, SYN, CaptureError, NotACapture, TcpSegment

__all__ = [
    "ACK",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "CaptureError",
    "CaptureReader",
    "CloseReason",
    "Direction",
    "Endpoint",
    "NotACapture",
    "StreamClosed",
    "StreamData",
    "StreamEvent",
    "StreamGap",
    "StreamOpened",
    "TcpReassembler",
    "TcpSegment",
    "decode_with_dpkt",
    "linktype_name",
    "make_decoder",
    "read_packets",
]
