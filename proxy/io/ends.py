"""Blocking ends of a channel for the threaded pumps (proxy/io/pumps.py): a TCP socket, plain
or with TLS done by an ssl.SSLObject over memory buffers.

Why not ssl.SSLSocket: one OpenSSL connection must not be used by two threads at once, and a
channel reads an end in one thread while the other direction writes to it in another. So
each TLS end keeps its SSLObject behind a lock held only for the in-memory crypto (OpenSSL
releases the GIL there), never while waiting on the network; the raw socket is read by one
thread and written under a send lock, taken before the crypto lock is let go so ciphertext
reaches the wire in the order it was made.

Once linked, a channel's pumps forward through proxy/io/_forward.c, which does the same
steps on the same OpenSSL objects under the same locks (both are C locks), without the GIL.
The handshake and the link stage stay here.
"""

from __future__ import annotations

import _ssl
import contextlib
import logging
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, cast

log = logging.getLogger("spicetap.proxy")

RECEIVE_SIZE = 256 * 1024
# A TLS end's first plaintext buffer: one TLS record's worth (16 KiB at most). It doubles up
# to RECEIVE_SIZE while receives fill it (a bulk stream); a channel of small messages keeps
# 16 KiB per end instead of 256 KiB, which 50 sessions' 200 channels paid in resident memory.
FIRST_PLAIN = 16 * 1024


class LockLike(Protocol):
    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class RecordWalkLike(Protocol):
    @property
    def cut(self) -> int: ...
    def feed(self, data: bytes) -> None: ...


# A linked channel's forwarding step in C (proxy/io/_forward.c): receive and send with no
# GIL between them. Without the extension the pumps do the same in Python.
Forward = Callable[[], tuple[bytes, int, int, float]]
# Where _forward.c's reading of _ssl._SSLSocket was tested: 3.11 in CI, 3.12 and 3.13 with
# scripts/test-on-python (the object's first fields are the same in all three)
CHECKED_PYTHONS = ((3, 11), (3, 12), (3, 13))
WITHOUT_C: str | None = None  # why the C forwarder is not in use (the proxy says so at start)
NEW_LOCK: Callable[[], LockLike]
try:
    from proxy.io import _forward
except ImportError as exc:  # not built (a source tree without `pip install`)
    _forward = None  # type: ignore[assignment]
    NEW_LOCK, WITHOUT_C = threading.Lock, str(exc)
else:
    NEW_LOCK = _forward.Lock


def why_not_tls_in_c(version: tuple[int, ...], ssl_module: str | None) -> str | None:
    """Why TLS ends cannot forward in C here, or None. The C forwarder works on the SSL
    objects Python's ssl module made (`ssl_module`: _ssl's file): only where the start of
    _ssl's object (not public API) is known to be what _forward.c reads, and where both
    call one and the same OpenSSL library."""
    if _forward is None:
        return WITHOUT_C
    if version[:2] not in CHECKED_PYTHONS:
        return f"Python {version[0]}.{version[1]}'s ssl module is untried"
    if not ssl_module or not _forward.shares_openssl(ssl_module):
        return "Python's ssl module does not use the OpenSSL the extension was built with"
    return None


# why TLS ends forward in Python (the proxy says so at start too)
TLS_WITHOUT_C = why_not_tls_in_c(sys.version_info[:2], getattr(_ssl, "__file__", None))


_SAID: set[str] = set()


def _new_record_walk() -> RecordWalkLike:
    return RecordWalk() if _forward is None else _forward.RecordWalk()


