"""Who may link in inject mode: a viewer password and/or tokens, compared in constant time.

SPICE sends the same ticket on every channel of a session (main first, then display,
inputs, ... each linking with the session's connection id), so a "one-time" token is one
session, not one link: a main-channel link (a new session) redeems it, at most once; the
first other channel linking within BIND_WINDOW seconds binds it to its connection id, and
from then on only links with that id may present it. An expired token starts no new
session; channels of a session it already opened still link.

Tokens come from two places, both live while the proxy runs: the tokens file, read again
whenever it changes (load_file), and the management API, which mints one-time tokens for
one target each (mint). A file token works on every route these credentials serve; a
minted one only on its target's (the `scope` a route's LinkPolicy carries). A token gone
from the file starts no new session; one already redeemed stays, so that its session's
later channels still link and the file cannot make it new again. prune() forgets tokens
that can no longer admit anything: minted ones past their deadline, redeemed ones whose
session has been gone for SESSION_GONE seconds. When the operator ends a session (the
management API), revoke() makes its token admit nothing more: spice-server takes a main
channel that links with an old session's connection id as that session coming back, so
without it the ended viewer could link again with the token it still holds.

Channels link in several threads at once, so every call takes the credentials' lock:
two viewers presenting one token together must not both redeem it.

Time comes in as an argument (monotonic seconds); nothing here reads a clock or a file.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from proxy.core.ticket import MAX_PASSWORD

MAIN = 1  # SPICE_CHANNEL_MAIN
BIND_WINDOW = 60.0
# a redeemed token is forgotten once no channel of its session has been seen this long
# (the shell reports live sessions every few seconds; a session may briefly have only its
# main channel, whose link carries no connection id)
SESSION_GONE = 300.0
MAX_MINTED = 10_000  # minted tokens not yet redeemed, per credentials: the API's bound


@dataclass
class Token:
    secret: bytes = field(repr=False)
    expires: float | None = None  # monotonic deadline
    redeemed_at: float | None = None
    session: int | None = None  # the connection id it is bound to
    scope: str | None = None  # minted: the only routes it opens ("" the main upstream)
    seen_live: float | None = None  # when its session last had a channel open
    revoked: bool = False  # the operator ended its session: it admits nothing more
    user: str | None = None  # whom the broker gave it to: sessions it opens say so


class Verdict(NamedTuple):
    ok: bool
    credential: str | None  # "password" | "token": which kind matched, never which one
    reason: str
    user: str | None = None  # the token's user, when it names one


@dataclass
class Readmission:
    """One new session at a live migration's destination for the token of the session that
    migrated: spice-gtk, once moved, links there afresh (connection id 0) with the same
    token. The migration's listener carries it in its policy; the first such main channel
    uses it up."""

    digest: bytes = field(repr=False)
    used: bool = False


class TooManyTokens(Exception):
    """mint() refused: MAX_MINTED tokens wait to be redeemed."""


def token_digest(secret: bytes) -> bytes:
    """What a channel keeps of the token it linked with, to revoke it by (revoke())."""
    # Tokens are looked up by digest: comparing fixed-size digests says nothing about
    # lengths, and a dict lookup's timing depends on a SHA-256 of what was presented, not on
    # how much of a secret it shares.
    return hashlib.sha256(secret).digest()


class ViewerCredentials:
    def __init__(
        self,
        password: bytes | None = None,
        tokens: Iterable[Token] | None = None,
        tokens_file: str | None = None,
    ) -> None:
        self._password = token_digest(password) if password is not None else None
        self.tokens_file = tokens_file  # where the shell reads file tokens from, if anywhere
        self._lock = threading.Lock()
        self._file: dict[bytes, Token] = {}
        self._kept: dict[bytes, Token] = {}  # redeemed, no longer in the file
        self._minted: dict[bytes, Token] = {}
        self._load(tokens or ())

    def __repr__(self) -> str:
        has_password = self._password is not None
        counts = f"tokens={len(self._file)}, minted={len(self._minted)}"
        return f"ViewerCredentials(password={has_password}, {counts})"

    def counts(self) -> tuple[int, int]:
        """Tokens from the file, and minted ones held (redeemed or not)."""
        with self._lock:
            return len(self._file), len(self._minted)

    def check(
        self,
        presented: bytes,
        channel_type: int,
        connection_id: int,
        now: float,
        scope: str | None = None,
        readmit: Readmission | None = None,
    ) -> Verdict:
        """`scope`: the route's target ("" the main upstream, None a route no minted token
        opens, e.g. the CONNECT front by address); `readmit`: at a migration's destination,
        the migrated session's token may start one session there."""
        given = token_digest(presented)
        if self._password is not None and hmac.compare_digest(given, self._password):
            return Verdict(True, "password", "viewer password")
        with self._lock:
            token = self._file.get(given) or self._kept.get(given)
            minted = self._minted.get(given)
            in_scope = minted is not None and scope is not None and minted.scope == scope
            if token is None and in_scope:
                token = minted
            if token is None:
                return Verdict(False, None, "wrong viewer password or token")
            if token.revoked:
                reason = "token revoked: the operator ended its session"
                return Verdict(False, "token", reason, token.user)
            if (
                readmit is not None
                and not readmit.used
                and readmit.digest == given
                and channel_type == MAIN
                and connection_id == 0
                and token.redeemed_at is not None
            ):
                readmit.used = True
                token.redeemed_at, token.session, token.seen_live = now, None, now
                return Verdict(True, "token", "token of a session that migrated here", token.user)
            return self._use(token, channel_type, connection_id, now)._replace(user=token.user)

    @staticmethod
    def _use(token: Token, channel_type: int, connection_id: int, now: float) -> Verdict:
        # A main channel links with connection id 0 to start a session; with the session's
        # id when the session moves to another host (a live migration: spice-gtk links every
        # channel there again, main first): that is the session's own viewer.
        if channel_type == MAIN and not (connection_id and token.session == connection_id):
            if token.redeemed_at is not None:
                return Verdict(False, "token", "token already used by another session")
            if token.expires is not None and now > token.expires:
                return Verdict(False, "token", "token expired")
            token.redeemed_at = now
            return Verdict(True, "token", "token redeemed by a new session")
        if token.session == connection_id and token.session is not None:
            token.seen_live = now
            return Verdict(True, "token", "token of this session")
        redeemed = token.redeemed_at
        if token.session is None and redeemed is not None and now - redeemed <= BIND_WINDOW:
            token.session = connection_id
            token.seen_live = now
            return Verdict(True, "token", "token bound to this session")
        return Verdict(False, "token", "token belongs to another session")

    def mint(
        self, secret: bytes, expires: float, scope: str, now: float, user: str | None = None
    ) -> None:
        """A one-time token for the routes of `scope`, redeemable until `expires`; the
        sessions it opens are `user`'s, if named."""
        if not 0 < len(secret) <= MAX_PASSWORD:
            raise ValueError(f"a token has 1 to {MAX_PASSWORD} bytes")
        digest = token_digest(secret)
        with self._lock:
            if len(self._minted) >= MAX_MINTED:  # room for more, if any expired
                self._prune(now, None)
                waiting = sum(t.redeemed_at is None for t in self._minted.values())
                if waiting >= MAX_MINTED:
                    raise TooManyTokens(f"{waiting} minted tokens wait to be redeemed")
            if digest in self._minted or digest in self._file or digest in self._kept:
                raise ValueError("that token is already known")  # a random one never is
            self._minted[digest] = Token(secret, expires, scope=scope, user=user)

    def revoke(self, digest: bytes) -> bool:
        """The token with this digest (token_digest) admits no channel from now on, not
        even of its own session: the operator ended that session. False if unknown here.
        A revoked token is kept as long as a redeemed one would be (prune), a file token
        as long as the file lists it: rereading the file cannot make it new again."""
        with self._lock:
            found = [token for table in self._tables() if (token := table.get(digest))]
            for token in found:
                token.revoked = True
        return bool(found)

    def _tables(self) -> tuple[dict[bytes, Token], ...]:
        return (self._file, self._kept, self._minted)

    def inherit(self, old: ViewerCredentials) -> None:
        """A reload made these credentials (a new password, tokens file or server password)
        for the same owner as `old` (the proxy, or one target): carry on from it. Both
        then share one lock and the same minted and redeemed tokens, so that a link still
        checked against `old` (accepted before the reload) and one checked here cannot both
        redeem a token; a token the file still lists keeps its state."""
        with old._lock:
            listed = list(self._file.values())
            self._lock = old._lock
            self._minted, self._kept = old._minted, old._kept
            self._file = dict(old._file)
            self._load(listed)

    def take_minted(self, scope: str, other: ViewerCredentials) -> None:
        """Tokens minted for `scope` in `other` are checked here from now on (a reload gave
        that target credentials of its own, or took them away)."""
        if other._lock is self._lock:
            return  # one lineage: the tokens are already shared
        with other._lock:
            moving = {d: t for d, t in other._minted.items() if t.scope == scope}
            for digest in moving:
                del other._minted[digest]
        with self._lock:
            self._minted.update(moving)

    def load_file(self, tokens: Iterable[Token]) -> None:
        """The tokens file as it now reads. A token it still lists keeps its state (a
        redeemed one stays used) and takes its new expiry; a dropped one starts no new
        session, and if redeemed is kept for its session's channels."""
        with self._lock:
            self._load(tokens)

    def _load(self, tokens: Iterable[Token]) -> None:
        fresh: dict[bytes, Token] = {}
        for token in tokens:
            digest = token_digest(token.secret)
            known = self._file.get(digest) or self._kept.pop(digest, None)
            if known is not None:
                known.expires, known.user = token.expires, token.user
                token = known
            fresh[digest] = token
        for digest, token in self._file.items():
            if digest not in fresh and token.redeemed_at is not None:
                self._kept[digest] = token
        self._file = fresh

    def prune(self, now: float, live_sessions: set[int]) -> None:
        """Forget what can no longer admit anyone. `live_sessions`: the connection ids of
        the channels open now."""
        with self._lock:
            self._prune(now, live_sessions)

    def _prune(self, now: float, live: set[int] | None) -> None:
        """live None (between the shell's reports): only unredeemed tokens past their
        deadline go, the rest needs to know which sessions are open."""
        for table in self._tables():
            for digest, token in list(table.items()):
                if live is not None and token.session in live:
                    token.seen_live = now
                if table is self._file or (live is None and token.redeemed_at is not None):
                    continue
                if _spent(token, now):
                    del table[digest]


