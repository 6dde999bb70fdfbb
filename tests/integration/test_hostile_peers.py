"""Hostile peers on both sides at once, while a real viewer uses the same proxy.

One `spicetap proxy` (recording) serves three targets: two QEMUs, and a loopback server
that breaks the protocol on purpose. Viewers break it towards one QEMU: a wrong magic,
a link header announcing a huge link message, a link message cut by a hang-up, one whose
capability counts point past its end, a data header announcing a 4 GiB message, a message
cut by a hang-up, and a viewer that stalls in the link stage. The hostile server answers
with a wrong magic, a huge link reply, half a link reply, or a 4 GiB message after a good
link. All of them at once, while spicy-screenshot takes the other QEMU's screen through
the proxy.

Then: the proxy is alive and serves a viewer again; every archive verifies intact; each
hostile connection is closed for its own reason, said in the log and in its records, on
the side at fault; and for every connection the archive holds exactly the bytes that
crossed, each way, as the test's own sockets counted them.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from proxy.core.probe import encrypt_ticket
from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import QemuServer, SpiceEndpoint, spicy_screenshot
from tests.integration.proxy_process import ProxyProcess
from tests.proxy.test_framing import caps_word, link_mess

pytestmark = pytest.mark.peers

LINK_TIMEOUT = 3  # seconds: the stalled viewer is cut after this
MAGIC = b"REDQ"
MINI = caps_word(1, 3)  # AUTH_SPICE and MINI_HEADER: no auth selection, mini headers
DISPLAY = 2
HUGE = 0xFFFFFFFF


class Conn(Protocol):
    """What the cases use of a connection: a socket, or a WebSocket client (WsClient)."""

    def sendall(self, data: bytes, /) -> None: ...
    def recv(self, size: int, /) -> bytes: ...
    def settimeout(self, seconds: float | None, /) -> None: ...
    def shutdown(self, how: int, /) -> None: ...
    def getsockname(self) -> Any: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...


@dataclass
class Wire:
    """What one test socket sent and received, byte for byte."""

    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    port: int = 0  # its local port: the archive's "client" names it


def _recv_some(sock: Conn, wire: Wire, want: int, timeout: float = 10.0) -> bytes:
    """Up to `want` more bytes (fewer at end of stream or reset), within `timeout`."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(want - len(got))
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        got += chunk
    wire.received += got
    return got


def _drain(sock: Conn, wire: Wire, timeout: float = 10.0) -> None:
    """Read until the other side closes (bounded)."""
    for _ in range(1000):
        if not _recv_some(sock, wire, 65536, timeout):
            return


def _send(sock: Conn, wire: Wire, data: bytes) -> None:
    sock.sendall(data)
    wire.sent += data


def _link_header(size: int) -> bytes:
    return struct.pack("<4sIII", MAGIC, 2, 2, size)


# -- viewers that break the protocol towards QEMU --------------------------------------------
def _authenticate(sock: Conn, wire: Wire, channel_type: int, conn: int) -> None:
    """A good link with the empty password (QEMU here disables ticketing)."""
    _send(sock, wire, link_mess(MINI, channel_type=channel_type, conn=conn))
    header = _recv_some(sock, wire, 16)
    reply = _recv_some(sock, wire, struct.unpack_from("<I", header, 12)[0])
    assert struct.unpack_from("<I", reply)[0] == 0
    _send(sock, wire, encrypt_ticket(reply[4:166], b"\0"))
    assert _recv_some(sock, wire, 4) == b"\0\0\0\0"


def bad_magic(sock: Conn, wire: Wire) -> None:
    _send(sock, wire, b"GET / HTTP/1.1\r\nHost: spice\r\n\r\n")
    _drain(sock, wire)


def huge_link_message(sock: Conn, wire: Wire) -> None:
    _send(sock, wire, _link_header(0x7FFFFFF0))
    _drain(sock, wire)


def _hang_up(sock: Conn, wire: Wire) -> None:
    """Stop sending (FIN) and read what still comes until the proxy closes. A close with
    unread data would reset the connection instead, and what the viewer sent just before
    may then never reach the proxy at all: this way every sent byte arrives."""
    sock.shutdown(socket.SHUT_WR)
    _drain(sock, wire)


