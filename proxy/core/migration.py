"""Following a live migration (no I/O): find the main channel's migration messages in the
server's stream, say where the server wants the viewer to go, and rewrite the message so the
viewer comes back to spicetap instead.

spice-server announces a migration on the main channel (server to viewer) with
MIGRATE_BEGIN (101) or MIGRATE_BEGIN_SEAMLESS (116), both carrying a DstInfo, or, for old
clients, MIGRATE_SWITCH_HOST (111) with the same fields inline: the destination's port and
TLS port ("sport"; 0xffff or 0 when absent), its host name and the subject of its
certificate. A viewer that gets the real destination connects there directly and escapes
the proxy; so these messages (only these) are held until complete and re-encoded with the
address spicetap serves the destination on. Every other byte is passed on as it comes; the
only delay is for a message header cut between two reads (at most 18 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dissectors.api import decode, encode
from proxy.core.framing import FULL_HEADER, MINI_HEADER

MAIN = 1
MIGRATE_BEGIN = 101
MIGRATE_SWITCH_HOST = 111
MIGRATE_BEGIN_SEAMLESS = 116
# The server's first message on a main channel; its body starts with the session id (u32),
# which the session's other channels then link with. Held like a migration message (it is
# a few dozen bytes) so that the relay learns the id: a reload routes by it.
INIT = 103
MIGRATION_MESSAGES = {
    MIGRATE_BEGIN: "migrate_begin",
    MIGRATE_SWITCH_HOST: "migrate_switch_host",
    MIGRATE_BEGIN_SEAMLESS: "migrate_begin_seamless",
}
NO_PORT = (0, 0xFFFF)  # spice-server writes -1 as a uint16 for "no such port"


class MigrationError(ValueError):
    """A migration message spicetap cannot rewrite (the message says why)."""


class MigrationUnavailable(Exception):
    """The shell cannot serve a destination (the message says why)."""


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    port: int | None  # plain
    tls_port: int | None
    cert_subject: str | None


def _c_string(data: bytes | None) -> str:
    # a pointer of 0 decodes as None: the server sent no string at all
    return (data or b"").split(b"\0", 1)[0].decode("utf-8", "replace")


def _address_fields(msg_type: int, fields: dict[str, Any]) -> dict[str, Any]:
    return fields if msg_type == MIGRATE_SWITCH_HOST else fields["dst_info"]


def destination(msg_type: int, body: bytes) -> Destination:
    decoded = decode(MAIN, "s2c", msg_type, body)
    if decoded.error is not None or decoded.fields is None:
        raise MigrationError(f"{MIGRATION_MESSAGES[msg_type]} does not decode: {decoded.error}")
    info = _address_fields(msg_type, decoded.fields)
    port, sport = int(info["port"]), int(info["sport"])
    host = _c_string(info["host_data"])
    if not host:  # nowhere to send the viewer: nothing to rewrite either
        raise MigrationError(f"{MIGRATION_MESSAGES[msg_type]} names no destination host")
    subject = _c_string(info.get("cert_subject_data"))
    return Destination(
        host,
        None if port in NO_PORT else port,
        None if sport in NO_PORT else sport,
        subject or None,
    )


def rewrite(
    msg_type: int,
    body: bytes,
    host: str,
    port: int | None,
    tls_port: int | None,
    cert_subject: str | None,
) -> bytes:
    """The same message, sending the viewer to host:port/tls_port (checked against
    cert_subject, or by host name when None)."""
    fields = decode(MAIN, "s2c", msg_type, body).fields
    assert fields is not None  # destination() decoded it first
    info = _address_fields(msg_type, fields)
    host_data = host.encode() + b"\0"  # @zero_terminated: the size counts the NUL
    # no subject: a NULL pointer, as spice-server writes it (an empty array is not the same:
    # spice-gtk's demarshaller rejects a zero-terminated array of size 0)
    subject_data = cert_subject.encode() + b"\0" if cert_subject else None
    info.update(
        port=0xFFFF if port is None else port,
        sport=0xFFFF if tls_port is None else tls_port,
        host_size=len(host_data),
        host_data=host_data,
        cert_subject_size=len(subject_data or b""),
        cert_subject_data=subject_data,
    )
    return encode(MAIN, "s2c", msg_type, fields)


@dataclass(frozen=True, slots=True)
class Pass:
    data: bytes


@dataclass(frozen=True, slots=True)
class Held:
    """A whole migration message: header and body as the server sent them."""

    msg_type: int
    header: bytes
    body: bytes


class MigrationScanner:
    """Walks the main channel's server-to-viewer messages (after the link stage) and splits
    the stream into bytes to pass on and migration messages to rewrite (and the first
    INIT, passed on unchanged once read)."""

    def __init__(self, mini_header: bool, max_message: int) -> None:
        self.header = MINI_HEADER if mini_header else FULL_HEADER
        self.mini = mini_header
        self.max_message = max_message
        self.pending = bytearray()  # a cut header, or a held message being completed
        self.skip = 0  # body bytes of an ordinary message still to pass
        self.held_type: int | None = None
        self.held_size = 0
        self.init_seen = False
        self.header_seen = False  # of any message: the first is INIT, or none will be

    @property
    def first_read(self) -> bool:
        """The first message's header is in, and the message is not still held back."""
        return self.header_seen and self.held_type is None

    def _size_and_type(self, header: bytes) -> tuple[int, int]:
        if self.mini:
            msg_type, size = MINI_HEADER.unpack_from(header)
        else:
            _serial, msg_type, size, _sub = FULL_HEADER.unpack_from(header)
        return msg_type, size

    def feed(self, data: bytes) -> list[Pass | Held]:
        out: list[Pass | Held] = []
        view = memoryview(data)
        n, hsize = len(view), self.header.size
        pos = start = 0  # start: the first byte of `data` not yet handed out
        while pos < n:
            if self.skip:  # an ordinary message's body: passes untouched
                step = min(self.skip, n - pos)
                self.skip -= step
                pos += step
                continue
            if self.held_type is not None:  # completing a migration message
                chunk = view[pos : pos + hsize + self.held_size - len(self.pending)]
                self.pending += chunk
                pos += len(chunk)
                start = pos
                if len(self.pending) == hsize + self.held_size:
                    whole = bytes(self.pending)
                    self.pending.clear()
                    out.append(Held(self.held_type, whole[:hsize], whole[hsize:]))
                    self.held_type = None
                continue
            header_start = pos
            chunk = view[pos : pos + hsize - len(self.pending)]
            pos += len(chunk)
            if len(self.pending) + len(chunk) < hsize:  # cut: kept back until it is whole
                if header_start > start:
                    out.append(Pass(bytes(view[start:header_start])))
                self.pending += chunk
                start = pos
                break
            carried = bytes(self.pending)  # a header begun in an earlier read
            self.pending.clear()
            header = carried + bytes(chunk)
            msg_type, size = self._size_and_type(header)
            self.header_seen = True
            held = msg_type in MIGRATION_MESSAGES or (msg_type == INIT and not self.init_seen)
            self.init_seen = self.init_seen or msg_type == INIT
            if held and size <= self.max_message:
                if header_start > start:
                    out.append(Pass(bytes(view[start:header_start])))
                start = pos
                if size == 0:  # no DstInfo at all: destination() will say so
                    out.append(Held(msg_type, header, b""))
                else:
                    self.held_type, self.held_size = msg_type, size
                    self.pending += header
            else:
                if carried:  # only at the start of a read, so nothing of `data` precedes it
                    out.append(Pass(carried))
                self.skip = size
        if pos > start:
            out.append(Pass(bytes(view[start:pos])))
        return out

    def reframe(self, held: Held, body: bytes) -> bytes:
        """`held`'s header with the new body's size, then the body."""
        if self.mini:
            return MINI_HEADER.pack(held.msg_type, len(body)) + body
        serial, msg_type, _size, sub_list = FULL_HEADER.unpack(held.header)
        return FULL_HEADER.pack(serial, msg_type, len(body), sub_list) + body


__all__ = [
    "MIGRATION_MESSAGES",
    "Destination",
    "Held",
    "MigrationError",
    "MigrationScanner",
    "MigrationUnavailable",
    "Pass",
    "destination",
    "rewrite",
]
