"""systemd's notification protocol, received as systemd does: datagrams on an AF_UNIX
socket named by NOTIFY_SOCKET (a path, or "@" and a name in the abstract namespace)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from proxy.io.sdnotify import ServiceManager
from tests.integration.proxy_process import ProxyProcess


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = tmp_path / "notify"
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def test_each_step_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    manager = ServiceManager({"NOTIFY_SOCKET": path})
    manager.ready("0 session(s)")
    manager.reloading()
    manager.stopping("draining")
    manager.close()
    ready, reloading, stopping = (_fields(sock.recv(4096)) for _ in range(3))
    assert ready == {"READY": "1", "STATUS": "0 session(s)"}
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert stopping == {"STOPPING": "1", "STATUS": "draining"}


def test_an_abstract_socket_is_reached_too() -> None:
    name = f"spicetap-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        manager = ServiceManager({"NOTIFY_SOCKET": "@" + name})
        manager.ready("up")
        manager.close()
        assert _fields(sock.recv(4096))["READY"] == "1"


@pytest.mark.parametrize(
    ("environ", "watchdog"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.4),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.4),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_is_ours_only_when_systemd_says_so(
    environ: dict[str, str], watchdog: float | None
) -> None:
    assert ServiceManager({"NOTIFY_SOCKET": "/run/x", **environ}).watchdog == watchdog


def test_keep_alive_pings_the_watchdog_at_half_its_interval(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    manager = ServiceManager({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    calls: list[float] = []

    def status() -> str:
        calls.append(trio.current_time())
        return f"{len(calls)} session(s)"

    async def main() -> None:
        with trio.move_on_after(0.45):
            await manager.keep_alive(status)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # no real waiting
    manager.close()
    start = calls[0]
    assert [round(t - start, 3) for t in calls] == [0.0, 0.1, 0.2, 0.3, 0.4]
    pings = [_fields(sock.recv(4096)) for _ in calls]
    assert all(p["WATCHDOG"] == "1" for p in pings)
    assert [p["STATUS"] for p in pings] == [f"{n} session(s)" for n in range(1, 6)]


def test_without_systemd_nothing_is_sent_and_a_lost_systemd_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert ServiceManager({}).address is None
    ServiceManager({}).ready("up")  # does nothing
    gone = ServiceManager({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    for _ in range(3):
        gone.ready("up")
    assert caplog.text.count("cannot notify systemd") == 1


def _until(sock: socket.socket, key: str) -> dict[str, str]:
    """The next datagram that has `key`, past watchdog pings (bounded)."""
    for _ in range(100):
        fields = _fields(sock.recv(4096))
        if key in fields:
            return fields
    raise AssertionError(f"no {key} from the proxy")


def test_the_proxy_tells_systemd_each_step_and_keeps_its_variables_to_itself(
    receiver: tuple[socket.socket, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    config = tmp_path / "spicetap.toml"
    config.write_text("[proxy]\nlink_timeout = 5.0\n")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        upstream = closed.getsockname()[1]  # nothing listens there: no viewer comes anyway
    extra = ("--config", str(config), "--management", "127.0.0.1:0")
    with ProxyProcess(upstream, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
        ready = _until(sock, "READY")
        assert ready["STATUS"] == "0 session(s), 0 channel(s) open; recording"
        assert _until(sock, "WATCHDOG")["WATCHDOG"] == "1"
        (child,) = proxy.children()  # the recording process
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]
        proxy.proc.send_signal(signal.SIGHUP)
        assert proxy.next_line() == "spicetap proxy reloaded\n"
        assert _until(sock, "RELOADING")["RELOADING"] == "1"
        assert _until(sock, "READY")["READY"] == "1"  # the reload is over
        # the management API's reload is told too (systemd shows the unit reloading)
        api = http.client.HTTPConnection("127.0.0.1", proxy.ports["management"], timeout=30)
        try:
            api.request("POST", "/api/reload")
            assert api.getresponse().status == 200
        finally:
            api.close()
        assert _until(sock, "RELOADING")["STATUS"] == "reloading the config"
        assert _until(sock, "READY")["READY"] == "1"
        assert proxy.stop() == 0
    assert _until(sock, "STOPPING")["STATUS"] == "stopping: draining archives"