def link_message_cut(sock: Conn, wire: Wire) -> None:
    _send(sock, wire, link_mess(MINI, channel_type=1, conn=0)[:23])
    _hang_up(sock, wire)


def caps_past_the_end(sock: Conn, wire: Wire) -> None:
    body = struct.pack("<IBBIII", 0, 1, 0, 0xFFFF, 0xFFFF, 18) + bytes(4)
    _send(sock, wire, _link_header(len(body)) + body)
    _drain(sock, wire)


def huge_message(sock: Conn, wire: Wire) -> None:
    _authenticate(sock, wire, 1, 0)
    _recv_some(sock, wire, 6, timeout=2)  # the start of MAIN INIT, or nothing yet
    _send(sock, wire, struct.pack("<HI", 101, HUGE))  # main: a 4 GiB client message
    _drain(sock, wire)


def message_cut(sock: Conn, wire: Wire) -> None:
    _authenticate(sock, wire, 1, 0)
    _send(sock, wire, struct.pack("<HI", 101, 1000) + bytes(10))  # 990 bytes never come
    _hang_up(sock, wire)


def stalled(sock: Conn, wire: Wire) -> None:
    _send(sock, wire, MAGIC[:1])
    _drain(sock, wire, timeout=LINK_TIMEOUT + 10)  # the proxy cuts it at the link timeout


TOO_BIG = "bytes exceeds"  # a link unit or a message over its limit
CUT = "inside a unit"  # the archive's words for a unit cut by the connection's end

STALLED = f"link stage not finished after {LINK_TIMEOUT} s"

VIEWERS: dict[str, tuple[Callable[[Conn, Wire], None], str, str, str]] = {
    # case: (viewer, side at fault, what the log says, what the archive's records say)
    "bad_magic": (bad_magic, "c2s", "bad link magic", "bad link magic"),
    "huge_link_message": (huge_link_message, "c2s", TOO_BIG, TOO_BIG),
    "link_message_cut": (link_message_cut, "c2s", "viewer vanished in the middle", CUT),
    "caps_past_the_end": (caps_past_the_end, "c2s", "malformed link_mess", "malformed link_mess"),
    "huge_message": (huge_message, "c2s", TOO_BIG, TOO_BIG),
    "message_cut": (message_cut, "c2s", "viewer vanished in the middle", CUT),
    "stalled": (stalled, "c2s", STALLED, STALLED),
}


# spice-server ends a session when another main channel authenticates: of the two viewers
# that authenticate one, the second waits for the first to be done
AFTER = {"message_cut": "huge_message"}


