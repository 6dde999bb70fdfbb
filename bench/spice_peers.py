"""The SPICE endpoints of the proxy benchmark: a small fake spice-server and a fake viewer,
each in its own process (so neither shares the proxy's CPU accounting), driven over a pipe.

Theory of operation. Both speak real SPICE: the link stage (REDQ header, link message, link
reply, auth mechanism and ticket, link result; wire facts from proxy.core.framing), then
messages with the mini header, bodies built by dissectors.api.encode. A session is a main
channel (the server's INIT names the session id) plus channels that link with that id, so a
recording proxy groups them into one session. The orchestrator sets the server's phase, then
asks the viewer to run it; the viewer times what it sees itself (bulk, small messages), the
server times ping-pong round trips. Plain blocking sockets, a thread per connection: the GIL
is released in every send and receive, and there is no event loop to pay for.

Phases (display = channel 2, inputs = 3, cursor = 4):
- bulk: the server sends `count` DRAW_COPY messages with `body_size`-byte bodies on display;
- small: the viewer sends `count` MOUSE_MOTION messages (16 bytes on the wire) on inputs,
  `burst` per write so that its own system calls are not what is measured; the server
  checks every byte and answers the last with MOUSE_MOTION_ACK, which stops the viewer's
  clock;
- latency: two sessions, one through the proxy and one straight to the server; the server
  sends PING on each display channel in turn and waits for the PONG, `warmup` + `count`
  rounds, so both are timed under the same load (this machine is shared);
- rss: sessions of main, display, inputs and cursor stay open while the server sends a
  DRAW_COPY of `body_size` every `interval` on each display channel and the viewer a
  MOUSE_MOTION every `interval` on each inputs channel, until told to stop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from dissectors.api import decode, encode, message_type
from proxy.core.framing import (
    CAP_AUTH_SELECTION,
    CAP_AUTH_SPICE,
    CAP_MINI_HEADER,
    LINK_HEADER,
    LINK_MAGIC,
    LINK_MESS_FIXED,
    LINK_REPLY_FIXED,
    MINI_HEADER,
    PUB_KEY_SIZE,
    TICKET_SIZE,
    U32,
    has_cap,
)

HOST = "127.0.0.1"
MAIN, DISPLAY, INPUTS, CURSOR = 1, 2, 3, 4
S2C, C2S = "s2c", "c2s"
MSG_INIT = message_type(MAIN, S2C, "init")
MSG_DRAW_COPY = message_type(DISPLAY, S2C, "draw_copy")
MSG_PING = message_type(DISPLAY, S2C, "ping")
MSGC_PONG = message_type(DISPLAY, C2S, "pong")
MSGC_MOUSE_MOTION = message_type(INPUTS, C2S, "mouse_motion")
MSG_MOTION_ACK = message_type(INPUTS, S2C, "mouse_motion_ack")
# What spice-gtk and spice-server both offer: auth selection, SPICE auth, the mini header.
COMMON_CAPS = (1 << CAP_AUTH_SELECTION) | (1 << CAP_AUTH_SPICE) | (1 << CAP_MINI_HEADER)
PROTOCOL = (2, 2)  # major, minor
IO_TIMEOUT = 60.0  # no single send or receive waits longer
KEEP = 64 * 1024  # bodies up to this size are returned; larger ones are skipped unread
READ_BUFFER = 1 << 20
PIPE_IDLE = 3600.0  # a peer process whose orchestrator says nothing for this long exits
FIRST_SESSION = 0x5EED0001


def message(msg_type: int, body: bytes) -> bytes:
    return MINI_HEADER.pack(msg_type, len(body)) + body


def _draw_copy_fields(pixels: bytes) -> dict[str, Any]:
    """A full-screen DRAW_COPY of an LZ_RGB bitmap, shaped as spice-server sends them."""
    rect = {"top": 0, "left": 0, "bottom": 768, "right": 1024}
    return {
        "base": {"surface_id": 0, "box": rect, "clip": {"type": 0}},
        "data": {
            "src_bitmap": {
                "descriptor": {"id": 7, "type": 101, "flags": 0, "width": 1024, "height": 768},
                "u": {"lz_rgb": {"data_size": len(pixels), "data": pixels}},
            },
            "src_area": rect,
            "rop_descriptor": 8,
            "scale_mode": 0,
            "mask": {"flags": 0, "pos": {"x": 0, "y": 0}, "bitmap": None},
        },
    }


def draw_copy(body_size: int) -> bytes:
    """One DRAW_COPY message (mini header included) whose body is exactly body_size bytes."""
    overhead = len(encode(DISPLAY, S2C, MSG_DRAW_COPY, _draw_copy_fields(b"")))
    pixels = os.urandom(max(0, body_size - overhead))  # incompressible, as LZ output is
    return message(MSG_DRAW_COPY, encode(DISPLAY, S2C, MSG_DRAW_COPY, _draw_copy_fields(pixels)))


def init_message(session_id: int) -> bytes:
    fields = {
        "session_id": session_id,
        "display_channels_hint": 1,
        "supported_mouse_modes": 3,
        "current_mouse_mode": 2,
        "agent_connected": 0,
        "agent_tokens": 0,
        "multi_media_time": 0,
        "ram_hint": 0,
    }
    return message(MSG_INIT, encode(MAIN, S2C, MSG_INIT, fields))


MOUSE_MOTION = message(
    MSGC_MOUSE_MOTION,
    encode(INPUTS, C2S, MSGC_MOUSE_MOTION, {"dx": 3, "dy": -2, "buttons_state": 0}),
)
MOTION_ACK = message(MSG_MOTION_ACK, encode(INPUTS, S2C, MSG_MOTION_ACK, {}))
INIT_SIZE = len(init_message(FIRST_SESSION))


def ping(ping_id: int) -> bytes:
    fields = {"id": ping_id, "timestamp": time.monotonic_ns(), "data": b""}
    return message(MSG_PING, encode(DISPLAY, S2C, MSG_PING, fields))


def pong(ping_body: bytes) -> bytes:
    fields = decode(DISPLAY, S2C, MSG_PING, ping_body).fields or {}
    answer = {"id": fields.get("id", 0), "timestamp": fields.get("timestamp", 0)}
    return message(MSGC_PONG, encode(DISPLAY, C2S, MSGC_PONG, answer))


PING_SIZE = len(ping(0))
PONG_SIZE = len(pong(ping(0)[MINI_HEADER.size :]))


# -- the link stage -------------------------------------------------------------------------
def recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise EOFError("peer closed during the link stage")
        buf += chunk
    return bytes(buf)


def _caps(data: bytes, count: int, offset: int) -> tuple[int, ...]:
    return tuple(U32.unpack_from(data, offset + 4 * i)[0] for i in range(count))


def link_as_viewer(sock: socket.socket, channel_type: int, connection_id: int) -> None:
    mess = LINK_MESS_FIXED.pack(connection_id, channel_type, 0, 1, 0, LINK_MESS_FIXED.size)
    mess += U32.pack(COMMON_CAPS)
    sock.sendall(LINK_HEADER.pack(LINK_MAGIC, *PROTOCOL, len(mess)) + mess)
    magic, _major, _minor, size = LINK_HEADER.unpack(recv_exact(sock, LINK_HEADER.size))
    reply = recv_exact(sock, size)
    error, _key, n_common, _n_channel, offset = LINK_REPLY_FIXED.unpack_from(reply)
    if magic != LINK_MAGIC or error:
        raise ConnectionError(f"link refused: magic {magic!r}, error {error}")
    common = _caps(reply, n_common, offset)
    if not (has_cap(common, CAP_MINI_HEADER) and has_cap(common, CAP_AUTH_SELECTION)):
        raise ConnectionError("the server lacks the mini header or auth selection")
    # The ticket is opaque to a proxy in pass-through mode: zeros stand for RSA output.
    sock.sendall(U32.pack(CAP_AUTH_SPICE) + bytes(TICKET_SIZE))
    (result,) = U32.unpack(recv_exact(sock, U32.size))
    if result:
        raise ConnectionError(f"link result {result}")


def link_as_server(sock: socket.socket) -> tuple[int, int]:
    """The server's half of the link stage: (channel type, connection id)."""
    magic, major, _minor, size = LINK_HEADER.unpack(recv_exact(sock, LINK_HEADER.size))
    if magic != LINK_MAGIC or major != PROTOCOL[0] or size > 4096:
        raise ConnectionError(f"not a SPICE link header: {magic!r}")
    mess = recv_exact(sock, size)
    connection_id, channel_type, _cid, _n_common, _n_channel, _off = LINK_MESS_FIXED.unpack_from(
        mess
    )
    reply = LINK_REPLY_FIXED.pack(0, bytes(PUB_KEY_SIZE), 1, 0, LINK_REPLY_FIXED.size)
    reply += U32.pack(COMMON_CAPS)
    sock.sendall(LINK_HEADER.pack(LINK_MAGIC, *PROTOCOL, len(reply)) + reply)
    (mechanism,) = U32.unpack(recv_exact(sock, U32.size))
    if mechanism != CAP_AUTH_SPICE:
        raise ConnectionError(f"auth mechanism {mechanism}")
    recv_exact(sock, TICKET_SIZE)
    sock.sendall(U32.pack(0))
    return channel_type, connection_id


