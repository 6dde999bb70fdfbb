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

from dataclasses import dataclass
from typing import Any

from proxy.core.framing import C2S, S2C, ChannelError, ChannelFramer, LinkUnit
from proxy.core.linkrewrite import Deliver, LinkPolicy, LinkRewriter, Note, Refuse


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


@dataclass(frozen=True, slots=True)
class Log:
    message: str


Command = Forward | RecordData | RecordEvent | Close | Log


class ChannelRelay:
    def __init__(self, limits: Limits, now: float, policy: LinkPolicy | None = None) -> None:
        self.limits = limits
        self.guard = ChannelFramer(limits.max_message, bodies=False)
        self.rewriter = (
            LinkRewriter(policy, limits.max_message)
            if policy is not None and policy.active
            else None
        )
        self.started = now
        self.last_activity = now
        self.linked = False  # the link stage finished (both sides)
        self.closed = False
        self.bytes = {C2S: 0, S2C: 0}
        self.messages = {C2S: 0, S2C: 0}

    @property
    def channel_type(self) -> int | None:
        return self.guard.channel_type

    def received(self, direction: str, data: bytes, now: float) -> list[Command]:
        if self.closed:
            return []
        self.last_activity = now
        self.bytes[direction] += len(data)
        if self.rewriter is not None and not self.rewriter.through[direction]:
            return self._rewrite(direction, data, now)
        commands: list[Command] = []
        self._forward(direction, data, now, commands)
        return commands

    def _forward(self, direction: str, data: bytes, now: float, commands: list[Command]) -> None:
        commands += (Forward(direction, data), RecordData(direction, data, now))
        for ev in self.guard.feed(direction, data):
            if isinstance(ev, ChannelError):
                self._broken(ev, commands)
                return
            if isinstance(ev, LinkUnit):
                # done: a result, a refused link (e.g. NEED_SECURED), or SASL taking over
                refused = ev.kind == "link_reply" and bool(self.guard.link_error)
                if ev.kind in ("link_result", "sasl") or refused:
                    self.linked = True
            else:
                self.messages[ev.direction] += 1

    def _broken(self, ev: ChannelError, commands: list[Command]) -> None:
        self.closed = True
        reason = f"{ev.direction} stream at byte {ev.offset}: {ev.reason}"
        commands += (Log(f"closing channel: {reason}"), Close(reason, error=True))

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
                commands += (Log(step.reason), Close(step.reason, error=False))
            else:
                self._broken(step, commands)
        if rewriter.finished:
            self.rewriter = None  # the rest of the channel takes the plain path
        return commands

    def peer_closed(self, direction: str, now: float) -> list[Command]:
        """The side that sends `direction` closed (c2s: the viewer)."""
        if self.closed:
            return []
        self.closed = True
        who = "viewer" if direction == C2S else "server"
        pending = self.guard.pending(direction) + self.guard.skip[direction]
        if self.rewriter is not None:
            pending += self.rewriter.pending(direction)
        if pending:
            reason = f"{who} vanished in the middle of a message ({pending} bytes missing)"
            return [Log(reason), Close(reason, error=True)]
        return [Close(f"{who} closed", error=False)]

    def tick(self, now: float) -> list[Command]:
        if self.closed:
            return []
        if not self.linked and now - self.started > self.limits.link_timeout:
            self.closed = True
            reason = f"link stage not finished after {self.limits.link_timeout:g} s"
            return [Log(reason), Close(reason, error=True)]
        idle = self.limits.idle_timeout
        if idle is not None and now - self.last_activity > idle:
            self.closed = True
            reason = f"idle for {idle:g} s"
            return [Log(reason), Close(reason, error=True)]
        return []


__all__ = [
    "S2C",
    "ChannelRelay",
    "Close",
    "Command",
    "Forward",
    "Limits",
    "LinkPolicy",
    "Log",
    "RecordData",
    "RecordEvent",
]