class Undelivered(OSError):
    """A send that broke part-way: its first `delivered` bytes reached the peer's socket
    (and so the peer) before the connection failed or was aborted."""

    def __init__(self, delivered: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.delivered = delivered


class PlainEnd:
    """A connected TCP socket in blocking mode."""

    tls = False

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        sock.setblocking(True)
        self.sock = sock
        self.send_lock = NEW_LOCK()  # the C forwarder's sends take it too
        # bytes a front already read from this end (e.g. sniffing), received first
        self.prefix = prefix

    def receive(self) -> bytes:
        """The next bytes; b"" at the peer's end of stream. OSError when the socket broke."""
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return self.sock.recv(RECEIVE_SIZE)

    def send(self, data: bytes) -> None:
        """All of `data`, or Undelivered saying how much went before the connection broke."""
        with self.send_lock:
            _send_counted(self.sock, data)

    def forward_to(self, sink: PlainEnd) -> Forward | None:
        """A call that receives the next bytes from this end and sends them all to `sink`
        with no Python between (see proxy/io/_forward.c), for the pump of one direction;
        None when the C extension is not built, or an end does its own receive or send
        (a test's end), or TLS cannot be done there (TLS_WITHOUT_C). A TLS end is taken
        over by C for good: call this before any thread uses the ends."""
        if _forward is None or self._own_io() or sink._own_io():
            return None
        if (self.tls or sink.tls) and TLS_WITHOUT_C is not None:
            return None
        try:
            source_core, sink_core = self._take_over(), sink._take_over()
        except (TypeError, ValueError) as exc:  # not the _ssl this was written against
            if str(exc) not in _SAID:  # once, not once per channel
                _SAID.add(str(exc))
                log.warning("TLS channels forward in Python, more slowly: %s", exc)
            return None
        forward = _forward.Forwarder(
            self.sock.fileno(),
            sink.sock.fileno(),
            cast(_forward.Lock, sink.send_lock),
            RECEIVE_SIZE,
        )
        if source_core is not None:
            forward.decrypt(source_core)
        if sink_core is not None:
            forward.encrypt(sink_core)
        return forward

    def _own_io(self) -> bool:
        cls = type(self)
        return cls.receive not in _C_RECEIVES or cls.send not in _C_SENDS

    def _take_over(self) -> _forward.TlsCore | None:
        """A TLS end's connection, moved into C (plain: nothing to move)."""
        return None

    def abort(self) -> None:
        """Wake the thread blocked in receive() (it sees the end of stream); any thread."""
        _shutdown(self.sock)

    def close(self) -> None:
        _shutdown(self.sock)
        self.sock.close()

    def peer(self) -> tuple[str, int]:
        return _address(self.sock, local=False)

    def local(self) -> tuple[str, int]:
        return _address(self.sock, local=True)


class TlsEnd(PlainEnd):
    """TLS over a blocking TCP socket; handshake() first, then receive/send as PlainEnd."""

    tls = True

    def __init__(
        self,
        sock: socket.socket,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        super().__init__(sock)
        self.obj = obj
        self.incoming = incoming
        self.outgoing = outgoing
        self.lock = NEW_LOCK()  # the SSLObject and both BIOs (the C forwarder's too)
        self.eof = False
        # every raw byte from the peer: OpenSSL keeps a cut record to itself, so its
        # buffers cannot say whether the peer left inside one
        self.records = _new_record_walk()
        # receive()'s (one thread's), made at its first use: an end the C forwarder takes
        # over never needs one
        self._plain: memoryview | None = None
        # once the C forwarder takes this end over, all its receives and sends go there
        self.core: _forward.TlsCore | None = None

    def handshake(self, timeout: float) -> None:
        """Run the TLS handshake to the end within `timeout` seconds (TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("TLS handshake timed out") from None
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(RECEIVE_SIZE)
                finally:
                    self.sock.settimeout(None)
                if not data:
                    raise ConnectionResetError("peer closed during the TLS handshake") from None
                self.records.feed(data)
                self.incoming.write(data)
                continue
            except ssl.SSLError:
                # OpenSSL wrote an alert saying why (an unknown CA, a bad certificate): the
                # peer learns it now, not at its own timeout or as a bare end of stream
                with contextlib.suppress(OSError):
                    self._flush()
                raise
            self._flush()
            return

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def receive(self) -> bytes:
        if self.prefix:  # decrypted bytes read ahead and given back (see peek_link)
            data, self.prefix = self.prefix, b""
            return data
        if self.core is not None:
            return self.core.receive()
        plain = self._plain
        if plain is None:
            plain = self._plain = memoryview(bytearray(FIRST_PLAIN))
        size = len(plain)
        while not self.eof:
            filled = 0
            self.lock.acquire()
            try:
                # One read returns at most one TLS record: gather what is already decrypted,
                # straight into one buffer (a bytes object per record, then a join, cost
                # 0.1-0.2 CPU s per GB more)
                while filled < size:
                    # with a buffer, read() says how many bytes it put there (the stub
                    # gives bytes for both forms)
                    got = cast(int, self.obj.read(size - filled, plain[filled:]))
                    if not got:  # close_notify: the peer's clean end (read gives 0)
                        self.eof = True
                        break
                    filled += got
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # close_notify, as some versions report it
                self.eof = True
            finally:
                pending = self.outgoing.read()  # e.g. an answer to a key update
                if pending:
                    self.send_lock.acquire()
                self.lock.release()
            if pending:
                try:
                    self.sock.sendall(pending)
                finally:
                    self.send_lock.release()
            if filled:
                if filled == size < RECEIVE_SIZE:  # more may be waiting: a bulk stream
                    self._plain = memoryview(bytearray(2 * size))
                return bytes(plain[:filled])
            if self.eof:
                break
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except ConnectionResetError:
                if not self.records.cut:
                    raise
                data = b""  # reset inside a record: the same break as an end there
            if not data:
                if self.records.cut:  # the peer vanished inside a TLS record
                    raise ssl.SSLEOFError(
                        ssl.SSL_ERROR_EOF,
                        f"the connection ended inside a TLS record ({self.records.cut} "
                        "bytes of it came)",
                    )
                break  # cut without close_notify: the same end for a SPICE channel
            self.records.feed(data)
            with self.lock:
                self.incoming.write(data)
        return b""

    def send(self, data: bytes) -> None:
        if self.core is not None:
            delivered, error = self.core.send(data)
            if error:  # as a plain end says it: what crossed, of records the peer got whole
                raise Undelivered(delivered, OSError(error, os.strerror(error)))
            return
        self.lock.acquire()
        try:
            self.obj.write(data)
            out = self.outgoing.read()
            self.send_lock.acquire()
        finally:
            self.lock.release()
        try:
            self.sock.sendall(out)
        finally:
            self.send_lock.release()

    def getpeercert(self) -> dict[str, object] | None:
        return self.obj.getpeercert()  # type: ignore[return-value]

    def _take_over(self) -> _forward.TlsCore | None:
        # The SSL of the ssl.SSLObject (its _sslobj, an _ssl._SSLSocket) leaves its memory
        # BIOs for the C core's buffers, what they held included; the handshake is done.
        if self.core is None:
            self.core = _forward.TlsCore(
                self.obj._sslobj,  # type: ignore[attr-defined]
                self.sock.fileno(),
                cast(_forward.Lock, self.lock),
                cast(_forward.Lock, self.send_lock),
                cast(_forward.RecordWalk, self.records),
                RECEIVE_SIZE,
            )
        return self.core


class RecordWalk:
    """Walks TLS record headers (type u8, version u16, length u16: RFC 8446 5.1) over the
    raw bytes a peer sends, to know whether its stream ended inside a record. On the
    forwarding path, so it hops header to header without copying."""

    HEADER = 5
    _LENGTH = struct.Struct(">H")

    def __init__(self) -> None:
        self.header = b""  # of the record being read, while incomplete
        self.left = 0  # bytes of its body still to come
        self.cut = 0  # bytes of the record in progress that came (0: between records)

    def feed(self, data: bytes) -> None:
        at, size = 0, len(data)
        while at < size and (self.left or self.header):  # the record in progress
            if self.left:
                step = min(self.left, size - at)
                self.left -= step
                at += step
                self.cut = self.cut + step if self.left else 0
                continue
            piece = data[at : at + self.HEADER - len(self.header)]
            self.header += piece
            at += len(piece)
            self.cut += len(piece)
            if len(self.header) == self.HEADER:
                self.left = self._LENGTH.unpack_from(self.header, 3)[0]
                self.header = b""
                self.cut = self.cut if self.left else 0
        start, length = at, self._LENGTH.unpack_from
        while at + self.HEADER <= size:  # then whole records, header to header
            start = at
            at += self.HEADER + length(data, at + 3)[0]
        if at > size:  # the last one goes on in the next read
            self.left, self.cut = at - size, size - start
        elif at < size:  # and so does a header
            self.header = data[at:]
            self.cut = len(self.header)


def tls_end(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    prefix: bytes = b"",
) -> TlsEnd:
    """`prefix`: TLS bytes a front already read from `sock` (the start of a ClientHello)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    incoming.write(prefix)
    obj = context.wrap_bio(
        incoming, outgoing, server_side=server_side, server_hostname=server_hostname
    )
    end = TlsEnd(sock, obj, incoming, outgoing)
    end.records.feed(prefix)
    return end


def tls_error_text(exc: ssl.SSLError) -> str:
    """What broke, in OpenSSL's words, without the C source line Python appends."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return "TLS: " + re.sub(r" \(_ssl\.c:\d+\)$", "", text)


def _send_counted(sock: socket.socket, data: bytes) -> None:
    """sendall, but saying how far it got: a blocking send() returns short only when the
    connection broke (or was shut down) part-way, and the bytes it took did cross."""
    sent = 0
    try:
        sent = sock.send(data)
        if sent < len(data):
            view = memoryview(data)
            while sent < len(data):
                sent += sock.send(view[sent:])
    except OSError as exc:
        raise Undelivered(sent, exc) from exc


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected any more: nothing to wake
        sock.shutdown(socket.SHUT_RDWR)


def _address(sock: socket.socket, *, local: bool) -> tuple[str, int]:
    try:
        host, port = (sock.getsockname() if local else sock.getpeername())[:2]
    except OSError:
        return ("?", 0)
    return (str(host), int(port))


End = PlainEnd | TlsEnd
_C_RECEIVES = (PlainEnd.receive, TlsEnd.receive)
_C_SENDS = (PlainEnd.send, TlsEnd.send)
# A TlsEnd's send in Python (no extension) stays all or nothing: ciphertext cut part-way
# would need its TLS records counted to know how much plaintext the peer could read; in C
# (TlsCore) they are.