def _spent(token: Token, now: float) -> bool:
    """Whether the token can admit no channel any more."""
    if token.redeemed_at is None:  # it could still start a session, until it expires
        return token.expires is not None and now > token.expires
    if token.session is None:  # redeemed, never bound: only within the bind window
        return now - token.redeemed_at > BIND_WINDOW
    last = token.seen_live if token.seen_live is not None else token.redeemed_at
    return now - last > SESSION_GONE


def parse_tokens(text: str, wall_now: float, mono_now: float) -> list[Token]:
    """Lines `TOKEN [EXPIRY] [user=NAME]` (EXPIRY: ISO 8601 with a time zone, or Unix
    seconds; NAME: whom a broker gave the token to, said by the sessions it opens); `#`
    starts a comment. Expiry is turned into a monotonic deadline. Errors name the line,
    never the token."""
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        user = None
        if len(parts) > 1 and parts[-1].startswith(USER_PREFIX):
            user = parts.pop()[len(USER_PREFIX) :]
            problem = user_problem(user)
            if problem is not None:
                raise ValueError(f"line {number}: {problem}")
        if len(parts) > 2:
            raise ValueError(f"line {number}: expected TOKEN [EXPIRY] [user=NAME]")
        secret = parts[0].encode()
        if len(secret) > MAX_PASSWORD:  # a viewer could never present it
            raise ValueError(f"line {number}: a token is at most {MAX_PASSWORD} bytes")
        expires = None
        if len(parts) == 2:
            expires = mono_now + _wall_time(parts[1], number) - wall_now
        tokens.append(Token(secret, expires, user=user))
    return tokens


USER_PREFIX = "user="
MAX_USER = 128  # characters: a name or an id a broker knows its users by


def user_problem(user: str) -> str | None:
    """Why `user` cannot name a token's user (it goes to logs, archives and the API), or
    None."""
    if not user:
        return "a user name is not empty"
    if len(user) > MAX_USER:
        return f"a user name is at most {MAX_USER} characters"
    if not user.isprintable():  # no line breaks or control characters in a log line
        return "a user name has printable characters only"
    return None


def _wall_time(text: str, number: int) -> float:
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:  # NaN compares false with every time: such a token would never expire
        if not math.isfinite(seconds) or not 0 <= seconds < 1e11:
            raise ValueError(f"line {number}: expiry {text!r} is not a Unix time")
        return seconds
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"line {number}: expiry {text!r} is not ISO 8601 or Unix time") from None
    if when.tzinfo is None:
        raise ValueError(f"line {number}: expiry {text!r} needs a time zone (e.g. Z)")
    return when.timestamp()
