"""Records of every SPICE connection in a pcap/pcapng capture, in capture order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from spicetap.capture import (
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamGap,
    StreamOpened,
    TcpReassembler,
    read_packets,
)
from spicetap.records import Record, RecordBuilder


def _records(builder: RecordBuilder, ev: StreamEvent) -> list[Record]:
    if isinstance(ev, StreamData):
        return builder.data(ev.conn, ev.ts, ev.direction, ev.data)
    if isinstance(ev, StreamOpened):
        builder.opened(ev.conn, ev.ts, ev.client, ev.server)
        return []
    if isinstance(ev, StreamGap):
        return builder.gap(ev.conn, ev.ts, ev.direction, ev.missing)
    if isinstance(ev, StreamClosed):
        return builder.closed(ev.conn, ev.ts, ev.reason)
    return []


def iter_capture(path: Path, problems: list[str] | None = None) -> Iterator[Record]:
    """Yield records; a damaged tail of the file is appended to `problems`.

    Raises CaptureError when the file cannot be read at all.
    """
    builder = RecordBuilder()
    reassembler = TcpReassembler()
    with read_packets(path) as reader:
        for segment in reader:
            for ev in reassembler.feed(segment):
                yield from _records(builder, ev)
    for ev in reassembler.finish():
        yield from _records(builder, ev)
    if problems is not None:
        if reader.problem:
            problems.append(reader.problem)
        if reader.unsupported_linktypes:  # else a capture of them shows nothing, silently
            kinds = ", ".join(str(t) for t in sorted(reader.unsupported_linktypes))
            problems.append(f"{path}: packets of link type {kinds} were skipped (not read)")