# -- a server that breaks it towards viewers -----------------------------------------------
def _reply_good(conn: socket.socket) -> None:
    """A link reply with a real RSA key, the ticket read, the result OK."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = struct.pack("<I", 0) + der + struct.pack("<III", 1, 0, 178) + struct.pack("<I", MINI)
    conn.sendall(_link_header(len(body)) + body)
    conn.settimeout(10)
    ticket = b""
    while len(ticket) < 128:
        chunk = conn.recv(128 - len(ticket))
        if not chunk:
            return
        ticket += chunk
    conn.sendall(struct.pack("<I", 0))


SERVER_CASES: dict[int, tuple[str, str, str]] = {
    # channel id the viewer asks for -> (case, what the log says, what the records say)
    1: ("server_bad_magic", "bad link magic", "bad link magic"),
    2: ("server_huge_link_reply", TOO_BIG, TOO_BIG),
    3: ("server_reply_cut", "server vanished in the middle", CUT),
    4: ("server_huge_message", TOO_BIG, TOO_BIG),
}


def _hostile_server(listener: socket.socket, stop: threading.Event) -> None:
    listener.settimeout(0.2)
    handlers: list[threading.Thread] = []
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        thread = threading.Thread(target=_misbehave, args=(conn,))
        thread.start()
        handlers.append(thread)
    for thread in handlers:
        thread.join(20)


def _misbehave(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(10)
        data = b""
        while len(data) < 16 + 22:  # the link header and a message with one cap word each
            chunk = conn.recv(64)
            if not chunk:
                return
            data += chunk
        channel_id = data[16 + 5]  # SpiceLinkMess: connection_id u32, type u8, id u8
        if channel_id == 1:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(40))
        elif channel_id == 2:
            conn.sendall(_link_header(0x7FFFFFF0))
        elif channel_id == 3:
            conn.sendall(_link_header(178) + bytes(60))
            return  # 118 bytes of the reply never come
        elif channel_id == 4:
            _reply_good(conn)
            conn.sendall(struct.pack("<HI", 1, HUGE))  # a 4 GiB message to the viewer
        time.sleep(1.0)  # let the proxy act first


def server_case(sock: Conn, wire: Wire, channel_id: int) -> None:
    body = bytearray(link_mess(MINI, channel_type=DISPLAY, conn=0x1234))
    body[16 + 5] = channel_id
    _send(sock, wire, bytes(body))
    if channel_id == 4:
        header = _recv_some(sock, wire, 16)
        size = struct.unpack_from("<I", header, 12)[0]
        reply = _recv_some(sock, wire, size)
        _send(sock, wire, encrypt_ticket(reply[4:166], b"\0"))
    _drain(sock, wire)


# -- the test --------------------------------------------------------------------------------
def _through_connect(front: int, target: int) -> Callable[[], Conn]:
    """Opens a tunnel through the CONNECT front: the socket is then at its first byte."""

    def open_tunnel() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", front), timeout=10)
        sock.sendall(f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:  # the answer's head, and nothing after it
            byte = sock.recv(1)
            assert byte, f"CONNECT answered {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 200"), head
        return sock

    return open_tunnel


class WsClient:
    """A browser's side of the WebSocket front, shaped like the socket the cases use:
    sendall() sends one masked binary message, recv() gives the payload of whole messages
    only (as a browser hands them to spice-html5), shutdown() closes the WebSocket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        self.raw = b""
        while b"\r\n\r\n" not in self.raw:
            chunk = self.sock.recv(4096)
            assert chunk, self.raw
            self.raw += chunk
        head, _, self.raw = self.raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.payload = b""  # of whole messages, not yet read
        self.closed = False  # a close frame came, or the connection ended

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(_client_frame(0x2, data))

    def recv(self, size: int) -> bytes:
        while not self.payload and not self.closed:
            self._frames()
            if self.payload or self.closed:
                break
            chunk = self.sock.recv(65536)  # a timeout raises, as a socket's would
            if not chunk:
                self.closed = True  # a message cut here never reached the application
                break
            self.raw += chunk
        data, self.payload = self.payload[:size], self.payload[size:]
        return data

    def _frames(self) -> None:
        """Whole server frames out of raw: unmasked, FIN set (the front sends no others)."""
        while len(self.raw) >= 2 and not self.closed:
            opcode, size, at = self.raw[0] & 0x0F, self.raw[1] & 0x7F, 2
            if size >= 126:
                width = 2 if size == 126 else 8
                if len(self.raw) < 2 + width:
                    return
                size, at = int.from_bytes(self.raw[2 : 2 + width], "big"), 2 + width
            if len(self.raw) < at + size:
                return
            body, self.raw = self.raw[at : at + size], self.raw[at + size :]
            if opcode == 0x2:
                self.payload += body
            elif opcode == 0x8:
                self.closed = True

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def shutdown(self, how: int) -> None:
        self.sock.sendall(_client_frame(0x8, (1000).to_bytes(2, "big")))  # a clean close

    def getsockname(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked frame (RFC 6455 5.2), FIN set, any length."""
    mask = b"\x0f\x1e\x2d\x3c"
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _direct(port: int) -> Callable[[], Conn]:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=10)


@pytest.mark.parametrize("front", ["reverse", "connect", "websocket"])
def test_hostile_peers_on_both_sides_cost_only_their_own_channels(
    front: str, tmp_path: Path
) -> None:
    """Through reverse listeners (the threaded shell), through the CONNECT front (the trio
    shell), and the viewers through the WebSocket front (the trio shell with WebSocket
    messages: what a browser would hand spice-html5 is what counts as received)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(32)
    stop = threading.Event()
    server = threading.Thread(target=_hostile_server, args=(listener, stop))
    server.start()
    wires: dict[str, Wire] = {}
    failures: list[str] = []
    try:
        # two QEMUs: spice-server drops its viewer whenever another main channel
        # authenticates, as two of the hostile viewers do
        with peers(), QemuServer(guest="none") as srv, QemuServer(guest="none") as other:
            assert srv.port is not None and other.port is not None
            bad = listener.getsockname()[1]
            config = tmp_path / "spicetap.toml"
            config.write_text(
                f"[proxy]\nlink_timeout = {LINK_TIMEOUT}\n"
                f'upstream = "127.0.0.1:{other.port}"\nlisten = "127.0.0.1:0"\n'
                'ws_listen = "127.0.0.1:0"\n'
                f'[targets.qemu]\nupstream = "127.0.0.1:{srv.port}"\nlisten = "127.0.0.1:0"\n'
                f'[targets.victim]\nupstream = "127.0.0.1:{other.port}"\n'
                'listen = "127.0.0.1:0"\n'
                f'[targets.hostile]\nupstream = "127.0.0.1:{bad}"\nlisten = "127.0.0.1:0"\n'
                '[connect]\nlisten = "127.0.0.1:0"\nallow = ["127.0.0.1:*"]\n'
            )
            rec = tmp_path / "rec"
            with ProxyProcess(0, rec, tmp_path / "proxy", extra=("--config", str(config))) as proxy:
                if front == "reverse":
                    good = SpiceEndpoint(port=proxy.ports["plain:qemu"])
                    to_victim, to_hostile = (
                        _direct(proxy.ports["plain:victim"]),
                        _direct(proxy.ports["plain:hostile"]),
                    )
                elif front == "connect":
                    via = proxy.ports["connect"]
                    good = SpiceEndpoint(port=srv.port, proxy=f"http://127.0.0.1:{via}")
                    to_victim, to_hostile = (
                        _through_connect(via, other.port),
                        _through_connect(via, bad),
                    )
                else:  # the front serves [proxy] upstream, the QEMU the viewers break
                    good = SpiceEndpoint(port=proxy.ports["plain:qemu"])
                    ws = proxy.ports["websocket"]
                    to_victim, to_hostile = (lambda: WsClient(ws)), None

                done = {case: threading.Event() for case in VIEWERS}

                def run(
                    case: str, open_to: Callable[[], Conn], play: Callable[[Conn, Wire], None]
                ) -> None:
                    wire = wires[case] = Wire()
                    if case in AFTER:  # its main channel would end the other's session
                        done[AFTER[case]].wait(LINK_TIMEOUT + 30)
                    try:
                        with open_to() as sock:
                            wire.port = sock.getsockname()[1]
                            play(sock, wire)
                    except Exception as exc:  # an assertion in a thread: report it
                        failures.append(f"{case}: {exc!r}")
                    finally:
                        if case in done:
                            done[case].set()

                threads = [
                    threading.Thread(target=run, args=(case, to_victim, play))
                    for case, (play, *_said) in VIEWERS.items()
                ] + [
                    threading.Thread(
                        target=run,
                        args=(case, to_hostile, lambda s, w, i=cid: server_case(s, w, i)),
                    )
                    for cid, (case, *_said) in SERVER_CASES.items()
                    if to_hostile is not None  # the WebSocket front has one upstream
                ]
                for thread in threads:
                    thread.start()
                during = spicy_screenshot(good, tmp_path / "during.ppm")
                for thread in threads:
                    thread.join(LINK_TIMEOUT + 40)
                assert not [t for t in threads if t.is_alive()]
                assert proxy.proc.poll() is None
                after = spicy_screenshot(good, tmp_path / "after.ppm")
                assert during.stat().st_size > 1000 and after.stat().st_size > 1000
                log = proxy.log()
    finally:
        stop.set()
        server.join(30)
        listener.close()
    assert not failures, failures

    archives = sorted(rec.glob("*.spta"))
    assert archives and all(verify(a).status == "intact" for a in archives)
    records = [r for a in archives for r in iter_records(a, [])]
    by_client = {(r.fields or {}).get("client"): r for r in records if r.kind == "open"}
    expected = {case: (side, logged, says) for case, (_p, side, logged, says) in VIEWERS.items()}
    if front != "websocket":
        expected.update(
            {case: ("s2c", logged, says) for case, logged, says in SERVER_CASES.values()}
        )
    for case, (side, logged, says) in expected.items():
        wire = wires[case]
        opened = by_client.get(f"127.0.0.1:{wire.port}")
        assert opened is not None, f"{case}: no archive record of its connection"
        mine = [r for r in records if r.connection == opened.connection]
        if front == "connect" and case == "bad_magic":  # the front closes such a tunnel
            neither = "carries neither TLS nor SPICE (starts b'GET / HT')"
            assert neither in log
            errors = [(r.direction, r.error) for r in mine if r.kind == "error"]
            assert len(errors) == 1 and errors[0][0] == "c2s" and neither in str(errors[0][1])
            assert not [r for r in mine if r.raw], "nothing was relayed, nothing recorded"
            continue
        said = [
            (r.direction, r.error or r.name or "")
            for r in mine
            if r.kind == "error" or (r.kind == "close" and r.name)
        ]
        reasons = [(d, text) for d, text in said if says in text]
        assert reasons and reasons[0][0] == side, f"{case}: {said}"
        assert logged in log, f"{case}: not in the log"
        for direction, crossed in (("c2s", wire.sent), ("s2c", wire.received)):
            units = [r for r in mine if r.direction == direction and r.kind in STREAM_KINDS]
            _same_stream(units, bytes(crossed), f"{case} {direction}")


# records whose raw bytes, in order, make up a direction's stream (agent and rewrite
# records repeat bytes of these)
STREAM_KINDS = {"link", "message", "error", "gap"}


def _same_stream(units: list[Any], crossed: bytes, what: str) -> None:
    """The records hold exactly the bytes that crossed; a redacted unit (a ticket) by its
    length, as the archive format keeps it."""
    at = 0
    for r in units:
        if r.redacted:
            at += int(r.redacted["len"])
            continue
        assert crossed[at : at + len(r.raw)] == r.raw, f"{what}: differs at byte {at}"
        at += len(r.raw)
    assert at == len(crossed), f"{what}: {at} bytes recorded, {len(crossed)} crossed"


# -- viewers that break TLS ------------------------------------------------------------------
class TlsViewer:
    """A TLS peer over memory buffers, so the test can also put raw bytes on the wire: a
    forged record, or the first bytes of a real one. A client trusting `ca`, or a server
    with the given context."""

    def __init__(
        self, sock: socket.socket, ca: Path | None, server: ssl.SSLContext | None = None
    ) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        if server is not None:
            self.obj = server.wrap_bio(self.incoming, self.outgoing, server_side=True)
        else:
            context = ssl.create_default_context(cafile=str(ca))
            context.check_hostname = False  # spicetap's certificate names its SPICE subject
            self.obj = context.wrap_bio(self.incoming, self.outgoing)
        for _ in range(20):  # a handshake takes a few flights
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self.incoming.write(sock.recv(65536))
        self._flush()

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def records(self, data: bytes) -> bytes:
        """`data` as TLS records, not sent."""
        self.obj.write(data)
        return self.outgoing.read()


def test_viewers_breaking_tls_get_an_error_of_their_own(tmp_path: Path) -> None:
    """Through a TLS listener: a forged record after the link, a real record cut by a
    hang-up, and bytes that are not TLS at all. Each is said as a TLS error of its own
    connection, logged and recorded (the third, which never became a channel, in the
    archive of unlinked connections), and the proxy goes on serving."""
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        extra = ("--tls-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0")
        rec = tmp_path / "rec"
        with ProxyProcess(srv.port, rec, tmp_path / "proxy", extra=extra) as proxy:
            ca = tmp_path / "proxy" / "config" / "ca-cert.pem"
            port = proxy.ports["tls"]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                viewer = TlsViewer(sock, ca)
                sock.sendall(viewer.records(link_mess(MINI, channel_type=1, conn=0)))
                assert sock.recv(65536)  # the link reply, as TLS records
                sock.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))  # forged application data
                _drain(sock, Wire())
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                viewer = TlsViewer(sock, ca)
                record = viewer.records(link_mess(MINI, channel_type=1, conn=0))
                sock.sendall(record[:20])  # the record's header and a little of it
                _hang_up(sock, Wire())
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                _drain(sock, Wire())
            time.sleep(0.5)
            assert proxy.proc.poll() is None
            shot = spicy_screenshot(SpiceEndpoint(port=proxy.ports["plain"]), tmp_path / "s.ppm")
            assert shot.stat().st_size > 1000
            log = proxy.log()
    forged = "viewer broke the protocol: TLS: [SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]"
    cut = "viewer broke the protocol: TLS: the connection ended inside a TLS record"
    assert forged in log and cut in log
    assert "TLS handshake failed" in log
    archives = sorted(rec.glob("*.spta"))
    assert all(verify(a).status == "intact" for a in archives)
    errors = [r for a in archives for r in iter_records(a, []) if r.kind == "error"]
    for said in (forged, cut):  # each once, on the viewer's side
        (error,) = [r for r in errors if (r.error or "").startswith(said)]
        assert error.direction == "c2s"
    (unlinked,) = [a for a in archives if a.name.endswith("-unlinked.spta")]
    records = list(iter_records(unlinked, []))
    (failed,) = [r for r in records if (r.error or "").startswith("TLS handshake failed: ")]
    attempt = [r for r in records if r.connection == failed.connection]
    assert [r.kind for r in attempt] == ["open", "error", "close"]
    assert attempt[0].fields is not None and attempt[0].fields["tls"] == {"viewer": True}
    assert (attempt[1].error or "").startswith("TLS handshake failed: ")
    assert attempt[1].direction == "c2s" and len({r.connection for r in attempt}) == 1


