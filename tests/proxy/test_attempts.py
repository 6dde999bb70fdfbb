"""Viewer connections that end before they become channels, through both shells: a TLS
handshake that fails, a server that cannot be reached. Each is logged and recorded (open,
an error on the side at fault, close), on loopback sockets."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from proxy.core.lockout import LINK_REFUSAL, Lockout, LockoutPolicy
from proxy.core.relay import Limits
from proxy.io.server import ChannelProxy, ProxyState, Upstream, tcp_end_opener, tcp_opener
from proxy.tls import issue_server_cert, load_or_create_ca, server_context
from tests.harness.procs import reserve_ports
from tests.proxy.test_framing import caps_word, link_mess


class Calls:
    """Stands for the recorder: every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> bool:
            self.calls.append((name, args))
            return True

        return call


def _unreachable() -> Upstream:
    (port,) = reserve_ports(1)  # free a moment ago, and nobody listens there
    label = f"127.0.0.1:{port}"
    opener, end = tcp_opener("127.0.0.1", port), tcp_end_opener("127.0.0.1", port)
    return Upstream(opener, label, "vm1", end, None, ("127.0.0.1", port))


async def _viewer_and_accepted() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A viewer's connection, and its accepted end as a front hands it to the proxy."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        viewer = await trio.open_tcp_stream(*listener.getsockname()[:2])
        accepted, _ = await listener.accept()
    return viewer, trio.SocketStream(accepted)


def _attempt(calls: Calls) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]:
    names = [name for name, _args in calls.calls]
    assert names == ["opened", "error", "closed"], names
    opened, error, closed = (args for _name, args in calls.calls)
    return opened, error, closed


@pytest.mark.parametrize("threaded", [True, False])
def test_a_server_that_cannot_be_reached_is_recorded_through_either_shell(threaded: bool) -> None:
    calls = Calls()
    proxy = ChannelProxy(Limits(), cast(Any, calls))
    upstream = _unreachable()

    async def main() -> None:
        viewer, stream = await _viewer_and_accepted()
        with trio.fail_after(10):
            if threaded:
                await proxy.handle_socket(stream, upstream)
            else:
                await proxy.handle(stream, upstream, insertion="connect")
        await viewer.aclose()

    trio.run(main)
    opened, error, closed = _attempt(calls)
    conn, _t, client, server, tls, route = opened
    assert client[0] == "127.0.0.1" and server == upstream.address
    assert tls == {"viewer": False}
    assert route == {
        "insertion": "reverse" if threaded else "connect",
        "server": upstream.label,
        "target": "vm1",
    }
    assert error[0] == conn and error[2] == "s2c"
    assert error[3].startswith(f"cannot reach upstream {upstream.label}: ")
    assert "refused" in error[3].lower()
    assert closed[0] == conn and closed[2] == error[3]
    assert proxy.state.errors == 1 and not proxy.state.channels


def test_a_failed_tls_handshake_is_recorded_as_the_viewers_error(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path)
    cert, key = issue_server_cert(ca, "O=spicetap,CN=test", ["127.0.0.1"], tmp_path)
    context = server_context(cert, key, None)
    calls = Calls()
    proxy = ChannelProxy(Limits(link_timeout=5.0), cast(Any, calls))
    upstream = _unreachable()  # never tried: the handshake fails first

    async def main() -> None:
        viewer, stream = await _viewer_and_accepted()
        await viewer.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")  # not TLS at all
        with trio.fail_after(10):
            await proxy.handle_socket(stream, upstream, tls=context)
        await viewer.aclose()

    trio.run(main)
    opened, error, closed = _attempt(calls)
    assert opened[4] == {"viewer": True}
    assert error[2] == "c2s" and error[3].startswith("TLS handshake failed: ")
    assert closed[2] == error[3]
    assert proxy.state.errors == 1


