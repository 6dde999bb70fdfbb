"""A small Chrome DevTools Protocol client: JSON commands over a WebSocket, synchronous.

    devtools = DevTools("ws://127.0.0.1:PORT/devtools/page/ID")
    devtools.call("Page.navigate", url="http://...")

Written for the harness and deliberately independent of spicetap's WebSocket code (that
is what the tests check). Only what DevTools needs: a client handshake, masked text frames
out, unmasked frames in, pings answered. Every read has a deadline; messages are bounded.
Events that arrive while waiting for an answer are kept (the last MAX_EVENTS); JavaScript
dialogs (spice-html5 reports some errors with alert()) are accepted and remembered, since
an open dialog blocks Runtime.evaluate.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from tests.harness.procs import LOOPBACK, PeerFailed

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
MAX_MESSAGE = 64 << 20  # a full-page PNG screenshot in base64 is a few MB
MAX_HEAD = 64 * 1024
MAX_EVENTS = 500
MAX_FRAMES_PER_ANSWER = 100_000  # events we read past while waiting for one answer


class DevTools:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws" or parts.hostname != LOOPBACK or parts.port is None:
            raise PeerFailed(f"unexpected DevTools address {url}")
        self.timeout = timeout
        self.sock = socket.create_connection((LOOPBACK, parts.port), timeout=timeout)
        self._buffer = b""
        self._id = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.dialogs: list[str] = []
        try:
            self._handshake(parts.path or "/", parts.port)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, path: str, port: int) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        deadline = time.monotonic() + self.timeout
        while b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > MAX_HEAD:
                raise PeerFailed("DevTools handshake answer too long")
            self._fill(deadline)
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        expected = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        if b" 101 " not in head.split(b"\r\n", 1)[0] or expected not in head:
            raise PeerFailed(f"DevTools refused the WebSocket: {head[:200]!r}")

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerFailed("DevTools did not answer in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            raise PeerFailed("DevTools did not answer in time") from None
        if not data:
            raise PeerFailed("DevTools closed the connection")
        self._buffer += data

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self._buffer) < n:  # ends: each pass adds bytes or raises
            self._fill(deadline)
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # client frames are always masked (§5.3)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _receive_message(self, deadline: float) -> str:
        message = b""
        for _ in range(MAX_FRAMES_PER_ANSWER):
            first, second = self._read(2, deadline)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8, deadline))[0]
            if second & 0x80 or n + len(message) > MAX_MESSAGE:
                raise PeerFailed("DevTools sent a masked or oversized frame")
            payload = self._read(n, deadline)
            opcode = first & 0x0F
            if opcode == 0x9:
                self._send_frame(0xA, payload)
            elif opcode == 0x8:
                raise PeerFailed("DevTools closed the WebSocket")
            elif opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return message.decode()
        raise PeerFailed("DevTools sent too many frames")

    def call(self, method: str, timeout: float | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events read meanwhile are kept)."""
        self._id += 1
        my_id = self._id
        command = {"id": my_id, "method": method, "params": params}
        self._send_frame(0x1, json.dumps(command).encode())
        deadline = time.monotonic() + (timeout or self.timeout)
        for _ in range(MAX_FRAMES_PER_ANSWER):
            message = json.loads(self._receive_message(deadline))
            if message.get("id") == my_id:
                if "error" in message:
                    raise PeerFailed(f"DevTools {method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if message.get("method") == "Page.javascriptDialogOpening":
                self.dialogs.append(str(message["params"].get("message")))
                self._id += 1
                answer = {"id": self._id, "method": "Page.handleJavaScriptDialog"}
                answer["params"] = {"accept": True}
                self._send_frame(0x1, json.dumps(answer).encode())
            elif "method" in message:
                self.events.append(message)
        raise PeerFailed(f"DevTools {method}: no answer among {MAX_FRAMES_PER_ANSWER} messages")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, struct.pack("!H", 1000))
        self.sock.close()
