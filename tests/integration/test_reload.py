"""Reloading a gateway's config while viewers use it: two QEMUs, real spice-gtk viewers
(a scripted client holding a session across the reload, spicy-screenshot for new ones),
the management API and SIGHUP."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import (
    ClientOptions,
    ClientResult,
    QemuServer,
    SpiceEndpoint,
    make_tls_material,
    run_gi_client,
)
from tests.harness.images import CURSOR_CELL, differing_pixels
from tests.harness.procs import PeerFailed
from tests.harness.screenshot import settled_screenshot, spicy_screenshot
from tests.harness.wsbridge import websocket_channel
from tests.integration.proxy_process import ProxyProcess
from tests.integration.test_auth import AUTH_ERROR, refused, shot, wait_for_log
from tests.integration.test_connect import _connect_status

pytestmark = pytest.mark.peers


def _connection(proxy: ProxyProcess, ca_file: Path | None) -> http.client.HTTPConnection:
    """To the management API: over HTTPS trusting only `ca_file`'s CA, if given."""
    port = proxy.ports["management"]
    if ca_file is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    context = ssl.create_default_context(cafile=str(ca_file))
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)


def _api(
    proxy: ProxyProcess, method: str, path: str, ca_file: Path | None = None
) -> tuple[int, Any]:
    conn = _connection(proxy, ca_file)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _port_of(listeners: list[str], kind: str) -> int:
    (where,) = [w for w in listeners if w.startswith(kind + " ")]
    return int(where.rsplit(":", 1)[1])


def _wait_for_channels(proxy: ProxyProcess, ca_file: Path | None = None) -> None:
    """Until the one session's channels are all open (their count steady for a second):
    the reload is then surely after them (the next test has channels link after it)."""
    counts: list[int] = []
    for _ in range(150):  # 15 s at most
        sessions = _api(proxy, "GET", "/api/sessions", ca_file)[1]["sessions"]
        counts.append(len(sessions[0]["channels"]) if len(sessions) == 1 else 0)
        if len(counts) > 10 and counts[-1] >= 4 and len(set(counts[-10:])) == 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"the session's channels did not settle: {counts[-10:]}")


