"""The PROXY protocol header a load balancer sends before a viewer's bytes: parsed
(versions 1 and 2, split anywhere, refused when it is none), read from a socket, and
used by the reverse, WebSocket and CONNECT fronts: the viewer named in it is the channel's,
and the server gets the viewer's bytes without it."""

from __future__ import annotations

import re
import socket
import struct
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.allow import AllowList
from proxy.core.forwarded import parse_trusted
from proxy.core.proxyproto import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse_proxy_header,
)
from proxy.core.relay import Limits
from proxy.io.connect import ConnectFront, serve_connect
from proxy.io.ends import PlainEnd
from proxy.io.proxyproto import read_proxy_header
from proxy.io.server import ChannelProxy, Routing
from proxy.io.websocket import serve_websocket
from proxy.targets import ConnectRouter
from tests.proxy.linkserver import LinkServer
from tests.proxy.test_attempts import Calls, _attempt, _viewer_and_accepted
from tests.proxy.test_framing import caps_word, link_mess, link_reply
from tests.proxy.test_websocket import CHROMIUM_UPGRADE, client_frame

LINK = link_mess(caps_word(1, 3))


def v2(command: int, family: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    """A version 2 header, laid out from the spec independently of the parser."""
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


V2_TCP4 = v2(0x21, 0x11, socket.inet_aton("192.0.2.7") + socket.inet_aton("10.0.0.1")
             + struct.pack("!HH", 51234, 5900))  # fmt: skip
V2_TCP6 = v2(
    0x21,
    0x21,
    socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + struct.pack("!HH", 443, 5901),
    tlvs=b"\x01\x00\x02h2" + b"\x04\x00\x00",  # ALPN, NOOP: skipped
)


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 5900\r\n", ("192.0.2.7", 51234)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 443 5901\r\n", ("2001:db8::7", 443)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n", None),
        (V2_TCP4, ("192.0.2.7", 51234)),
        (V2_TCP6, ("2001:db8::7", 443)),
        (v2(0x20, 0x00, b""), None),  # LOCAL: the balancer's own health check
        (v2(0x21, 0x31, b"\x00" * 216), None),  # a UNIX socket: no address to tell
    ],
)
def test_headers_of_both_versions_split_anywhere(
    header: bytes, source: tuple[str, int] | None
) -> None:
    data = header + LINK
    for cut in range(len(header)):
        assert parse_proxy_header(data[:cut]) is None, cut
    assert parse_proxy_header(data) == ProxyHeader(source, len(header))
    assert data[len(header) :] == LINK


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (LINK, "no PROXY protocol header"),  # a viewer straight from the balancer's network
        (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),  # a TLS ClientHello
        (b"PRXY TCP4", "no PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIZ\n", "no PROXY protocol header"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 51234" + b" " * 80, "longer than 107 bytes"),
        (b"PROXY TCP5 192.0.2.7 10.0.0.1 1 2\r\n", "not understood"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n", "not understood"),
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n", "not understood"),  # leading zero
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n", "not understood"),
        (b"PROXY TCP4 192.0.2.700 10.0.0.1 1 2\r\n", "not understood"),
        (b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n", "addresses not TCP4"),
        (b"PROXY TCP4 192.0.2.7  10.0.0.1 1 2\r\n", "not understood"),  # two spaces
        (v2(0x22, 0x11, b"\x00" * 12), "command byte 0x22"),
        (v2(0x11, 0x11, b"\x00" * 12), "command byte 0x11"),  # version 1 in v2's form
        (v2(0x21, 0x11, b"\x00" * 11), "addresses cut short (11 bytes)"),
        (v2(0x21, 0x21, b"\x00" * 35), "addresses cut short (35 bytes)"),
    ],
)
def test_what_is_no_header_says_so(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=re.escape(why)):
        parse_proxy_header(data)


@given(st.binary(max_size=300))
def test_any_bytes_are_a_header_none_yet_or_an_error(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    assert header is None or header.length <= len(data)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_reading_gives_back_what_came_after_the_header() -> None:
    ours, theirs = _pair()
    with ours, theirs:
        theirs.sendall(V2_TCP4 + LINK[:5])
        end = PlainEnd(ours)
        assert read_proxy_header(end, 5).source == ("192.0.2.7", 51234)
        theirs.sendall(LINK[5:])
        got = end.receive()
        while len(got) < len(LINK):
            got += end.receive()
        assert got == LINK
        assert ours.gettimeout() is None  # blocking again, for the pumps


def test_reading_fails_on_eof_silence_and_other_bytes() -> None:
    ours, theirs = _pair()
    with ours, theirs:
        theirs.sendall(b"PROXY TCP4 ")
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyHeaderError, match="ended before its PROXY header was whole"):
            read_proxy_header(PlainEnd(ours), 5)
    ours, theirs = _pair()
    with ours, theirs, pytest.raises(TimeoutError):
        read_proxy_header(PlainEnd(ours), 0.2)
    ours, theirs = _pair()
    with ours, theirs:
        theirs.sendall(LINK)
        with pytest.raises(ProxyHeaderError, match="no PROXY protocol header"):
            read_proxy_header(PlainEnd(ours), 5)


def _serve_one(proxied: bool, sent: bytes) -> tuple[ChannelProxy, Calls, bytes, list[Any]]:
    """A viewer connection from 127.0.0.1 (the balancer, trusted when `proxied`) that sends
    `sent`, relayed by the threaded shell to a server that reads a link message and
    answers it: the proxy, its recorder's calls, what the server got, the channels."""
    calls = Calls()
    proxy = ChannelProxy(Limits(link_timeout=2), cast(Any, calls))
    server = LinkServer(LINK, link_reply(caps_word(1, 3)))
    seen: list[Any] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            upstream = await server.start(nursery)
            viewer, stream = await _viewer_and_accepted()
            balancers = parse_trusted(["127.0.0.1"] if proxied else ["192.0.2.0/24"])
            nursery.start_soon(partial(proxy.handle_socket, stream, upstream, proxied=balancers))
            with trio.fail_after(10):
                await viewer.send_all(sent)
                answer = await viewer.receive_some()
            if answer:
                seen.extend(proxy.state.channels.values())
            await viewer.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return proxy, calls, bytes(server.got), seen


@pytest.mark.parametrize("header", [V2_TCP4, b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 5900\r\n"])
def test_the_reverse_front_relays_the_viewer_a_balancer_names(header: bytes) -> None:
    _proxy, calls, got, channels = _serve_one(True, header + LINK)
    assert got == LINK  # the header is spicetap's, not the server's
    (channel,) = channels
    assert channel.viewer == ("192.0.2.7", 51234)
    assert channel.forwarded_by[0] == "127.0.0.1"  # the balancer
    (opened,) = [args for name, args in calls.calls if name == "opened"]
    _conn, _t, client, _server, _tls, route, *_ = opened
    assert client == ("192.0.2.7", 51234)
    assert route["forwarded_by"].startswith("127.0.0.1:")


def test_untrusted_peers_bytes_go_through_unchanged() -> None:
    """Only the named balancers' headers are read: anyone else's bytes are theirs, relayed
    as they came (here the server would refuse them as no SPICE)."""
    sent = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 5900\r\n" + LINK
    _proxy, _calls, got, _channels = _serve_one(False, sent)
    # the server read at least a link message's worth of them, as they were sent
    assert len(got) >= len(LINK) and sent.startswith(got)


def test_a_trusted_balancer_without_a_header_is_refused_and_recorded() -> None:
    proxy, calls, got, channels = _serve_one(True, LINK)
    assert got == b"" and not channels
    opened, error, _closed = _attempt(calls)
    assert opened[2][0] == "127.0.0.1"  # the balancer itself
    assert error[3].startswith("PROXY protocol: no PROXY protocol header"), error
    assert proxy.state.errors == 1


def test_proxy_protocol_options_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spicetap.cli import main
    from spicetap.config import load_config

    up = ["--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0"]
    assert main(["proxy", *up, "--proxy-protocol-from", "lb.example"]) == 2
    err = capsys.readouterr().err
    assert "--proxy-protocol-from: 'lb.example' is not an IP address or network" in err
    config = tmp_path / "c.toml"
    config.write_text('[proxy]\nproxy_protocol_from = ["10.0.0.0/8", "::1"]\n')
    assert load_config(config).proxy.proxy_protocol_from == ("10.0.0.0/8", "::1")
    config.write_text('[proxy]\nproxy_protocol_from = ["10.0.0.0/40"]\n')
    assert main(["proxy", "--config", str(config), *up]) == 2
    assert f"{config}: [proxy] proxy_protocol_from: '10.0.0.0/40'" in capsys.readouterr().err


@pytest.mark.parametrize("header", [V2_TCP4, b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 5900\r\n", b""])
async def test_the_websocket_front_reads_a_balancers_header_first(header: bytes) -> None:
    """An L4 balancer before the WebSocket front: its header comes before the HTTP request
    (before TLS, with wss://); without one, from a trusted balancer, nothing is served."""
    calls = Calls()
    proxy = ChannelProxy(Limits(link_timeout=2), cast(Any, calls))
    server = LinkServer(LINK, link_reply(caps_word(1, 3)))
    got = server.got

    async with trio.open_nursery() as nursery:
        routing = Routing(await server.start(nursery), proxied=parse_trusted(["127.0.0.1"]))
        serving = await nursery.start(serve_websocket, proxy, routing, "127.0.0.1", 0, Path("/x"))
        web = serving.listeners[0].socket.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", web) as browser:
            with trio.fail_after(10):
                await browser.send_all(header + CHROMIUM_UPGRADE + client_frame(0x2, LINK))
                try:
                    answer = await browser.receive_some()
                except trio.BrokenResourceError:  # closed with our bytes unread: a reset
                    answer = b""
                if header:
                    await server.linked.wait()
        if header:
            assert answer.startswith(b"HTTP/1.1 101 "), answer
            assert bytes(got) == LINK
            (channel,) = proxy.state.channels.values()
            assert channel.viewer == ("192.0.2.7", 51234)
            assert channel.forwarded_by is not None and channel.forwarded_by[0] == "127.0.0.1"
        else:
            assert answer == b"" and not got
            _opened, error, _closed = _attempt(calls)
            assert error[3].startswith("PROXY protocol: no PROXY protocol header"), error
        nursery.cancel_scope.cancel()


async def _through_the_connect_front(
    header: bytes, tunnel: bytes
) -> tuple[list[Any], Calls, bytes, bytes, int]:
    """`header`, a CONNECT request to a server that reads a link message, then `tunnel`,
    from 127.0.0.1, a trusted balancer: the channels once linked, the recorder's calls,
    the front's answer, what the server got, the front's port."""
    seen: list[Any] = []
    calls = Calls()
    proxy = ChannelProxy(Limits(link_timeout=2), cast(Any, calls))
    server = LinkServer(LINK, link_reply(caps_word(1, 3)))
    async with trio.open_nursery() as nursery:
        upstream = await server.start(nursery)
        assert upstream.address is not None
        host, port = upstream.address
        router = ConnectRouter({}, AllowList.parse([f"{host}:{port}"]))
        front = ConnectFront(router, cast(Any, None), None, proxied=parse_trusted(["127.0.0.1"]))
        serving = await nursery.start(serve_connect, proxy, front, "127.0.0.1", 0)
        at = serving.listeners[0].socket.getsockname()[1]
        request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        async with await trio.open_tcp_stream("127.0.0.1", at) as viewer:
            with trio.fail_after(10):
                await viewer.send_all(header + request + tunnel)
                answer = b""
                try:
                    while chunk := await viewer.receive_some():
                        answer += chunk
                        if tunnel == LINK:
                            await server.linked.wait()
                            seen.extend(proxy.state.channels.values())
                            break
                except trio.BrokenResourceError:  # closed with our bytes unread: a reset
                    pass
        nursery.cancel_scope.cancel()
    return seen, calls, answer, bytes(server.got), at


@pytest.mark.parametrize("header", [V2_TCP4, b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 5900\r\n"])
async def test_the_connect_front_reads_a_balancers_header_first(header: bytes) -> None:
    """An L4 balancer before the CONNECT front: its header comes before the CONNECT request,
    here in the same segment as the request and the link message."""
    channels, _calls, answer, got, _at = await _through_the_connect_front(header, LINK)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert got == LINK  # neither the header nor the request reach the server
    (channel,) = channels
    assert channel.viewer == ("192.0.2.7", 51234)
    assert channel.forwarded_by is not None and channel.forwarded_by[0] == "127.0.0.1"


def test_the_connect_fronts_refusals_behind_a_balancer_are_recorded() -> None:
    """Without a header from a trusted balancer no request is read: recorded as the
    balancer's attempt, headed for the front itself (no target named yet). A tunnel that
    carries no SPICE is recorded as the named viewer's, with the balancer that named it."""
    _channels, calls, answer, got, at = trio.run(_through_the_connect_front, b"", LINK)
    assert answer == b"" and got == b""
    opened, error, _closed = _attempt(calls)
    assert opened[2][0] == "127.0.0.1" and opened[3] == ("127.0.0.1", at), opened
    assert error[3].startswith("PROXY protocol: no PROXY protocol header"), error
    ssh = b"SSH-2.0-OpenSSH_9.2p1\r\n"
    _channels, calls, answer, got, _at = trio.run(_through_the_connect_front, V2_TCP4, ssh)
    assert answer.startswith(b"HTTP/1.1 200 ") and got == b""
    opened, error, _closed = _attempt(calls)
    assert opened[2] == ("192.0.2.7", 51234)
    assert opened[5]["forwarded_by"].startswith("127.0.0.1:"), opened
    assert "carries neither TLS nor SPICE" in error[3], error


class _SentWith(trio.abc.Stream):
    """A stream whose first send carries `first` ahead of it, in one write: a balancer's
    PROXY header in the same segment as the browser's TLS ClientHello."""

    def __init__(self, stream: trio.abc.Stream, first: bytes) -> None:
        self.stream, self.first = stream, first

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data, self.first = self.first + bytes(data), b""
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.stream.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_tls_that_came_with_the_header_reaches_the_websocket_fronts_tls(
    tmp_path: Path,
) -> None:
    """wss:// behind a balancer: the ClientHello in the header's own segment is what TLS
    reads first (it was read with the header, and once went nowhere)."""
    import ssl

    from proxy.tls import issue_server_cert, load_or_create_ca, server_context

    ca = load_or_create_ca(tmp_path)
    cert, key = issue_server_cert(ca, "O=test,CN=127.0.0.1", ["127.0.0.1"], tmp_path / "s")
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca-cert.pem"))
    proxy = ChannelProxy(Limits(link_timeout=2), cast(Any, Calls()))
    server = LinkServer(LINK, link_reply(caps_word(1, 3)))
    upgrade = CHROMIUM_UPGRADE.replace(b"Origin: http://", b"Origin: https://")
    async with trio.open_nursery() as nursery:
        routing = Routing(
            await server.start(nursery),
            tls=server_context(cert, key, None),
            proxied=parse_trusted(["127.0.0.1"]),
        )
        serving = await nursery.start(serve_websocket, proxy, routing, "127.0.0.1", 0, Path("/x"))
        web = serving.listeners[0].socket.getsockname()[1]
        tcp = await trio.open_tcp_stream("127.0.0.1", web)
        browser = trio.SSLStream(_SentWith(tcp, V2_TCP4), trust, server_hostname="127.0.0.1")
        with trio.fail_after(10):
            await browser.send_all(upgrade + client_frame(0x2, LINK))
            answer = await browser.receive_some()
            await server.linked.wait()
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        assert bytes(server.got) == LINK
        (channel,) = proxy.state.channels.values()
        assert channel.viewer == ("192.0.2.7", 51234)
        await trio.aclose_forcefully(browser)
        nursery.cancel_scope.cancel()
