"""Rewrite the link stage of one channel connection: capability masking and auth modes.

Theory of operation. Without a policy the relay forwards bytes as they come. With one, the
link stage is held: each side's bytes are cut into link units, each unit is rewritten if
the policy says so, then delivered to the other side; once a direction's link stage is
over, its remaining bytes are delivered as they are and the relay goes back to its
zero-copy path for that direction.

Two framers parse the two original streams, each with the knowledge of the peer that
sends it: `viewer` parses what the viewer sends (c2s) and is fed what the viewer receives
(the rewritten s2c units); `server` parses what the server sends (s2c) and is fed what the
server receives (the rewritten c2s units). What a peer sends next (an auth mechanism or
not, a ticket or SASL) depends on what it received, so each stream is cut exactly as its
sender produced it.

Rewrites (sizes never change, so link headers stay as they are):
- LinkMess (c2s) and LinkReply (s2c): masked capability bits cleared (capmask.py).
- intercept, inject: the LinkReply's public key becomes spicetap's, and AUTH_SASL is
  cleared from the caps the viewer sees, so the viewer sends a ticket spicetap can read.
- the ticket: intercept decrypts it and encrypts the same password for the server;
  inject checks the viewer's password or token and, when right, sends the real server
  password encrypted for the server; when wrong, spicetap answers PERMISSION_DENIED itself
  and the channel ends without any ticket reaching the server (the server saw only the
  link message and then a close).
Notes tell the recorder what was rewritten (the original bytes of non-secret units) and
how authentication went. Tickets, passwords and keys are never in a note or a reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from dissectors.api import LINK
from proxy.core.capmask import CapMask
from proxy.core.credentials import MAIN, Readmission, ViewerCredentials, token_digest
from proxy.core.framing import (
    C2S,
    CAP_AUTH_SASL,
    LINK_MESS_FIXED,
    LINK_REPLY_FIXED,
    PUB_KEY_OFFSET,
    PUB_KEY_SIZE,
    S2C,
    ChannelError,
    ChannelFramer,
    LinkUnit,
)
from proxy.core.ticket import TicketError, TicketKey, encrypt_ticket

AUTH_MODES = ("pass-through", "intercept", "inject")
U32 = struct.Struct("<I")
PERMISSION_DENIED = 7  # SPICE_LINK_ERR_PERMISSION_DENIED (enums.h)
MECH_SASL = 2  # LinkAuthMechanism value: the bit index of SPICE_COMMON_CAP_AUTH_SASL
RESULT_NAMES = LINK.enum_by_value["link_reply_error"]


@dataclass(frozen=True)
class LinkPolicy:
    """What the proxy does to every channel's link stage (one per proxy run, and one per
    target with its own authentication or minted tokens)."""

    mask: CapMask = field(default_factory=CapMask)
    auth: str = "pass-through"
    key: TicketKey | None = None  # spicetap's key pair: intercept and inject
    viewers: ViewerCredentials | None = None  # inject: who may link
    server_password: bytes | None = field(default=None, repr=False)  # inject
    # inject: the target whose minted tokens open this route ("" the main upstream; None:
    # none do, e.g. the CONNECT front's allow-listed addresses)
    scope: str | None = None
    # inject, at a live migration's destination: the migrated session's token, once
    readmit: Readmission | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth mode {self.auth!r}: expected one of {', '.join(AUTH_MODES)}")
        if self.auth != "pass-through" and self.key is None:
            raise ValueError(f"auth mode {self.auth} needs spicetap's key pair")
        if self.auth == "inject" and (self.viewers is None or self.server_password is None):
            raise ValueError("auth mode inject needs viewer credentials and the server password")

    @property
    def active(self) -> bool:
        """False: nothing to rewrite, the relay keeps its plain forwarding path."""
        return bool(self.mask) or self.auth != "pass-through"

    def describe(self) -> dict[str, Any]:
        return {"auth": self.auth, "mask_caps": list(self.mask.names)}


@dataclass(frozen=True, slots=True)
class Deliver:
    direction: str  # c2s: to the server; s2c: to the viewer
    data: bytes


@dataclass(frozen=True, slots=True)
class Note:
    """Something for the archive: kind "rewrite" (raw = the unit as its sender sent it)
    or "auth" (raw empty)."""

    direction: str
    kind: str
    name: str
    fields: dict[str, Any]
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Refuse:
    """spicetap ended the link itself (after delivering its own link result)."""

    reason: str
    # the viewer's credentials were wrong (or its ticket unreadable): a failed attempt
    # to count against its address (lockout.py); not when the server's key was at fault
    viewer_failed: bool = True


Step = Deliver | Note | Refuse | ChannelError
_LINK_OVER = ("messages", "sasl", "done")


class LinkRewriter:
    def __init__(self, policy: LinkPolicy, max_message: int) -> None:
        self.policy = policy
        self.viewer = ChannelFramer(max_message, bodies=False, link_only=True)
        self.server = ChannelFramer(max_message, bodies=False, link_only=True)
        self.through = {C2S: False, S2C: False}  # that direction's link stage is over
        self.server_key: bytes | None = None  # the server's real public key (DER)
        self.credential: str | None = None  # inject: "password" or "token"
        self.readmission: Readmission | None = None  # inject: a main channel's token
        self.token: bytes | None = None  # inject: the token's digest, to revoke it by
        self.user: str | None = None  # inject: whom the token was given to, if it says
        self.stopped = False
        self._out: list[Step] = []
        self._now = 0.0

    @property
    def finished(self) -> bool:
        return self.through[C2S] and self.through[S2C]

    def pending(self, direction: str) -> int:
        framer = self.viewer if direction == C2S else self.server
        return framer.pending(direction)

    def feed(self, direction: str, data: bytes, now: float) -> list[Step]:
        """Bytes received from the side that sends `direction`; returns what to do."""
        if self.stopped:
            return []
        if self.through[direction]:
            return [Deliver(direction, data)]
        self._out, self._now = [], now
        self._parse(self.viewer if direction == C2S else self.server, direction, data)
        return self._out

    # -- internals -------------------------------------------------------------------------
    def _parse(self, framer: ChannelFramer, direction: str, data: bytes) -> None:
        own = C2S if framer is self.viewer else S2C
        for ev in framer.feed(direction, data):
            if self.stopped:
                return
            if isinstance(ev, ChannelError):
                self._stop(ev)
                return
            if isinstance(ev, LinkUnit) and ev.direction == own:
                self._unit(ev)  # units of the other direction are our own echo
        if not self.stopped and not self.through[own] and framer.state[own] in _LINK_OVER:
            self.through[own] = True
            rest = bytes(framer.buf[own])
            framer.buf[own].clear()
            if rest:
                self._deliver(own, rest)

    def _stop(self, step: Step) -> None:
        self._out.append(step)
        self.stopped = True

    def _deliver(self, direction: str, data: bytes) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, Deliver) and last.direction == direction:
            self._out[-1] = Deliver(direction, last.data + data)  # one send, not several
        else:
            self._out.append(Deliver(direction, data))
        # Each framer learns what its peer received, as long as that can still change
        # what the peer sends next (its own link stage is not over).
        if direction == C2S and not self.through[S2C]:
            self._parse(self.server, C2S, data)
        elif direction == S2C and not self.through[C2S]:
            self._parse(self.viewer, S2C, data)

    def _unit(self, unit: LinkUnit) -> None:
        kind, data = unit.kind, unit.data
        note: Note | None = None
        if kind == "link_mess":
            data, note = self._link_mess(data)
        elif kind == "link_reply":
            data, note = self._link_reply(data)
        elif kind == "auth_mechanism" and self.policy.auth != "pass-through":
            (mech,) = U32.unpack(data)
            if mech == MECH_SASL:  # we cleared AUTH_SASL: a viewer insisting is refused
                self._deny("viewer chose SASL, which spicetap cannot check or pass on")
                return
        elif kind == "ticket" and self.policy.auth != "pass-through":
            ticket = self._ticket(data)
            if ticket is None:
                return
            data = ticket
        self._deliver(unit.direction, data)
        if note is not None:  # after the unit, as the archive reads best
            self._out.append(note)
        if kind == "link_result" and self.policy.auth != "pass-through":
            (code,) = U32.unpack(data)
            fields = {"mode": self.policy.auth, "result": RESULT_NAMES.get(code, code)}
            if self.credential is not None:
                fields["credential"] = self.credential
            if self.user is not None:
                fields["user"] = self.user
            self._out.append(Note(S2C, "auth", self.policy.auth, {**fields, "by": "server"}))

    def _link_mess(self, data: bytes) -> tuple[bytes, Note | None]:
        if not self.policy.mask:
            return data, None
        try:
            _conn, ctype, _cid, n_common, n_channel, offset = LINK_MESS_FIXED.unpack_from(data)
            buf = bytearray(data)
            cleared = self.policy.mask.clear(buf, offset, n_common, n_channel, ctype)
        except struct.error:
            return data, None  # malformed: the framer reports it right after this unit
        if not cleared:
            return data, None
        return bytes(buf), Note(C2S, "rewrite", "link_mess", {"cleared": cleared}, data)

    def _link_reply(self, data: bytes) -> tuple[bytes, Note | None]:
        try:
            error, key, n_common, n_channel, offset = LINK_REPLY_FIXED.unpack_from(data)
        except struct.error:
            return data, None
        if error != 0:  # a refused link carries no usable key or caps: pass it on
            return data, None
        buf = bytearray(data)
        fields: dict[str, Any] = {}
        try:
            cleared = self.policy.mask.clear(
                buf, offset, n_common, n_channel, self.viewer.channel_type or 0
            )
            if self.policy.key is not None:
                self.server_key = key
                buf[PUB_KEY_OFFSET : PUB_KEY_OFFSET + PUB_KEY_SIZE] = self.policy.key.public_der
                fields["pub_key"] = "replaced by spicetap's"
                if n_common:  # word 0 of the common caps holds AUTH_SASL
                    (word,) = U32.unpack_from(buf, offset)
                    if word >> CAP_AUTH_SASL & 1:
                        U32.pack_into(buf, offset, word & ~(1 << CAP_AUTH_SASL))
                        cleared.append("common:auth_sasl")
        except struct.error:
            return data, None
        if cleared:
            fields["cleared"] = cleared
        if not fields:
            return data, None
        return bytes(buf), Note(S2C, "rewrite", "link_reply", fields, data)

    def _ticket(self, ticket: bytes) -> bytes | None:
        """The ticket to send upstream, or None after refusing the viewer."""
        key, server_key = self.policy.key, self.server_key
        assert key is not None  # LinkPolicy checks it for these modes
        if server_key is None:
            self._deny("no public key from the server to encrypt for", viewer_failed=False)
            return None
        try:
            password = key.decrypt(ticket)
        except TicketError as exc:
            self._deny(str(exc))
            return None
        if self.policy.auth == "inject":
            viewers, real = self.policy.viewers, self.policy.server_password
            assert viewers is not None and real is not None
            verdict = viewers.check(
                password,
                self.viewer.channel_type or 0,
                self.viewer.connection_id,
                self._now,
                self.policy.scope,
                self.policy.readmit,
            )
            self.user = verdict.user
            if not verdict.ok:
                self._deny(verdict.reason)
                return None
            if verdict.credential == "token":
                self.token = token_digest(password)
                if self.viewer.channel_type == MAIN:
                    # should this session migrate, its token may open one at the destination
                    self.readmission = Readmission(self.token)
            self.credential, password = verdict.credential, real
        try:
            return encrypt_ticket(server_key, password)
        except TicketError as exc:  # the server's key cannot take it
            self._deny(str(exc), viewer_failed=False)
            return None

    def _deny(self, reason: str, *, viewer_failed: bool = True) -> None:
        """Answer the viewer PERMISSION_DENIED ourselves; nothing goes upstream."""
        self._out.append(Deliver(S2C, U32.pack(PERMISSION_DENIED)))
        fields = {"mode": self.policy.auth, "result": "PERMISSION_DENIED", "by": "spicetap"}
        if self.user is not None:  # a token that names its user, refused
            fields["user"] = self.user
        self._out.append(Note(S2C, "auth", self.policy.auth, {**fields, "reason": reason}))
        self._stop(Refuse(f"viewer authentication refused by spicetap: {reason}", viewer_failed))


__all__ = ["AUTH_MODES", "Deliver", "LinkPolicy", "LinkRewriter", "Note", "Refuse", "Step"]
