"""Whom a WebSocket connection comes from behind reverse proxies: the forwarding headers
(RFC 7239 Forwarded, X-Forwarded-For/-Proto/-Host) believed from trusted proxies only,
and the WebSocket front using what they say."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from proxy.core.forwarded import Forwarding, forwarding, hops, is_trusted, parse_trusted
from proxy.core.relay import Limits
from proxy.core.websocket import accept
from proxy.io.server import ChannelProxy, Routing
from proxy.io.websocket import serve_websocket
from tests.proxy.linkserver import LinkServer
from tests.proxy.test_framing import caps_word, link_mess, link_reply
from tests.proxy.test_websocket import CHROMIUM_UPGRADE, client_frame, request

PROXIES = parse_trusted(["10.0.0.0/8", "127.0.0.1", "fd00::/64"])
NGINX = ("10.0.0.2", 40000)  # a trusted proxy's end of its connection to us
STRANGER = ("198.51.100.4", 50000)


def told(headers: dict[str, str], peer: tuple[str, int] = NGINX) -> Forwarding:
    return forwarding({k.lower(): v for k, v in headers.items()}, peer, PROXIES)


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    """Anyone can send X-Forwarded-For: a browser that connects directly and sends one is
    still its own address (else it would pick whose lockout count it uses)."""
    spoofed = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    assert told(spoofed, STRANGER) == Forwarding(STRANGER)
    assert forwarding({"x-forwarded-for": "203.0.113.9"}, NGINX, ()) == Forwarding(NGINX)


def test_a_trusted_proxy_names_the_browser() -> None:
    assert told({"X-Forwarded-For": "203.0.113.9"}) == Forwarding(("203.0.113.9", 0), NGINX)
    # no header from a trusted proxy: it is the peer itself (a health check, say)
    assert told({}) == Forwarding(NGINX)


def test_the_chain_is_read_from_the_nearest_hop_while_it_is_trusted() -> None:
    # a browser behind a CDN (not trusted) behind our two proxies
    chain = {"X-Forwarded-For": "192.0.2.1, 203.0.113.9, 10.0.0.7"}
    assert told(chain).client == ("203.0.113.9", 0)
    # what a browser wrote itself, left of the address our proxy saw, is not believed
    assert told({"X-Forwarded-For": "10.9.9.9, 203.0.113.9"}).client == ("203.0.113.9", 0)
    # every hop trusted: the farthest is the client (an internal browser)
    assert told({"X-Forwarded-For": "10.1.1.1, 10.0.0.7"}).client == ("10.1.1.1", 0)


def test_rfc7239_forwarded_with_ports_ipv6_and_case() -> None:
    forwarded = 'For="[2001:db8:cafe::17]:4711";Proto=HTTPS;Host=vdi.example:8443, for=10.0.0.7'
    assert told({"Forwarded": forwarded}) == Forwarding(
        ("2001:db8:cafe::17", 4711), NGINX, "https", "vdi.example:8443"
    )
    assert told({"Forwarded": "for=192.0.2.60:5678;by=10.0.0.2"}).client == ("192.0.2.60", 5678)
    # both sent: Forwarded is the standard one
    both = {"Forwarded": "for=192.0.2.60", "X-Forwarded-For": "192.0.2.99"}
    assert told(both).client == ("192.0.2.60", 0)


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        # the nearest hop hidden or unreadable: the proxy stands for the browser
        ({"Forwarded": "for=unknown"}, NGINX),
        ({"Forwarded": "for=_hidden;proto=https"}, NGINX),
        ({"Forwarded": 'for="192.0.2.1'}, NGINX),  # an unterminated quote
        ({"Forwarded": "for=192.0.2.1 garbage"}, NGINX),
        ({"X-Forwarded-For": "not-an-address"}, NGINX),
        ({"X-Forwarded-For": "192.0.2.1:99999"}, NGINX),
        # a hidden hop farther on: the last address a trusted proxy told
        ({"Forwarded": "for=203.0.113.9, for=_hidden, for=10.0.0.7"}, ("10.0.0.7", 0)),
        ({"X-Forwarded-For": "203.0.113.9, unknown, 10.0.0.7"}, ("10.0.0.7", 0)),
        ({"X-Forwarded-For": ", 203.0.113.9 ,"}, ("203.0.113.9", 0)),  # empty items
        ({"X-Forwarded-For": "192.0.2.1:4711"}, ("192.0.2.1", 4711)),
        ({"X-Forwarded-For": "[2001:db8::1]:4711"}, ("2001:db8::1", 4711)),
        ({"X-Forwarded-For": "2001:db8::1"}, ("2001:db8::1", 0)),
        ({"X-Forwarded-For": "::ffff:192.0.2.1"}, ("192.0.2.1", 0)),
    ],
)
def test_unreadable_hops_end_the_chain(headers: dict[str, str], client: tuple[str, int]) -> None:
    assert told(headers).client == client
    assert told(headers).proxy == NGINX


def test_x_forwarded_proto_and_host_pair_with_their_hop() -> None:
    one = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
           "X-Forwarded-Host": "VDI.example"}  # fmt: skip
    assert told(one) == Forwarding(("203.0.113.9", 0), NGINX, "https", "vdi.example")
    # one value for two hops: the outer proxy's, passed on
    two = {**one, "X-Forwarded-For": "203.0.113.9, 10.0.0.7"}
    assert told(two).proto == "https" and told(two).host == "vdi.example"
    # a list per hop: the client's hop's
    per = {"X-Forwarded-For": "203.0.113.9, 10.0.0.7", "X-Forwarded-Proto": "https, http"}
    assert told(per).proto == "https"
    # lists that do not pair, and values that are no scheme or host, tell nothing
    odd = {"X-Forwarded-For": "203.0.113.9, 10.0.0.7, 10.0.0.8", "X-Forwarded-Proto": "a, b"}
    assert told(odd).proto is None
    bad = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "gopher",
           "X-Forwarded-Host": "evil.example/path"}  # fmt: skip
    assert (told(bad).proto, told(bad).host) == (None, None)
    assert told({**one, "X-Forwarded-Proto": "wss"}).proto == "https"


def test_trusted_networks_and_their_errors() -> None:
    assert is_trusted("10.200.3.4", PROXIES) and is_trusted("fd00::1", PROXIES)
    assert is_trusted("::ffff:10.0.0.2", PROXIES)  # a dual-stack listener's IPv4 peer
    assert not is_trusted("fd00:0:0:1::1", PROXIES) and not is_trusted("?", PROXIES)
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not an IP address or network"):
        parse_trusted(["10.0.0.0/33"])
    with pytest.raises(ValueError, match=r"'proxy\.example'"):
        parse_trusted(["proxy.example"])


def test_hops_bound_nothing_but_the_head_and_never_raise() -> None:
    # the head is bounded by MAX_HEAD; whatever it holds is read without an exception
    for value in ['"', ";", ",", "for", "for=", '=""', "for=;for=", "a=b,,c=d", "\\"]:
        hops({"forwarded": value})
        hops({"x-forwarded-for": value})


def test_the_origin_check_uses_the_scheme_and_host_the_browser_used() -> None:
    """nginx's default rewrites Host to the upstream's name and terminates TLS: the page
    https://vdi.example/ opens a WebSocket that reaches us as ws:// with Host "backend"."""
    behind = CHROMIUM_UPGRADE.replace(b"Host: 127.0.0.1:5959", b"Host: backend").replace(
        b"Origin: http://127.0.0.1:5959", b"Origin: https://vdi.example"
    )
    req = request(behind)
    assert not isinstance(accept(req), tuple)  # 403: without a word from a proxy
    vouched = Forwarding(("203.0.113.9", 0), NGINX, "https", "vdi.example")
    assert isinstance(accept(req, told=vouched), tuple)
    # what an untrusted peer says does not count (told.proxy is None)
    assert not isinstance(accept(req, told=Forwarding(STRANGER)), tuple)
    # a proxy that tells only the scheme: the Host header is used with it
    assert not isinstance(accept(req, told=Forwarding(NGINX, NGINX, "https")), tuple)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
