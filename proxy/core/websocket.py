"""RFC 6455 WebSocket, server side, sans I/O: the opening handshake and the frame codec.

Theory of operation. `accept(request)` checks an upgrade request (§4.2.1) and returns the
101 response to send, or an `HttpError` to answer instead. After that, one
`WebSocketConnection` per socket: `receive_data(bytes)` (b"" at EOF) returns events:
`Payload` (application bytes, handed out as soon as they arrive, even mid-frame, so nothing
is buffered beyond the 14-byte frame header and a 125-byte control frame), `Reply` (frame
bytes to write back: pong, close) and `Closed` (the connection is over: write any Reply
first, then close the socket). `send(data)` and `close(code)` return frame bytes to write.
Peer mistakes never raise: they become a close frame with a status code and `Closed`.

It carries one SPICE channel connection, as websockify does for spice-html5: binary
messages are a byte stream (message boundaries mean nothing), text messages are refused
with 1003 as websockify refuses them, and the "binary" subprotocol is answered when offered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from proxy.core.forwarded import Forwarding
from proxy.core.http import HttpError, Request, response

# §1.3: Sec-WebSocket-Accept = base64(SHA-1(key + this GUID))
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
VERSION = "13"  # §4.1; any other version gets 426 and this list (§4.4)
SUBPROTOCOL = "binary"  # what spice-html5 asks for (new WebSocket(uri, 'binary'))

# opcodes, §5.2
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# close status codes, §7.4.1
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA = 1000, 1001, 1002, 1003
NO_STATUS, ABNORMAL, INVALID_DATA, POLICY, TOO_BIG = 1005, 1006, 1007, 1008, 1009

MAX_CONTROL_PAYLOAD = 125  # §5.5: control frames are short and never fragmented
MAX_EMPTY_RUN = 100  # frames in a row carrying no data (control or empty): a flood
_HEAD = struct.Struct("!BB")
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def is_upgrade(request: Request) -> bool:
    """The client asks for a WebSocket (anything else on this port is a plain GET)."""
    return "websocket" in request.tokens("upgrade")


# An origin as browsers send it (RFC 6454): scheme, host, optional port; compared below
# without case or a trailing slash, so an allowed one may have either.
ORIGIN = re.compile(r"https?://([^/\s:\[\]]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?/?", re.IGNORECASE)


def origin_is_valid(allowed: str) -> bool:
    """Whether an operator's allowed origin (--ws-origin) can ever match: "*" or an origin."""
    if allowed == "*":
        return True
    origin = ORIGIN.fullmatch(allowed)
    return origin is not None and int((origin[2] or ":0")[1:]) < 65536  # [2]: ":PORT"


def origin_refusal(
    request: Request, tls: bool, allowed: tuple[str, ...], told: Forwarding | None = None
) -> HttpError | None:
    """Why a browser page may not open this WebSocket (cross-site WebSocket hijacking: a page
    from elsewhere must not drive a viewer's browser into a SPICE session), or None.
    Browsers always send Origin (RFC 6455 §4.1); accepted are spicetap's own page (the
    origin of the Host asked for; behind a trusted reverse proxy, of the scheme and Host
    it says the browser used, if it says), an origin the operator allows ("*": any), and
    clients that send none, which are not browsers."""
    origin = request.headers.get("origin")
    if origin is None:
        return None
    origin = origin.strip().lower().rstrip("/")
    scheme = "https" if tls else "http"
    host = request.headers.get("host", "").strip().lower()
    if told is not None and told.proxy is not None:
        scheme, host = told.proto or scheme, told.host or host
    own = f"{scheme}://{host}"
    if origin == own or "*" in allowed or origin in {a.lower().rstrip("/") for a in allowed}:
        return None
    return HttpError(403, f"origin {origin} is not allowed (see --ws-origin)")


