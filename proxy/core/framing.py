"""Split one SPICE channel connection's two byte streams into link-stage units and messages.

Theory of operation: a channel connection starts with the link stage, then carries messages.

    c2s: LinkHeader(16) LinkMess(size)  [AuthMechanism(4)] Ticket(128)      | SASL  messages
    s2c: LinkHeader(16) LinkReply(size)                    LinkResult(4)    | SASL  messages

What the client sends after LinkMess depends on the server's reply (auth selection is used
only when both sides set common cap 0; the mini header only when both set cap 3), so the
client side waits until the reply is known. SASL's exchange (proxy/core/saslwire.py) ends
in its own result, then the link result; all after its result is SASL-encrypted, so
opaque, when the server's own connection is plain TCP (sasl_layer). No I/O: bytes in,
events out. A peer that breaks the protocol yields one ChannelError event and that
direction stops being parsed; later bytes are counted as `ignored`, never raised.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from proxy.core.saslwire import STATES as SASL_STATES
from proxy.core.saslwire import next_step

C2S = "c2s"
S2C = "s2c"

# protocol.h: SPICE_MAGIC is "REDQ" in wire order.
LINK_MAGIC = b"REDQ"
LINK_HEADER = struct.Struct("<4sIII")  # magic, major, minor, size
LINK_MESS_FIXED = struct.Struct("<IBBIII")  # conn id, type, id, n common, n channel, caps off
LINK_REPLY_FIXED = struct.Struct("<I162sIII")  # error, RSA-1024 pub key (DER), caps...
PUB_KEY_OFFSET = 4  # in LinkReply, right after the u32 error
PUB_KEY_SIZE = 162
TICKET_SIZE = 128  # RSA-1024 encrypted password
U32 = struct.Struct("<I")
MINI_HEADER = struct.Struct("<HI")  # type, size
FULL_HEADER = struct.Struct("<QHII")  # serial, type, size, sub_list

CAP_AUTH_SELECTION = 0
CAP_AUTH_SPICE = 1
CAP_AUTH_SASL = 2
CAP_MINI_HEADER = 3

DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024
LARGE = 64 * 1024  # a message at least this big, cut by a chunk's end, is gathered in parts
MAX_LINK_SIZE = 64 * 1024  # a link message carries a few caps words; anything huge is hostile
# What may wait in the link stage for the other side: a viewer's bytes sent ahead of the
# server's link reply (a ticket, a first message), or a peer's after a refused link. Real
# peers send next to nothing there; without a bound, a peer could fill the proxy's memory
# within the link timeout.
MAX_LINK_PENDING = MAX_LINK_SIZE


# The start of a viewer's link message: what a channel asks for before anything is relayed
LINK_ASKS = LINK_HEADER.size + 6  # then the connection id (u32), channel type and id (u8)


def link_asks(data: bytes) -> tuple[int, int] | None:
    """(channel type, connection id) from a viewer's first LINK_ASKS bytes, or None when
    they are no SPICE link message."""
    if len(data) < LINK_ASKS or data[:4] != LINK_MAGIC:
        return None
    conn, ctype, _cid = struct.unpack_from("<IBB", data, LINK_HEADER.size)
    return ctype, conn


def has_cap(words: tuple[int, ...], bit: int) -> bool:
    word, shift = divmod(bit, 32)
    return word < len(words) and bool(words[word] >> shift & 1)


@dataclass(frozen=True, slots=True)
class LinkUnit:
    """A link-stage unit: kind is header, link_mess, link_reply, auth_mechanism, ticket,
    link_result, sasl (a field of the SASL exchange, or opaque bytes of a SASL security
    layer), sasl_complete (the server's u8 after each answer), sasl_result (SASL's own
    u32 result) or sasl_reason (why the server refused after SASL)."""

    direction: str
    kind: str
    data: bytes


class Message(NamedTuple):  # one per message: a tuple is the cheapest immutable event
    direction: str
    msg_type: int
    body: bytes
    raw: bytes  # data header + body, exactly as on the wire
    serial: int | None  # None with the mini header
    sub_list: int


@dataclass(frozen=True, slots=True)
class ChannelError:
    direction: str
    offset: int  # stream offset where the problem starts
    reason: str
    # the bytes received from `offset` on that could not be framed: they crossed the proxy,
    # so the archive keeps them (privacy permitting)
    data: bytes = b""
    secret: bool = False  # came where a ticket or SASL does: never kept


Event = LinkUnit | Message | ChannelError

# Builds the event for one framed message: (direction, type, data, start, body start, end,
# serial, sub_list), the message being data[start:end] (see ChannelFramer.feed_built).
MessageBuilder = Callable[[str, int, bytes, int, int, int, int | None, int], Any]


def build_message(
    d: str,
    msg_type: int,
    data: bytes,
    start: int,
    body: int,
    end: int,
    serial: int | None,
    sub_list: int,
) -> Message:
    # tuple.__new__ skips the NamedTuple's Python-level __new__: a third of the cost
    return tuple.__new__(Message, (d, msg_type, data[body:end], data[start:end], serial, sub_list))


def frame_messages(
    d: str, data: bytes, mini: bool, limit: int, build: MessageBuilder, events: list[Any]
) -> tuple[int, int, str | None]:
    """Append build(...) of every whole message at the start of `data` to `events`; returns
    where they end, the size of a message cut by the end of data (0: none) and why framing
    stopped at a message over `limit` (None: it did not). proxy/core/_fastframe.c's
    frame() is this loop in C, used when it is built; the tests hold both to one output."""
    hdr = MINI_HEADER if mini else FULL_HEADER
    hsize, unpack, append = hdr.size, hdr.unpack_from, events.append
    n = len(data)
    pos = 0
    while n - pos >= hsize:
        if mini:
            msg_type, size = unpack(data, pos)
            serial, sub_list = None, 0
        else:
            serial, msg_type, size, sub_list = unpack(data, pos)
        if size > limit:
            return pos, 0, f"message type {msg_type} of {size} bytes exceeds the limit"
        end = pos + hsize + size
        if end > n:
            return pos, end - pos, None
        append(build(d, msg_type, data, pos, pos + hsize, end, serial, sub_list))
        pos = end
    return pos, 0, None


Framer = Callable[[str, bytes, bool, int, MessageBuilder, list[Any]], tuple[int, int, str | None]]
FRAME: Framer
WITHOUT_C: str | None = None  # why the C framer is not in use (the proxy says so at start)


class AssemblyLike(Protocol):
    """A large message gathered from the chunks that bring it (proxy/core/_fastframe.c's
    Assembly: filled in place, one copy per byte)."""

    @property
    def filled(self) -> int: ...
    @property
    def missing(self) -> int: ...
    def add(self, data: bytes | memoryview, /) -> int: ...
    def take(self) -> bytes: ...
    def partial(self) -> bytes: ...


class PyAssembly:
    """Assembly without the extension: a bytearray, copied once more when taken."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("an Assembly's size must be > 0")
        self._buf: bytearray | None = bytearray(size)
        self.filled = 0

    @property
    def _ready(self) -> bytearray:
        if self._buf is None:
            raise ValueError("the Assembly was taken (or never made)")
        return self._buf

    @property
    def missing(self) -> int:
        return len(self._buf) - self.filled if self._buf is not None else 0

    def add(self, data: bytes | memoryview, /) -> int:
        buf = self._ready
        n = min(len(data), self.missing)
        buf[self.filled : self.filled + n] = memoryview(data)[:n]
        self.filled += n
        return n

    def take(self) -> bytes:
        buf = self._ready
        if self.missing:
            raise ValueError(f"the message is not whole: {self.filled} of {len(buf)} bytes")
        self._buf = None
        return bytes(buf)

    def partial(self) -> bytes:
        return bytes(self._ready[: self.filled])