class MessageReader:
    """Mini-header messages from a socket, read in large chunks into one reused buffer.
    read() returns (type, body, size); bodies over KEEP bytes are skipped (body None)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def _fill(self) -> None:
        if self.start:  # keep the unread tail at the front
            left = self.end - self.start
            self.buf[:left] = self.view[self.start : self.end]
            self.start, self.end = 0, left
        n = self.sock.recv_into(self.view[self.end :])
        if not n:
            raise EOFError("peer closed")
        self.end += n

    def read(self) -> tuple[int, bytes | None, int]:
        header = MINI_HEADER.size
        while self.end - self.start < header:
            self._fill()
        msg_type, size = MINI_HEADER.unpack_from(self.buf, self.start)
        self.start += header
        if size <= KEEP:
            while self.end - self.start < size:
                self._fill()
            body = bytes(self.view[self.start : self.start + size])
            self.start += size
            return msg_type, body, size
        left = size - min(size, self.end - self.start)
        self.start += size - left
        while left:  # skip the body: receive over it, keeping whatever follows it
            n = self.sock.recv_into(self.view)
            if not n:
                raise EOFError("peer closed inside a message")
            take = min(n, left)
            left -= take
            self.start, self.end = take, n
        return msg_type, None, size

    def skip_copies(self, message: bytes, count: int) -> None:
        """Read `count` back-to-back copies of `message`, every byte compared (at memcmp
        speed: one compare per buffer, not one parse per message)."""
        size = len(message)
        pattern = message * (READ_BUFFER // 4 // size)
        left = count
        while left:
            if self.end - self.start < size:
                self._fill()
                continue
            n = min(left, (self.end - self.start) // size, len(pattern) // size)
            if not self.buf.startswith(pattern[: n * size], self.start):
                raise ValueError("a message other than the expected copies")
            self.start += n * size
            left -= n

    def drain(self) -> None:
        """Read and drop whatever comes until the peer closes."""
        self.count_until_eof(-1)

    def count_until_eof(self, msg_type: int) -> int:
        """Messages of msg_type until the peer closes (or IO_TIMEOUT passes)."""
        seen = 0
        try:
            while True:
                if self.read()[0] == msg_type:
                    seen += 1
        except (EOFError, OSError):
            return seen


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(IO_TIMEOUT)


# -- the server -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    kind: str  # idle | bulk | small | latency | rss
    count: int = 0
    body_size: int = 0
    interval: float = 0.0
    warmup: int = 0
    burst: int = 1  # small: messages per write


@dataclass
class _Pair:
    """The two display channels of a latency phase (through the proxy, and direct)."""

    members: list[tuple[int, socket.socket, MessageReader]]
    done: threading.Event


class FakeServer:
    """Accepts SPICE channels on a plain and (with a certificate) a TLS port."""

    def __init__(self, tls: ssl.SSLContext | None, ports: dict[str, int]) -> None:
        """`ports` fixed by the orchestrator: a restarted server keeps them, so proxies
        still running reach it."""
        self.tls = tls
        self.phase = Phase("idle")
        self.payload = b""
        # unique per server process: a restarted server must not reuse a recorded session id
        self.session_ids = itertools.count(FIRST_SESSION + (os.getpid() % 0x4000) * 0x10000)
        self.lock = threading.Condition()
        self.results: list[dict[str, Any]] = []
        self.active = 0
        self.stop = threading.Event()
        self.pair: _Pair | None = None
        self.ports = ports
        for kind, port in ports.items():
            if kind == "tls" and tls is None:
                continue
            listener = socket.create_server((HOST, port), backlog=512)
            threading.Thread(
                target=self._accept, args=(listener, kind == "tls"), daemon=True
            ).start()

    def set_phase(self, phase: Phase) -> None:
        with self.lock:
            self.phase = phase
            self.payload = draw_copy(phase.body_size) if phase.body_size else b""
            self.results = []
            self.pair = None
            self.stop.clear()

    def collect(self, timeout: float) -> dict[str, Any]:
        """The phase's results, once every channel has ended (or `timeout` passed)."""
        with self.lock:
            self.lock.wait_for(lambda: self.active == 0, timeout)
            return {"results": list(self.results), "still_open": self.active}

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        while True:
            sock, _addr = listener.accept()
            threading.Thread(target=self._serve, args=(sock, tls), daemon=True).start()

    def _serve(self, raw: socket.socket, tls: bool) -> None:
        with self.lock:
            self.active += 1
        sock = raw
        try:
            _nodelay(raw)
            if tls and self.tls is not None:
                sock = self.tls.wrap_socket(raw, server_side=True)
            channel_type, connection_id = link_as_server(sock)
            with self.lock:
                phase, payload = self.phase, self.payload
            result = self._channel(sock, channel_type, connection_id, phase, payload)
            if result is not None:
                with self.lock:
                    self.results.append(result)
        except (OSError, EOFError, ConnectionError, ValueError):
            pass  # a peer gone (or a readiness probe) ends only its own channel
        finally:
            sock.close()
            with self.lock:
                self.active -= 1
                self.lock.notify_all()

    def _channel(
        self, sock: socket.socket, channel_type: int, session: int, phase: Phase, payload: bytes
    ) -> dict[str, Any] | None:
        reader = MessageReader(sock)
        kind = phase.kind
        if channel_type == MAIN:
            sock.sendall(init_message(next(self.session_ids)))
        elif channel_type == DISPLAY and kind == "bulk":
            for _ in range(phase.count):
                sock.sendall(payload)
            reader.drain()
            return {"session": session, "channel": "display", "sent": phase.count}
        elif channel_type == DISPLAY and kind == "latency":
            return self._latency(sock, reader, session, phase)
        elif channel_type == DISPLAY and kind == "rss":
            sent = 0
            while not self.stop.is_set():
                sock.sendall(payload)
                sent += 1
                self.stop.wait(phase.interval)
            reader.drain()
            return {"session": session, "channel": "display", "sent": sent}
        elif channel_type == INPUTS and kind == "small":
            reader.skip_copies(MOUSE_MOTION, phase.count)
            sock.sendall(MOTION_ACK)
            reader.drain()
            return {"session": session, "channel": "inputs", "received": phase.count}
        elif channel_type == INPUTS and kind == "rss":
            seen = reader.count_until_eof(MSGC_MOUSE_MOTION)
            return {"session": session, "channel": "inputs", "received": seen}
        reader.drain()  # main and cursor: open until the viewer leaves
        return None

    def _latency(
        self, sock: socket.socket, reader: MessageReader, session: int, phase: Phase
    ) -> dict[str, Any] | None:
        """Display channels pair up as they link; the second of a pair pings both in turn
        (which goes first alternates), its partner waits and answers nothing itself."""
        with self.lock:
            if self.pair is None or len(self.pair.members) == 2:
                self.pair = _Pair([], threading.Event())
            pair = self.pair
            pair.members.append((session, sock, reader))
            first = len(pair.members) == 1
        if first:
            pair.done.wait(IO_TIMEOUT * 10)
            reader.drain()
            return None
        rtts: dict[int, list[int]] = {s: [] for s, _sock, _reader in pair.members}
        try:
            for i in range(phase.warmup + phase.count):
                for s, peer, peer_reader in pair.members[:: 1 if i % 2 else -1]:
                    msg = ping(i)
                    start = time.perf_counter_ns()
                    peer.sendall(msg)
                    while peer_reader.read()[0] != MSGC_PONG:
                        pass
                    if i >= phase.warmup:
                        rtts[s].append(time.perf_counter_ns() - start)
        finally:
            pair.done.set()
        reader.drain()
        rtt_ns = {str(s): v for s, v in rtts.items()}
        return {"session": session, "channel": "display", "rtt_ns": rtt_ns}


