"""The PROXY protocol (haproxy's, versions 1 and 2) a TCP load balancer in front of
spicetap's reverse listeners sends first on each connection, to say whom it relays (no I/O).

A load balancer in TCP mode (haproxy `send-proxy`/`send-proxy-v2`, nginx's stream
`proxy_protocol on`, cloud network load balancers) hides the viewer: spicetap would see
the balancer's address. With the PROXY protocol it writes a header before the viewer's
first byte (before TLS, too): the viewer's address and port. Believed only from networks
the operator names (--proxy-protocol-from); from those the header is required, as
haproxy's `accept-proxy` requires it, since a connection without one would be the
balancer's own.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest version 1 line, "\r\n" included (the spec's bound)
# version 2: a signature no protocol's first bytes look like, then 4 bytes: version and
# command, family and transport, and the length of the addresses and TLVs that follow
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
V2_LOCAL, V2_PROXY = 0x20, 0x21  # version 2 with the LOCAL (a health check) or PROXY command
V2_TCP4, V2_TCP6 = 0x11, 0x21  # AF_INET or AF_INET6, over STREAM
MAX_HEADER = V2_FIXED + 0xFFFF  # version 2's length field bounds it
_NOT_A_HEADER = "no PROXY protocol header (the connection begins with other bytes)"
_V2_ADDRESSES = {V2_TCP4: (4, "!4s4sHH"), V2_TCP6: (16, "!16s16sHH")}


class ProxyHeaderError(ValueError):
    """A connection that should begin with a PROXY header does not (the text says how)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said: the viewer's address and port, or None when it spoke for
    itself (v1 UNKNOWN, v2 LOCAL: a health check) or for no TCP peer; and how many bytes
    the header took (the viewer's bytes follow)."""

    source: tuple[str, int] | None
    length: int


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None if more bytes are needed to tell (read more
    and call again with all of them); ProxyHeaderError if it is none."""
    if data[:1] == b"P":
        return _v1(data)
    if data[:1] == b"\r":
        return _v2(data)
    if not data:
        return None
    raise ProxyHeaderError(_NOT_A_HEADER)


def _v1(data: bytes) -> ProxyHeader | None:
    if not (data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]):
        raise ProxyHeaderError(_NOT_A_HEADER)
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    words = data[len(V1_PREFIX) : end].split(b" ")
    if words[0] == b"UNKNOWN":  # the balancer's own connection; the rest is to be ignored
        return ProxyHeader(None, end + 2)
    if words[0] not in (b"TCP4", b"TCP6") or len(words) != 5:
        raise ProxyHeaderError(f"PROXY v1 line not understood: {_shown(data[:end])}")
    family = 4 if words[0] == b"TCP4" else 6
    try:
        source = ipaddress.ip_address(words[1].decode("ascii"))
        destination = ipaddress.ip_address(words[2].decode("ascii"))
        ports = [_port(w) for w in words[3:]]
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(f"PROXY v1 line not understood: {_shown(data[:end])}") from None
    if source.version != family or destination.version != family:
        raise ProxyHeaderError(f"PROXY v1 addresses not {words[0].decode()}: {_shown(data[:end])}")
    return ProxyHeader((str(source), ports[0]), end + 2)


def _port(word: bytes) -> int:
    # decimal without a leading zero (the spec's form; "0" itself allowed)
    if not word.isdigit() or (len(word) > 1 and word[:1] == b"0") or int(word) > 65535:
        raise ValueError(word)
    return int(word)


def _v2(data: bytes) -> ProxyHeader | None:
    if data[: len(V2_SIGNATURE)] != V2_SIGNATURE[: len(data)]:
        raise ProxyHeaderError(_NOT_A_HEADER)
    if len(data) < V2_FIXED:
        return None
    command, family, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if command not in (V2_LOCAL, V2_PROXY):
        raise ProxyHeaderError(f"PROXY v2 version/command byte 0x{command:02x} not understood")
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if command == V2_LOCAL or family not in _V2_ADDRESSES:  # a health check; UDP, UNIX...
        return ProxyHeader(None, total)
    size, layout = _V2_ADDRESSES[family]
    if length < 2 * size + 4:
        raise ProxyHeaderError(f"PROXY v2 addresses cut short ({length} bytes)")
    source, _destination, port, _port_to = struct.unpack_from(layout, data, V2_FIXED)
    return ProxyHeader((str(ipaddress.ip_address(source)), port), total)  # TLVs after: skipped


class ProxyHeaderReader:
    """Bytes in as they arrive, the header out once whole; `rest` is what followed it."""

    def __init__(self) -> None:
        self.data = b""
        self.rest = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """ProxyHeaderError when the bytes are no header, or too many came for one."""
        self.data += data
        header = parse_proxy_header(self.data)
        if header is not None:
            self.rest = self.data[header.length :]
        elif len(self.data) > MAX_HEADER:
            raise ProxyHeaderError("PROXY protocol header too long")
        return header


def _shown(line: bytes) -> str:
    return repr(line[:64].decode("ascii", "replace"))
