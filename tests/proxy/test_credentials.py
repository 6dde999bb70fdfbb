"""Viewer credentials while the proxy runs: minted tokens per target, the tokens file read
again, spent tokens forgotten, one redemption when many threads try at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from proxy.core.credentials import (
    BIND_WINDOW,
    MAX_MINTED,
    SESSION_GONE,
    Readmission,
    Token,
    TooManyTokens,
    ViewerCredentials,
    token_digest,
)

MAIN, DISPLAY = 1, 2
SESSION = 0x5EED


def open_session(creds: ViewerCredentials, secret: bytes, now: float, scope: str | None) -> bool:
    """A main channel redeems the token, a display channel of its session binds it."""
    main = creds.check(secret, MAIN, 0, now, scope)
    return main.ok and creds.check(secret, DISPLAY, SESSION, now + 1, scope).ok


def test_a_minted_token_opens_one_session_of_its_own_target_only() -> None:
    creds = ViewerCredentials()
    creds.mint(b"lab-token", 100.0, "lab", 0.0)
    # other targets, and routes no minted token opens (the CONNECT front by address)
    for scope in ("vm2", "", None):
        verdict = creds.check(b"lab-token", MAIN, 0, 1.0, scope)
        assert not verdict.ok and verdict.reason == "wrong viewer password or token"
    assert open_session(creds, b"lab-token", 2.0, "lab")
    assert creds.check(b"lab-token", DISPLAY, SESSION, 500.0, "lab").ok  # its channels
    assert creds.check(b"lab-token", MAIN, 0, 3.0, "lab").reason == (
        "token already used by another session"
    )


def test_a_migrating_session_links_its_main_channel_again_with_its_token() -> None:
    """After a live migration spice-gtk links the main channel at the destination with the
    session's connection id, presenting the same token."""
    creds = ViewerCredentials(None, [Token(b"t", expires=10.0)])
    assert open_session(creds, b"t", 0.0, None)
    assert creds.check(b"t", MAIN, SESSION, 500.0, None).reason == "token of this session"
    assert not creds.check(b"t", MAIN, SESSION + 1, 500.0, None).ok  # another session's id
    assert not creds.check(b"t", MAIN, 0, 500.0, None).ok  # a new session


def test_a_migrated_session_may_start_one_session_at_its_destination() -> None:
    """spice-gtk, once moved, links the destination afresh (connection id 0) with the same
    token: the migration's listener readmits that token, once."""
    creds = ViewerCredentials(None, [Token(b"t"), Token(b"other")])
    assert open_session(creds, b"t", 0.0, None)
    assert open_session(creds, b"other", 0.0, None)
    readmit = Readmission(token_digest(b"t"))
    assert not creds.check(b"t", MAIN, 0, 9.0, None).ok  # elsewhere: still used
    assert not creds.check(b"other", MAIN, 0, 9.0, None, readmit).ok  # another token
    verdict = creds.check(b"t", MAIN, 0, 10.0, None, readmit)
    assert verdict.reason == "token of a session that migrated here"
    assert creds.check(b"t", DISPLAY, SESSION + 1, 11.0, None).ok  # the new session binds it
    assert not creds.check(b"t", DISPLAY, SESSION, 11.0, None).ok  # the old one is gone
    assert not creds.check(b"t", MAIN, 0, 12.0, None, readmit).ok  # once


REVOKED = "token revoked: the operator ended its session"


@pytest.mark.parametrize("source", ["file", "minted", "kept"])
def test_the_token_of_a_session_the_operator_ended_admits_nothing_more(source: str) -> None:
    """spice-server takes a main channel linking with an ended session's connection id as
    that session coming back: before revoke() the token let it in, after it nothing."""
    creds = ViewerCredentials(None, [Token(b"t")] if source != "minted" else [])
    if source == "minted":
        creds.mint(b"t", 100.0, "lab", 0.0)
    assert open_session(creds, b"t", 0.0, "lab")
    if source == "kept":  # dropped from the file while its session ran
        creds.load_file([])
    assert creds.check(b"t", MAIN, SESSION, 2.0, "lab").ok  # the way back in, until...
    assert creds.revoke(token_digest(b"t"))
    for channel, conn in ((MAIN, SESSION), (DISPLAY, SESSION), (MAIN, 0)):
        verdict = creds.check(b"t", channel, conn, 3.0, "lab", Readmission(token_digest(b"t")))
        assert (verdict.ok, verdict.reason) == (False, REVOKED), (channel, conn)
    assert not creds.revoke(token_digest(b"never-seen"))


