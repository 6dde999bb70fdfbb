"""The HTTP CONNECT front's protocol core (no I/O): read one CONNECT request, decide, answer.

spice-gtk (remote-viewer --spice-proxy=http://HOST:PORT, or SPICE_PROXY) opens one proxy
connection per SPICE channel and sends `CONNECT host:port HTTP/1.0` naming the server's
port or tls-port; after a 2xx answer the connection is a raw tunnel. h11 (sans-I/O, by the
trio authors) does the HTTP parsing, so header folding, bad framing and size limits follow
RFC 9112 rather than our own guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

from proxy.core.allow import split_host_port
from proxy.core.http import MAX_HEAD, BoundedServer

# The first byte a viewer sends in the tunnel tells TLS from plain SPICE: a TLS record
# starts with content type 22 (handshake); a SPICE link starts with the magic "REDQ".
TLS_HANDSHAKE = 0x16
SPICE_MAGIC = b"REDQ"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # for the log and the response body


def _response(conn: h11.Connection, status: int, reason: str, body: bytes = b"") -> bytes:
    headers = []
    if body:
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        headers.append(("Connection", "close"))
    parts = [conn.send(h11.Response(status_code=status, headers=headers, reason=reason.encode()))]
    if body:
        parts += [conn.send(h11.Data(data=body)), conn.send(h11.EndOfMessage())]
    return b"".join(p or b"" for p in parts)


class ConnectHandshake:
    """Feed bytes until `feed` returns a request or a refusal, then call `accept` or
    `refuse`; after `accept`, `tunnel_data` holds tunnel bytes that came with the request."""

    def __init__(self) -> None:
        self._conn = BoundedServer()
        self.tunnel_data = b""

    def feed(self, data: bytes) -> ConnectRequest | Refusal | None:
        self._conn.receive_data(data)
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            return Refusal(exc.error_status_hint, f"bad request: {exc}")
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):
            return Refusal(400, "bad request: expected an HTTP request")
        if event.method != b"CONNECT":
            return Refusal(405, f"only CONNECT is served here, not {event.method.decode()}")
        # A CONNECT request has no body; h11 frames one if the headers announce it (chunked,
        # Content-Length), and what follows would be read as that body, not as the tunnel.
        try:
            end = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            return Refusal(exc.error_status_hint, f"bad request: {exc}")
        if not isinstance(end, h11.EndOfMessage):
            return Refusal(400, "bad request: a CONNECT request has no body")
        if self._conn.head_too_big():
            return Refusal(431, f"request head over {MAX_HEAD} bytes")
        target = event.target.decode("ascii", "replace")
        try:
            host, port_text = split_host_port(target)
            port = int(port_text)
        except ValueError:
            return Refusal(400, f"CONNECT target {target!r} is not HOST:PORT")
        if not 1 <= port <= 65535 or not host:
            return Refusal(400, f"CONNECT target {target!r} is not HOST:PORT")
        return ConnectRequest(host, port)

    def eof(self) -> Refusal:
        return Refusal(400, "the viewer closed before finishing its CONNECT request")

    def accept(self) -> bytes:
        out = _response(self._conn, 200, "Connection established")
        self.tunnel_data = self._conn.trailing_data[0]
        return out

    def refuse(self, refusal: Refusal) -> bytes:
        conn = self._conn
        if conn.their_state is h11.ERROR or conn.our_state is not h11.SEND_RESPONSE:
            # h11 will not answer a request it could not parse: spell it out ourselves
            body = refusal.reason.encode()
            return (
                f"HTTP/1.1 {refusal.status} Refused\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
        reason = _REASONS.get(refusal.status, "Refused")
        return _response(conn, refusal.status, reason, refusal.reason.encode())


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


def tunnel_kind(first: bytes) -> str | None:
    """ "tls", "spice", or None (neither: close the tunnel) from the tunnel's first bytes."""
    if first[:1] == bytes([TLS_HANDSHAKE]):
        return "tls"
    if SPICE_MAGIC.startswith(first[:4]) and first:
        return "spice"
    return None
