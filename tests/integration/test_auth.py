"""Authentication modes and capability masking through a real `spicetap proxy`, between
QEMU's spice-server (with a password) and real spice-gtk clients."""

from __future__ import annotations

import http.client
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import (
    ALL_CHANNELS,
    ClientOptions,
    PeerFailed,
    QemuServer,
    SpiceEndpoint,
    run_gi_client,
    spicy_screenshot,
)
from tests.harness.images import CURSOR_CELL, differing_pixels
from tests.harness.screenshot import settled_screenshot
from tests.integration.proxy_process import ProxyProcess

pytestmark = pytest.mark.peers

PASSWORD = "s3cret-pw"  # the server's
VIEWER_PASSWORD = "viewer-pw"  # what viewers give spicetap in inject mode
AUTH_ERROR = "main channel event: 23"  # SPICE_CHANNEL_ERROR_AUTH, as spicy-screenshot says it
MINI_HEADER = 3  # SPICE_COMMON_CAP_MINI_HEADER


def shot(port: int, password: str, out: Path) -> Path:
    return spicy_screenshot(SpiceEndpoint(port=port, password=password), out)


def same_screen(via: SpiceEndpoint, direct: SpiceEndpoint, work: Path) -> bool:
    """Screenshots through the proxy and straight from QEMU agree, once SeaBIOS has stopped
    printing; its text cursor may blink between the two (one cell)."""
    settled = settled_screenshot(direct, work / "direct.ppm")
    return differing_pixels(spicy_screenshot(via, work / "via.ppm"), settled) <= CURSOR_CELL


def refused(port: int, password: str, out: Path) -> str:
    """spicy-screenshot with a wrong password: the client's own error text."""
    with pytest.raises(PeerFailed) as exc:
        shot(port, password, out)
    return str(exc.value)


def records(proxy: ProxyProcess) -> list[Any]:
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    return [r for a in archives for r in iter_records(a, [])]


def header_session(proxy: ProxyProcess) -> dict[str, Any]:
    return header_sessions(proxy)[0]


