"""A SPICE channel over a WebSocket (spice-html5's way in), as a plain socket a test can
link by hand: bytes written to it go to the WebSocket front in masked binary frames
(RFC 6455 5.3: a client masks), payloads of the frames that come back are read from it.
Two daemon threads pump; each ends with its socket (closed by the test, or idle for
`timeout` seconds)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

MASK = b"\x01\x02\x03\x04"
MAX_HEAD = 8192  # the front's answer to the upgrade, at most
MAX_READS = 100_000  # per pump: far more than a test's channel carries


def client_frame(payload: bytes, masked: bool = True) -> bytes:
    """One binary frame (FIN, opcode 2) with a payload under 126 bytes, masked as a client
    must (unmasked: a browser breaking the protocol)."""
    assert len(payload) < 126
    head = bytes([0x82, (0x80 if masked else 0) | len(payload)])
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def _server_frame(buf: bytes) -> tuple[int, bytes, int] | None:
    """(opcode, payload, bytes used) of the unmasked frame at buf's start, or None while
    it is incomplete."""
    if len(buf) < 2:
        return None
    size, at = buf[1] & 0x7F, 2
    if size == 126:
        if len(buf) < 4:
            return None
        size, at = struct.unpack_from(">H", buf, 2)[0], 4
    elif size == 127:
        if len(buf) < 10:
            return None
        size, at = struct.unpack_from(">Q", buf, 2)[0], 10
    if len(buf) < at + size:
        return None
    return buf[0] & 0x0F, buf[at : at + size], at + size


def _end(sock: socket.socket) -> None:
    """Close, waking the other pump if it waits on this socket (close alone may not)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def upgraded(
    port: int, timeout: float, headers: dict[str, str] | None = None
) -> tuple[socket.socket, bytes]:
    """A connection to the WebSocket front at 127.0.0.1:port, upgraded (with `headers`
    besides the upgrade's): the socket, and the frame bytes that came with the answer."""
    front = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    more = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    front.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" + more.encode() + b"\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
        chunk = front.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return front, head.split(b"\r\n\r\n", 1)[1]


def websocket_channel(port: int, timeout: float = 30.0) -> socket.socket:
    """Open a WebSocket on the front at 127.0.0.1:port; the socket to speak SPICE on."""
    front, early = upgraded(port, timeout)
    ours, theirs = socket.socketpair()
    ours.settimeout(timeout)
    theirs.settimeout(timeout)

    def up() -> None:  # the test's bytes, framed
        try:
            for _ in range(MAX_READS):  # ends with the test's socket, or idle
                data = theirs.recv(65536)
                if not data:
                    return
                for i in range(0, len(data), 125):
                    front.sendall(client_frame(data[i : i + 125]))
        except OSError:
            pass
        finally:
            _end(front)

    def down() -> None:  # the frames' payloads
        buf = early
        try:
            for _ in range(MAX_READS):  # ends with the front's socket, or idle
                while (frame := _server_frame(buf)) is not None:
                    opcode, payload, used = frame
                    buf = buf[used:]
                    if opcode == 8:  # close
                        return
                    if opcode == 2:
                        theirs.sendall(payload)
                chunk = front.recv(65536)
                if not chunk:
                    return
                buf += chunk
        except OSError:
            pass
        finally:
            _end(theirs)

    for pump in (up, down):
        threading.Thread(target=pump, daemon=True).start()
    return ours