def accept(
    request: Request,
    tls: bool = False,
    origins: tuple[str, ...] = (),
    told: Forwarding | None = None,
) -> tuple[bytes, str | None] | HttpError:
    """The 101 response and the chosen subprotocol, or why the upgrade is refused. `tls`:
    the page was served over https; `origins`: other pages' origins allowed to connect;
    `told`: what a trusted reverse proxy said of the browser."""
    if request.method != "GET" or request.version < "1.1":
        return HttpError(400, "a WebSocket upgrade is a GET over HTTP/1.1")
    if "host" not in request.headers:
        return HttpError(400, "no Host header")
    refused = origin_refusal(request, tls, origins, told)
    if refused is not None:
        return refused
    if not is_upgrade(request):
        return HttpError(400, "Upgrade header does not name websocket")
    if "upgrade" not in request.tokens("connection"):
        return HttpError(400, "Connection header does not name Upgrade")
    if request.headers.get("sec-websocket-version", "").strip() != VERSION:
        return HttpError(426, f"only WebSocket version {VERSION} is supported")
    key = request.headers.get("sec-websocket-key", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16  # §4.1: 16 random bytes
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return HttpError(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    # websockify: pick "binary" when offered; no offer, no subprotocol; an offer without
    # "binary" is refused (the client would expect a protocol we do not speak)
    offered = request.tokens("sec-websocket-protocol")
    if offered and SUBPROTOCOL not in offered:
        return HttpError(400, f"subprotocols {', '.join(offered)} offered; only binary is spoken")
    chosen = SUBPROTOCOL if offered else None
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ]
    if chosen:
        headers.append(("Sec-WebSocket-Protocol", chosen))
    return response(101, headers), chosen


@dataclass(frozen=True, slots=True)
class Payload:
    data: bytes  # application bytes from a binary message (possibly part of a frame)


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes  # a frame to write to the peer before anything else


@dataclass(frozen=True, slots=True)
class Closed:
    code: int  # the peer's close code, or ours when we failed the connection
    reason: str
    error: bool  # we failed the connection or it dropped; False: a clean close handshake


Event = Payload | Reply | Closed


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A server frame: never masked (§5.1), length in the shortest form (§5.2)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = _HEAD.pack(first, n)
    elif n < 1 << 16:
        head = _HEAD.pack(first, 126) + _LEN16.pack(n)
    else:
        head = _HEAD.pack(first, 127) + _LEN64.pack(n)
    return head + payload


def close_payload(code: int, reason: str = "") -> bytes:
    # §5.5.1: 2-byte code, then UTF-8 reason; the whole payload fits a control frame
    return _LEN16.pack(code) + reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]


def unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    """XOR with the 4-byte key, starting `offset` bytes into the frame's payload (§5.3).
    One big-integer XOR: linear time in C, no per-byte Python loop."""
    if not data:
        return b""
    k = offset % 4
    key = (mask[k:] + mask[:k]) * (len(data) // 4 + 1)
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(key[:n], "big")).to_bytes(n, "big")


_VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