def header_sessions(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """What each archive's header says of its session."""
    sessions = []
    for archive in proxy.archives():
        with ArchiveReader(archive) as reader:
            sessions.append(reader.header["session"])
    return sessions


def assert_secrets_absent(proxy: ProxyProcess, *secrets: str) -> None:
    blobs = [a.read_bytes() for a in proxy.archives()] + [proxy.log().encode()]
    for secret in secrets:
        assert all(secret.encode() not in blob for blob in blobs), "a secret was recorded"


def results(recs: list[Any]) -> list[str | None]:
    return [(r.fields or {}).get("error") for r in recs if r.name == "link_result"]


def test_pass_through_relays_right_and_wrong_passwords(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none", password=PASSWORD) as srv:
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy") as proxy:
            shot(proxy.port, PASSWORD, tmp_path / "ok.ppm")
            error = refused(proxy.port, "wrong", tmp_path / "bad.ppm")
            shot(proxy.port, PASSWORD, tmp_path / "again.ppm")  # the proxy serves on
            assert proxy.proc.poll() is None
    assert AUTH_ERROR in error
    recs = records(proxy)
    assert "PERMISSION_DENIED" in results(recs) and "OK" in results(recs)
    assert not [r for r in recs if r.kind == "rewrite"]  # nothing rewritten
    assert header_session(proxy)["auth"] == "pass-through"
    assert_secrets_absent(proxy, PASSWORD, "wrong")


def test_intercept_swaps_the_key_and_the_server_still_accepts(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none", password=PASSWORD) as srv:
        assert srv.port is not None
        extra = ("--auth", "intercept")
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            assert same_screen(
                SpiceEndpoint(port=proxy.port, password=PASSWORD), srv.endpoint(), tmp_path
            )
            error = refused(proxy.port, "wrong", tmp_path / "bad.ppm")
            shot(proxy.port, PASSWORD, tmp_path / "again.ppm")
            assert proxy.proc.poll() is None
    assert AUTH_ERROR in error
    recs = records(proxy)
    auth = [r.fields for r in recs if r.kind == "auth"]
    assert {"mode": "intercept", "result": "PERMISSION_DENIED", "by": "server"} in auth
    assert {"mode": "intercept", "result": "OK", "by": "server"} in auth
    # the viewer got spicetap's key; the rewrite record keeps the one the server sent
    rewrites = [r for r in recs if r.kind == "rewrite" and r.name == "link_reply"]
    replies = [r for r in recs if r.kind == "link" and r.name == "link_reply"]
    assert rewrites and len(rewrites) == len(replies)
    for rewrite, reply in zip(rewrites, replies, strict=True):
        assert rewrite.connection == reply.connection
        assert reply.raw[4:166] != rewrite.raw[4:166]
        assert reply.raw[166:] == rewrite.raw[166:] or "cleared" in rewrite.fields
    assert header_session(proxy)["auth"] == "intercept"
    assert_secrets_absent(proxy, PASSWORD, "wrong")


def write_config(tmp_path: Path, **proxy: str) -> Path:
    server_pw = tmp_path / "server-password"
    server_pw.write_text(PASSWORD + "\n")
    server_pw.chmod(0o600)
    lines = ["[proxy]", 'auth = "inject"', f'server_password_file = "{server_pw}"']
    lines += [f'{key} = "{value}"' for key, value in proxy.items()]
    config = tmp_path / "spicetap.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_inject_viewers_never_learn_the_server_password(tmp_path: Path) -> None:
    config = write_config(tmp_path, viewer_password=VIEWER_PASSWORD)
    with peers(), QemuServer(guest="none", password=PASSWORD) as srv:
        assert srv.port is not None
        extra = ("--config", str(config))
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            assert same_screen(
                SpiceEndpoint(port=proxy.port, password=VIEWER_PASSWORD), srv.endpoint(), tmp_path
            )
            # the server's own password is not what viewers give: spicetap refuses it
            error = refused(proxy.port, PASSWORD, tmp_path / "bad.ppm")
            shot(proxy.port, VIEWER_PASSWORD, tmp_path / "again.ppm")
            assert proxy.proc.poll() is None
    assert AUTH_ERROR in error
    recs = records(proxy)
    denied = [r for r in recs if r.kind == "auth" and r.fields["by"] == "spicetap"]
    assert len(denied) == 1 and denied[0].fields["result"] == "PERMISSION_DENIED"
    refused_conn = denied[0].connection
    # the refused viewer's ticket never went upstream: its c2s stream ends before it
    assert not [r for r in recs if r.connection == refused_conn and r.name == "ticket"]
    assert "viewer authentication refused by spicetap" in proxy.log()
    ok = [r.fields for r in recs if r.kind == "auth" and r.fields["by"] == "server"]
    assert ok and all(f["result"] == "OK" and f["credential"] == "password" for f in ok)
    assert header_session(proxy)["auth"] == "inject"
    assert_secrets_absent(proxy, PASSWORD, VIEWER_PASSWORD)


def test_inject_token_opens_one_whole_session(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-7f3a9c 2099-01-01T00:00:00Z\ntok-old 2000-01-01T00:00:00Z\n")
    config = write_config(tmp_path, viewer_tokens_file=str(tokens))
    with peers(), QemuServer(guest="boot", password=PASSWORD) as srv:
        assert srv.port is not None
        extra = ("--config", str(config))
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            result = run_gi_client(
                SpiceEndpoint(port=proxy.port, password="tok-7f3a9c"),
                ClientOptions(
                    duration=10, expect_channels=ALL_CHANNELS, expect_display=True, smartcard=True
                ),
                tmp_path / "client",
            )
            used = refused(proxy.port, "tok-7f3a9c", tmp_path / "used.ppm")
            expired = refused(proxy.port, "tok-old", tmp_path / "expired.ppm")
            assert proxy.proc.poll() is None
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    assert len(result.opened) == ALL_CHANNELS  # every channel presented the token
    assert AUTH_ERROR in used and AUTH_ERROR in expired
    reasons = [r.fields.get("reason") for r in records(proxy) if r.kind == "auth"]
    assert "token already used by another session" in reasons
    assert "token expired" in reasons
    assert_secrets_absent(proxy, PASSWORD, "tok-7f3a9c", "tok-old")


API_TOKEN = "api-token-0123456789abcdef"


def mint(proxy: ProxyProcess, **body: Any) -> tuple[int, dict[str, Any]]:
    """POST /api/tokens on the proxy's management API, with its bearer token."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.ports["management"], timeout=30)
    try:
        headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
        conn.request("POST", "/api/tokens", body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    return response.status, answer


def wait_for_log(proxy: ProxyProcess, text: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while text not in proxy.log():
        assert time.monotonic() < deadline, f"no {text!r} in the proxy's log"
        assert proxy.proc.poll() is None
        time.sleep(0.1)


def test_tokens_minted_and_written_while_the_proxy_runs(tmp_path: Path) -> None:
    """A broker's way: no viewer credential at start; the management API mints one-time
    tokens per target, and a token added to the tokens file works without a restart."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# empty at start\n")
    api_token = tmp_path / "api-token"
    api_token.write_text(API_TOKEN + "\n")
    config = write_config(
        tmp_path,
        viewer_tokens_file=str(tokens),
        management="127.0.0.1:0",
        management_token_file=str(api_token),
    )
    with peers(), QemuServer(guest="none", password=PASSWORD) as srv:
        assert srv.port is not None
        # a second route to the same server, as target "lab"
        lab = f'[targets.lab]\nupstream = "127.0.0.1:{srv.port}"\nlisten = "127.0.0.1:0"\n'
        config.write_text(config.read_text() + lab)
        extra = ("--config", str(config))
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            status, main = mint(proxy, ttl=60, user="alice@corp")
            assert status == 201 and main["target"] is None, main
            shot(proxy.port, main["token"], tmp_path / "main.ppm")
            used = refused(proxy.port, main["token"], tmp_path / "used.ppm")
            status, for_lab = mint(proxy, target="lab")
            assert status == 201 and for_lab["ttl"] == 120
            elsewhere = refused(proxy.port, for_lab["token"], tmp_path / "elsewhere.ppm")
            shot(proxy.ports["plain:lab"], for_lab["token"], tmp_path / "lab.ppm")
            status, short = mint(proxy, ttl=0.5)
            time.sleep(1.0)
            expired = refused(proxy.port, short["token"], tmp_path / "expired.ppm")
            assert mint(proxy, target="nope")[0] == 404
            tokens.write_text("file-token-4d2a\n")
            wait_for_log(proxy, "read: 1 token(s)")
            shot(proxy.ports["plain:lab"], "file-token-4d2a", tmp_path / "file.ppm")
            assert proxy.proc.poll() is None
    assert all(AUTH_ERROR in text for text in (used, elsewhere, expired))
    assert "token minted for target 'lab', good for 120 s" in proxy.log()
    recs = records(proxy)
    reasons = [r.fields.get("reason") for r in recs if r.kind == "auth"]
    assert "token already used by another session" in reasons
    assert "token expired" in reasons
    assert "wrong viewer password or token" in reasons  # lab's token on the main route
    ok = [r.fields for r in recs if r.kind == "auth" and r.fields["by"] == "server"]
    assert len(ok) >= 6 and all(f["credential"] == "token" for f in ok)  # 3 sessions, 2+ each
    # the session the token minted for alice opened says whose it is, on every channel
    alices = [f for f in ok if f.get("user") == "alice@corp"]
    assert len(alices) >= 2 and len(alices) == len([f for f in ok if "user" in f])
    # so does its archive's header; the other two sessions' tokens named nobody
    users = sorted(str(s.get("user")) for s in header_sessions(proxy) if s["id"] is not None)
    assert users == ["None", "None", "alice@corp"], users
    assert "token minted for the main upstream (user alice@corp)" in proxy.log()
    minted = [main["token"], for_lab["token"], short["token"]]
    assert_secrets_absent(proxy, PASSWORD, API_TOKEN, "file-token-4d2a", *minted)


def relink(port: int, token: str, channel_type: int, conn: int) -> int:
    """A channel linked by hand with `token`: the link result (0 OK, 7 PERMISSION_DENIED)."""
    from proxy.core.probe import encrypt_ticket
    from tests.integration.test_proxy import _link, _read

    sock, header = _link(port, channel_type, conn)
    with sock:
        assert header[:4] == b"REDQ", header
        reply = _read(sock, struct.unpack_from("<I", header, 12)[0])
        assert struct.unpack_from("<I", reply)[0] == 0  # SPICE_LINK_ERR_OK: a key follows
        sock.sendall(encrypt_ticket(reply[4:166], token.encode()))  # 162 bytes of DER
        result: int = struct.unpack("<I", _read(sock, 4))[0]
    return result


def test_an_ended_sessions_token_cannot_bring_it_back(tmp_path: Path) -> None:
    """spice-server takes a main channel linking with an old session's connection id as
    that session coming back. So when the operator ends a session (here all of one user's:
    DELETE /api/sessions?user=NAME), the token it linked with is revoked: the viewer still
    holding it, linking again with its session's id, is refused by spicetap."""
    from tests.integration.test_probe import api_call, viewer_in_background, wait_for_session

    tokens = tmp_path / "tokens"
    tokens.write_text("tok-ended-1b7e user=carol\n")
    config = write_config(tmp_path, viewer_tokens_file=str(tokens), management="127.0.0.1:0")
    with peers(), QemuServer(guest="none", password=PASSWORD) as srv:
        assert srv.port is not None
        extra = ("--config", str(config))
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            viewer = SpiceEndpoint(port=proxy.port, password="tok-ended-1b7e")
            thread, out = viewer_in_background(viewer, tmp_path / "client", 40)
            try:
                session = wait_for_session(proxy, 4, "?user=carol")
                sid = session["connectionId"]
                assert session["user"] == "carol"  # whom the broker gave the token to
                _, nobody = api_call(proxy, "GET", "/api/sessions?user=dave")
                assert nobody["sessions"] == [] and nobody["totals"]["sessions"] == 1
                # while it runs, its token links its channels (an inputs channel here)
                assert relink(proxy.port, "tok-ended-1b7e", 3, sid) == 0
                # the operator ends all of carol's sessions (here, the one)
                status, ended = api_call(proxy, "DELETE", "/api/sessions?user=carol")
                assert status == 200 and ended["success"] and ended["user"] == "carol", ended
                (one,) = ended["sessions"]
                assert one["connectionId"] == sid and one["tokensRevoked"] == 1
            finally:
                thread.join(60)
            assert relink(proxy.port, "tok-ended-1b7e", 1, sid) == 7  # PERMISSION_DENIED
            tokens.write_text("tok-ended-1b7e user=carol\n# the file rewritten, the token listed\n")
            wait_for_log(proxy, "read: 1 token(s)")
            assert relink(proxy.port, "tok-ended-1b7e", 1, sid) == 7
            assert proxy.proc.poll() is None
    assert out and out[0].returncode == 0, out[0].summary if out else None
    assert f"ending session {sid} (user carol, " in proxy.log()
    assert "its token revoked" in proxy.log()
    auth = [r.fields for r in records(proxy) if r.kind == "auth"]
    revoked = [f for f in auth if f.get("reason", "").startswith("token revoked: the operator")]
    assert len(revoked) == 2 and all(f["user"] == "carol" for f in revoked)
    assert_secrets_absent(proxy, PASSWORD, "tok-ended-1b7e")


def caps(rec: Any) -> int:
    return int((rec.fields or {})["common_caps"][0])


def test_masked_caps_reach_the_other_side_cleared(tmp_path: Path) -> None:
    """Masking, combined with intercept on a server without a password (spice-server
    still decrypts the ticket then: spicetap must re-encrypt it all the same)."""
    masked = "common:mini_header,display:lz4_compression"
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        extra = ("--mask-caps", masked, "--auth", "intercept")
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            # the session still works: the same screen as without the proxy
            assert same_screen(SpiceEndpoint(port=proxy.port), srv.endpoint(), tmp_path)
    recs = records(proxy)
    assert header_session(proxy)["mask_caps"] == masked.split(",")
    assert header_session(proxy)["auth"] == "intercept"
    for name, fixed in (("link_mess", 18), ("link_reply", 178)):
        received = [r for r in recs if r.kind == "link" and r.name == name]
        originals = {r.connection: r for r in recs if r.kind == "rewrite" and r.name == name}
        assert received and len(originals) == len(received)
        for rec in received:
            # the peer on the other side got the bit cleared; the sender had set it
            assert not caps(rec) >> MINI_HEADER & 1
            original = originals[rec.connection]
            assert int.from_bytes(original.raw[fixed : fixed + 4], "little") >> MINI_HEADER & 1
            assert "common:mini_header" in original.fields["cleared"]
    display = [r for r in recs if r.kind == "rewrite" and r.channel == "display"]
    assert any("display:lz4_compression" in r.fields["cleared"] for r in display)
    # both sides then used the full header: every message is framed and dissected
    assert not [r for r in recs if r.kind in ("error", "gap") or r.not_fully_dissected]
    assert any(r.kind == "message" and r.name == "surface_create" for r in recs)


def test_each_target_has_its_own_injected_credentials(tmp_path: Path) -> None:
    """A gateway in front of two VMs with different passwords: each target's viewers give
    that target's own viewer password; neither server password reaches a viewer."""
    secrets = {"vm1": ("vm1-server-pw", "vm1-viewer"), "vm2": ("vm2-server-pw", "vm2-viewer")}
    with (
        peers(),
        QemuServer(guest="none", password=secrets["vm1"][0]) as one,
        QemuServer(guest="none", password=secrets["vm2"][0]) as two,
    ):
        assert one.port is not None and two.port is not None
        lines = []
        for name, srv in (("vm1", one), ("vm2", two)):
            server_pw = tmp_path / f"{name}-server-password"
            server_pw.write_text(secrets[name][0] + "\n")
            lines += [
                f"[targets.{name}]",
                f'upstream = "127.0.0.1:{srv.port}"',
                'listen = "127.0.0.1:0"',
                'auth = "inject"',
                f'viewer_password = "{secrets[name][1]}"',
                f'server_password_file = "{server_pw}"',
            ]
        config = tmp_path / "gateway.toml"
        config.write_text("\n".join(lines) + "\n")
        extra = ("--config", str(config))
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            vm1, vm2 = proxy.ports["plain:vm1"], proxy.ports["plain:vm2"]
            shot(vm1, "vm1-viewer", tmp_path / "vm1.ppm")
            shot(vm2, "vm2-viewer", tmp_path / "vm2.ppm")
            crossed = refused(vm2, "vm1-viewer", tmp_path / "crossed.ppm")
            server_pw_refused = refused(vm1, "vm1-server-pw", tmp_path / "server.ppm")
            assert proxy.proc.poll() is None
    assert AUTH_ERROR in crossed and AUTH_ERROR in server_pw_refused
    recs = records(proxy)
    by_spicetap = [r.fields for r in recs if r.kind == "auth" and r.fields["by"] == "spicetap"]
    assert len(by_spicetap) == 2 and all(f["result"] == "PERMISSION_DENIED" for f in by_spicetap)
    ok = [r.fields for r in recs if r.kind == "auth" and r.fields["by"] == "server"]
    assert len(ok) >= 2 and all(f["result"] == "OK" for f in ok)
    headers = []
    for archive in proxy.archives():
        with ArchiveReader(archive) as reader:
            headers.append(reader.header["session"])
    assert {h["target"] for h in headers} == {"vm1", "vm2"}
    assert all(h["auth"] == "inject" for h in headers)
    assert_secrets_absent(proxy, *secrets["vm1"], *secrets["vm2"])


LINK_ERROR = "main channel event: 22"  # SPICE_CHANNEL_ERROR_LINK: the link itself refused


def test_repeated_wrong_passwords_lock_the_address_out(tmp_path: Path) -> None:
    """Pass-through: QEMU refuses three wrong passwords (spicetap counts them from the
    link results it relays); from then on spicetap refuses the address's links itself,
    the right password too, and QEMU hears of none of them; the operator sees it in the
    API and /metrics, releases the address, and the right password works again."""
    from tests.integration.test_probe import api_call, metrics

    extra = ("--lockout-failures", "3", "--lockout-seconds", "600", "--management", "127.0.0.1:0")
    with peers(), QemuServer(guest="none", password=PASSWORD) as srv:
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            wrong = [refused(proxy.port, f"guess{i}", tmp_path / f"{i}.ppm") for i in range(3)]
            wait_for_log(proxy, "viewer address 127.0.0.1 locked out for 600 s")
            upstream_opened = proxy.log().count(f"-> 127.0.0.1:{srv.port}")
            locked_out = refused(proxy.port, PASSWORD, tmp_path / "right.ppm")
            assert proxy.log().count(f"-> 127.0.0.1:{srv.port}") == upstream_opened
            status, listed = api_call(proxy, "GET", "/api/lockouts")
            assert status == 200
            (entry,) = listed["addresses"]
            assert entry["address"] == "127.0.0.1" and entry["locked"]
            assert 0 < entry["lockedFor"] <= 600
            assert listed["totals"]["failures"] == 3 and listed["totals"]["lockouts"] == 1
            counters = metrics(proxy)
            assert counters["spicetap_addresses_locked_out"] == 1
            assert counters["spicetap_lockout_refused_total"] >= 1
            status, released = api_call(proxy, "DELETE", "/api/lockouts?address=127.0.0.1")
            assert (status, released["released"]) == (200, ["127.0.0.1"])
            shot(proxy.port, PASSWORD, tmp_path / "again.ppm")
            assert proxy.proc.poll() is None
    assert all(AUTH_ERROR in error for error in wrong)
    assert LINK_ERROR in locked_out and AUTH_ERROR not in locked_out
    recs = records(proxy)
    assert results(recs).count("PERMISSION_DENIED") == 3
    said = "address 127.0.0.1 locked out after repeated failed authentications"
    turned_away = [r for r in recs if r.kind == "error" and (r.error or "").startswith(said)]
    assert turned_away and all(r.direction == "c2s" for r in turned_away)
    assert_secrets_absent(proxy, PASSWORD, "guess0")