def server_process(
    pipe: Connection, cert: str | None, key: str | None, ports: dict[str, int]
) -> None:
    """Process entry: serve phases until told to quit."""
    tls = None
    if cert and key:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
    server = FakeServer(tls, ports)
    pipe.send("ready")
    commands: dict[str, Callable[..., Any]] = {
        "phase": server.set_phase,
        "results": server.collect,
        "stop": server.stop.set,
    }
    _serve_pipe(pipe, commands)


def _serve_pipe(pipe: Connection, commands: dict[str, Callable[..., Any]]) -> None:
    while pipe.poll(PIPE_IDLE):
        name, *args = pipe.recv()
        if name == "quit":
            return
        try:
            pipe.send({"ok": commands[name](*args)})
        except Exception as exc:  # reported to the orchestrator, which stops the run
            pipe.send({"error": f"{name}: {type(exc).__name__}: {exc}"})


# -- the viewer -----------------------------------------------------------------------------
class FakeViewer:
    def __init__(self, ca_file: str | None) -> None:
        self.tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.counts: dict[int, dict[str, int]] = {}

    def _connect(self, port: int, tls: bool) -> socket.socket:
        sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
        _nodelay(sock)
        if tls:
            assert self.tls is not None
            sock = self.tls.wrap_socket(sock, server_hostname=HOST)
        self.sockets.append(sock)
        return sock

    def _session(self, port: int, tls: bool) -> int:
        """Open a main channel; the session id its INIT announces."""
        main = self._connect(port, tls)
        link_as_viewer(main, MAIN, 0)
        msg_type, body, _size = MessageReader(main).read()
        fields = decode(MAIN, S2C, msg_type, body or b"").fields
        if msg_type != MSG_INIT or not fields:
            raise ConnectionError(f"expected INIT on main, got message {msg_type}")
        return int(fields["session_id"])

    def _channel(self, port: int, tls: bool, channel_type: int, session: int) -> socket.socket:
        sock = self._connect(port, tls)
        link_as_viewer(sock, channel_type, session)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets = []

    def run(self, phase: Phase, port: int, tls: bool, direct_port: int) -> dict[str, Any]:
        """One session through the target (latency: and one direct); what the viewer
        measured."""
        try:
            session = self._session(port, tls)
            if phase.kind == "bulk":
                return {"session": session, **self._bulk(phase, port, tls, session)}
            if phase.kind == "small":
                return {"session": session, **self._small(phase, port, tls, session)}
            if phase.kind == "latency":
                pair = (port, session, direct_port, self._session(direct_port, tls))
                return {"session": session, **self._latency(phase, tls, *pair)}
            raise ValueError(f"unknown phase {phase.kind}")
        finally:
            self.close()

    def _bulk(self, phase: Phase, port: int, tls: bool, session: int) -> dict[str, Any]:
        reader = MessageReader(self._channel(port, tls, DISPLAY, session))
        start = time.perf_counter()  # the server starts sending right after the link result
        received = wire = 0
        while received < phase.count:
            msg_type, _body, size = reader.read()
            wire += MINI_HEADER.size + size
            if msg_type == MSG_DRAW_COPY:
                received += 1
        return {"messages": received, "bytes": wire, "seconds": time.perf_counter() - start}

    def _small(self, phase: Phase, port: int, tls: bool, session: int) -> dict[str, Any]:
        sock = self._channel(port, tls, INPUTS, session)
        reader = MessageReader(sock)
        writes, rest = divmod(phase.count, phase.burst)
        burst = MOUSE_MOTION * phase.burst
        start = time.perf_counter()
        for _ in range(writes):
            sock.sendall(burst)
        sock.sendall(MOUSE_MOTION * rest)
        while reader.read()[0] != MSG_MOTION_ACK:
            pass
        seconds = time.perf_counter() - start
        return {
            "messages": phase.count,
            "bytes": phase.count * len(MOUSE_MOTION),
            "seconds": seconds,
        }

    def _latency(
        self, phase: Phase, tls: bool, port: int, session: int, direct_port: int, direct: int
    ) -> dict[str, Any]:
        """Answer PINGs on a display channel through the target and on one straight to
        the server; the server alternates between them."""
        pings = phase.warmup + phase.count
        channels = [
            self._channel(port, tls, DISPLAY, session),
            self._channel(direct_port, tls, DISPLAY, direct),
        ]
        errors: list[BaseException] = []

        def answer(sock: socket.socket) -> None:
            reader = MessageReader(sock)
            try:
                for _ in range(pings):
                    msg_type, body, _size = reader.read()
                    if msg_type == MSG_PING and body is not None:
                        sock.sendall(pong(body))
            except (OSError, EOFError) as exc:
                errors.append(exc)

        threads = [threading.Thread(target=answer, args=(s,), daemon=True) for s in channels]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(IO_TIMEOUT * 10)
        if errors or any(t.is_alive() for t in threads):
            raise ConnectionError(f"ping answers failed: {errors[:1]}")
        return {"pings": pings, "direct_session": direct}

    # rss: sessions stay open with traffic until stop(); close() reports the counts
    def open_sessions(self, phase: Phase, port: int, tls: bool, sessions: int) -> dict[str, Any]:
        self.stop.clear()
        self.counts = {}
        for _ in range(sessions):
            session = self._session(port, tls)
            counts = self.counts[session] = {"display_received": 0, "inputs_sent": 0}
            display = self._channel(port, tls, DISPLAY, session)
            inputs = self._channel(port, tls, INPUTS, session)
            self._channel(port, tls, CURSOR, session)  # open, quiet, as a cursor mostly is
            for work, sock in ((self._count_display, display), (self._send_inputs, inputs)):
                thread = threading.Thread(target=work, args=(sock, counts, phase), daemon=True)
                thread.start()
                self.threads.append(thread)
        return {"sessions": sessions, "channels": len(self.sockets)}

    def _count_display(self, sock: socket.socket, counts: dict[str, int], _phase: Phase) -> None:
        reader = MessageReader(sock)
        try:
            while True:
                if reader.read()[0] == MSG_DRAW_COPY:
                    counts["display_received"] += 1
        except (EOFError, OSError):
            return

    def _send_inputs(self, sock: socket.socket, counts: dict[str, int], phase: Phase) -> None:
        try:
            while not self.stop.is_set():
                sock.sendall(MOUSE_MOTION)
                counts["inputs_sent"] += 1
                self.stop.wait(phase.interval)
        except OSError:
            return

    def close_sessions(self, timeout: float) -> dict[str, Any]:
        self.stop.set()
        self.close()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.threads = []
        return {"sessions": {str(k): v for k, v in self.counts.items()}}


def viewer_process(pipe: Connection, ca_file: str | None) -> None:
    viewer = FakeViewer(ca_file)
    pipe.send("ready")
    commands: dict[str, Callable[..., Any]] = {
        "run": viewer.run,
        "open": viewer.open_sessions,
        "stop": viewer.stop.set,
        "close": viewer.close_sessions,
    }
    _serve_pipe(pipe, commands)
