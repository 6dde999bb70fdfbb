"""Who may link in inject mode: a viewer password and/or tokens, compared in constant time.

SPICE sends the same ticket on every channel of a session (main first, then display,
inputs, ... each linking with the session's connection id), so a "one-time" token is one
session, not one link: a main-channel link (a new session) redeems it, at most once; the
first other channel linking within BIND_WINDOW seconds binds it to its connection id, and
from then on only links with that id may present it. An expired token starts no new
session; channels of a session it already opened still link.

Time comes in as an argument (monotonic seconds); nothing here reads a clock or a file.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from proxy.core.ticket import MAX_PASSWORD

MAIN = 1  # SPICE_CHANNEL_MAIN
BIND_WINDOW = 60.0


@dataclass
class Token:
    secret: bytes = field(repr=False)
    expires: float | None = None  # monotonic deadline
    redeemed_at: float | None = None
    session: int | None = None  # the connection id it is bound to


class Verdict(NamedTuple):
    ok: bool
    credential: str | None  # "password" | "token": which kind matched, never which one
    reason: str


def _digest(secret: bytes) -> bytes:
    # compare fixed-size digests: the comparison time says nothing about lengths either
    return hashlib.sha256(secret).digest()


class ViewerCredentials:
    def __init__(self, password: bytes | None = None, tokens: list[Token] | None = None) -> None:
        self._password = _digest(password) if password is not None else None
        self.tokens = tokens or []
        self._token_digests = [_digest(t.secret) for t in self.tokens]

    def __repr__(self) -> str:
        has_password = self._password is not None
        return f"ViewerCredentials(password={has_password}, tokens={len(self.tokens)})"

    def check(self, presented: bytes, channel_type: int, connection_id: int, now: float) -> Verdict:
        given = _digest(presented)
        password_ok = self._password is not None and hmac.compare_digest(given, self._password)
        token: Token | None = None
        for candidate, digest in zip(self.tokens, self._token_digests, strict=True):
            if hmac.compare_digest(given, digest):  # every candidate is compared
                token = candidate
        if password_ok:
            return Verdict(True, "password", "viewer password")
        if token is None:
            return Verdict(False, None, "wrong viewer password or token")
        return self._use(token, channel_type, connection_id, now)

    @staticmethod
    def _use(token: Token, channel_type: int, connection_id: int, now: float) -> Verdict:
        if channel_type == MAIN:
            if token.redeemed_at is not None:
                return Verdict(False, "token", "token already used by another session")
            if token.expires is not None and now > token.expires:
                return Verdict(False, "token", "token expired")
            token.redeemed_at = now
            return Verdict(True, "token", "token redeemed by a new session")
        if token.session == connection_id and token.session is not None:
            return Verdict(True, "token", "token of this session")
        redeemed = token.redeemed_at
        if token.session is None and redeemed is not None and now - redeemed <= BIND_WINDOW:
            token.session = connection_id
            return Verdict(True, "token", "token bound to this session")
        return Verdict(False, "token", "token belongs to another session")


def parse_tokens(text: str, wall_now: float, mono_now: float) -> list[Token]:
    """Lines `TOKEN [EXPIRY]` (EXPIRY: ISO 8601 with a time zone, or Unix seconds); `#`
    starts a comment. Expiry is turned into a monotonic deadline. Errors name the line,
    never the token."""
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2:
            raise ValueError(f"line {number}: expected TOKEN [EXPIRY]")
        secret = parts[0].encode()
        if len(secret) > MAX_PASSWORD:  # a viewer could never present it
            raise ValueError(f"line {number}: a token is at most {MAX_PASSWORD} bytes")
        expires = None
        if len(parts) == 2:
            expires = mono_now + _wall_time(parts[1], number) - wall_now
        tokens.append(Token(secret, expires))
    return tokens


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