class WebSocketConnection:
    """One server-side WebSocket after the handshake. `max_message` bounds one message
    (all its fragments together): a bigger one fails the connection with 1009."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.closed = False  # no more events once Closed was returned
        self.close_sent = False
        self._buffer = bytearray()  # an incomplete frame header, or a control frame
        self._frame: tuple[int, bool, bytes, int] | None = None  # opcode, fin, mask, length
        self._done = 0  # payload bytes of the current frame handed out
        self._message = 0  # bytes so far of the binary message in progress
        self._fragmented = False  # a binary message's first frame had FIN clear
        self._empty_run = 0

    # sending

    def send(self, data: bytes) -> bytes:
        """One binary message; nothing once a close frame was sent."""
        return b"" if self.close_sent else encode_frame(BINARY, data)

    def close(self, code: int = NORMAL, reason: str = "") -> bytes:
        """Start the closing handshake (§7.1.2); b"" if a close frame went already."""
        if self.close_sent:
            return b""
        self.close_sent = True
        return encode_frame(CLOSE, close_payload(code, reason))

    # receiving

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        if not data:
            self.closed = True
            return [Closed(ABNORMAL, "connection dropped without a close frame", error=True)]
        events: list[Event] = []
        view = memoryview(data)
        while view and not self.closed:
            if self._frame is None:
                view = self._read_header(view, events)
            else:
                view = self._read_payload(view, events)
        return events

    def _fail(self, code: int, reason: str, events: list[Event]) -> memoryview:
        """Fail the connection (§7.1.7): a close frame saying why, then done."""
        frame = self.close(code, reason)
        if frame:
            events.append(Reply(frame))
        events.append(Closed(code, reason, error=True))
        self.closed = True
        return memoryview(b"")

    def _read_header(self, view: memoryview, events: list[Event]) -> memoryview:
        need = 2
        take = min(len(view), 14 - len(self._buffer))  # 14: the longest header (§5.2)
        self._buffer += view[:take]
        buf = self._buffer
        if len(buf) < need:
            return view[take:]
        first, second = buf[0], buf[1]
        fin, opcode, masked, length = bool(first & 0x80), first & 0x0F, second & 0x80, second & 0x7F
        if length == 126:
            need += 2
        elif length == 127:
            need += 8
        need += 4 if masked else 0
        if len(buf) < need:
            return view[take:]
        used = take - (len(buf) - need)  # bytes of `view` that belong to this header
        if length == 126:
            length = _LEN16.unpack_from(buf, 2)[0]
        elif length == 127:
            length = _LEN64.unpack_from(buf, 2)[0]
            if length >> 63:
                return self._fail(PROTOCOL_ERROR, "64-bit length with the top bit set", events)
        mask = bytes(buf[need - 4 : need]) if masked else b""
        del buf[:]
        if first & 0x70:
            return self._fail(PROTOCOL_ERROR, "reserved bits set (no extension agreed)", events)
        if not masked:
            return self._fail(PROTOCOL_ERROR, "client frame not masked", events)  # §5.1
        problem = self._check_frame(opcode, fin, length)
        if problem is not None:
            return self._fail(*problem, events)
        self._frame = (opcode, fin, mask, length)
        self._done = 0
        rest = view[used:]
        if length == 0:
            self._finish_frame(b"", events)
        return rest

    def _check_frame(self, opcode: int, fin: bool, length: int) -> tuple[int, str] | None:
        if opcode in (CLOSE, PING, PONG):
            if not fin or length > MAX_CONTROL_PAYLOAD:
                return PROTOCOL_ERROR, "control frame fragmented or over 125 bytes"
            return self._count_empty()
        if opcode == TEXT:  # as websockify answers
            return UNSUPPORTED_DATA, "text frames are not supported"
        if opcode == BINARY:
            if self._fragmented:
                return PROTOCOL_ERROR, "new message before the last one ended"
            self._message = 0
        elif opcode == CONTINUATION:
            if not self._fragmented:
                return PROTOCOL_ERROR, "continuation frame outside a message"
        else:
            return PROTOCOL_ERROR, f"unknown opcode {opcode:#x}"
        self._fragmented = not fin
        self._message += length
        if self._message > self.max_message:
            return TOO_BIG, f"message over {self.max_message} bytes"
        if length:
            self._empty_run = 0
            return None
        return self._count_empty()

    def _count_empty(self) -> tuple[int, str] | None:
        """Bounds how long a reader can wait through frames that carry no data."""
        self._empty_run += 1
        if self._empty_run > MAX_EMPTY_RUN:
            return POLICY, f"over {MAX_EMPTY_RUN} frames in a row without data"
        return None

    def _read_payload(self, view: memoryview, events: list[Event]) -> memoryview:
        assert self._frame is not None
        opcode, _fin, mask, length = self._frame
        take = min(len(view), length - self._done)
        chunk = unmask(bytes(view[:take]), mask, self._done)
        self._done += take
        if opcode in (BINARY, CONTINUATION):
            if chunk:
                events.append(Payload(chunk))
            if self._done == length:
                self._frame = None
        else:  # a control frame: gather its (at most 125) bytes
            self._buffer += chunk
            if self._done == length:
                control = bytes(self._buffer)
                del self._buffer[:]
                self._finish_frame(control, events)
        return view[take:]

    def _finish_frame(self, payload: bytes, events: list[Event]) -> None:
        """A frame whose payload is complete: only control frames need anything more."""
        assert self._frame is not None
        opcode = self._frame[0]
        self._frame = None
        if opcode == PING:
            if not self.close_sent:
                events.append(Reply(encode_frame(PONG, payload)))  # §5.5.3: same payload
        elif opcode == CLOSE:
            self._peer_close(payload, events)

    def _peer_close(self, payload: bytes, events: list[Event]) -> None:
        if len(payload) == 1:
            self._fail(PROTOCOL_ERROR, "close frame with a 1-byte payload", events)
            return
        code = _LEN16.unpack_from(payload)[0] if payload else NO_STATUS
        if payload and code not in _VALID_CLOSE and not 3000 <= code <= 4999:
            self._fail(PROTOCOL_ERROR, f"invalid close code {code}", events)
            return
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(INVALID_DATA, "close reason is not UTF-8", events)
            return
        # §5.5.1: answer with a close frame echoing the code, unless ours went first
        if not self.close_sent:
            self.close_sent = True
            echo = close_payload(code) if payload else b""
            events.append(Reply(encode_frame(CLOSE, echo)))
        events.append(Closed(code, reason, error=False))
        self.closed = True


__all__ = [
    "Closed",
    "Event",
    "Payload",
    "Reply",
    "WebSocketConnection",
    "accept",
    "accept_key",
    "encode_frame",
    "is_upgrade",
]
