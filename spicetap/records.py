"""Turn reassembled channel byte streams into SPICE records: link units, messages, agent
messages, errors and gaps, with the decoded view beside the raw bytes.

No I/O: stream events in, records out. Sessions are told apart by the connection id that
every non-main channel links with, which the main channel's INIT message announces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dissectors.agent import AgentMessage, AgentReassembler
from dissectors.api import LINK, SPICE, Decoded, Dialect, decode, message_type
from dissectors.errors import DecodeError, Malformed, covered_bytes
from proxy.core.endpoint import endpoint_text
from proxy.core.framing import (
    C2S,
    DEFAULT_MAX_MESSAGE,
    S2C,
    ChannelError,
    ChannelFramer,
    LinkUnit,
    Message,
    MessageBuilder,
)
from spicetap.archive.privacy import SECRET_STAGE

try:
    from proxy.core._fastframe import FlatBuilder
except ImportError:  # not built: every message goes through the Python builder
    FLAT_BUILDER: type[FlatBuilder] | None = None
else:
    FLAT_BUILDER = FlatBuilder

MAIN = 1
MAIN_INIT = message_type(MAIN, "s2c", "init")
AGENT_DATA = {d: message_type(MAIN, d, "agent_data") for d in (C2S, S2C)}

VIEWS_FROM = 4096  # RecordBuilder(views=True): bodies longer than this decode from a view
# A main channel that never sends INIT is not held back for long, nor for much memory:
# its records then go out without a session (a server may send up to --max-message each).
MAX_HELD = 64
MAX_HELD_BYTES = 1 << 20
# Link units that are secrets: never decoded or shown; archives keep only their length.
SECRET_UNITS = {"ticket", "sasl"}
# What an archive says when a channel chose SASL. Its exchange is kept only as lengths. On
# a plain server connection spice-server then wraps the channel in SASL's security layer,
# kept as lengths too; over TLS it adds none, and the channel is dissected as any other.
SASL_NOTE = {
    "mechanism": "sasl",
    "may_be_encrypted": True,
    "note": "SASL chosen on a plain server connection: spice-server wraps the rest of this "
    "channel in SASL's security layer, which spicetap cannot read",
}
SASL_OVER_TLS_NOTE = {
    "mechanism": "sasl",
    "may_be_encrypted": False,
    "note": "SASL chosen over TLS: spice-server adds no security layer of its own, so the "
    "channel is dissected after the exchange",
}
_LINK_STRUCTS = {
    "header": "LinkHeader",
    "link_mess": "LinkMess",
    "link_reply": "LinkReply",
    "auth_mechanism": "LinkAuthMechanism",
    "link_result": "LinkResult",
    "sasl_result": "LinkResult",  # SASL's own u32 result, with the same codes
}


class Record(NamedTuple):  # one per message: a tuple is the cheapest immutable record
    time: float
    session: int | None  # connection id from the main channel's INIT
    connection: int
    channel: str
    channel_id: int
    direction: str
    kind: str  # "link" | "message" | "agent" | "error" | "gap" | "close"
    msg_type: int | None
    name: str | None
    raw: bytes  # plaintext bytes as on the wire (renderers never print secret units)
    error: str | None = None
    fields: dict[str, Any] | None = None  # link units: decoded values by name
    agent_types: frozenset[int] = frozenset()  # AGENT_DATA: agent message types it carried
    # Messages and agent messages: the members of their Decoded (see `decoded`), folded in
    # so that a message costs one object, not two.
    decoded_fields: dict[str, Any] | None = None
    size: int = 0  # of the body
    covered: int = 0
    decode_error: DecodeError | None = None
    struct: str | None = None
    dialect: Dialect | None = None  # None: nothing decoded (not a message)
    channel_type: int = 0  # in the dialect (an agent message's: its variant)

    @property
    def decoded(self) -> Decoded | None:
        """The decoded body, rebuilt from the members folded into the record."""
        dialect = self.dialect
        if dialect is None or self.msg_type is None:
            return None
        ctype = self.channel_type
        return _new(
            Decoded,
            (dialect.channel_name(ctype), ctype, self.direction, self.msg_type, self.name,
             self.decoded_fields, self.size, self.covered, self.decode_error, self.struct,
             dialect),
        )  # fmt: skip

    @property
    def not_fully_dissected(self) -> bool:
        return self.dialect is not None and not (
            self.decode_error is None and self.name is not None and self.covered == self.size
        )


@dataclass
class _Conn:
    number: int
    framer: ChannelFramer = field(default_factory=ChannelFramer)
    agent: AgentReassembler | None = None
    # A main channel's records wait for its INIT, which names the session.
    ident: tuple[int | None, int, str, int] | None = None  # session, number, channel, id
    open_fields: dict[str, Any] | None = None  # endpoints, until the open record is out
    open_time: float = 0.0
    held: list[Record] | None = None
    held_bytes: int = 0  # of the held records' raw bytes
    # Once linked (not main, session known): the framer's message builder, and how to tell
    # it the time of the bytes fed next (see RecordBuilder._builder).
    builder: tuple[MessageBuilder, Callable[[float], None]] | None = None


def _link_fields(kind: str, data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    if kind == "sasl_complete":  # the server's u8 after each SASL answer
        return {"complete": bool(data[0])}, None
    if kind == "sasl_reason":  # u32 length, then text with its NUL (proxy/core/saslwire.py)
        return {"reason": data[4:].rstrip(b"\0").decode("utf-8", "replace")}, None
    struct = _LINK_STRUCTS.get(kind)
    if struct is None:
        return None, None
    try:
        value, _covered = LINK.decode_struct(struct, data)
    except Malformed as exc:
        return None, str(exc.error)
    return LINK.namer(struct)(value), None


_new = tuple.__new__
_NO_AGENT_TYPES: frozenset[int] = frozenset()


@functools.cache
def _flat_layouts(ctype: int) -> dict[str, dict[int, tuple[str, str, tuple[tuple[str, str], ...]]]]:
    """What a channel type's FlatBuilders decode themselves: per direction, message type ->
    (message name, struct, its FLAT members). Made once per channel type, not per
    connection (the builders only read it)."""
    return {
        d: {
            num: (name, struct, SPICE.flat[struct])
            for num, (_c, name, struct, _dec, _in_place) in SPICE.table(ctype, d).items()
            if struct in SPICE.flat
        }
        for d in (C2S, S2C)
    }


def _message_record(head: tuple[Any, ...], raw: bytes, dec: Decoded) -> Record:
    """head: time, session, connection, channel, channel id, direction, kind."""
    _channel, ctype, _d, msg_type, name, fields, size, covered, error, struct, dialect = dec
    # tuple.__new__ skips the NamedTuple's Python-level __new__
    return _new(
        Record,
        (*head, msg_type, name, raw, str(error) if error else None, None, _NO_AGENT_TYPES,
         fields, size, covered, error, struct, dialect, ctype),
    )  # fmt: skip


class RecordBuilder:
    """Per capture (or proxy run): feeds channel bytes, returns records."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, views: bool = False) -> None:
        self.max_message = max_message  # the proxy's limit: it relays no larger message
        # True: a long message's byte strings (image data) are memoryviews into its raw
        # bytes, not copies. For a caller that only archives records (compact() turns them
        # into bytes or {len, head}): the recording process.
        self.views = views
        self.conns: dict[int, _Conn] = {}
        self.main_session: dict[int, int] = {}  # main connection -> session id
        # connections whose records wait (for their link message, or a main channel's
        # INIT): records let go meanwhile are later than theirs (see iter_capture)
        self.holding: set[int] = set()

    def opened(
        self,
        conn: int,
        ts: float = 0.0,
        client: tuple[str, int] | None = None,
        server: tuple[str, int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """A new connection; its `open` record (with the endpoints) is emitted just before
        its first other record, when the link message has named its channel."""
        c = self._new(conn)
        tls = (extra or {}).get("tls")
        if isinstance(tls, dict) and tls.get("server"):
            c.framer.sasl_layer = False  # spice-server adds no SASL layer over TLS
        if client is not None and server is not None:
            c.open_fields = {
                "client": endpoint_text(client),
                "server": endpoint_text(server),
                **(extra or {}),
            }
            c.open_time = ts
        self.conns[conn] = c

    def _new(self, conn: int) -> _Conn:
        return _Conn(conn, ChannelFramer(self.max_message))

    def _conn(self, conn: int) -> _Conn:
        """The connection's state, made if nothing came for it yet."""
        c = self.conns.get(conn)
        if c is None:
            c = self.conns[conn] = self._new(conn)
        return c

    def _session(self, c: _Conn) -> int | None:
        fr = c.framer
        if fr.channel_type == MAIN:
            # a new session's main channel links with id 0 and learns it from INIT; a main
            # channel joining a migration's destination links with the session it continues
            return self.main_session.get(c.number) or fr.connection_id or None
        return fr.connection_id or None

    def _ident(self, c: _Conn) -> tuple[int | None, int, str, int]:
        """session, connection, channel name, channel id: fixed once the session is known."""
        if c.ident is not None:
            return c.ident
        fr = c.framer
        name = SPICE.channel_name(fr.channel_type) if fr.channel_type else "unknown"
        ident = (self._session(c), c.number, name, fr.channel_id)
        if ident[0] is not None:
            c.ident = ident
        return ident

    def _base(self, c: _Conn, ts: float, direction: str) -> dict[str, Any]:
        fr = c.framer
        return {
            "time": ts,
            "session": self._session(c),
            "connection": c.number,
            "channel": SPICE.channel_name(fr.channel_type) if fr.channel_type else "unknown",
            "channel_id": fr.channel_id,
            "direction": direction,
        }

    def data(self, conn: int, ts: float, direction: str, data: bytes | memoryview) -> list[Record]:
        """Bytes of one direction; a memoryview (the recording process's ring) may change
        once this returns: only a large message's assembly takes it as it is, to copy it."""
        c = self.conns.get(conn)
        if c is None:
            self.opened(conn)
            c = self.conns[conn]
        fr = c.framer
        if data.__class__ is not bytes and not fr.assembling(direction):
            data = bytes(data)
        ident = c.ident if fr.channel_type != MAIN else None
        out: list[Record] = []
        if ident is None:
            for ev in fr.feed(direction, data):
                out += self._event(c, ts, ev)
        else:
            if c.builder is None:
                c.builder = self._builder(fr.channel_type or 0, ident, self.views)
            build, at = c.builder
            at(ts)
            linked = fr.linked
            # messages come out of the framer as records already; link units and errors
            # (rare) still need turning into records
            built = fr.feed_built(direction, data, build)
            if linked and (not built or built[-1].__class__ is Record):
                out = built  # messages only
            else:
                for ev in built:
                    if ev.__class__ is Record:
                        out.append(ev)
                    else:
                        out += self._event(c, ts, ev)
        return self._release(c, out)

    @staticmethod
    def _builder(
        ctype: int, ident: tuple[int | None, int, str, int], views: bool = False
    ) -> tuple[MessageBuilder, Callable[[float], None]]:
        """The hot path (a linked channel other than main, its session known): each message
        framed becomes its record at once. Its body decodes where it lies in the framer's
        snapshot (pointers count from `body`): no body copy, and a regions list only for
        a decoder that follows pointers. What _event does for a message, without the
        Message, the call to decode() and the list per message. Made once per connection;
        the second function sets the time of what is fed next."""
        session, number, channel, channel_id = ident
        tables = {C2S: SPICE.table(ctype, C2S), S2C: SPICE.table(ctype, S2C)}
        dialect = SPICE
        ts = 0.0

        def at(time: float) -> None:
            nonlocal ts
            ts = time

        def build(
            d: str,
            msg_type: int,
            data: bytes,
            start: int,
            body: int,
            end: int,
            _serial: int | None,
            _sub_list: int,
        ) -> Record:
            entry = tables[d].get(msg_type)
            if entry is not None:
                _channel, name, struct, decoder, in_place = entry
                regions: list[tuple[int, int]] | None = None if in_place else []
                # slices of a memoryview are views: a megabyte of image data is not copied
                src = memoryview(data) if views and end - body > VIEWS_FROM else data
                try:
                    fields, stop = decoder(src, body, end, regions, body)
                except (Malformed, UnboundLocalError, KeyError, AttributeError):
                    # decode() below says where and why, with offsets in the body (and
                    # decodes a C string, whose find() a memoryview lacks, from bytes)
                    pass
                else:
                    if regions:  # pointers were followed: the union of what was read
                        regions.append((body, stop))
                        covered = covered_bytes(regions)
                    else:
                        covered = stop - body
                    return _new(
                        Record,
                        (ts, session, number, channel, channel_id, d, "message", msg_type,
                         name, data[start:end], None, None, _NO_AGENT_TYPES, fields,
                         end - body, covered, None, struct, dialect, ctype),
                    )  # fmt: skip
            dec = decode(ctype, d, msg_type, data[body:end])
            return _message_record(
                (ts, session, number, channel, channel_id, d, "message"), data[start:end], dec
            )

        if FLAT_BUILDER is None:
            return build, at
        # The C builder makes the records of fixed-layout bodies itself (all of inputs, most
        # acks), exactly as `build` would, and hands it every other message.
        layouts = _flat_layouts(ctype)
        flat = FLAT_BUILDER(Record, ident, layouts, _NO_AGENT_TYPES, dialect, ctype, build)

        def at_both(time: float) -> None:
            nonlocal ts
            ts = flat.time = time

        return flat, at_both

    def _open_record(self, c: _Conn) -> Record:
        fields, c.open_fields = c.open_fields, None
        return Record(
            **self._base(c, c.open_time, C2S),
            kind="open",
            msg_type=None,
            name=None,
            raw=b"",
            fields=fields,
        )

    def _release(self, c: _Conn, records: list[Record], force: bool = False) -> list[Record]:
        out = self._let_go(c, records, force)
        if c.held:
            self.holding.add(c.number)
        else:
            self.holding.discard(c.number)
        return out

    def _let_go(self, c: _Conn, records: list[Record], force: bool) -> list[Record]:
        """The records that may go out now. Until the link message names the channel, its
        session is unknown: they wait for it, so that a link header read apart from the
        link message (and the open record) joins the session's archive, not one beside it;
        a connection that can no longer name it (closed, a framing error, a gap) lets go.
        A main channel's records then wait for INIT, which names the session. The open
        record (who connected, to what) comes before a connection's first other record,
        whatever kind that is: bytes, an error of the proxy's, or the close."""
        if c.open_fields is not None and records:
            records.insert(0, self._open_record(c))
        fr = c.framer
        if fr.channel_type != MAIN and c.held is None and fr.channel_type is not None:
            return records
        if c.held is None:
            c.held, c.held_bytes = [], 0
        c.held += records
        c.held_bytes += sum(len(r.raw) for r in records)
        full = len(c.held) >= MAX_HELD or c.held_bytes >= MAX_HELD_BYTES
        if fr.channel_type is None:
            if force or "dead" in fr.state.values() or full:
                out, c.held = c.held, None
                return out
            return []
        if fr.channel_type != MAIN:  # named just now: what waited gets its channel
            out, c.held = [self._named(c, r, self._session(c)) for r in c.held], None
            return out
        session = self.main_session.get(c.number)
        if session is None and not force and not full:
            return []
        out = [self._named(c, r, session) for r in c.held]
        c.held, c.held_bytes = [], 0
        return out

    @staticmethod
    def _named(c: _Conn, rec: Record, session: int | None) -> Record:
        """rec with the channel and session its connection has come to know."""
        if rec.channel == "unknown" and c.framer.channel_type is not None:
            return rec._replace(
                channel=SPICE.channel_name(c.framer.channel_type),
                channel_id=c.framer.channel_id,
                session=rec.session if rec.session is not None else session,
            )
        return rec if rec.session is not None else rec._replace(session=session)

    def _event(self, c: _Conn, ts: float, ev: LinkUnit | Message | ChannelError) -> list[Record]:
        if not isinstance(ev, Message):  # link units and errors are rare: keep them aside
            return self._link_or_error(c, ts, ev)
        fr = c.framer
        ctype = fr.channel_type or 0
        dec = decode(ctype, ev.direction, ev.msg_type, ev.body)
        if ctype == MAIN and ev.direction != C2S and ev.msg_type == MAIN_INIT and dec.fields:
            self.main_session[c.number] = int(dec.fields["session_id"])
        session, number, channel, channel_id = self._ident(c)
        head = (ts, session, number, channel, channel_id, ev.direction, "message")
        out = [_message_record(head, ev.raw, dec)]
        if ctype == MAIN and ev.msg_type == AGENT_DATA[ev.direction] and dec.fields is not None:
            if c.agent is None:
                c.agent = AgentReassembler()
            agent_out = c.agent.feed(ev.direction, dec.fields["data"])
            out[0] = out[0]._replace(agent_types=frozenset(c.agent.touched))
            for am in agent_out:
                if isinstance(am, AgentMessage):
                    out.append(_message_record((*head[:6], "agent"), am.raw, am.decoded))
                else:
                    out.append(
                        Record(
                            **self._base(c, ts, ev.direction),
                            kind="error",
                            msg_type=None,
                            name="agent",
                            raw=b"",
                            error=am.reason,
                        )
                    )
        return out

    def _link_or_error(self, c: _Conn, ts: float, ev: LinkUnit | ChannelError) -> list[Record]:
        if isinstance(ev, ChannelError):
            tls = ev.reason.startswith("TLS-encrypted")  # undecryptable in a capture
            return [
                Record(
                    **self._base(c, ts, ev.direction),
                    kind="tls" if tls else "error",
                    msg_type=None,
                    name=SECRET_STAGE if ev.secret else None,
                    raw=b"" if tls else ev.data,
                    error=ev.reason,
                )
            ]
        if isinstance(ev, LinkUnit):
            secret = ev.kind in SECRET_UNITS
            fields, err = (None, None) if secret else _link_fields(ev.kind, ev.data)
            out = [
                Record(
                    **self._base(c, ts, ev.direction),
                    kind="link",
                    msg_type=None,
                    name=ev.kind,
                    raw=ev.data,
                    error=err,
                    fields=fields,
                )
            ]
            if ev.kind == "auth_mechanism" and c.framer.auth == "sasl":
                note = SASL_NOTE if c.framer.sasl_layer else SASL_OVER_TLS_NOTE
                out.append(
                    Record(
                        **self._base(c, ts, ev.direction),
                        kind="auth",
                        msg_type=None,
                        name="sasl",
                        raw=b"",
                        fields=dict(note),
                    )
                )
            return out
        raise AssertionError(ev)

    def event(
        self,
        conn: int,
        ts: float,
        direction: str,
        kind: str,
        name: str,
        fields: dict[str, Any],
        raw: bytes = b"",
    ) -> list[Record]:
        """Something the proxy did rather than bytes that crossed: "rewrite" (raw = the
        link unit as its sender sent it) or "auth" (how authentication went)."""
        c = self._conn(conn)
        rec = Record(
            **self._base(c, ts, direction),
            kind=kind,
            msg_type=None,
            name=name,
            raw=raw,
            fields=fields,
        )
        out = [rec]
        if c.open_fields is not None:
            out.insert(0, self._open_record(c))
        return self._release(c, out)

    def gap(
        self, conn: int, ts: float, direction: str, missing: int, where: str = "the capture"
    ) -> list[Record]:
        c = self._conn(conn)
        rec = Record(
            **self._base(c, ts, direction),
            kind="gap",
            msg_type=None,
            name=None,
            raw=b"",
            error=f"{missing} bytes missing from {where}",
        )
        # Framing cannot resume after lost bytes: the rest of this direction is opaque.
        c.framer.state[direction] = "dead"
        return self._release(c, [rec])

    def error(self, conn: int, ts: float, direction: str, reason: str) -> list[Record]:
        """A channel error found outside the framer (the proxy's limits, a vanished peer)."""
        c = self._conn(conn)
        rec = Record(
            **self._base(c, ts, direction),
            kind="error",
            msg_type=None,
            name=None,
            raw=b"",
            error=reason,
        )
        return self._release(c, [rec])

    def closed(self, conn: int, ts: float, reason: str) -> list[Record]:
        c = self.conns.get(conn)
        if c is None:
            return []
        out: list[Record] = []
        fr = c.framer
        for direction in (C2S, "s2c"):
            left = fr.pending_data(direction)
            if left:  # what crossed the proxy is kept, truncated or not
                what = (
                    f"{len(left)} bytes sent after the link was refused"
                    if fr.state[direction] == "done"
                    else f"inside a unit: {len(left)} bytes of a truncated message"
                )
                out.append(
                    Record(
                        **self._base(c, ts, direction),
                        kind="error",
                        msg_type=None,
                        name=SECRET_STAGE if fr.in_secret_stage(direction) else None,
                        raw=left,
                        error=f"connection ended ({reason}) {what}",
                    )
                )
        out.append(
            Record(**self._base(c, ts, C2S), kind="close", msg_type=None, name=reason, raw=b"")
        )
        released = self._release(c, out, force=True)
        # forget it: a long-running recorder sees many connections, each with its framer
        del self.conns[conn]
        self.main_session.pop(conn, None)
        return released


__all__ = ["DecodeError", "Record", "RecordBuilder"]