def test_a_token_names_its_user_to_every_channel_it_admits_or_not() -> None:
    creds = ViewerCredentials(b"pw", [Token(b"file-tok", user="bob")])
    creds.mint(b"minted", 100.0, "", 0.0, user="alice")
    assert creds.check(b"minted", MAIN, 0, 1.0, "").user == "alice"
    assert creds.check(b"minted", DISPLAY, SESSION, 2.0, "").user == "alice"
    refused = creds.check(b"minted", MAIN, 0, 3.0, "")  # a second session: who tried
    assert not refused.ok and refused.user == "alice"
    assert creds.check(b"file-tok", MAIN, 0, 1.0, None).user == "bob"
    assert creds.check(b"pw", MAIN, 0, 1.0, None).user is None  # a shared password
    assert creds.check(b"nope", MAIN, 0, 1.0, None).user is None
    creds.load_file([Token(b"file-tok", user="carol")])  # the broker says it again
    assert creds.check(b"file-tok", DISPLAY, 9, 2.0, None).user == "carol"


def test_a_revoked_file_token_stays_revoked_when_the_file_is_read_again() -> None:
    creds = ViewerCredentials(None, [Token(b"t"), Token(b"other")])
    assert open_session(creds, b"t", 0.0, None)
    creds.revoke(token_digest(b"t"))
    creds.load_file([Token(b"t", expires=500.0), Token(b"other")])
    creds.prune(SESSION_GONE * 2, set())  # file tokens are kept while listed
    assert creds.check(b"t", MAIN, SESSION, 1.0, None).reason == REVOKED
    assert creds.check(b"other", MAIN, 0, 1.0, None).ok  # only that token


def test_revoking_reaches_credentials_a_reload_carried_on() -> None:
    old = ViewerCredentials(b"pw", [Token(b"t")])
    assert open_session(old, b"t", 0.0, None)
    new = ViewerCredentials(b"new-pw", [Token(b"t")])
    new.inherit(old)
    assert new.revoke(token_digest(b"t"))
    assert old.check(b"t", DISPLAY, SESSION, 1.0, None).reason == REVOKED  # a link from before


def test_a_minted_token_past_its_deadline_starts_nothing() -> None:
    creds = ViewerCredentials()
    creds.mint(b"late", 10.0, "", 0.0)
    assert creds.check(b"late", MAIN, 0, 10.5, "").reason == "token expired"


def test_file_tokens_open_every_route_and_the_password_still_works() -> None:
    creds = ViewerCredentials(b"pw", [Token(b"file-tok")])
    assert creds.check(b"pw", MAIN, 0, 0.0, "lab").credential == "password"
    assert creds.check(b"file-tok", MAIN, 0, 0.0, None).ok  # even by address


def test_reading_the_file_again_keeps_what_was_used() -> None:
    creds = ViewerCredentials(None, [Token(b"used"), Token(b"unused"), Token(b"gone-used")])
    assert open_session(creds, b"used", 0.0, None)
    assert creds.check(b"gone-used", MAIN, 0, 0.0, None).ok
    assert creds.check(b"gone-used", DISPLAY, 7, 1.0, None).ok  # bound to session 7
    creds.load_file([Token(b"used", expires=50.0), Token(b"new"), Token(b"unused")])
    # still listed, already redeemed: it stays used, whatever the file now says
    assert not creds.check(b"used", MAIN, 0, 2.0, None).ok
    assert creds.check(b"used", DISPLAY, SESSION, 2.0, None).ok
    assert creds.check(b"new", MAIN, 0, 2.0, None).ok
    # dropped from the file: its session's later channels still link, nothing new starts
    assert creds.check(b"gone-used", DISPLAY, 7, 3.0, None).ok
    assert not creds.check(b"gone-used", MAIN, 0, 3.0, None).ok
    # dropped before use: revoked
    creds.load_file([])
    assert creds.check(b"unused", MAIN, 0, 4.0, None).reason == "wrong viewer password or token"
    # listed again after being dropped while redeemed: still the used token, not a new one
    creds.load_file([Token(b"gone-used")])
    assert not creds.check(b"gone-used", MAIN, 0, 5.0, None).ok