def test_a_gateway_reload_leaves_sessions_on_and_moves_new_viewers(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none") as a, QemuServer(guest="none") as b:
        assert a.port is not None and b.port is not None
        config = tmp_path / "gateway.toml"
        listen = 'listen = "127.0.0.1:0"'
        config.write_text(
            f'[proxy]\nmanagement = "127.0.0.1:0"\n\n[connect]\n{listen}\n\n'
            f'[targets.vm1]\nupstream = "127.0.0.1:{a.port}"\n{listen}\n'
            f'[targets.old]\nupstream = "127.0.0.1:{a.port}"\n{listen}\n'
        )
        extra = ("--config", str(config))
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            vm1, old = proxy.ports["plain:vm1"], proxy.ports["plain:old"]
            connect = proxy.ports["connect"]
            assert _connect_status(connect, f"127.0.0.1:{b.port}") == b"HTTP/1.1 403 Forbidden"
            # a viewer on vm1 (A) through the reload
            out: list[ClientResult] = []
            options = ClientOptions(duration=30, min_duration=12, expect_display=True)
            session = threading.Thread(
                target=lambda: out.append(
                    run_gi_client(SpiceEndpoint(port=vm1), options, tmp_path / "client")
                )
            )
            session.start()
            _wait_for_channels(proxy)
            config.write_text(
                f'[proxy]\nmanagement = "127.0.0.1:0"\n\n'
                f'[connect]\n{listen}\nallow = ["127.0.0.1:{b.port}"]\n\n'
                f'[targets.vm1]\nupstream = "127.0.0.1:{b.port}"\n{listen}\n'
                f'[targets.vm2]\nupstream = "127.0.0.1:{a.port}"\n{listen}\n'
            )
            status, report = _api(proxy, "POST", "/api/reload")
            assert status == 200 and report["success"] is True, report
            assert report["targets"] == {"added": ["vm2"], "removed": ["old"], "changed": ["vm1"]}
            listeners = report["listeners"]
            assert listeners["stopped"] == [f"plain:old 127.0.0.1:{old}"]
            assert listeners["repointed"] == [f"plain:vm1 127.0.0.1:{vm1} -> 127.0.0.1:{b.port}"]
            assert report["restartNeeded"] == []
            vm2 = _port_of(listeners["opened"], "plain:vm2")
            direct = settled_screenshot(a.endpoint(), tmp_path / "direct.ppm")
            via_vm2 = spicy_screenshot(SpiceEndpoint(port=vm2), tmp_path / "vm2.ppm")
            spicy_screenshot(SpiceEndpoint(port=vm1), tmp_path / "vm1.ppm")  # now B
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", old), timeout=5).close()
            assert (
                _connect_status(connect, f"127.0.0.1:{b.port}")
                == b"HTTP/1.1 200 Connection established"
            )
            session.join(60)
            # a file that cannot be served leaves it all as it was
            config.write_text("[targets.vm1\n")
            proxy.proc.send_signal(signal.SIGHUP)
            wait_for_log(proxy, "reload failed, the running config stays")
            spicy_screenshot(SpiceEndpoint(port=vm2), tmp_path / "vm2-again.ppm")
            # the next reload moves the CONNECT front (targets only: B by vm1's address)
            config.write_text(
                f'[proxy]\nmanagement = "127.0.0.1:0"\n\n[connect]\nlisten = "127.0.0.2:0"\n\n'
                f'[targets.vm1]\nupstream = "127.0.0.1:{b.port}"\n{listen}\n'
                f'[targets.vm2]\nupstream = "127.0.0.1:{a.port}"\n{listen}\n'
            )
            status, report = _api(proxy, "POST", "/api/reload")
            assert status == 200 and report["success"] is True, report
            assert report["listeners"]["stopped"] == [f"connect 127.0.0.1:{connect}"]
            moved = _port_of(report["listeners"]["opened"], "connect")
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", connect), timeout=5).close()
            elsewhere = _connect_status(moved, "127.0.0.1:1", host="127.0.0.2")
            assert elsewhere == b"HTTP/1.1 403 Forbidden"
            by_name = SpiceEndpoint(host="vm2", port=5900, proxy=f"http://127.0.0.2:{moved}")
            spicy_screenshot(by_name, tmp_path / "by-name.ppm")
            assert proxy.proc.poll() is None
    (client,) = out
    # the session begun before the reload ran its 12 s with no channel lost
    assert client.returncode == 0 and not client.summary.get("errors"), client.summary
    assert client.summary["elapsed"] >= 12
    assert differing_pixels(via_vm2, direct) <= CURSOR_CELL
    routed: dict[str, list[str]] = {}
    for archive in proxy.archives():
        assert verify(archive).status == "intact", archive
        with ArchiveReader(archive) as reader:
            session = reader.header["session"]
            list(reader.records())
            assert reader.end is not None
            if session.get("target") is None:  # the CONNECT tunnel above that carried nothing
                continue
            assert reader.end["status"] == "complete", (session, reader.end)
        routed.setdefault(str(session["target"]), []).append(str(session["server"]))
    # vm1: the held session on A, the screenshot after the reload on B
    assert sorted(routed["vm1"]) == sorted([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
    # vm2: by its listener twice, by name through the moved CONNECT front once
    assert routed["vm2"] == [f"127.0.0.1:{a.port}"] * 3
    assert "Traceback" not in proxy.log()


PASSWORD = "first-pw-1"
ROTATED = "second-pw-2"


def test_a_vm_password_rotated_with_a_reload_and_used_tokens_stay_used(tmp_path: Path) -> None:
    """Inject mode: the VM's password changes (QMP set_password) and spicetap learns the new
    one by SIGHUP, with no session dropped; a token used before the reload stays used."""
    server_pw = tmp_path / "server-pw"
    server_pw.write_text(PASSWORD + "\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-one-4711\ntok-two-4712\ntok-three-4713\n")

    def section(upstream: int, password_file: Path) -> str:
        return (
            f'[targets.vm1]\nupstream = "127.0.0.1:{upstream}"\nlisten = "127.0.0.1:0"\n'
            f'auth = "inject"\nviewer_tokens_file = "{tokens}"\n'
            f'server_password_file = "{password_file}"\n'
        )

    with peers(), QemuServer(guest="none", password=PASSWORD) as srv:
        assert srv.port is not None
        config = tmp_path / "gateway.toml"
        config.write_text(section(srv.port, server_pw))
        extra = ("--config", str(config))
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            port = proxy.ports["plain:vm1"]
            shot(port, "tok-one-4711", tmp_path / "one.ppm")
            srv.qmp("set_password", protocol="spice", password=ROTATED)
            stale = refused(port, "tok-two-4712", tmp_path / "stale.ppm")
            rotated = tmp_path / "server-pw-rotated"
            rotated.write_text(ROTATED + "\n")
            config.write_text(section(srv.port, rotated))
            proxy.proc.send_signal(signal.SIGHUP)
            assert proxy.next_line() == "spicetap proxy reloaded\n"
            used = refused(port, "tok-one-4711", tmp_path / "used.ppm")
            shot(port, "tok-three-4713", tmp_path / "three.ppm")
    assert AUTH_ERROR in stale and AUTH_ERROR in used
    log = proxy.log()
    assert "reload: target vm1 changed" in log
    auth = [
        r.fields
        for archive in proxy.archives()
        for r in iter_records(archive, [])
        if r.kind == "auth"
    ]
    reasons = [(f or {}).get("reason") for f in auth]
    assert "token already used by another session" in reasons
    for secret in (PASSWORD, ROTATED, "tok-one-4711", "tok-two-4712", "tok-three-4713"):
        blobs = [a.read_bytes() for a in proxy.archives()] + [log.encode()]
        assert all(secret.encode() not in blob for blob in blobs), "a secret was recorded"


@pytest.mark.parametrize(
    ("front", "flags"),
    [
        ("listener", ()),
        ("connect", ()),
        ("listener", ("--no-follow-migration",)),
        ("websocket", ()),
    ],
)
def test_channels_of_a_session_begun_before_its_target_moved_follow_the_session(
    tmp_path: Path, front: str, flags: tuple[str, ...]
) -> None:
    """By hand, so that the order is sure: a session's main channel links on A through
    vm1 (its own listener, or CONNECT vm1; or the WebSocket front, [proxy] upstream being
    A); vm1 moves to B; a new session goes to B, and
    an inputs channel of each session links where its session lives (QEMU refuses a
    connection id it did not give). The session's id comes from its main channel's INIT,
    read whether migrations are followed or not."""
    from tests.integration.test_proxy import _authenticate, _link, _read
    from tests.proxy.test_framing import caps_word, link_mess

    held: list[socket.socket] = []  # the sessions live while their main channels are

    def session_of(main: socket.socket, header: bytes) -> int:
        held.append(main)
        _authenticate(main, header)
        msg_type, size = struct.unpack("<HI", _read(main, 6))  # the mini header
        assert msg_type == 103  # SPICE_MSG_MAIN_INIT: its body starts with the session id
        session: int = struct.unpack_from("<I", _read(main, size))[0]
        return session

    with peers(), QemuServer(guest="none") as a, QemuServer(guest="none") as b:
        assert a.port is not None and b.port is not None
        config = tmp_path / "gateway.toml"
        connect = '[connect]\nlisten = "127.0.0.1:0"\n\n'
        vm1 = '[targets.vm1]\nupstream = "127.0.0.1:{}"\nlisten = "127.0.0.1:0"\n'
        if front == "websocket":  # (listen: not the default port, 5900)
            connect = ""
            vm1 = '[proxy]\nupstream = "127.0.0.1:{}"\nlisten = "127.0.0.1:0"\n'
            vm1 += 'ws_listen = "127.0.0.1:0"\n'
        config.write_text(connect + vm1.format(a.port))
        extra = ("--config", str(config), *flags)
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:

            def link(channel_type: int, session: int) -> tuple[socket.socket, bytes]:
                if front == "connect":  # the port named does not matter
                    return _link(proxy.ports["connect"], channel_type, session, "vm1:5900")
                if front == "websocket":
                    sock = websocket_channel(proxy.ports["websocket"])
                    sock.sendall(link_mess(caps_word(1, 3), channel_type, conn=session))
                    return sock, _read(sock, 16)
                return _link(proxy.ports["plain:vm1"], channel_type, session)

            on_a = session_of(*link(1, 0))
            config.write_text(connect + vm1.format(b.port))
            proxy.proc.send_signal(signal.SIGHUP)
            assert proxy.next_line() == "spicetap proxy reloaded\n"
            on_b = session_of(*link(1, 0))
            for session in (on_a, on_b):
                inputs, header = link(3, session)
                assert header[:4] == b"REDQ"
                _authenticate(inputs, header)  # the link result is OK: its session's QEMU
                held.append(inputs)
            assert proxy.proc.poll() is None
            for sock in held:
                sock.close()
    servers: dict[int, set[str]] = {}
    for archive in proxy.archives():  # named ...-SESSIONID.spta
        with ArchiveReader(archive) as reader:
            server = str(reader.header["session"]["server"])
        servers.setdefault(int(archive.stem.rsplit("-", 1)[1], 16), set()).add(server)
    assert servers == {on_a: {f"127.0.0.1:{a.port}"}, on_b: {f"127.0.0.1:{b.port}"}}, servers


def test_a_reload_changes_how_sessions_from_then_on_are_recorded(tmp_path: Path) -> None:
    """[recording] changed and SIGHUP: a session begun after the reload is recorded to the
    new directory, compressed, without pixels; the one before keeps its archive's settings
    and the proxy says which settings changed."""
    before, after = tmp_path / "before", tmp_path / "after"
    with peers(), QemuServer(guest="none") as srv:
        config = tmp_path / "spicetap.toml"
        main = f'[proxy]\nupstream = "127.0.0.1:{srv.port}"\nlisten = "127.0.0.1:0"\n'
        config.write_text(main + f'[recording]\ndirectory = "{before}"\n')
        with ProxyProcess(0, None, tmp_path / "proxy", ("--config", str(config))) as proxy:
            spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "one.ppm")
            config.write_text(
                main + f'[recording]\ndirectory = "{after}"\ncompress = true\n'
                "[recording.privacy]\ndisplay = false\n"
            )
            proxy.proc.send_signal(signal.SIGHUP)
            assert proxy.next_line() == "spicetap proxy reloaded\n"
            spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "two.ppm")
    assert "follow the new directory, privacy switches, compression" in proxy.log()
    (first,) = before.glob("*.spta")
    (second,) = after.glob("*.spta.zst")
    pixels = {}
    for archive in (first, second):
        assert verify(archive).status == "intact"
        with ArchiveReader(archive) as reader:
            assert reader.header["policy"]["display"] is (archive == first)
        draws = [r for r in iter_records(archive, []) if (r.name or "").startswith("draw_")]
        assert draws, f"{archive.name}: the screenshot's drawing was not recorded"
        pixels[archive] = {r.redacted is None for r in draws}  # type: ignore[union-attr]
    assert pixels == {first: {True}, second: {False}}


def test_a_renewed_certificate_is_shown_to_new_viewers_with_no_session_dropped(
    tmp_path: Path,
) -> None:
    """The operator's certificate renewed in place (as certbot or an internal CA's agent
    does), then SIGHUP: spice-gtk viewers from then on are shown the new one (a viewer
    that trusts only the old CA is refused), and a TLS session begun before goes on. The
    management API's HTTPS shows the new one as well."""
    first, second = make_tls_material(tmp_path / "a"), make_tls_material(tmp_path / "b")
    live = tmp_path / "live"
    live.mkdir()

    def install(material: Path) -> None:
        shutil.copy(material / "server-cert.pem", live / "cert.pem")
        shutil.copy(material / "server-key.pem", live / "key.pem")

    install(first.x509_dir)
    # two VMs: spice-server lets one client in at a time (a new one ends the held session)
    with peers(), QemuServer(guest="boot") as a, QemuServer(guest="boot") as b:
        assert a.port is not None and b.port is not None
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[proxy]\nmanagement = "127.0.0.1:0"\nmanagement_tls = true\n'
            f'tls_cert = "{live / "cert.pem"}"\ntls_key = "{live / "key.pem"}"\n\n'
            f'[targets.vm1]\nupstream = "127.0.0.1:{a.port}"\ntls_listen = "127.0.0.1:0"\n'
            f'[targets.vm2]\nupstream = "127.0.0.1:{b.port}"\ntls_listen = "127.0.0.1:0"\n'
        )
        extra = ("--config", str(config))
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            vm1, vm2 = proxy.ports["tls:vm1"], proxy.ports["tls:vm2"]
            out: list[ClientResult] = []
            options = ClientOptions(duration=30, min_duration=12, expect_display=True)
            held = SpiceEndpoint(tls_port=vm1, ca_file=first.ca_file)
            session = threading.Thread(
                target=lambda: out.append(run_gi_client(held, options, tmp_path / "client"))
            )
            session.start()
            _wait_for_channels(proxy, first.ca_file)
            install(second.x509_dir)
            proxy.proc.send_signal(signal.SIGHUP)
            assert proxy.next_line() == "spicetap proxy reloaded\n"
            for name, port in (("vm1", vm1), ("vm2", vm2)):  # one file, shown by both
                wait_for_log(proxy, f"reload: tls:{name} 127.0.0.1:{port} shows viewers a new")
            shot = spicy_screenshot(
                SpiceEndpoint(tls_port=vm2, ca_file=second.ca_file), tmp_path / "after.ppm"
            )
            with pytest.raises(PeerFailed):
                old_ca = SpiceEndpoint(tls_port=vm2, ca_file=first.ca_file)
                spicy_screenshot(old_ca, tmp_path / "refused.ppm", timeout=20)
            session.join(60)
            # the management API's HTTPS shows the renewed certificate too
            with pytest.raises(ssl.SSLCertVerificationError):
                _api(proxy, "GET", "/api/sessions", first.ca_file)
            metrics = _connection(proxy, second.ca_file)
            try:
                metrics.request("GET", "/metrics")
                text = metrics.getresponse().read().decode()
            finally:
                metrics.close()
    assert shot.stat().st_size > 1000
    (client,) = out
    # the session begun before the reload ran its 12 s with no channel lost
    assert client.returncode == 0 and not client.summary.get("errors"), client.summary
    assert client.summary["elapsed"] >= 12
    renewed = x509.load_pem_x509_certificate((second.x509_dir / "server-cert.pem").read_bytes())
    gauge = "spicetap_tls_certificate_expiry_timestamp_seconds{"
    lines = [ln for ln in text.splitlines() if ln.startswith(gauge)]
    assert len(lines) == 3, lines  # both listeners' and the API's
    assert all(ln.endswith(f" {int(renewed.not_valid_after_utc.timestamp())}") for ln in lines)