def test_a_server_breaking_tls_gets_an_error_of_its_own(tmp_path: Path) -> None:
    """The server's leg in TLS (--upstream-tls): a server that forges a record after the
    viewer's link message, and one that hangs up inside a real record. Each channel ends
    as the server's TLS error, logged and recorded on its side (s2c)."""
    from proxy.tls import issue_server_cert, load_or_create_ca, server_context

    ca = load_or_create_ca(tmp_path / "pki")
    cert, key = issue_server_cert(ca, "O=test,CN=127.0.0.1", ["127.0.0.1"], tmp_path / "pki")
    context = server_context(cert, key, None)
    listener = socket.create_server(("127.0.0.1", 0))
    answers = [b"\x17\x03\x03\x00\x20" + bytes(32), None]  # forged, then a cut record

    failures: list[str] = []

    def serve() -> None:
        try:
            listener.settimeout(20)
            for answer in answers:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(10)
                    misbehave(conn, answer)
        except Exception as exc:  # an assertion in a thread: report it
            failures.append(repr(exc))

    def misbehave(conn: socket.socket, answer: bytes | None) -> None:
        server = TlsViewer(conn, None, context)
        for _ in range(10):  # the viewer's link message, maybe already in with the handshake
            try:
                assert server.obj.read(65536)[:4] == MAGIC
                break
            except ssl.SSLWantReadError:
                server.incoming.write(conn.recv(65536))
        if answer is None:
            conn.sendall(server.records(bytes(300))[:20])  # then hang up
        else:
            conn.sendall(answer)
            time.sleep(1.0)  # the proxy acts first

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        extra = (
            "--listen", "127.0.0.1:0", "--upstream-insecure",
            "--upstream-tls", f"127.0.0.1:{listener.getsockname()[1]}",
        )  # fmt: skip
        rec = tmp_path / "rec"
        with ProxyProcess(0, rec, tmp_path / "proxy", extra=extra) as proxy:
            for _ in answers:
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                    sock.sendall(link_mess(MINI, channel_type=1, conn=0))
                    _drain(sock, Wire())
            assert proxy.proc.poll() is None
            log = proxy.log()
    finally:
        thread.join(30)
        listener.close()
    assert not failures, failures
    forged = "server broke the protocol: TLS: [SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]"
    cut = "server broke the protocol: TLS: the connection ended inside a TLS record"
    assert forged in log and cut in log
    archives = sorted(rec.glob("*.spta"))
    assert all(verify(a).status == "intact" for a in archives)
    errors = [r for a in archives for r in iter_records(a, []) if r.kind == "error"]
    for said in (forged, cut):
        (error,) = [r for r in errors if (r.error or "").startswith(said)]
        assert error.direction == "s2c"
