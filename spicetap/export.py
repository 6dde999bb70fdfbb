"""`spicetap export`: records (from an archive or a capture) to pcapng or JSON lines.

pcap: the plaintext byte streams of every channel connection, in synthetic TCP that
Wireshark's SPICE dissector reads, so TLS sessions recorded by spicetap become readable in
Wireshark. Only wire units are written (link units and messages, in arrival order); bytes an
archive left out (tickets, and whatever the privacy policy redacted) are written as zeros of
the same length, so the streams stay aligned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from spicetap.inputs import AnyRecord
from spicetap.pcap_export import PcapngStreamWriter
from spicetap.render import to_json

WIRE_KINDS = {"link", "message"}


def _endpoint(text: Any) -> tuple[str, int] | None:
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def _payload(rec: AnyRecord) -> bytes:
    redacted = getattr(rec, "redacted", None)
    if redacted and not rec.raw:
        return bytes(int(redacted.get("len", 0)))
    return rec.raw


def export_pcap(records: Iterable[AnyRecord], out: Path, tick: Callable[[int], None]) -> int:
    count = 0
    with out.open("wb") as f:
        writer = PcapngStreamWriter(f, comment="exported by spicetap")
        opened: set[int] = set()
        for rec in records:
            conn = rec.connection
            if rec.kind == "open" and conn not in opened:
                fields = rec.fields or {}
                writer.open(
                    conn, rec.time, _endpoint(fields.get("client")), _endpoint(fields.get("server"))
                )
                opened.add(conn)
                continue
            if rec.kind == "close":
                if conn in opened:
                    writer.close(conn, rec.time)
                    opened.discard(conn)
                continue
            if rec.kind not in WIRE_KINDS:
                continue
            if conn not in opened:  # a capture or archive without the connection's start
                writer.open(conn, rec.time, None, None)
                opened.add(conn)
            data = _payload(rec)
            direction = "c2s" if rec.direction == "c2s" else "s2c"
            if data:
                writer.data(conn, rec.time, direction, data)
            count += 1
            if count % 4096 == 0:
                tick(count)
        last = 0.0
        for conn in sorted(opened):
            writer.close(conn, last)
        writer.finish()
    return count


def export_json(records: Iterable[AnyRecord], out: Path, tick: Callable[[int], None]) -> int:
    count = 0
    with out.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(to_json(rec) + "\n")
            count += 1
            if count % 4096 == 0:
                tick(count)
    return count