ASSEMBLY: Callable[[int], AssemblyLike]
try:
    from proxy.core._fastframe import Assembly as _Assembly
    from proxy.core._fastframe import frame as _frame_in_c
except ImportError as exc:  # not built (a source tree without `pip install`): same in Python
    FRAME = frame_messages
    ASSEMBLY = PyAssembly
    WITHOUT_C = str(exc)
else:
    FRAME = _frame_in_c
    ASSEMBLY = _Assembly


def _caps(
    data: bytes, fixed: struct.Struct, n_common: int, n_channel: int, offset: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    count = n_common + n_channel
    if offset < fixed.size or offset + 4 * count > len(data):
        raise ValueError("capability words lie outside the link message")
    words = struct.unpack_from(f"<{count}I", data, offset)
    return words[:n_common], words[n_common:]


class ChannelFramer:
    """Both directions of one channel connection."""

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        *,
        bodies: bool = True,
        link_only: bool = False,
    ) -> None:
        """bodies=False: only walk message headers, skipping bodies without buffering
        them, and count messages in `walked` instead of making events (link units and
        errors are still events); the proxy's guard uses that.
        link_only=True: stop at the end of the link stage (messages or SASL), leaving what
        follows in `buf` for the caller; the link rewriter uses that."""
        self.max_message = max_message
        self.bodies = bodies
        self.link_only = link_only
        self.skip = {C2S: 0, S2C: 0}  # body bytes still to skip (bodies=False)
        self.walked = {C2S: 0, S2C: 0}  # messages seen by the header walk (bodies=False)
        self.buf = {C2S: bytearray(), S2C: bytearray()}
        # A large message arriving in pieces (bodies=True): copied from each chunk into
        # an Assembly of its size, instead of growing buf (then copied out, then sliced):
        # one copy of it instead of three. buf is empty meanwhile. Chunks may then be
        # views that change once fed (the recording process's ring): only copies are kept.
        self.assembly: dict[str, AssemblyLike | None] = {C2S: None, S2C: None}
        self.offset = {C2S: 0, S2C: 0}  # stream offset of buf[0] (or of the assembly's)
        self.state = {C2S: "header", S2C: "header"}
        self.need_size = {C2S: 0, S2C: 0}
        self.ignored = {C2S: 0, S2C: 0}
        self.channel_type: int | None = None
        self.channel_id = 0
        self.connection_id = 0
        self.client_common: tuple[int, ...] = ()
        self.client_channel: tuple[int, ...] = ()
        self.server_common: tuple[int, ...] = ()
        self.server_channel: tuple[int, ...] = ()
        self.link_error: int | None = None
        self.result: int | None = None
        self.mini_header = False
        self.auth: str | None = None  # "spice" | "sasl"
        # Whether a SASL security layer wraps what follows a SASL exchange: spice-server
        # uses one exactly when its own connection is plain TCP (see saslwire). A caller
        # that knows the server's leg is TLS says False, and the channel is dissected.
        self.sasl_layer = True
        self.sasl_result: int | None = None  # SASL's own u32 result, before the link result

    def feed(self, direction: str, data: bytes | memoryview) -> list[Event]:
        """Add bytes received in one direction; returns the units now complete."""
        events: list[Event] = self.feed_built(direction, data, build_message)
        return events

    def feed_built(
        self, direction: str, data: bytes | memoryview, build: MessageBuilder
    ) -> list[Any]:
        """feed(), with each message's event made by `build` (bodies=True only). A caller
        that turns messages into something else does it here, from the snapshot of the
        stream the framer slices them from: no Message and no body copy in between. `data`
        may be a memoryview (changing once this returns) only while assembling() says so."""
        state = self.state[direction]
        if state == "dead":
            self.ignored[direction] += len(data)
            return []
        if self.assembly[direction] is not None:
            return self._assemble(direction, data, build)
        # The common case: nothing held back from earlier chunks, so frame this one itself.
        messages = state == "messages" and self.bodies and not self.link_only
        if messages and not self.buf[direction] and data.__class__ is bytes:
            events: list[Any] = []
            self._frame(direction, data, events, build)
            return events
        if state == "messages" and not self.bodies and not self.link_only:
            events = []
            self._walk(direction, bytes(data), events)  # bytes already: no copy
            return events
        if self.skip[direction] and not self.buf[direction]:
            skip = min(self.skip[direction], len(data))
            self.skip[direction] -= skip
            self.offset[direction] += skip
            if skip == len(data):
                return []
            data = data[skip:]
        self.buf[direction] += data
        events = []
        # the server's reply, or its SASL result, decides how the client's bytes go on
        waits = self.state[C2S] == "wait_reply" or self.state[C2S] in SASL_STATES
        client_waiting = direction == S2C and waits
        self._drain(direction, events, build)
        if client_waiting and self.buf[C2S]:
            self._drain(C2S, events, build)  # the reply unblocked the client's auth bytes
        waiting = len(self.buf[direction])
        if waiting > MAX_LINK_PENDING and self.state[direction] in ("wait_reply", "done"):
            if self.state[direction] == "done":
                self._fail(direction, f"{waiting} bytes after the link was refused", events)
            else:
                self._fail(direction, f"{waiting} bytes ahead of the server's link reply", events)
        return events

    @property
    def linked(self) -> bool:
        """Both directions are past the link stage: a feed then gives only messages, and
        at most one ChannelError after them."""
        return self.state[C2S] == "messages" and self.state[S2C] == "messages"

    def pending(self, direction: str) -> int:
        """Bytes received but not yet part of a complete unit (a truncated tail at the end)."""
        assembly = self.assembly[direction]
        return len(self.buf[direction]) + (assembly.filled if assembly is not None else 0)

    def assembling(self, direction: str) -> bool:
        """Whether a large message is being gathered: the next bytes are copied, never kept
        as they are (so they may come as a view that changes afterwards)."""
        return self.assembly[direction] is not None

    def pending_data(self, direction: str) -> bytes:
        """Those bytes themselves (a large message's start comes before the buffer)."""
        assembly = self.assembly[direction]
        return (assembly.partial() if assembly is not None else b"") + bytes(self.buf[direction])

    def in_secret_stage(self, direction: str) -> bool:
        """Whether bytes now would be the ticket (or auth selection before it) or SASL:
        from the viewer's LinkMess on until the link result, and all of SASL."""
        state = self.state[direction]
        if state == "done" and direction == C2S:  # after a refusal: maybe a ticket sent ahead
            return True
        return state in ("wait_reply", "auth", "ticket", "sasl") or state in SASL_STATES

    @property
    def link_over(self) -> bool:
        """Both directions are past the link stage, SASL's exchange included (or done)."""
        return all(s in ("messages", "sasl", "done", "dead") for s in self.state.values())

    # -- internals -------------------------------------------------------------------------
    def _take(self, direction: str, size: int) -> bytes:
        buf = self.buf[direction]
        chunk = bytes(buf[:size])
        del buf[:size]
        self.offset[direction] += size
        return chunk

    def _fail(self, direction: str, reason: str, events: list[Event]) -> None:
        unframed = bytes(self.buf[direction])
        secret = self.in_secret_stage(direction)
        events.append(ChannelError(direction, self.offset[direction], reason, unframed, secret))
        self.state[direction] = "dead"
        self.ignored[direction] += len(self.buf[direction])
        self.buf[direction].clear()

    def _drain(self, d: str, events: list[Any], build: MessageBuilder) -> None:
        buf = self.buf[d]
        while True:
            state = self.state[d]
            if state == "messages":
                if not self.link_only:
                    self._messages(d, events, build)
                return
            if state in ("dead", "wait_reply", "done"):
                return
            if state == "sasl":  # a security layer's bytes, or link_only's stop
                if buf and not self.link_only:
                    events.append(LinkUnit(d, "sasl", self._take(d, len(buf))))
                return
            if state in SASL_STATES:
                if not self._sasl(d, state, events):
                    return
                continue
            size = {
                "header": LINK_HEADER.size,
                "body": self.need_size[d],
                "auth": 4,
                "ticket": TICKET_SIZE,
                "result": 4,
            }[state]
            if len(buf) < size:
                return
            self._link_unit(d, state, self._take(d, size), events)

    def _link_unit(self, d: str, state: str, data: bytes, events: list[Event]) -> None:
        if state == "header":
            magic, major, _minor, size = LINK_HEADER.unpack(data)
            events.append(LinkUnit(d, "header", data))
            if magic[0] == 0x16 and magic[1] == 0x03:  # a TLS record: handshake, TLS 1.x
                self._fail(d, "TLS-encrypted stream: no plaintext to dissect here", events)
            elif magic != LINK_MAGIC:
                self._fail(d, f"bad link magic {magic!r} (expected b'REDQ')", events)
            elif major != 2:
                self._fail(d, f"unsupported protocol major version {major}", events)
            elif size > MAX_LINK_SIZE:
                self._fail(d, f"link message of {size} bytes exceeds {MAX_LINK_SIZE}", events)
            else:
                self.need_size[d] = size
                self.state[d] = "body"
            return
        if state == "body":
            kind = "link_mess" if d == C2S else "link_reply"
            events.append(LinkUnit(d, kind, data))
            try:
                self._link_body(d, data)
            except (ValueError, struct.error) as exc:
                self._fail(d, f"malformed {kind}: {exc}", events)
            return
        if state == "auth":
            events.append(LinkUnit(d, "auth_mechanism", data))
            (mech,) = U32.unpack(data)
            if mech == CAP_AUTH_SASL:
                # SASL replaces the ticket and the 4-byte result with its own exchange
                # (link_only stops here: opaque from now on)
                self.auth = "sasl"
                self.state[d] = "sasl" if self.link_only else "sasl_mechname"
                if self.state[S2C] == "result":
                    self.state[S2C] = "sasl" if self.link_only else "sasl_mechlist"
            elif mech == CAP_AUTH_SPICE:
                self.auth, self.state[d] = "spice", "ticket"
            else:
                self._fail(d, f"unknown auth mechanism {mech}", events)
            return
        if state == "ticket":
            events.append(LinkUnit(d, "ticket", data))
            self.state[d] = "messages"
            return
        # state == "result"
        events.append(LinkUnit(d, "link_result", data))
        (self.result,) = U32.unpack(data)
        self.state[d] = "messages" if self.result == 0 else "done"
        if self.state[C2S] in SASL_STATES:  # after SASL the client waited for this too
            self.state[C2S] = self.state[d]

    def _sasl(self, d: str, state: str, events: list[Any]) -> bool:
        """The next unit of the SASL exchange in `d`, if it is whole (False: not yet)."""
        step = next_step(state, self.buf[d])
        if step is None:
            return False
        if isinstance(step, str):
            self._fail(d, step, events)
            return False
        if not step.kind:  # a link reply in its place: the server refuses
            self.state[d] = step.then
            return True
        data = self._take(d, step.size)
        events.append(LinkUnit(d, step.kind, data))
        if step.kind != "sasl_result":
            self.state[d] = step.then
            return True
        (self.sasl_result,) = U32.unpack(data)
        if self.sasl_result != 0:  # refused: a reason, and the server hangs up
            self.state[S2C], self.state[C2S] = step.then, "done"
        elif self.sasl_layer:  # the link result and all after it are encrypted
            self.state[S2C] = self.state[C2S] = "sasl"
        else:  # the link result, as after a ticket, then messages
            self.state[S2C] = "result"
        return True

    def _link_body(self, d: str, data: bytes) -> None:
        if d == C2S:
            conn, ctype, cid, n_common, n_channel, caps_off = LINK_MESS_FIXED.unpack_from(data)
            self.connection_id, self.channel_type, self.channel_id = conn, ctype, cid
            self.client_common, self.client_channel = _caps(
                data, LINK_MESS_FIXED, n_common, n_channel, caps_off
            )
            self.state[d] = "wait_reply"
            return
        error, _key, n_common, n_channel, caps_off = LINK_REPLY_FIXED.unpack_from(data)
        self.link_error = error
        if error != 0:  # e.g. NEED_SECURED: the server closes; nothing more is expected
            self.state[d] = "done"
            self.state[C2S] = "done" if self.state[C2S] == "wait_reply" else self.state[C2S]
            return
        self.server_common, self.server_channel = _caps(
            data, LINK_REPLY_FIXED, n_common, n_channel, caps_off
        )
        both = (self.client_common, self.server_common)
        self.mini_header = all(has_cap(w, CAP_MINI_HEADER) for w in both)
        self.state[d] = "result"
        if self.state[C2S] == "wait_reply":
            if all(has_cap(w, CAP_AUTH_SELECTION) for w in both):
                self.state[C2S] = "auth"
            else:
                self.auth, self.state[C2S] = "spice", "ticket"

    def _messages(self, d: str, events: list[Any], build: MessageBuilder) -> None:
        """Frame every complete message in the buffer."""
        if not self.bodies:
            self._headers(d, events)
            return
        buf = self.buf[d]
        hdr = MINI_HEADER if self.mini_header else FULL_HEADER
        hsize, mini, limit = hdr.size, self.mini_header, self.max_message
        n = len(buf)
        if n < hsize:
            return
        first_size = hdr.unpack_from(buf)[1 if mini else 2]
        if first_size <= limit and n < hsize + first_size:
            return  # a large message still arriving: no copy until it is whole
        data = bytes(buf)  # one snapshot of the buffer; `build` slices each message from it
        buf.clear()
        self._frame(d, data, events, build)

    def _frame(self, d: str, data: bytes, events: list[Any], build: MessageBuilder) -> None:
        """Build every whole message at the start of `data`, which follows what was framed
        before (self.buf is empty); keep the rest in self.buf."""
        n = len(data)
        pos, cut, too_big = FRAME(d, data, self.mini_header, self.max_message, build, events)
        self.offset[d] += pos
        if cut >= LARGE:
            assembly = self.assembly[d] = ASSEMBLY(cut)
            assembly.add(memoryview(data)[pos:])
        elif pos < n:
            self.buf[d] += memoryview(data)[pos:]
        if too_big is not None:
            self._fail(d, too_big, events)

    def _assemble(self, d: str, data: bytes | memoryview, build: MessageBuilder) -> list[Any]:
        """The next piece of a large message (see assembly): once it is whole, its event,
        then whatever follows it in the last piece."""
        assembly = self.assembly[d]
        assert assembly is not None
        taken = assembly.add(data)
        if assembly.missing:
            return []
        whole = assembly.take()
        self.assembly[d] = None
        want, over = len(whole), len(data) - taken  # bytes past the message, in this piece
        hdr = MINI_HEADER if self.mini_header else FULL_HEADER
        if self.mini_header:
            msg_type, _size = hdr.unpack_from(whole)
            serial, sub_list = None, 0
        else:
            serial, msg_type, _size, sub_list = hdr.unpack_from(whole)
        # the record's raw bytes are this object itself: whole[0:len(whole)] is no copy
        events: list[Any] = [build(d, msg_type, whole, 0, hdr.size, want, serial, sub_list)]
        self.offset[d] += want
        if over:
            rest = memoryview(data)[taken:]
            size = hdr.unpack_from(rest)[1 if self.mini_header else 2] if over >= hdr.size else 0
            cut = hdr.size + size
            if over >= hdr.size and cut > over and cut >= LARGE and size <= self.max_message:
                next_one = self.assembly[d] = ASSEMBLY(cut)
                next_one.add(rest)
            else:
                self._frame(d, bytes(rest), events, build)
        return events

    def _headers(self, d: str, events: list[Any]) -> None:
        buf = self.buf[d]
        data = bytes(buf)
        buf.clear()
        self._walk(d, data, events)

    def _walk(self, d: str, data: bytes, events: list[Any]) -> None:
        """Header-only walk (bodies=False): count each message, skip the body its header
        announces, keep only a cut header for the next chunk. No copy of the chunk."""
        buf = self.buf[d]
        if buf:  # a header cut by the previous chunk: at most a few bytes
            data = bytes(buf) + data
            buf.clear()
        hdr = MINI_HEADER if self.mini_header else FULL_HEADER
        hsize, unpack, limit = hdr.size, hdr.unpack_from, self.max_message
        size_at = 1 if self.mini_header else 2  # mini: (type, size); full: (serial, type, ...)
        n = len(data)
        pos = min(self.skip[d], n)
        self.skip[d] -= pos
        count = 0
        while n - pos >= hsize:
            size = unpack(data, pos)[size_at]
            if size > limit:
                self.offset[d] += pos
                self.walked[d] += count
                msg_type = unpack(data, pos)[size_at - 1]
                self._fail(d, f"message type {msg_type} of {size} bytes exceeds the limit", events)
                return
            count += 1
            pos += hsize + size
        if pos > n:  # the last body goes on in later chunks
            self.skip[d] = pos - n
            pos = n
        elif pos < n:
            buf += data[pos:]
        self.offset[d] += pos
        self.walked[d] += count
