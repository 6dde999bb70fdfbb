"""One viewer-to-server channel connection, as the proxy sees it: no I/O, no clock.

Events in (bytes received from a side, a side closed, time passing); commands out (forward
these bytes, record these bytes, close, log). Without a link policy, bytes are forwarded
unchanged and before anything else is done with them. With one (capability masking, auth
intercept or inject: linkrewrite.py), the link stage is held until each link unit is
complete, rewritten, then forwarded; after the link stage bytes flow unchanged again.
RecordData always carries exactly the forwarded bytes (what the receiving peer got); a
RecordEvent says what was rewritten and keeps the sender's original of non-secret units.
A header-only walk of the forwarded streams (no body copies) checks the link stage and
message sizes, so a peer breaking the protocol closes this channel with a clear reason; the
dissection proper happens later, off the forwarding path, from the Record commands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.core.credentials import Readmission
from proxy.core.framing import C2S, S2C, U32, ChannelError, ChannelFramer, LinkUnit
from proxy.core.linkrewrite import (
    PERMISSION_DENIED,
    Deliver,
    LinkPolicy,
    LinkRewriter,
    Note,
    Refuse,
)
from proxy.core.migration import (
    INIT,
    MIGRATION_MESSAGES,
    Destination,
    Held,
    MigrationError,
    MigrationScanner,
    Pass,
    destination,
    rewrite,
)
from proxy.core.saslident import SASL_LOGIN, SaslIdentity

MAIN = 1
SESSION_REFUSED = (
    "new session refused: the connections left under the cap are kept for channels of "
    "sessions already begun"
)


@dataclass(frozen=True)
class Limits:
    link_timeout: float = 10.0  # the whole link stage must be done by then
    idle_timeout: float | None = None  # no bytes either way for this long: close
    max_message: int = 64 << 20


@dataclass(frozen=True, slots=True)
class Forward:
    direction: str  # c2s: to the server; s2c: to the viewer
    data: bytes


@dataclass(frozen=True, slots=True)
class RecordData:
    direction: str
    data: bytes
    time: float


@dataclass(frozen=True, slots=True)
class RecordEvent:
    """Not bytes that crossed: what the proxy did to the link stage ("rewrite", with the
    sender's original unit in raw) or how authentication went ("auth")."""

    direction: str
    kind: str
    name: str
    fields: dict[str, Any]
    raw: bytes
    time: float


@dataclass(frozen=True, slots=True)
class Close:
    reason: str
    error: bool  # a protocol error or a limit, not a peer's normal close
    direction: str = C2S  # whose bytes the error is about (a timeout: the channel's)
    # The recording frames the same bytes and records this error itself, with the bytes
    # it concerns (a framing error; a unit cut by the end): no second record of it.
    seen_in_bytes: bool = False


# Said once per main channel whose server wraps it in SASL's security layer (plain TCP).
SASL_LAYER_MIGRATION = (
    "SASL security layer on the main channel: its migration messages cannot be read, so a "
    "live migration would send this viewer to the new host directly, past spicetap "
    "(TLS on the server leg avoids it)"
)


@dataclass(frozen=True, slots=True)
class Log:
    message: str


@dataclass(frozen=True, slots=True)
class Redirect:
    """The server sends the viewer to `destination` (a live migration): serve it, then call
    ChannelRelay.redirected with where viewers reach it through spicetap (or
    redirect_failed). Until then the server's later bytes on this channel wait, in order."""

    destination: Destination
    message: str  # migrate_begin, migrate_begin_seamless or migrate_switch_host


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """The viewer's credentials were refused, by spicetap's inject check or by the server
    (PERMISSION_DENIED after a ticket, or SASL's failure): the shell counts it against the
    viewer's address (proxy/core/lockout.py)."""

    by: str  # "spicetap" or "server"


Command = Forward | RecordData | RecordEvent | Close | Log | Redirect | AuthFailed


class ChannelRelay:
    def __init__(
        self,
        limits: Limits,
        now: float,
        policy: LinkPolicy | None = None,
        *,
        follow_migration: bool = False,
        session_gate: Callable[[], bool] | None = None,
        server_tls: bool = False,
        sasl_user: bool = False,
    ) -> None:
        self.limits = limits
        # asked, once the viewer's link message is in, whether a new session may begin here
        # (proxy/core/admission.py); a channel of a session already begun needs no leave
        self.session_gate = session_gate
        # The main channel's server stream is scanned once linked: for migration messages
        # when following them (redirects), else up to its first message only, INIT, whose
        # session id keeps a session's channels together when a reload moves its target
        # (proxy/io/server.py's rejoin). `scanning` goes off once nothing is to be read.
        self.redirects = follow_migration
        self.scanning = True
        self.scanner: MigrationScanner | None = None
        # a main channel's session, once the server's INIT said it
        self.session_id: int | None = None
        self.s2c_fed = 0  # server bytes the guard has seen
        self.s2c_link = 0  # ...of which the link stage
        self.waiting: Held | None = None  # a migration message held for Redirect
        self.backlog: list[Pass | Held] = []  # server bytes behind it
        self.backlog_size = 0
        self.guard = ChannelFramer(limits.max_message, bodies=False)
        # behind a TLS server leg, SASL leaves the channel in clear: guarded, and followed
        self.guard.sasl_layer = not server_tls
        self.rewriter = (
            LinkRewriter(policy, limits.max_message)
            if policy is not None and policy.active
            else None
        )
        # inject: a main channel's token, for a new session at a migration's destination,
        # and the policy the shell made of it there (once: MigrationListeners tells
        # policies apart by identity)
        self.readmission: Readmission | None = None
        self.token: bytes | None = None  # inject: the digest of the token it linked with
        # inject: whom that token was given to, if it says; SASL: the name the viewer
        # logged in with, when sasl_user allows reading it
        self.user: str | None = None
        self.sasl = SaslIdentity() if sasl_user else None
        # SASL: the server owes the viewer an answer to its data; spice-server refuses a
        # password by closing then (red-sasl.cpp: a failed step ends the link)
        self.sasl_owed = False
        self.sasl_over = False  # SASL's result came (what follows is the link, or a layer)
        self.destination_policy: LinkPolicy | None = None
        # inject: the server checks spicetap's own password, so its refusal is no failure
        # of the viewer's (which spicetap checked already)
        self.server_checks_viewer = policy is None or policy.auth != "inject"
        self.started = now
        self.last_activity = now
        self.linked = False  # the link stage finished (both sides)
        self.closed = False
        # the operator's reason to end the channel (the management API): its next tick
        # ends it, and whatever ends it from then on is that end
        self.ending: str | None = None
        self.bytes = {C2S: 0, S2C: 0}  # delivered (and so recorded): see crossed()
        self.messages = self.guard.walked  # counted by the guard's header walk

    @property
    def passing(self) -> bool:
        """Past the link stage and any rewriting of it: each direction's input only makes
        output in that same direction (plus, on the server's side, migration redirects),
        and what is recorded of one direction no longer depends on the other's order."""
        return self.linked and self.rewriter is None

    def unchanged(self, direction: str) -> bool:
        """Whatever arrives in `direction` now is forwarded as it is, first: a shell may send
        it before calling received(..., sent=True), which then leaves the Forward out. Not
        during the link stage: the guard must see each side's link unit before the other
        side's answer to it (e.g. the link message before the reply), as the peers did."""
        return self.linked and self.rewriter is None and not (direction == S2C and self.scanning)

    @property
    def channel_type(self) -> int | None:
        return self.guard.channel_type

    @property
    def session(self) -> int | None:
        """The session this channel belongs to: the connection id it linked with, or, for a
        main channel beginning one (id 0), the id the server's INIT gave; None until
        known."""
        guard = self.guard
        if guard.channel_type is None:
            return None
        if guard.channel_type != MAIN or guard.connection_id:
            return guard.connection_id
        return self.session_id

    def received(
        self, direction: str, data: bytes, now: float, *, sent: bool = False
    ) -> list[Command]:
        """`data` came from the side sending `direction`; `sent`: the shell already
        forwarded it, as unchanged() allowed."""
        if self.closed and not sent:  # what crossed as the other side closed still counts
            return []
        self.last_activity = now
        if self.rewriter is not None and not self.rewriter.through[direction]:
            return self._rewrite(direction, data, now)
        commands: list[Command] = []
        self._forward(direction, data, now, commands, sent)
        return commands

    def crossed(self, cmd: RecordData) -> None:
        """The shell delivered `cmd`'s bytes and is recording them: now they count. Not on
        arrival: bytes a shell could not deliver (the other side had gone) are neither
        recorded nor counted, so the counters and the archive agree. A send cut part-way
        records and counts the part that crossed (record_of_part)."""
        self.bytes[cmd.direction] += len(cmd.data)

    def _forward(
        self, direction: str, data: bytes, now: float, commands: list[Command], sent: bool = False
    ) -> None:
        events = self.guard.feed(direction, data)
        gate = self.session_gate is not None and self.guard.channel_type is not None
        if gate and self._session_refused():
            commands.append(Close(SESSION_REFUSED, error=False))
            return
        mark = len(commands)
        if sent:
            commands.append(RecordData(direction, data, now))
        elif direction == S2C and self.scanning:
            self._forward_scanned(data, events, now, commands)
        else:
            commands += (Forward(direction, data), RecordData(direction, data, now))
        if self.guard.auth == "sasl" and not self.sasl_over:
            self._sasl_steps(events, now, commands, mark)
        for ev in events:
            if isinstance(ev, ChannelError):
                self._broken(ev, commands)
                return
            if isinstance(ev, LinkUnit):
                if ev.direction == S2C and self._viewer_refused(ev):
                    commands.append(AuthFailed("server"))
                # done: a result (after a ticket or SASL; with a SASL security layer, SASL's
                # own: what follows is opaque), or a refused link (e.g. NEED_SECURED)
                refused = ev.kind == "link_reply" and bool(self.guard.link_error)
                if refused or self.guard.link_over:
                    self.linked = True

    def _viewer_refused(self, unit: LinkUnit) -> bool:
        """Whether the server's `unit` refuses the viewer's credentials: PERMISSION_DENIED
        as the link result (after a ticket or SASL), or SASL's own result not 0."""
        if not self.server_checks_viewer or unit.kind not in ("link_result", "sasl_result"):
            return False
        code: int = U32.unpack(unit.data)[0]
        return code == PERMISSION_DENIED if unit.kind == "link_result" else code != 0

    def _sasl_steps(
        self, events: list[Any], now: float, commands: list[Command], mark: int
    ) -> None:
        """Follow SASL's exchange (not a security layer after it) through `events`. A login
        said goes before the recording of the bytes that brought it (commands from `mark`
        on), forwarding still first: with the link result and INIT often in the same
        chunk, the recorder knows the session's user before INIT opens its archive."""
        said: list[Command] = []
        for unit in events:
            if not isinstance(unit, LinkUnit) or self.sasl_over:
                continue
            if unit.kind == "sasl":
                self.sasl_owed = unit.direction == C2S
                if self.sasl is not None:
                    (self.sasl.client if unit.direction == C2S else self.sasl.server)(unit.data)
            elif unit.kind == "sasl_result":
                self.sasl_over, self.sasl_owed = True, False
                accepted = U32.unpack(unit.data)[0] == 0
                self._sasl_login("accepted" if accepted else "refused", now, said)
        if said:
            data = (i for i in range(mark, len(commands)) if isinstance(commands[i], RecordData))
            at = next(data, len(commands))
            commands[at:at] = said

    def _sasl_login(self, outcome: str, now: float, commands: list[Command]) -> None:
        """Whom the viewer logged in as, and how it went, if sasl_user allows saying."""
        if self.sasl is None or self.sasl.mechanism is None:
            return
        fields = {**self.sasl.fields(), "outcome": outcome}
        if outcome == "accepted":
            self.user = self.sasl.user
        self.sasl = None  # said once
        commands.append(RecordEvent(S2C, "auth", SASL_LOGIN, fields, b"", now))

    def _sasl_cut(self, now: float) -> list[Command]:
        """The channel ends otherwise than by a peer's close mid-exchange (a timeout, the
        operator, a broken stream): a login begun is said as unfinished."""
        commands: list[Command] = []
        self._sasl_login("unfinished", now, commands)
        return commands

    def _session_refused(self) -> bool:
        """A main channel linking with connection id 0 begins a new session: refused (the
        link message not forwarded) when the gate says no. Asked once per channel."""
        gate, self.session_gate = self.session_gate, None
        assert gate is not None
        new = self.guard.channel_type == MAIN and self.guard.connection_id == 0
        if not new or gate():
            return False
        self.closed = True
        return True

    def _forward_scanned(
        self, data: bytes, events: list[Any], now: float, commands: list[Command]
    ) -> None:
        """The server's side while it is scanned: the link stage passes as it is; on the
        main channel, messages go through the scanner (all of them when following
        migrations, else up to INIT)."""
        before = self.s2c_fed
        self.s2c_fed += len(data)
        cut = 0 if self.scanner is not None else len(data)
        if self.scanner is None:
            for ev in events:
                if isinstance(ev, LinkUnit) and ev.direction == S2C:
                    self.s2c_link += len(ev.data)
                    if ev.kind == "link_result":
                        clear = self.guard.state[S2C] == "messages"  # no SASL layer
                        # not following, a main channel joining a session knows it already
                        wanted = self.redirects or not self.guard.connection_id
                        main = self.guard.channel_type == MAIN
                        if main and not self.guard.result and clear and wanted:
                            self.scanner = MigrationScanner(
                                self.guard.mini_header, self.limits.max_message
                            )
                            cut = self.s2c_link - before
                        else:
                            self.scanning = False  # nothing to read here
                    elif ev.kind == "sasl_result" and self.guard.state[S2C] == "sasl":
                        # accepted, and a security layer follows: nothing more to read
                        self.scanning = False
                        if self.guard.channel_type == MAIN and self.redirects:  # say so
                            commands.append(Log(SASL_LAYER_MIGRATION))
        if any(isinstance(ev, ChannelError) for ev in events):
            cut = len(data)  # the channel closes: pass everything as it came
        if cut:
            commands += (Forward(S2C, data[:cut]), RecordData(S2C, data[:cut], now))
        if cut < len(data):
            self._scan(self.scanner.feed(data[cut:]) if self.scanner else [], now, commands)

    def _scan(self, parts: list[Pass | Held], now: float, commands: list[Command]) -> None:
        for i, part in enumerate(parts):
            if self.waiting is not None:  # keep the order: everything waits behind it
                for later in parts[i:]:
                    self.backlog.append(later)
                    self.backlog_size += len(later.data if isinstance(later, Pass) else later.body)
                if self.backlog_size > self.limits.max_message:
                    self.closed = True
                    reason = "server kept sending while a migration redirect was pending"
                    commands += (Log(reason), Close(reason, error=True, direction=S2C))
                return
            if isinstance(part, Pass):
                commands += (Forward(S2C, part.data), RecordData(S2C, part.data, now))
                continue
            if part.msg_type == INIT and len(part.body) >= U32.size:
                (self.session_id,) = U32.unpack_from(part.body)
            if part.msg_type == INIT or not self.redirects:  # read only: passes as it came
                raw = part.header + part.body
                commands += (Forward(S2C, raw), RecordData(S2C, raw, now))
                continue
            name = MIGRATION_MESSAGES[part.msg_type]
            try:
                dest = destination(part.msg_type, part.body)
            except MigrationError as exc:
                raw = part.header + part.body
                commands += (Log(f"{exc}: forwarded unchanged"),)
                commands += (Forward(S2C, raw), RecordData(S2C, raw, now))
                continue
            self.waiting = part
            commands.append(Redirect(dest, name))
        scanner = self.scanner
        if not self.redirects and scanner is not None and scanner.first_read:
            # the first message is read (INIT, or none): the rest passes unscanned, and
            # fast; what the scanner holds (a cut header) goes first
            self.scanner, self.scanning = None, False
            if scanner.pending:
                data = bytes(scanner.pending)
                commands += (Forward(S2C, data), RecordData(S2C, data, now))

    def redirected(
        self,
        host: str,
        port: int | None,
        tls_port: int | None,
        cert_subject: str | None,
        now: float,
    ) -> list[Command]:
        """The destination of the pending Redirect is served at host:port/tls_port."""
        held = self.waiting
        commands: list[Command] = []
        if held is None or self.closed or self.scanner is None:
            return []
        body = rewrite(held.msg_type, held.body, host, port, tls_port, cert_subject)
        framed = self.scanner.reframe(held, body)
        original = destination(held.msg_type, held.body)
        name = MIGRATION_MESSAGES[held.msg_type]
        to = {"host": host, "port": port, "tls_port": tls_port, "cert_subject": cert_subject}
        fields = {"message": name, "from": _dest_fields(original), "to": to}
        commands += (Forward(S2C, framed), RecordData(S2C, framed, now))
        commands.append(RecordEvent(S2C, "rewrite", name, fields, held.header + held.body, now))
        return commands + self._release(now)

    def redirect_failed(self, reason: str, now: float) -> list[Command]:
        """No way to serve the destination: the viewer gets the message unchanged (and will
        leave spicetap), which is said loudly."""
        held = self.waiting
        if held is None or self.closed:
            return []
        raw = held.header + held.body
        message = f"cannot follow the migration ({reason}): the viewer will leave spicetap"
        commands: list[Command] = [Log(message), Forward(S2C, raw), RecordData(S2C, raw, now)]
        return commands + self._release(now)

    def redirect_unchanged(self, now: float) -> list[Command]:
        """The viewer follows the migration through the same front by itself (a CONNECT
        proxy): the message goes on as the server sent it."""
        held = self.waiting
        if held is None or self.closed:
            return []
        raw = held.header + held.body
        return [Forward(S2C, raw), RecordData(S2C, raw, now), *self._release(now)]

    def _release(self, now: float) -> list[Command]:
        self.waiting = None
        parts, self.backlog, self.backlog_size = self.backlog, [], 0
        commands: list[Command] = []
        self._scan(parts, now, commands)
        return commands

    def _broken(self, ev: ChannelError, commands: list[Command]) -> None:
        self.closed = True
        reason = f"{ev.direction} stream at byte {ev.offset}: {ev.reason}"
        commands += (Log(f"closing channel: {reason}"), Close(reason, True, ev.direction, True))

    def _rewrite(self, direction: str, data: bytes, now: float) -> list[Command]:
        """The link stage under a policy: forward what the rewriter delivers."""
        rewriter = self.rewriter
        assert rewriter is not None
        commands: list[Command] = []
        for step in rewriter.feed(direction, data, now):
            if self.closed:
                break
            if isinstance(step, Deliver):
                self._forward(step.direction, step.data, now, commands)
            elif isinstance(step, Note):
                commands.append(
                    RecordEvent(step.direction, step.kind, step.name, step.fields, step.raw, now)
                )
            elif isinstance(step, Refuse):
                self.closed = True
                if step.viewer_failed:
                    commands.append(AuthFailed("spicetap"))
                commands += (Log(step.reason), Close(step.reason, error=False))
            else:
                self._broken(step, commands)
        if rewriter.finished:
            self.rewriter = None  # the rest of the channel takes the plain path
            self.readmission, self.token = rewriter.readmission, rewriter.token
            self.user = rewriter.user
        return commands

    def peer_closed(self, direction: str, now: float) -> list[Command]:
        """The side that sends `direction` closed (c2s: the viewer)."""
        if self.closed:
            return []
        commands = self._held_back(now)  # what migration following still held: sent, recorded
        self.closed = True
        who = "viewer" if direction == C2S else "server"
        came = self.guard.pending(direction)  # of a cut header or link unit
        if self.rewriter is not None:
            came += self.rewriter.pending(direction)
        due = self.guard.skip[direction]  # of a body whose header did come
        if self.guard.state[direction] == "done" and came:  # the link was refused
            reason = f"{who} closed, having sent {came} bytes after the link was refused"
            return [*commands, Log(reason), Close(reason, True, direction, True)]
        if came or due:
            said = [f"{came} bytes of it came"] if came else []
            said += [f"{due} more were due"] if due else []
            reason = f"{who} vanished in the middle of a message ({', '.join(said)})"
            commands += self._sasl_cut(now)
            return [*commands, Log(reason), Close(reason, True, direction, True)]
        if not self.linked and self.guard.channel_type is not None:
            if self.guard.auth == "sasl":
                refused = direction == S2C and self.sasl_owed
                if refused and self.server_checks_viewer:  # spice-server's SASL refusal
                    commands.append(AuthFailed("server"))
                self._sasl_login("refused" if refused else "unfinished", now, commands)
                return [*commands, Close(f"{who} closed during SASL", False, direction)]
            # A server must answer the link; a viewer may give up on it (its user left).
            reason = f"{who} closed during the link stage"
            if direction == S2C:
                return [*commands, Log(reason), Close(reason, True, direction)]
            return [*commands, Close(reason, False, direction)]
        return [*commands, Close(f"{who} closed", False, direction)]

    def peer_failed(self, direction: str, reason: str, now: float) -> list[Command]:
        """The side that sends `direction` broke the stream's own framing (a WebSocket's):
        an error of this channel, recorded as such."""
        if self.closed:
            return []
        commands = self._held_back(now)
        self.closed = True
        who = "viewer" if direction == C2S else "server"
        reason = f"{who} broke the protocol: {reason}"
        return [*commands, *self._sasl_cut(now), Log(reason), Close(reason, True, direction)]

    def terminate(self, reason: str, now: float) -> list[Command]:
        """The operator ends the channel (the management API): what migration following
        holds back goes out first, then the channel closes, not as an error of a peer's."""
        if self.closed:
            return []
        commands = self._held_back(now)
        self.closed = True
        return [*commands, *self._sasl_cut(now), Close(reason, False)]  # its close line says why

    def _held_back(self, now: float) -> list[Command]:
        """The server's bytes migration following holds (a message awaiting its redirect and
        what queued behind it, a cut header), unchanged: the archive loses nothing."""
        parts: list[bytes] = []
        if self.waiting is not None:
            parts.append(self.waiting.header + self.waiting.body)
        parts += [p.data if isinstance(p, Pass) else p.header + p.body for p in self.backlog]
        if self.scanner is not None and self.scanner.pending:
            parts.append(bytes(self.scanner.pending))
            self.scanner.pending.clear()
        self.waiting, self.backlog, self.backlog_size = None, [], 0
        data = b"".join(parts)
        return [Forward(S2C, data), RecordData(S2C, data, now)] if data else []

    def tick(self, now: float) -> list[Command]:
        if self.closed:
            return []
        if self.ending is not None:
            return self.terminate(self.ending, now)
        if not self.linked and now - self.started > self.limits.link_timeout:
            self.closed = True
            reason = f"link stage not finished after {self.limits.link_timeout:g} s"
            return [*self._sasl_cut(now), Log(reason), Close(reason, error=True)]
        idle = self.limits.idle_timeout
        if idle is not None and now - self.last_activity > idle:
            self.closed = True
            reason = f"idle for {idle:g} s"
            return [Log(reason), Close(reason, error=True)]
        return []


def record_of_part(forward: Forward, delivered: int, rest: list[Command]) -> RecordData | None:
    """A shell's send of `forward` broke after `delivered` bytes had crossed: the record of
    that part, from the RecordData the relay puts after each Forward (in `rest`), or None
    when nothing crossed."""
    if delivered <= 0:
        return None
    for cmd in rest:
        if isinstance(cmd, RecordData) and cmd.data is forward.data:
            return RecordData(cmd.direction, cmd.data[:delivered], cmd.time)
    return None


def _dest_fields(dest: Destination) -> dict[str, Any]:
    return {
        "host": dest.host,
        "port": dest.port,
        "tls_port": dest.tls_port,
        "cert_subject": dest.cert_subject,
    }


__all__ = [
    "S2C",
    "AuthFailed",
    "ChannelRelay",
    "Close",
    "Command",
    "Forward",
    "Limits",
    "LinkPolicy",
    "Log",
    "RecordData",
    "RecordEvent",
    "Redirect",
    "record_of_part",
]
