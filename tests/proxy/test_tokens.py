"""Viewer tokens while the proxy runs: the management API mints them per target, tokens
files are read again when they change (the shell: proxy/io/tokens.py)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.core.credentials import Token, ViewerCredentials, token_digest
from proxy.core.linkrewrite import LinkPolicy
from proxy.core.management import HttpError, parse_mint, route
from proxy.core.ticket import TicketKey
from proxy.io.management import ManagementApi, ManagementOptions
from proxy.io.server import ProxyState
from proxy.io.tokens import MintError, TokenDesk
from proxy.linksetup import scoped
from tests.proxy.test_management import TOKEN, exchange, request

MAIN, DISPLAY = 1, 2
KEY = TicketKey.generate()
BEARER = f"Authorization: Bearer {TOKEN}\r\n"


def inject(viewers: ViewerCredentials) -> LinkPolicy:
    return LinkPolicy(auth="inject", key=KEY, viewers=viewers, server_password=b"real")


def gateway(tokens_file: Path | None = None) -> tuple[TokenDesk, ViewerCredentials]:
    """The main upstream and target "lab" share the proxy's credentials; "plain" passes
    tickets through; "own" has credentials of its own."""
    shared = ViewerCredentials(None, [], str(tokens_file) if tokens_file else None)
    base = inject(shared)
    scopes = {
        "": scoped(base, ""),
        "lab": scoped(base, "lab"),
        "plain": LinkPolicy(),
        "own": scoped(inject(ViewerCredentials(b"own-pw")), "own"),
    }
    return TokenDesk(scopes, base), shared


def opens(policy: LinkPolicy, token: str) -> bool:
    assert policy.viewers is not None
    return policy.viewers.check(token.encode(), MAIN, 0, time.monotonic(), policy.scope).ok


def test_a_minted_token_opens_its_target_once() -> None:
    desk, _shared = gateway()
    minted = desk.mint("lab", 60.0)
    assert len(minted.token) == 32 and minted.scope == "lab"
    assert abs(minted.expires - (time.time() + 60.0)) < 5
    assert minted.token not in repr(minted)
    assert not opens(desk.scopes[""], minted.token)  # same credentials, another route
    assert opens(desk.scopes["lab"], minted.token)
    assert not opens(desk.scopes["lab"], minted.token)  # one session
    main = desk.mint(None, 60.0)
    assert main.scope == "" and opens(desk.scopes[""], main.token)
    own = desk.mint("own", 60.0)
    assert opens(desk.scopes["own"], own.token) and not opens(desk.scopes["lab"], own.token)


def test_revoking_a_sessions_token_reaches_every_route_it_opens(tmp_path: Path) -> None:
    """A file token is checked by every route whose credentials read that file (here the
    shared ones and a target's own): revoked in all of them, counted once."""
    tokens = tmp_path / "tokens"
    tokens.write_text("file-tok\n")
    desk, shared = gateway(tokens)
    own = desk.scopes["own"].viewers
    assert own is not None
    own.tokens_file = str(tokens)
    desk.reconfigure(desk.scopes, inject(shared))
    desk.reread_all()
    minted = desk.mint("lab", 60.0)
    assert opens(desk.scopes["lab"], minted.token) and opens(desk.scopes[""], "file-tok")
    digests = [token_digest(t.encode()) for t in (minted.token, "file-tok", "file-tok", "x")]
    assert desk.revoke(digests) == 2
    for scope, token in (("lab", minted.token), ("", "file-tok"), ("own", "file-tok")):
        policy = desk.scopes[scope]
        assert policy.viewers is not None
        verdict = policy.viewers.check(token.encode(), MAIN, 7, time.monotonic(), scope)
        assert verdict.reason == "token revoked: the operator ended its session", scope


def test_minting_for_what_cannot_take_a_token_says_why() -> None:
    desk, _ = gateway()
    with pytest.raises(MintError, match="no target 'nope'; targets: lab, own, plain") as unknown:
        desk.mint("nope", 60.0)
    with pytest.raises(MintError, match=r"target 'plain' does not inject .*pass-through") as no:
        desk.mint("plain", 60.0)
    assert (unknown.value.kind, no.value.kind) == ("unknown", "not_inject")
    only_targets = TokenDesk({"lab": gateway()[0].scopes["lab"]}, None)
    with pytest.raises(MintError, match=r"no main upstream \(name a target\); targets: lab"):
        only_targets.mint(None, 60.0)


def test_a_changed_tokens_file_is_read_again(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "tokens"
    path.write_text("first-token\n")
    desk, shared = gateway(path)
    desk.reread_all()
    assert opens(desk.scopes[""], "first-token")
    path.write_text("second-token 2000-01-01T00:00:00Z\nthird-token\n")
    desk.reread_all()
    assert shared.counts() == (2, 0)
    assert not opens(desk.scopes["lab"], "second-token")  # listed, but expired
    assert opens(desk.scopes["lab"], "third-token")
    # a broken file keeps the tokens read before, and says so once, naming the line
    path.write_text("fourth-token\nbad-token not-a-time\n")
    desk.reread_all()
    desk.reread_all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "line 2" in warnings[0] and str(path) in warnings[0]
    assert "bad-token" not in caplog.text and "fourth-token" not in caplog.text
    assert not opens(desk.scopes[""], "fourth-token")
    path.unlink()
    desk.reread_all()
    assert "cannot read" in caplog.records[-1].getMessage()
    assert shared.counts() == (2, 0)


async def test_the_proxy_reads_a_changed_file_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("")
    desk, _ = gateway(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(desk.keep_current, ProxyState())
        await trio.sleep(0.1)
        path.write_text("late-token\n")
        for _ in range(40):  # bounded: 2 s
            if opens(desk.scopes[""], "late-token"):
                break
            await trio.sleep(0.05)
        else:
            pytest.fail("the new token never worked")
        nursery.cancel_scope.cancel()


# -- POST /api/tokens --------------------------------------------------------------------------
def test_token_requests() -> None:
    assert route("POST", "/api/tokens") == "/api/tokens"
    assert parse_mint(b"") == parse_mint(b"{}")
    assert parse_mint(b'{"target": "lab", "ttl": 30}').target == "lab"
    assert parse_mint(b'{"user": "Alice Smith"}').user == "Alice Smith"
    for body, says in [
        (b"[]", "JSON object"),
        (b'{"target": 5}', '"target"'),
        (b'{"target": ""}', '"target"'),
        (b'{"ttl": 0}', '"ttl"'),
        (b'{"ttl": true}', '"ttl"'),
        (b'{"ttl": 1e9}', '"ttl"'),
        (b'{"ttl": NaN}', '"ttl"'),
        (b'{"tll": 5}', "unknown key 'tll'"),
        (b'{"user": ""}', '"user": a user name is not empty'),
        (b'{"user": 7}', '"user": a user name is a string'),
        (b'{"user": "a\\nb"}', '"user": a user name has printable characters only'),
        (b'{"user": "' + b"x" * 129 + b'"}', '"user": a user name is at most 128'),
    ]:
        with pytest.raises(HttpError, match=says) as exc:
            parse_mint(body)
        assert exc.value.status == 400


def api(desk: TokenDesk | None, token: bool = True) -> ManagementApi:
    options = ManagementOptions(("127.0.0.1", 0), token=TOKEN.encode() if token else None)
    return ManagementApi(options, ProxyState(), None, desk)


async def test_minting_over_http() -> None:
    desk, _ = gateway()
    body = json.dumps({"target": "lab", "ttl": 90, "user": "alice@corp"}).encode()
    status, headers, reply = await exchange(api(desk), request("POST", "/api/tokens", body, BEARER))
    assert status == 201 and headers["cache-control"] == "no-store"
    data = json.loads(reply)
    assert set(data) == {"token", "target", "expires", "ttl", "user"}
    assert data["target"] == "lab" and data["ttl"] == 90 and data["expires"].endswith("+00:00")
    assert data["user"] == "alice@corp"
    policy = desk.scopes["lab"]
    assert policy.viewers is not None
    verdict = policy.viewers.check(data["token"].encode(), MAIN, 0, time.monotonic(), "lab")
    assert verdict.ok and verdict.user == "alice@corp"  # its sessions say whose they are


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"target": "nope"}', 404, "no target 'nope'"),
        (b'{"target": "plain"}', 409, "does not inject"),
        (b'{"ttl": -1}', 400, '"ttl"'),
    ],
)
async def test_minting_errors_over_http(body: bytes, status: int, says: str) -> None:
    desk, _ = gateway()
    got, _h, reply = await exchange(api(desk), request("POST", "/api/tokens", body, BEARER))
    assert got == status and says in json.loads(reply)["error"]


async def test_an_api_without_a_token_of_its_own_mints_nothing() -> None:
    desk, shared = gateway()
    status, _h, reply = await exchange(api(desk, token=False), request("POST", "/api/tokens"))
    assert status == 403 and "management_token_file" in json.loads(reply)["error"]
    assert shared.counts() == (0, 0)
    got = await exchange(api(None), request("POST", "/api/tokens", b"", BEARER))
    assert got[0] == 409 and b"auth inject" in got[2]


def test_a_minted_token_is_never_logged(caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    desk, _ = gateway()
    minted = desk.mint("lab", 5.0)
    assert minted.token not in caplog.text and "token minted for target 'lab'" in caplog.text


def test_file_tokens_given_at_start_are_not_lost_by_the_first_read(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("start-token\n")
    shared = ViewerCredentials(None, [Token(b"start-token")], str(path))
    desk = TokenDesk({"": scoped(inject(shared), "")}, None)
    assert opens(desk.scopes[""], "start-token")
    desk.reread_all()  # the same file: the redeemed token stays used
    assert not opens(desk.scopes[""], "start-token")