def test_a_new_expiry_in_the_file_applies() -> None:
    creds = ViewerCredentials(None, [Token(b"t", expires=10.0)])
    creds.load_file([Token(b"t", expires=100.0)])
    assert creds.check(b"t", MAIN, 0, 50.0, None).ok


def test_spent_tokens_are_forgotten_and_live_sessions_keep_theirs() -> None:
    creds = ViewerCredentials()
    creds.mint(b"expired", 5.0, "", 0.0)
    creds.mint(b"never-bound", 1000.0, "", 0.0)
    creds.mint(b"bound", 1000.0, "", 0.0)
    assert creds.check(b"never-bound", MAIN, 0, 1.0, "").ok
    assert open_session(creds, b"bound", 1.0, "")
    creds.prune(6.0, {SESSION})
    assert creds.counts() == (0, 2)  # the expired one went
    creds.prune(2.0 + BIND_WINDOW + 1, {SESSION})
    assert creds.counts() == (0, 1)  # redeemed, never bound, the window shut
    # the session lives on: its token stays, however long
    later = 2.0 + BIND_WINDOW + 10 * SESSION_GONE
    creds.prune(later, {SESSION})
    assert creds.check(b"bound", DISPLAY, SESSION, later, "").ok
    creds.prune(later + SESSION_GONE / 2, set())
    assert creds.counts() == (0, 1)  # gone a while, not long enough
    creds.prune(later + SESSION_GONE + 1, set())
    assert creds.counts() == (0, 0)


def test_file_tokens_are_never_forgotten_while_listed() -> None:
    """A redeemed file token forgotten would be new again: the file still lists it."""
    creds = ViewerCredentials(None, [Token(b"t")])
    assert open_session(creds, b"t", 0.0, None)
    creds.prune(10 * SESSION_GONE, set())
    assert not creds.check(b"t", MAIN, 0, 10 * SESSION_GONE, None).ok


def test_minting_is_bounded_by_tokens_waiting_to_be_redeemed() -> None:
    creds = ViewerCredentials()
    for i in range(MAX_MINTED):
        creds.mint(f"t{i}".encode(), 10.0, "", 0.0)
    with pytest.raises(TooManyTokens):
        creds.mint(b"one-more", 10.0, "", 0.0)
    creds.mint(b"after-expiry", 100.0, "", 11.0)  # the expired ones made room
    assert creds.counts() == (0, 1)


@pytest.mark.parametrize("secret", [b"", b"x" * 61])
def test_a_token_no_viewer_could_present_is_not_minted(secret: bytes) -> None:
    with pytest.raises(ValueError, match="1 to 60 bytes"):
        ViewerCredentials().mint(secret, 10.0, "", 0.0)


def race(creds: ViewerCredentials, secrets: list[bytes]) -> list[bool]:
    """Each secret presented by a main channel in a thread of its own, all at once."""
    barrier = threading.Barrier(len(secrets))
    wins: list[bool] = []

    def link(secret: bytes) -> None:
        barrier.wait()
        wins.append(creds.check(secret, MAIN, 0, 1.0, "").ok)

    threads = [threading.Thread(target=link, args=(s,)) for s in secrets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return wins


class SlowToken(Token):
    """A token whose state takes a while to read: another thread runs in between."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name == "redeemed_at":
            time.sleep(0.001)  # what was read may be stale by the time it is used
        return value


def test_one_token_presented_by_many_viewers_at_once_opens_one_session() -> None:
    """Channels link in their own threads: the redemption must not be checked, then set,
    by two of them in between."""
    creds = ViewerCredentials(None, [SlowToken(b"t")])
    creds.mint(b"m", 100.0, "", 0.0)
    assert sorted(race(creds, [b"t"] * 8)) == [False] * 7 + [True]
    assert sorted(race(creds, [b"m"] * 8)) == [False] * 7 + [True]


def test_secrets_stay_out_of_reprs() -> None:
    creds = ViewerCredentials(b"pw-secret", [Token(b"file-secret")])
    creds.mint(b"minted-secret", 10.0, "lab", 0.0)
    text = repr(creds) + repr(Token(b"file-secret"))
    assert "secret" not in text.replace("ViewerCredentials", "")
    assert "tokens=1, minted=1" in repr(creds)