async def test_the_websocket_front_relays_a_browser_behind_a_proxy(
    trusted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    link = link_mess(caps_word(1, 3))
    server = LinkServer(link, link_reply(caps_word(1, 3)))
    head = CHROMIUM_UPGRADE.replace(
        b"Host: 127.0.0.1:5959", b"Host: backend:5959\r\nX-Forwarded-For: 203.0.113.9"
    ).replace(b"Origin: http://127.0.0.1:5959", b"Origin: https://vdi.example")
    head = head.replace(b"\r\n\r\n", b"\r\nX-Forwarded-Proto: https\r\n"
                        b"X-Forwarded-Host: vdi.example\r\n\r\n")  # fmt: skip
    async with trio.open_nursery() as nursery:
        proxy = ChannelProxy(Limits(), None)
        networks = parse_trusted(["127.0.0.0/8"] if trusted else ["192.0.2.0/24"])
        routing = Routing(await server.start(nursery), trusted=networks)
        serving = await nursery.start(serve_websocket, proxy, routing, "127.0.0.1", 0, Path("/x"))
        port = serving.listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client:
            with trio.fail_after(10):
                await client.send_all(head + client_frame(0x2, link))
                answer = await client.receive_some()
                if trusted:
                    await server.linked.wait()
        if not trusted:  # the page's origin is not the Host this request names: 403
            assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert b"origin https://vdi.example is not allowed" in answer
            assert not proxy.state.channels
        else:
            assert answer.startswith(b"HTTP/1.1 101 "), answer
            (channel,) = proxy.state.channels.values()
            assert channel.viewer == ("203.0.113.9", 0)
            assert channel.forwarded_by is not None and channel.forwarded_by[0] == "127.0.0.1"
            (opened,) = [r for r in caplog.records if r.getMessage().startswith("channel ")
                         and "-> 127.0.0.1" in r.getMessage()]  # fmt: skip
            fields = opened.__dict__["fields"]
            assert fields["viewer"] == "203.0.113.9"
            assert fields["forwarded_by"].startswith("127.0.0.1:")
        nursery.cancel_scope.cancel()


def test_trusted_proxy_options_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spicetap.cli import main
    from spicetap.config import load_config

    up = ["--upstream", "127.0.0.1:1"]
    assert main(["proxy", "--ws-trusted-proxy", "10.0.0.0/8", *up]) == 2
    assert "--ws-trusted-proxy needs --ws-listen" in capsys.readouterr().err
    front = ["--ws-listen", "127.0.0.1:0", *up]
    assert main(["proxy", *front, "--ws-trusted-proxy", "proxy.example"]) == 2
    err = capsys.readouterr().err
    assert "--ws-trusted-proxy: 'proxy.example' is not an IP address or network" in err
    assert "Traceback" not in err
    config = tmp_path / "c.toml"
    config.write_text('[proxy]\nws_trusted_proxies = ["10.0.0.0/8", "fd00::/8"]\n')
    assert load_config(config).proxy.ws_trusted_proxies == ("10.0.0.0/8", "fd00::/8")
    config.write_text('[proxy]\nws_trusted_proxies = ["10.0.0.300"]\n')
    assert main(["proxy", "--config", str(config), *front]) == 2
    assert f"{config}: [proxy] ws_trusted_proxies: '10.0.0.300'" in capsys.readouterr().err
    config.write_text('[proxy]\nws_trusted_proxies = "10.0.0.0/8"\n')
    assert main(["proxy", "--config", str(config), *front]) == 2
    assert "expected a list of strings" in capsys.readouterr().err