def test_servers_that_stall_their_handshakes_keep_no_other_server_waiting(
    tmp_path: Path,
) -> None:
    """Upstream TLS handshakes run in threads. On trio's default limiter (40, for the whole
    process) 45 channels to a server that never answers held every thread, and a healthy
    server's viewers waited behind them until the connect timeout."""
    import contextlib
    import socket
    import threading

    from proxy.io.server import tls_end_opener
    from proxy.tls import client_context

    ca = load_or_create_ca(tmp_path)
    cert, key = issue_server_cert(ca, "O=test,CN=127.0.0.1", ["127.0.0.1"], tmp_path / "s")
    good_ctx = server_context(cert, key, None)
    silent, good = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve_good() -> None:
        conn, _ = good.accept()
        with contextlib.suppress(OSError), good_ctx.wrap_socket(conn, server_side=True) as tls:
            stop.wait(20)
            tls.close()

    threading.Thread(target=serve_good, daemon=True).start()
    client = client_context(tmp_path / "ca-cert.pem", False, None)
    stalled = tls_end_opener("127.0.0.1", silent.getsockname()[1], client, None)
    healthy = tls_end_opener("127.0.0.1", good.getsockname()[1], client, None)

    async def main() -> float:
        async def stall() -> None:
            with contextlib.suppress(OSError):
                (await stalled()).close()

        async with trio.open_nursery() as nursery:
            for _ in range(45):
                nursery.start_soon(stall)
            for _ in range(450):  # all 45 accepted: their handshakes wait in threads
                with contextlib.suppress(BlockingIOError):
                    silent.setblocking(False)
                    held.append(silent.accept()[0])
                if len(held) == 45:
                    break
                await trio.sleep(0.01)
            await trio.sleep(0.2)
            started = trio.current_time()
            with trio.fail_after(8):  # the connect timeout is 10 s
                end = await healthy()
            took = trio.current_time() - started
            end.close()
            stop.set()
            for sock in held:  # the stalled handshakes end now
                sock.close()
        return took

    try:
        took = trio.run(main)
    finally:
        silent.close()
        good.close()
    assert len(held) == 45 and took < 5


@pytest.mark.parametrize("threaded", [True, False])
def test_a_locked_out_viewer_is_refused_its_link_and_no_server_is_asked(threaded: bool) -> None:
    """The viewer gets the link reply spice-server refuses a link with; the upstream (a
    listener here) never sees a connection; the attempt is recorded with the reason."""
    calls = Calls()
    lockout = Lockout(LockoutPolicy(failures=2, duration=600))
    proxy = ChannelProxy(Limits(link_timeout=5.0), cast(Any, calls), ProxyState(lockout=lockout))
    link = link_mess(caps_word(1, 3))
    answers: list[bytes] = []
    asked: list[bool] = []

    async def main() -> None:
        with trio.socket.socket() as server:
            await server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            upstream = Upstream(
                tcp_opener("127.0.0.1", port), f"127.0.0.1:{port}", None,
                tcp_end_opener("127.0.0.1", port), None, ("127.0.0.1", port),
            )  # fmt: skip
            for attempt in range(2):
                lockout.failed("127.0.0.1", time.monotonic())  # e.g. two wrong passwords
                viewer, stream = await _viewer_and_accepted()
                await viewer.send_all(link[:7])  # in two parts: the rest after a while
                async with trio.open_nursery() as nursery:
                    if threaded:
                        nursery.start_soon(proxy.handle_socket, stream, upstream)
                    else:
                        nursery.start_soon(partial(proxy.handle, stream, upstream))
                    await trio.sleep(0.1)
                    await viewer.send_all(link[7:])
                    with trio.fail_after(10):
                        answer = b""
                        while chunk := await viewer.receive_some(4096):
                            answer += chunk
                answers.append(answer)
                await viewer.aclose()
                if attempt == 0:  # one failure: not yet locked, so the server was asked
                    with trio.fail_after(5):
                        accepted, _ = await server.accept()
                    accepted.close()
                    answers.pop()
            with trio.move_on_after(0.3):
                await server.accept()
                asked.append(True)

    trio.run(main)
    assert answers == [LINK_REFUSAL] and not asked
    refusal = [args for name, args in calls.calls if name == "error"][-1]
    assert refusal[2] == "c2s"
    assert refusal[3].startswith("address 127.0.0.1 locked out after repeated failed")
    assert lockout.refused_total == 1
