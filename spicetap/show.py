"""Records of every SPICE connection in a pcap/pcapng capture, in time order."""

from __future__ import annotations

import heapq
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
from spicetap.capture.piped import Piped, is_piped
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


# Records kept back while a connection's wait, at most: past this they go out as they came.
REORDER_MAX = 4096


class TimeOrder:
    """A builder's records in time order across connections. A main channel's link stage
    waits in the builder for INIT (which names the session), and records of other
    connections let go meanwhile are later than it: they are kept back until it comes,
    then merged with it by time. Each connection's own records keep their order."""

    def __init__(self, builder: RecordBuilder) -> None:
        self.builder = builder
        self.kept: list[Record] = []

    def put(self, records: list[Record]) -> list[Record]:
        if self.builder.holding and len(self.kept) + len(records) < REORDER_MAX:
            self.kept += records
            return []
        if not self.kept:
            return records
        self.kept += records
        return self.flush()

    def flush(self) -> list[Record]:
        by_connection: dict[int, list[Record]] = {}
        for rec in self.kept:
            by_connection.setdefault(rec.connection, []).append(rec)
        self.kept = []
        # merge takes heads only: a connection's records never overtake one another
        return list(heapq.merge(*by_connection.values(), key=_time))


def _time(rec: Record) -> float:
    return rec.time


def iter_capture(path: Path | Piped, problems: list[str] | None = None) -> Iterator[Record]:
    """Yield records; a damaged tail of the file is appended to `problems`. A pipe (`-`,
    a named pipe) is read as it comes.

    Raises CaptureError when the file cannot be read at all.
    """
    if isinstance(path, Path) and is_piped(path):
        with Piped.open(path) as piped:
            yield from iter_capture(piped, problems)
        return
    name = path.name if isinstance(path, Piped) else str(path)
    builder = RecordBuilder()
    order = TimeOrder(builder)
    reassembler = TcpReassembler()
    with read_packets(path) as reader:
        for segment in reader:
            for ev in reassembler.feed(segment):
                yield from order.put(_records(builder, ev))
    for ev in reassembler.finish():
        yield from order.put(_records(builder, ev))
    yield from order.flush()
    if problems is not None:
        if isinstance(path, Piped) and path.ended_by_interrupt:
            problems.append(f"{name}: read until Ctrl-C (its writer had not ended it)")
        if reader.problem:
            problems.append(reader.problem)
        if reader.unsupported_linktypes:  # else a capture of them shows nothing, silently
            kinds = ", ".join(str(t) for t in sorted(reader.unsupported_linktypes))
            problems.append(f"{name}: packets of link type {kinds} were skipped (not read)")
