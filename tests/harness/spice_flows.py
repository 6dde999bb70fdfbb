"""Which SPICE channel each captured connection carried, and what flowed on it.

An oracle for harness tests, independent of the project's dissector: it reads
the link messages (the only place a connection names its channel type), skips
the authentication bytes, then walks the mini (or full) message headers in both
directions and counts message types. TLS and SASL streams are only counted.

Layouts (spice-protocol spice/protocol.h):
  SpiceLinkHeader  magic "REDQ", major u32, minor u32, size u32         16 bytes
  SpiceLinkMess    connection_id u32, channel_type u8, channel_id u8,
                   num_common_caps u32, num_channel_caps u32, caps_offset u32
  SpiceLinkReply   error u32, pub_key[162], num_common_caps u32,
                   num_channel_caps u32, caps_offset u32
  then client: [auth mechanism u32 if AUTH_SELECTION] + 128-byte RSA ticket;
       server: link result u32
  mini header      type u16, size u32;  full header serial u64, type u16,
                   size u32, sub_list u32
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.pcapng import TcpStream, tcp_streams

CHANNEL_NAMES = {
    1: "main",
    2: "display",
    3: "inputs",
    4: "cursor",
    5: "playback",
    6: "record",
    7: "tunnel",
    8: "smartcard",
    9: "usbredir",
    10: "port",
    11: "webdav",
}
CAP_AUTH_SELECTION, CAP_AUTH_SPICE, CAP_MINI_HEADER = 0, 1, 3
AUTH_SPICE = 1
TICKET_BYTES = 128

# message numbers (spice/enums.h) the harness asserts on
MSG_MAIN_AGENT_DATA = 109  # server -> client
MSGC_MAIN_AGENT_DATA = 107  # client -> server
MSG_PLAYBACK_DATA = 101
MSG_RECORD_START = 101
MSGC_RECORD_DATA = 101
MSG_SPICEVMC_DATA = 101  # usbredir, port, webdav, smartcard (both directions)
MSG_SPICEVMC_COMPRESSED_DATA = 102

_HEADER = struct.Struct("<4sIII")
_LINK_MESS = struct.Struct("<IBBIII")
_LINK_REPLY = struct.Struct("<I162sIII")
_MINI = struct.Struct("<HI")
_FULL = struct.Struct("<QHII")


@dataclass
class Direction:
    bytes: int = 0
    messages: Counter[int] = field(default_factory=Counter)
    payload_bytes: Counter[int] = field(default_factory=Counter)  # per message type
    truncated: bool = False


@dataclass
class SpiceFlow:
    client_port: int
    server_port: int
    start: float
    channel_type: int | None = None
    channel_id: int | None = None
    connection_id: int | None = None
    encrypted: bool = False  # TLS or SASL: message counts unavailable
    link_error: int | None = None
    from_client: Direction = field(default_factory=Direction)
    from_server: Direction = field(default_factory=Direction)

    @property
    def channel(self) -> str:
        if self.channel_type is None:
            return "tls" if self.encrypted else "unknown"
        return CHANNEL_NAMES.get(self.channel_type, f"type{self.channel_type}")


def _caps(data: bytes, start: int, count: int) -> int:
    words = struct.unpack_from(f"<{count}I", data, start) if count else ()
    return sum(w << (32 * i) for i, w in enumerate(words))


def _walk(data: bytes, pos: int, mini: bool, out: Direction) -> None:
    header = _MINI if mini else _FULL
    while pos + header.size <= len(data):
        fields = header.unpack_from(data, pos)
        mtype, size = (fields[0], fields[1]) if mini else (fields[1], fields[2])
        if pos + header.size + size > len(data):
            out.truncated = True
            return
        out.messages[mtype] += 1
        out.payload_bytes[mtype] += size
        pos += header.size + size
    if pos != len(data):
        out.truncated = True


def analyse_stream(stream: TcpStream) -> SpiceFlow:
    flow = SpiceFlow(stream.client[1], stream.server[1], stream.start)
    c, s = stream.client_bytes, stream.server_bytes
    flow.from_client.bytes, flow.from_server.bytes = len(c), len(s)
    if len(c) < _HEADER.size + _LINK_MESS.size or c[:4] != b"REDQ":
        flow.encrypted = c[:1] == b"\x16"  # a TLS ClientHello
        return flow
    link_size = _HEADER.unpack_from(c, 0)[3]
    conn_id, ctype, cid, n_common, _n_chan, caps_off = _LINK_MESS.unpack_from(c, _HEADER.size)
    flow.connection_id, flow.channel_type, flow.channel_id = conn_id, ctype, cid
    client_caps = _caps(c, _HEADER.size + caps_off, n_common)
    if len(s) < _HEADER.size + _LINK_REPLY.size:
        return flow
    reply_size = _HEADER.unpack_from(s, 0)[3]
    error, _key, s_common, _s_chan, s_off = _LINK_REPLY.unpack_from(s, _HEADER.size)
    flow.link_error = error
    if error:
        return flow
    server_caps = _caps(s, _HEADER.size + s_off, s_common)
    common = client_caps & server_caps
    mini = bool(common >> CAP_MINI_HEADER & 1)
    pos_c = _HEADER.size + link_size
    if common >> CAP_AUTH_SELECTION & 1:
        mechanism = struct.unpack_from("<I", c, pos_c)[0] if len(c) >= pos_c + 4 else 0
        pos_c += 4
        if mechanism != AUTH_SPICE:
            flow.encrypted = True  # SASL: the rest is SASL-wrapped
            return flow
    pos_c += TICKET_BYTES
    pos_s = _HEADER.size + reply_size
    if len(s) >= pos_s + 4:
        flow.link_error = struct.unpack_from("<I", s, pos_s)[0]
    pos_s += 4
    if flow.link_error == 0:
        _walk(c, pos_c, mini, flow.from_client)
        _walk(s, pos_s, mini, flow.from_server)
    return flow


def spice_flows(pcapng: Path, server_ports: set[int]) -> list[SpiceFlow]:
    """One SpiceFlow per TCP connection to one of `server_ports`, in SYN order."""
    return [analyse_stream(st) for st in tcp_streams(pcapng, server_ports)]


def channel_counts(flows: list[SpiceFlow]) -> Counter[str]:
    return Counter(f.channel for f in flows)


ALL_CHANNELS = Counter(
    {
        "main": 1,
        "display": 1,
        "inputs": 1,
        "cursor": 1,
        "playback": 1,
        "record": 1,
        "usbredir": 2,
        "smartcard": 1,
        "port": 1,
        "webdav": 1,
    }
)
USB_BULK_MIN_BYTES = 1 << 20  # the shared CD is 4 MiB of incompressible data


def full_session_problems(flows: list[SpiceFlow]) -> list[str]:
    """What a full GI-client session against the linux guest lacks on the wire ([] = ok)."""
    problems: list[str] = []
    counts = channel_counts(flows)
    if counts != ALL_CHANNELS:
        problems.append(f"channel connections {dict(counts)} != {dict(ALL_CHANNELS)}")

    def total(channel: str, side: str, *types: int) -> int:
        return sum(
            getattr(f, side).payload_bytes[t] for f in flows if f.channel == channel for t in types
        )

    checks = {
        "main AGENT_DATA client->server": total("main", "from_client", MSGC_MAIN_AGENT_DATA),
        "main AGENT_DATA server->client": total("main", "from_server", MSG_MAIN_AGENT_DATA),
        "playback DATA": total("playback", "from_server", MSG_PLAYBACK_DATA),
        "record DATA": total("record", "from_client", MSGC_RECORD_DATA),
        "port DATA client->server": total("port", "from_client", MSG_SPICEVMC_DATA),
        "port DATA server->client": total("port", "from_server", MSG_SPICEVMC_DATA),
    }
    problems += [f"no {name}" for name, size in checks.items() if size == 0]
    usb = total("usbredir", "from_client", MSG_SPICEVMC_DATA, MSG_SPICEVMC_COMPRESSED_DATA)
    if usb < USB_BULK_MIN_BYTES:
        problems.append(f"usbredir client->server carried only {usb} bytes")
    for f in flows:
        if f.from_client.truncated or f.from_server.truncated:
            problems.append(f"{f.channel} (client port {f.client_port}): message walk lost sync")
    return problems
