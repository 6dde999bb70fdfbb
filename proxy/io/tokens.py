"""Viewer tokens while the proxy runs (inject mode): minted ones, and the files kept live.

A VDI broker hands each user a one-time token when the user opens a console, the way oVirt
sets a short-lived ticket on the VM; restarting the proxy for each new token would drop
every session. So the management API mints tokens (`POST /api/tokens`, through mint()),
and each viewer tokens file is read again when it changes (keep_current(), which also
tells the credentials which sessions are live, so that spent tokens are forgotten).

The rules (one session per token, expiry, which routes a token opens) are the core's:
proxy/core/credentials.py. Here: clocks, files, randomness and the trio task.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.core.credentials import MAIN, TooManyTokens, ViewerCredentials
from proxy.core.linkrewrite import LinkPolicy
from proxy.io.server import ProxyState
from proxy.linksetup import read_tokens
from spicetap.errors import UserError

log = logging.getLogger("spicetap.proxy")

# How often the tokens files are looked at (a stat each): a token written to a file works
# within this long. Spent tokens are looked for less often (a pass over all of them).
POLL = 0.5
PRUNE_EVERY = 5.0
TOKEN_BYTES = 24  # 192 random bits, 32 characters of URL-safe base64 (SPICE allows 60)


class MintError(Exception):
    """Why no token was minted: `kind` is "unknown" (no such target), "not_inject" (the
    target does not inject credentials) or "full" (too many wait to be redeemed)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Minted:
    token: str
    scope: str
    expires: float  # wall-clock (Unix) time
    ttl: float

    def __repr__(self) -> str:  # never the token
        return f"Minted(scope={self.scope!r}, ttl={self.ttl})"


@dataclass
class _WatchedFile:
    path: str
    credentials: list[ViewerCredentials]
    # what stat said when last read; None at first, so that the first look reads it (it
    # may have changed since the CLI read it)
    seen: tuple[int, ...] | None = None
    problem: str | None = None  # the last error logged, so it is said once per change


class TokenDesk:
    """The proxy's inject routes by scope: "" the main upstream (--upstream, [proxy]), or
    a target's name. `scopes` holds every route policy, inject or not (a target that does
    not inject is named in the errors), `base` the proxy's own (the CONNECT front's
    allow-listed addresses use it)."""

    def __init__(self, scopes: dict[str, LinkPolicy], base: LinkPolicy | None) -> None:
        self._files: dict[str, _WatchedFile] = {}
        self.reconfigure(scopes, base)

    def reconfigure(self, scopes: dict[str, LinkPolicy], base: LinkPolicy | None) -> None:
        """The routes as a reload left them. A file watched before and still named is not
        read again until it changes (the reload read it)."""
        self.scopes = scopes
        self._credentials = _distinct(p.viewers for p in [*scopes.values(), base] if p)
        files: dict[str, _WatchedFile] = {}
        for creds in self._credentials:
            path = creds.tokens_file
            if path is None:
                continue
            before = self._files.get(path)
            seen = before.seen if before is not None else None
            watched = files.setdefault(path, _WatchedFile(path, [], seen))
            watched.credentials.append(creds)
        self._files = files

    @property
    def active(self) -> bool:
        """Whether keep_current has anything to do."""
        return bool(self._credentials)

    def mint(self, target: str | None, ttl: float, user: str | None = None) -> Minted:
        scope = target or ""
        policy = self.scopes.get(scope)
        what = f"target {target!r}" if target else "the main upstream"
        if policy is None:
            names = sorted(n for n in self.scopes if n)
            known = f"; targets: {', '.join(names)}" if names else ""
            if target:
                raise MintError("unknown", f"no target {target!r}{known}")
            raise MintError("unknown", f"no main upstream (name a target){known}")
        if policy.auth != "inject" or policy.viewers is None:
            raise MintError(
                "not_inject", f"{what} does not inject credentials (auth {policy.auth})"
            )
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = time.monotonic()
        try:
            policy.viewers.mint(token.encode(), now + ttl, scope, now, user)
        except TooManyTokens as exc:
            raise MintError("full", str(exc)) from None
        expires = time.time() + ttl
        whose = f" (user {user})" if user is not None else ""
        log.info("token minted for %s%s, good for %g s to start one session", what, whose, ttl)
        return Minted(token, scope, expires, ttl)

    def revoke(self, digests: Iterable[bytes]) -> int:
        """The tokens these channels linked with (their relays' `token`) admit nothing
        more: how many were found."""
        found = set()
        for digest in set(digests):
            for creds in self._credentials:  # a file's token is in each route that reads it
                if creds.revoke(digest):
                    found.add(digest)
        return len(found)

    async def keep_current(self, state: ProxyState) -> None:
        """Until cancelled: read changed tokens files, and let the credentials forget spent
        tokens."""
        pruned = time.monotonic()
        while True:
            for watched in list(self._files.values()):  # a reload may replace them
                await trio.to_thread.run_sync(self._reread_if_changed, watched)
            now = time.monotonic()
            if now - pruned >= PRUNE_EVERY:
                pruned = now
                live = live_sessions(state)
                for creds in list(self._credentials):
                    creds.prune(now, live)
            await trio.sleep(POLL)

    def reread_all(self) -> None:
        """Every tokens file now, changed or not (blocking: not on the trio thread)."""
        for watched in list(self._files.values()):
            watched.seen = None
            self._reread_if_changed(watched)

    @staticmethod
    def _reread_if_changed(watched: _WatchedFile) -> None:
        seen = _stat(watched.path)
        if seen == watched.seen and seen is not None:
            return
        watched.seen = seen
        try:
            tokens = read_tokens(watched.path)
        except UserError as exc:
            problem = str(exc)
            if problem != watched.problem:
                log.warning("%s; the tokens read before stay in force", problem)
            watched.problem = problem
            return
        watched.problem = None
        for creds in watched.credentials:
            creds.load_file(tokens)
        log.info("viewer tokens file %s read: %d token(s)", watched.path, len(tokens))


def live_sessions(state: ProxyState) -> set[int]:
    """The connection ids of the channels open now (a main channel links with 0)."""
    ids = set()
    for stats in list(state.channels.values()):  # one C-level copy: safe across threads
        guard = stats.relay.guard
        if guard.channel_type is not None and guard.channel_type != MAIN:
            ids.add(guard.connection_id)
    return ids


def _stat(path: str) -> tuple[int, ...] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    # a rewrite in place keeps the inode, a rename-over changes it; size and the times catch
    # an edit within one mtime tick
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _distinct(items: Iterable[ViewerCredentials | None]) -> list[ViewerCredentials]:
    seen: dict[int, ViewerCredentials] = {}
    for creds in items:
        if creds is not None:
            seen.setdefault(id(creds), creds)
    return list(seen.values())
