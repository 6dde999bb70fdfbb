"""Reloading the config file while the proxy serves: what changes, what stays, and that a
file that cannot be served changes nothing. Real listeners on loopback; the upstreams are
plain TCP servers that count the connections reaching them (real SPICE peers:
tests/integration/test_reload.py)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pytest
import trio

from proxy import targets as targets_module
from proxy.core.admission import Admission, session_reserve
from proxy.core.credentials import MAIN, Token, ViewerCredentials
from proxy.core.forwarded import parse_trusted
from proxy.core.lockout import Lockout, LockoutPolicy
from proxy.core.management import HttpError
from proxy.core.relay import Limits
from proxy.core.reload import plan, restart_needed, target_changes
from proxy.fronts import Fronts, build_fronts
from proxy.io.management import ManagementApi, ManagementOptions, serve_management
from proxy.io.reloading import FrontListeners, Reloader, ReloadFailed
from proxy.io.server import ChannelProxy, ProxyState
from proxy.io.tokens import TokenDesk
from proxy.recording_options import recording_options
from spicetap.cli import build_parser
from spicetap.config import Config, ConnectSection, ProxySection, RecordingSection, load_config
from tests.harness import make_tls_material
from tests.integration.proxy_process import ProxyProcess
from tests.integration.test_auth import wait_for_log

# --- what a reload may change (pure) ---


def test_restart_needed_names_only_what_a_reload_cannot_apply() -> None:
    old = Config()
    new = Config(
        proxy=replace(
            ProxySection(),
            upstream="h:1",
            auth="intercept",
            management="127.0.0.1:1",
            max_message=4096,
            max_connections=9,
            follow_migration=False,
            ws_listen="h:3",
        ),
        recording=replace(RecordingSection(), compress=True, nice=0, rotate_bytes=1 << 30),
        connect=ConnectSection(listen="127.0.0.1:2", allow=("h:1",)),
    )
    assert restart_needed(old, new) == [
        "[proxy] max_message",
        "[proxy] management",
        "[recording] nice",
    ]
    assert restart_needed(new, new) == []
    # recording started or stopped waits for a restart; moved, it applies to new sessions
    recording = [replace(RecordingSection(), directory=d) for d in (None, "/a", "/b")]
    assert restart_needed(Config(recording=recording[0]), Config(recording=recording[1])) == [
        "[recording] directory"
    ]
    assert restart_needed(Config(recording=recording[1]), Config(recording=recording[2])) == []


def test_plan_stops_opens_and_keeps_in_the_files_order() -> None:
    steps = plan({"a": 1, "b": 2}, {"c": 3, "b": 4, "d": 5})
    assert (steps.open, steps.stop, steps.keep) == (["c", "d"], ["a"], ["b"])


def test_target_changes_compare_settings() -> None:
    changes = target_changes({"a": 1, "b": 2, "c": 3}, {"b": 2, "c": 4, "d": 5})
    assert (changes.added, changes.removed, changes.changed) == (["d"], ["a"], ["c"])


# --- credentials across a reload ---


def test_inherited_credentials_keep_a_used_token_used() -> None:
    old = ViewerCredentials(None, [Token(b"t1"), Token(b"t2")], "tokens")
    assert old.check(b"t1", MAIN, 0, 0.0).ok
    old.mint(b"m1", 100.0, "vm1", 0.0)
    # the reload read the same file (and a new password) into fresh credentials
    fresh = ViewerCredentials(b"pw", [Token(b"t1"), Token(b"t2")], "tokens")
    fresh.inherit(old)
    assert fresh.check(b"t1", MAIN, 0, 1.0).reason == "token already used by another session"
    assert fresh.check(b"t2", MAIN, 0, 1.0).ok
    assert fresh.check(b"m1", MAIN, 0, 1.0, scope="vm1").ok  # minted before the reload
    assert fresh.check(b"pw", MAIN, 0, 1.0).ok
    # a link still checked against the old credentials sees what the new ones did
    assert not old.check(b"t2", MAIN, 0, 2.0).ok


def test_minted_tokens_follow_their_target_to_other_credentials() -> None:
    shared = ViewerCredentials(b"pw")
    shared.mint(b"for-vm1", 100.0, "vm1", 0.0)
    shared.mint(b"for-vm2", 100.0, "vm2", 0.0)
    own = ViewerCredentials(b"other")
    own.take_minted("vm1", shared)
    assert own.check(b"for-vm1", MAIN, 0, 1.0, scope="vm1").ok
    assert not shared.check(b"for-vm1", MAIN, 0, 1.0, scope="vm1").ok
    assert shared.check(b"for-vm2", MAIN, 0, 1.0, scope="vm2").ok


# --- the reloader, with real listeners ---


@dataclass
class Upstream:
    """A TCP server that counts the connections reaching it."""

    port: int = 0
    accepted: int = 0
    reached: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.reached.set()
        await stream.aclose()


@dataclass
class Setup:
    path: Path
    reloader: Reloader
    listeners: FrontListeners
    upstreams: tuple[Upstream, Upstream]

    def write(self, text: str) -> None:
        a, b = self.upstreams
        self.path.write_text(text.format(a=a.port, b=b.port))

    def port_of(self, kind: str) -> int:
        for running in self.listeners.running.values():
            where = running.where()
            if where.startswith(kind + " "):
                return int(where.rsplit(":", 1)[1])
        raise KeyError(kind)


@asynccontextmanager
async def running(tmp_path: Path, first: str) -> AsyncIterator[Setup]:
    async with trio.open_nursery() as nursery:
        upstreams = (Upstream(), Upstream())
        for up in upstreams:
            (listener,) = await nursery.start(
                partial(trio.serve_tcp, up.handle, 0, host="127.0.0.1")
            )
            up.port = listener.socket.getsockname()[1]
        path = tmp_path / "gateway.toml"
        path.write_text(first.format(a=upstreams[0].port, b=upstreams[1].port))
        args = build_parser().parse_args(["proxy", "--config", str(path)])
        config = load_config(path)
        fronts = build_fronts(args, config, None, False)
        proxy = ChannelProxy(Limits(link_timeout=2.0), None, ProxyState(), fronts.link_policy)
        listeners = FrontListeners(proxy, nursery, False, None)
        for route in fronts.fronts():
            await listeners.open(route)
        if fronts.connect is not None:
            await listeners.open_connect(*fronts.connect)
        tokens = TokenDesk(fronts.scopes, fronts.link_policy)

        def rebuild(config: Config, previous: Fronts) -> Fronts:
            return build_fronts(args, config, None, False, previous)

        reloader = Reloader(path, config, fronts, rebuild, listeners, tokens)
        yield Setup(path, reloader, listeners, upstreams)
        nursery.cancel_scope.cancel()


async def _reach(port: int, upstream: Upstream) -> None:
    """A viewer connects to `port`; the proxy opens its upstream connection at once."""
    upstream.reached = trio.Event()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await upstream.reached.wait()
    await stream.aclose()


VM1_ON_A = '[targets.vm1]\nupstream = "127.0.0.1:{a}"\nlisten = "127.0.0.1:0"\n'
OLD_ON_A = '[targets.old]\nupstream = "127.0.0.1:{a}"\nlisten = "127.0.0.1:0"\n'


async def test_a_reload_opens_stops_and_repoints_listeners(tmp_path: Path) -> None:
    async with running(tmp_path, VM1_ON_A + OLD_ON_A) as setup:
        a, b = setup.upstreams
        vm1, old = setup.port_of("plain:vm1"), setup.port_of("plain:old")
        await _reach(vm1, a)
        # vm1 moves to B on the same listener, old goes, vm2 comes
        setup.write(
            '[targets.vm1]\nupstream = "127.0.0.1:{b}"\nlisten = "127.0.0.1:0"\n'
            '[targets.vm2]\nupstream = "127.0.0.1:{a}"\nlisten = "127.0.0.1:0"\n'
        )
        report = await setup.reloader.reload()
        assert report.targets.added == ["vm2"]
        assert report.targets.removed == ["old"]
        assert report.targets.changed == ["vm1"]
        assert report.stopped == [f"plain:old 127.0.0.1:{old}"]
        assert report.repointed == [f"plain:vm1 127.0.0.1:{vm1} -> 127.0.0.1:{b.port}"]
        vm2 = setup.port_of("plain:vm2")
        assert report.opened == [f"plain:vm2 127.0.0.1:{vm2}"]
        assert report.failed == [] and report.restart_needed == []
        assert setup.port_of("plain:vm1") == vm1
        await _reach(vm1, b)
        await _reach(vm2, a)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", old), timeout=2).close()


async def test_a_file_that_cannot_be_served_changes_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, VM1_ON_A) as setup:
        a, _b = setup.upstreams
        vm1 = setup.port_of("plain:vm1")
        before = setup.reloader.fronts
        for text, problem in (
            ("[targets.vm1\n", r"gateway\.toml"),  # TOML that does not parse
            (VM1_ON_A + '[targets.vm2]\nupstream = "nowhere"\n', "expected HOST:PORT"),
            ('[targets.vm1]\nupstream = "127.0.0.1:{b}"\nauth = "inject"\n', "inject needs"),
        ):
            setup.write(text)
            with pytest.raises(ReloadFailed, match=problem):
                await setup.reloader.reload()
            assert setup.reloader.fronts is before
            await _reach(vm1, a)


async def test_a_port_that_is_taken_is_reported_and_tried_again(tmp_path: Path) -> None:
    async with running(tmp_path, VM1_ON_A) as setup:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            setup.write(
                VM1_ON_A
                + f'[targets.vm2]\nupstream = "127.0.0.1:{{b}}"\nlisten = "127.0.0.1:{port}"\n'
            )
            report = await setup.reloader.reload()
            assert report.failed == [f"plain:vm2 127.0.0.1:{port}: Address already in use"]
            assert report.json()["success"] is False
            assert report.targets.added == ["vm2"]
        report = await setup.reloader.reload()  # the same file, the port now free
        assert report.opened == [f"plain:vm2 127.0.0.1:{port}"]
        assert report.targets.added == []
        await _reach(port, setup.upstreams[1])


async def test_a_listener_moves_from_plain_to_tls_on_the_same_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    async with running(tmp_path, VM1_ON_A) as setup:
        port = setup.port_of("plain:vm1")
        setup.write(
            f'[targets.vm1]\nupstream = "127.0.0.1:{{a}}"\ntls_listen = "127.0.0.1:{port}"\n'
        )
        report = await setup.reloader.reload()
        # the plain listener is closed before the TLS one binds its port
        assert report.stopped == [f"plain:vm1 127.0.0.1:{port}"]
        assert report.opened == [f"tls:vm1 127.0.0.1:{port}"]


async def test_the_main_upstream_moves_its_reverse_and_websocket_routes(tmp_path: Path) -> None:
    main = (
        '[proxy]\nupstream = "127.0.0.1:{a}"\nlisten = "127.0.0.1:0"\nws_listen = "127.0.0.1:0"\n'
    )
    async with running(tmp_path, main) as setup:
        _a, b = setup.upstreams
        port, web = setup.port_of("plain"), setup.port_of("websocket")
        setup.write(main.replace("{a}", "{b}"))
        report = await setup.reloader.reload()
        assert report.repointed == [
            f"plain 127.0.0.1:{port} -> 127.0.0.1:{b.port}",
            f"websocket 127.0.0.1:{web} -> 127.0.0.1:{b.port}",
        ]
        await _reach(port, b)


async def _status_for_the_portal(port: int, extra: str = "") -> bytes:
    upgrade = (
        "GET / HTTP/1.1\r\nHost: spicetap\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: https://portal.example\r\n{extra}\r\n"
    )
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as browser:
            await browser.send_all(upgrade.encode())
            return bytes(await browser.receive_some()).split(b"\r\n", 1)[0]


async def test_a_reload_changes_which_pages_may_open_websockets(tmp_path: Path) -> None:
    main = '[proxy]\nupstream = "127.0.0.1:{a}"\nws_listen = "127.0.0.1:0"\n'
    async with running(tmp_path, main) as setup:
        port = setup.port_of("websocket")
        assert await _status_for_the_portal(port) == b"HTTP/1.1 403 Forbidden"
        setup.write(main + 'ws_origins = ["https://portal.example"]\n')
        assert (await setup.reloader.reload()).restart_needed == []
        assert await _status_for_the_portal(port) == b"HTTP/1.1 101 Switching Protocols"
        # the portal is spicetap's own page behind a reverse proxy: once trusted, it says so
        behind = "X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: https\r\n"
        behind += "X-Forwarded-Host: portal.example\r\n"
        setup.write(main)
        await setup.reloader.reload()
        assert await _status_for_the_portal(port, behind) == b"HTTP/1.1 403 Forbidden"
        setup.write(main + 'ws_trusted_proxies = ["127.0.0.1"]\n')
        assert (await setup.reloader.reload()).restart_needed == []
        assert await _status_for_the_portal(port, behind) == b"HTTP/1.1 101 Switching Protocols"


async def test_a_reload_names_the_load_balancers_that_send_proxy_headers(
    tmp_path: Path,
) -> None:
    connect = '[connect]\nlisten = "127.0.0.1:0"\nallow = ["127.0.0.1:1"]\n'
    async with running(tmp_path, VM1_ON_A + connect) as setup:
        (running_vm1,) = setup.listeners.running.values()
        assert setup.listeners.connect is not None
        front = setup.listeners.connect.front
        assert running_vm1.routing.proxied == () and front.proxied == ()
        setup.write('[proxy]\nproxy_protocol_from = ["10.0.0.0/8"]\n\n' + VM1_ON_A + connect)
        assert (await setup.reloader.reload()).restart_needed == []
        assert running_vm1.routing.proxied == parse_trusted(["10.0.0.0/8"])
        assert setup.listeners.connect.front is front  # the one serving, reconfigured
        assert front.proxied == parse_trusted(["10.0.0.0/8"])


async def test_a_reload_of_the_same_file_changes_nothing(tmp_path: Path) -> None:
    inject = 'auth = "inject"\nviewer_password = "v-pw"\nserver_password = "s-pw"\n'
    async with running(tmp_path, VM1_ON_A + inject) as setup:
        setup.listeners.follow_migration = True
        key = next(iter(setup.listeners.running))
        setup.listeners.repoint(key, setup.reloader.fronts.routes[0])
        migration = setup.listeners.running[key].routing.migration
        assert migration is not None
        report = await setup.reloader.reload()
        assert report.json() == {
            "success": True,
            "targets": {"added": [], "removed": [], "changed": []},
            "listeners": {
                "opened": [], "stopped": [], "repointed": [], "failed": [], "renewed": []
            },
            "restartNeeded": [],
        }
        # the same checks: migrations under way keep the listeners that serve them
        assert setup.listeners.running[key].routing.migration is migration


async def test_restart_only_keys_are_named_every_time(tmp_path: Path) -> None:
    async with running(tmp_path, VM1_ON_A) as setup:
        setup.write("[proxy]\nmax_message = 1024\n\n" + VM1_ON_A)
        assert (await setup.reloader.reload()).restart_needed == ["[proxy] max_message"]
        assert (await setup.reloader.reload()).restart_needed == ["[proxy] max_message"]


async def test_channels_from_a_reload_on_get_its_timeouts(tmp_path: Path) -> None:
    async def hold(stream: trio.SocketStream) -> None:  # a server that never answers
        async with stream:
            await trio.sleep_forever()

    async with running(tmp_path, VM1_ON_A) as setup, trio.open_nursery() as nursery:
        (server,) = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        port = server.socket.getsockname()[1]
        proxy = setup.listeners.proxy
        setup.write(
            "[proxy]\nlink_timeout = 3\nidle_timeout = 30\nmax_message = 1024\n\n"
            + VM1_ON_A.replace("{a}", str(port))
        )
        report = await setup.reloader.reload()
        assert report.restart_needed == ["[proxy] max_message"]
        assert proxy.limits == Limits(link_timeout=3, idle_timeout=30)  # max_message kept
        async with await trio.open_tcp_stream("127.0.0.1", setup.port_of("plain:vm1")):
            for _ in range(500):  # 5 s at most, until the channel is relayed
                if proxy.state.channels:
                    break
                await trio.sleep(0.01)
            (channel,) = proxy.state.channels.values()
            assert channel.relay.limits == proxy.limits
        nursery.cancel_scope.cancel()


async def test_the_api_reloads_and_says_why_not(tmp_path: Path) -> None:
    async with running(tmp_path, VM1_ON_A) as setup:
        options = ManagementOptions(("127.0.0.1", 0), None, None, None)
        api = ManagementApi(options, ProxyState(), None, None, setup.reloader)
        setup.write(VM1_ON_A + OLD_ON_A)
        reply = await api.answer("POST", "/api/reload", b"")
        data = json.loads(reply.body)
        assert reply.status == 200 and data["success"] is True
        assert data["targets"] == {"added": ["old"], "removed": [], "changed": []}
        setup.write("[targets.vm1\n")
        with pytest.raises(HttpError, match=r"gateway\.toml") as failed:
            await api.answer("POST", "/api/reload", b"{}")
        assert failed.value.status == 422
        with pytest.raises(HttpError, match="takes no parameters") as bad:
            await api.answer("POST", "/api/reload", b'{"force": true}')
        assert bad.value.status == 400
        without = ManagementApi(options, ProxyState(), None, None, None)
        with pytest.raises(HttpError, match="no --config file") as none:
            await without.answer("POST", "/api/reload", b"")
        assert none.value.status == 409


# --- the signal, in a real `spicetap proxy` process ---


def test_sighup_reloads_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[targets.vm1]\nupstream = "127.0.0.1:1"\nlisten = "127.0.0.1:0"\n')
    with ProxyProcess(0, None, tmp_path / "proxy", ("--config", str(config))) as proxy:
        config.write_text(
            '[targets.vm1]\nupstream = "127.0.0.1:1"\nlisten = "127.0.0.1:0"\n'
            '[targets.vm2]\nupstream = "127.0.0.1:2"\nlisten = "127.0.0.1:0"\n'
        )
        proxy.proc.send_signal(signal.SIGHUP)
        lines = [proxy.next_line(), proxy.next_line()]
        assert lines[0].startswith("spicetap proxy listening (plain:vm2) on 127.0.0.1:")
        assert lines[1] == "spicetap proxy reloaded\n"
        wait_for_log(proxy, "config reloaded")
        log = proxy.log()
        assert "SIGHUP: reloading" in log and "reload: target vm2 added" in log
        config.write_text("[targets.vm1\n")
        proxy.proc.send_signal(signal.SIGHUP)
        assert proxy.next_line() == "spicetap proxy reload failed\n"
        wait_for_log(proxy, "reload failed")
        log = proxy.log()
        assert "reload failed, the running config stays: " in log and "not valid TOML" in log
        assert proxy.proc.poll() is None
    assert "Traceback" not in proxy.log()


def test_sighup_without_a_config_file_stops_the_proxy(tmp_path: Path) -> None:
    # a closed terminal's hang-up: before, the proxy died at once; now it drains as on SIGTERM
    with ProxyProcess(1, tmp_path / "rec", tmp_path / "proxy") as proxy:
        proxy.proc.send_signal(signal.SIGHUP)
        assert proxy.proc.wait(30) == 0
    assert "stopping: draining archives" in proxy.log()


def test_a_replaced_ca_file_is_read_again_by_the_next_connection(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(make_tls_material(tmp_path / "first").ca_file.read_bytes())
    context = targets_module._client_context(ca, False, None, True)
    assert targets_module._client_context(ca, False, None, True) is context  # one per check
    ca.write_bytes(make_tls_material(tmp_path / "second").ca_file.read_bytes())
    renewed = targets_module._client_context(ca, False, None, True)
    assert renewed is not context
    assert renewed.get_ca_certs() != context.get_ca_certs()


def test_peek_link_reads_what_a_channel_asks_for_and_gives_the_bytes_back() -> None:
    from proxy.io.ends import PlainEnd
    from proxy.io.server import peek_link
    from tests.proxy.test_framing import caps_word, link_mess

    message = link_mess(caps_word(1, 3), channel_type=3, conn=0xABCD)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        end = PlainEnd(ours, prefix=message[:5])  # a front already read a few
        theirs.sendall(message[5:12])
        theirs.sendall(message[12:])
        assert peek_link(end, 5.0) == (3, 0xABCD)
        received = b""
        for _ in range(3):  # the bytes read ahead, then the socket's rest
            if len(received) < len(message):
                received += end.receive()
        assert received == message
        theirs.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(8))
        assert peek_link(end, 5.0) is None  # not SPICE: the relay says so, from the bytes
        assert end.receive().startswith(b"GET / ")
        started = time.monotonic()
        assert peek_link(end, 0.3) is None  # nothing comes: at most the timeout
        assert time.monotonic() - started < 3


def test_peek_link_on_a_tls_end_gives_the_decrypted_bytes_back(tmp_path: Path) -> None:
    """The CONNECT front and TLS listeners peek after the handshake: the link message
    comes out of TLS records, and receive() gives it back before reading on."""
    import threading

    from proxy.io.ends import tls_end
    from proxy.io.server import peek_link
    from tests.proxy.test_framing import caps_word, link_mess

    material = make_tls_material(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(
        material.x509_dir / "server-cert.pem", material.x509_dir / "server-key.pem"
    )
    client = ssl.create_default_context(cafile=str(material.ca_file))
    message = link_mess(caps_word(1, 3), channel_type=5, conn=0x1234)
    ours, theirs = socket.socketpair()
    wrapped = client.wrap_socket(theirs, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    with ours, wrapped:  # wrapped took theirs over

        def viewer() -> None:
            wrapped.do_handshake()
            for piece in (message[:3], message[3:20], message[20:]):  # records of their own
                wrapped.sendall(piece)

        sender = threading.Thread(target=viewer)
        sender.start()
        end = tls_end(ours, server, server_side=True)
        end.handshake(10.0)
        assert peek_link(end, 10.0) == (5, 0x1234)
        received = b""
        for _ in range(5):  # bounded: the bytes given back, then the records' rest
            if len(received) < len(message):
                received += end.receive()
        sender.join(10)
        assert received == message


async def test_every_reload_reaches_the_connect_front_that_serves(tmp_path: Path) -> None:
    connect = '[connect]\nlisten = "127.0.0.1:0"\nallow = ["127.0.0.1:{port}"]\n'
    async with running(tmp_path, VM1_ON_A + connect.replace("{port}", "1")) as setup:
        front = setup.reloader.fronts.connect
        assert front is not None
        router = front[1].router  # the one the CONNECT front routes with
        for port in (2, 3):
            setup.write(VM1_ON_A + connect.replace("{port}", str(port)))
            await setup.reloader.reload()
            assert router.route("127.0.0.1", port) is not None
            assert router.route("127.0.0.1", port - 1) is None


CONNECT_TO_A = '[connect]\nlisten = "{where}:0"\nallow = ["127.0.0.1:{{a}}"]\n'


async def _connect_answer(port: int, target: str, host: str = "127.0.0.1") -> bytes:
    """The status line the CONNECT front on host:port answers for `target`."""
    with trio.fail_after(5):
        async with await trio.open_tcp_stream(host, port) as viewer:
            await viewer.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            return bytes(await viewer.receive_some()).split(b"\r\n", 1)[0]


async def test_a_reload_opens_moves_and_stops_the_connect_front(tmp_path: Path) -> None:
    async with running(tmp_path, VM1_ON_A) as setup:
        a, _b = setup.upstreams
        listeners = setup.listeners
        assert listeners.connect is None
        setup.write(VM1_ON_A + CONNECT_TO_A.format(where="127.0.0.1"))
        report = await setup.reloader.reload()
        assert listeners.connect is not None
        first, front = listeners.connect.bound[1], listeners.connect.front
        assert report.opened == [f"connect 127.0.0.1:{first}"] and report.restart_needed == []
        assert (
            await _connect_answer(first, f"127.0.0.1:{a.port}")
            == b"HTTP/1.1 200 Connection established"
        )
        # another address: a new listener, the same front (its router's memory stays)
        setup.write(VM1_ON_A + CONNECT_TO_A.format(where="127.0.0.2"))
        report = await setup.reloader.reload()
        assert listeners.connect is not None and listeners.connect.front is front
        moved = listeners.connect.bound
        assert moved[0] == "127.0.0.2"
        assert report.stopped == [f"connect 127.0.0.1:{first}"]
        assert report.opened == [f"connect 127.0.0.2:{moved[1]}"]
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", first)
        answer = await _connect_answer(moved[1], f"127.0.0.1:{a.port}", moved[0])
        assert answer == b"HTTP/1.1 200 Connection established"
        setup.write(VM1_ON_A)
        report = await setup.reloader.reload()
        assert report.stopped == [f"connect 127.0.0.2:{moved[1]}"] and listeners.connect is None


async def test_a_reload_opens_moves_and_stops_the_websocket_front(tmp_path: Path) -> None:
    main = (
        '[proxy]\nupstream = "127.0.0.1:{{a}}"\nlisten = "127.0.0.1:0"\nws_listen = "{where}:0"\n'
    )
    async with running(tmp_path, VM1_ON_A) as setup:
        setup.write(main.format(where="127.0.0.1") + VM1_ON_A)
        report = await setup.reloader.reload()
        web = setup.port_of("websocket")
        assert report.opened == [
            f"plain 127.0.0.1:{setup.port_of('plain')}",
            f"websocket 127.0.0.1:{web}",
        ]
        assert await _status_for_the_portal(web) == b"HTTP/1.1 403 Forbidden"  # it serves
        setup.write(main.format(where="127.0.0.2") + VM1_ON_A)
        report = await setup.reloader.reload()
        (moved,) = report.opened  # the plain listener stays
        assert report.stopped == [f"websocket 127.0.0.1:{web}"]
        assert moved.startswith("websocket 127.0.0.2:")
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", web)
        setup.write(VM1_ON_A)
        report = await setup.reloader.reload()
        assert report.stopped[1:] == [moved] and report.opened == []
        with pytest.raises(KeyError):
            setup.port_of("websocket")


async def test_a_reload_changes_the_connection_cap_and_migration_following(tmp_path: Path) -> None:
    connect = CONNECT_TO_A.format(where="127.0.0.1")
    async with running(tmp_path, VM1_ON_A + connect) as setup:
        listeners = setup.listeners
        admission = listeners.proxy.state.admission = Admission(50)
        assert listeners.connect is not None
        (vm1,) = listeners.running.values()
        for follow, cap in ((False, 7), (True, 900), (False, 900)):
            setup.write(
                f"[proxy]\nmax_connections = {cap}\nfollow_migration = {str(follow).lower()}\n"
                + VM1_ON_A
                + connect
            )
            report = await setup.reloader.reload()
            assert report.restart_needed == [] and report.opened == report.stopped == []
            assert (admission.limit, admission.reserve) == (cap, session_reserve(cap))
            assert (vm1.routing.migration is not None) is follow
            assert listeners.connect.front.follow_migration is follow
        admission.open = 7
        setup.write("[proxy]\nmax_connections = 7\n" + VM1_ON_A + connect)
        await setup.reloader.reload()
        assert not admission.admit() and admission.refused == 1  # past the new cap


async def test_a_reload_turns_reading_sasl_user_names_on_and_off(tmp_path: Path) -> None:
    async with running(tmp_path, VM1_ON_A) as setup:
        proxy = setup.listeners.proxy
        assert proxy.sasl_user is False
        for on in (True, False, True):
            setup.write(VM1_ON_A + f"[recording.privacy]\nsasl_user = {str(on).lower()}\n")
            report = await setup.reloader.reload()
            assert report.restart_needed == [] and proxy.sasl_user is on


async def test_a_reload_changes_the_lockout_and_keeps_what_it_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running(tmp_path, VM1_ON_A) as setup:
        lockout = setup.listeners.proxy.state.lockout = Lockout(LockoutPolicy(failures=5))
        now = time.monotonic()
        for _ in range(3):
            lockout.failed("10.0.0.9", now)
        setup.write("[proxy]\nlockout_failures = 4\nlockout_seconds = 60\n" + VM1_ON_A)
        await setup.reloader.reload()
        assert lockout.policy == LockoutPolicy(failures=4, duration=60)
        assert "reload: lockout: 4 failed authentications within 300 s" in caplog.text
        assert lockout.failed("10.0.0.9", now) is not None  # the three before still count
        caplog.clear()
        setup.write("[proxy]\nlockout_failures = 0\n" + VM1_ON_A)
        await setup.reloader.reload()
        assert "reload: lockout: off" in caplog.text
        assert lockout.locked_for("10.0.0.9", now) > 0  # a reload is no way out of a lock


async def test_a_cap_beyond_the_open_files_limit_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    too_many = 1 << 40  # beyond any open-files limit
    async with running(tmp_path, VM1_ON_A) as setup:
        setup.listeners.proxy.state.admission = Admission(50)
        warned = []
        for cap in (too_many, too_many, 9, too_many):
            caplog.clear()
            setup.write(f"[proxy]\nmax_connections = {cap}\n" + VM1_ON_A)
            await setup.reloader.reload()
            warned.append("new ones may fail" in caplog.text)
        assert warned == [True, False, False, True]  # when set, not at every reload


async def test_a_reload_rotates_the_management_apis_token(tmp_path: Path) -> None:
    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    token_file = tmp_path / "api-token"
    token_file.write_text(old + "\n")
    main = f'[proxy]\nmanagement = "127.0.0.1:0"\nmanagement_token_file = "{token_file}"\n'
    async with running(tmp_path, main + VM1_ON_A) as setup, trio.open_nursery() as nursery:
        token = setup.reloader.fronts.api_token
        options = ManagementOptions(("127.0.0.1", 0), None, token, None)
        serving = await nursery.start(
            serve_management, options, ProxyState(), None, None, setup.reloader
        )
        port = serving.listeners[0].socket.getsockname()[1]

        async def status(bearer: str) -> bytes:
            request = (
                f"GET /api/sessions HTTP/1.1\r\nHost: api\r\n"
                f"Authorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
            )
            with trio.fail_after(5):
                async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                    await client.send_all(request.encode())
                    return bytes(await client.receive_some()).split(b"\r\n", 1)[0]

        assert await status(old) == b"HTTP/1.1 200 OK"
        token_file.write_text(new + "\n")  # the same file, another token: no key changed
        report = await setup.reloader.reload()
        assert report.restart_needed == []
        assert await status(old) == b"HTTP/1.1 401 Unauthorized"
        assert await status(new) == b"HTTP/1.1 200 OK"
        assert new not in repr(setup.reloader.fronts)  # a logged Fronts keeps it
        token_file.write_text("short\n")  # unusable: the reload fails, the token stays
        with pytest.raises(ReloadFailed, match="api-token"):
            await setup.reloader.reload()
        assert await status(new) == b"HTTP/1.1 200 OK"
        # the lockout's settings reach the API's count of wrong tokens (one so far)
        token_file.write_text(new + "\n")
        setup.write(main + "lockout_failures = 2\n" + VM1_ON_A)
        await setup.reloader.reload()
        assert await status(old) == b"HTTP/1.1 401 Unauthorized"
        assert await status(new) == b"HTTP/1.1 429 Too Many Requests"
        nursery.cancel_scope.cancel()


def test_a_file_without_a_recording_directory_leaves_recording_as_it_was(tmp_path: Path) -> None:
    """Recording stopped by the file waits for a restart; the reloads after it still
    apply [recording] once the directory is back."""
    from proxy.cli import _rebuild

    path = tmp_path / "gateway.toml"
    args = build_parser().parse_args(["proxy", "--config", str(path)])
    first, later = tmp_path / "first", tmp_path / "later"
    path.write_text(VM1_ON_A.format(a=1) + f'[recording]\ndirectory = "{first}"\n')
    fronts = build_fronts(args, load_config(path), None, False)
    fronts = replace(fronts, recording=recording_options(args, load_config(path).recording, 99))
    path.write_text(VM1_ON_A.format(a=1))  # no directory
    kept = _rebuild(args, None, False, load_config(path), fronts)
    assert kept.recording == fronts.recording
    path.write_text(VM1_ON_A.format(a=1) + f'[recording]\ndirectory = "{later}"\n')
    moved = _rebuild(args, None, False, load_config(path), kept).recording
    assert moved is not None and moved.directory == later and later.is_dir()
    assert moved.max_message == 99  # the recording process's, set at start
