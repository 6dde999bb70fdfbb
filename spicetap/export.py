"""`spicetap export`: records (from an archive or a capture) to pcapng or JSON lines.

pcap: the plaintext byte streams of every channel connection, in synthetic TCP that
Wireshark's SPICE dissector reads, so TLS sessions recorded by spicetap become readable in
Wireshark. Only wire units are written (link units and messages, in arrival order); bytes an
archive left out (tickets, and whatever the privacy policy redacted) are written as zeros of
the same length, so the streams stay aligned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from spicetap.inputs import AnyRecord
from spicetap.pcap_export import PcapngStreamWriter
from spicetap.render import to_json

WIRE_KINDS = {"link", "message"}


def _endpoint(text: Any) -> tuple[str, int] | None:
    """ "host:port" or "[v6]:port" as the pcapng writer takes it, or None: unknown, or not an
    IP address and port (a host name, or damage)."""
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    return (host, number) if 0 < number < 65536 else None


def _open(writer: PcapngStreamWriter, rec: AnyRecord, noted: set[str], problems: list[str]) -> None:
    """Start a connection's stream at the addresses its open record names. A packet needs
    IP addresses: an endpoint that is not one (a host name, say) is exported as the
    writer's stand-in for an unknown one (a loopback address, port 5930 for a server), as
    is a server of the other IP version than its client; the warning names what was
    replaced, once per address."""
    fields = rec.fields or {}
    texts = fields.get("client"), fields.get("server")
    client, server = (_endpoint(text) for text in texts)
    why = ["is not an IP address and port" if end is None else "" for end in (client, server)]
    if client and server and (":" in client[0]) != (":" in server[0]):
        server, why[1] = None, "is not of its client's IP version"  # one stream, one version
    written = writer.open(rec.connection, rec.time, client, server)
    for side, text, reason, end in zip(("client", "server"), texts, why, written, strict=True):
        if text is not None and reason and str(text) not in noted:
            noted.add(str(text))
            problems.append(
                f"connection {rec.connection}: {side} {str(text)!r} {reason}; "
                f"exported as {end.host}:{end.port}"
            )


def _payload(rec: AnyRecord) -> bytes:
    redacted = getattr(rec, "redacted", None)
    if redacted and not rec.raw:
        return bytes(int(redacted.get("len", 0)))
    return rec.raw


def export_pcap(
    records: Iterable[AnyRecord],
    out: Path,
    tick: Callable[[int], None],
    problems: list[str] | None = None,
) -> int:
    count = 0
    noted: set[str] = set()
    with out.open("wb") as f:
        writer = PcapngStreamWriter(f, comment="exported by spicetap")
        opened: set[int] = set()
        for rec in records:
            conn = rec.connection
            if rec.kind == "open" and conn not in opened:
                _open(writer, rec, noted, [] if problems is None else problems)
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
