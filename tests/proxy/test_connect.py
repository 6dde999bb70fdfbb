"""The CONNECT front's core: request parsing, refusals, allow-list, routing."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.allow import AllowList, AllowListError, parse_pattern
from proxy.core.connect import ConnectHandshake, ConnectRequest, Refusal, tunnel_kind
from proxy.core.http import MAX_HEAD
from proxy.targets import ConnectRouter, Target
from spicetap.config import ConnectSection
from spicetap.errors import UserError

GLIB_REQUEST = (  # what spice-gtk's GLib HTTP proxy sends
    b"CONNECT 10.0.0.5:5901 HTTP/1.0\r\nHost: 10.0.0.5:5901\r\n"
    b"Proxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n\r\n"
)


def test_connect_request_split_anywhere_then_tunnel_bytes() -> None:
    for cut in range(1, len(GLIB_REQUEST)):
        hs = ConnectHandshake()
        assert hs.feed(GLIB_REQUEST[:cut]) is None
        assert hs.feed(GLIB_REQUEST[cut:] + b"REDQ") == ConnectRequest("10.0.0.5", 5901)
        answer = hs.accept()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")
        assert hs.tunnel_data == b"REDQ"  # bytes after the request belong to the tunnel


def test_ipv6_target() -> None:
    hs = ConnectHandshake()
    assert hs.feed(b"CONNECT [fd00::5]:5900 HTTP/1.1\r\nHost: x\r\n\r\n") == ConnectRequest(
        "fd00::5", 5900
    )


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"CONNECT nohost HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT h:0 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT h:99999 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT h:x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"\x16\x03\x01\x00\x10garbage\r\n\r\n", 400),
        (b"REDQ\x02\x00\x00\x00\x02\x00\x00\x00\r\n\r\n", 400),
        # a body would be read as HTTP, not as the tunnel: bad chunk framing once crashed
        # the proxy when accepted
        (b"CONNECT h:1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n", 400),
        (b"CONNECT h:1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nREDQ", 400),
    ],
)
def test_bad_requests_are_refused_with_an_http_answer(request_bytes: bytes, status: int) -> None:
    hs = ConnectHandshake()
    result = hs.feed(request_bytes)
    assert isinstance(result, Refusal) and result.status == status
    answer = hs.refuse(result)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert result.reason.encode() in answer


def test_oversized_head_is_refused() -> None:
    hs = ConnectHandshake()
    result = None
    for _ in range(100):  # bounded: 100 x 1 KiB headers
        result = hs.feed(b"X-Filler: " + b"a" * 1024 + b"\r\n")
        if result is not None:
            break
    assert isinstance(result, Refusal) and result.status == 431
    assert hs.refuse(result).startswith(b"HTTP/1.1 431 ")
    # whole in one read: h11 alone would take it, as its bound is on incomplete heads
    whole = b"CONNECT h:1 HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\nREDQ"
    assert ConnectHandshake().feed(whole) == Refusal(431, f"request head over {MAX_HEAD} bytes")


@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_a_refusal_or_need_more(data: bytes) -> None:
    hs = ConnectHandshake()
    result = hs.feed(data)
    assert result is None or isinstance(result, ConnectRequest | Refusal)
    if isinstance(result, Refusal):
        assert hs.refuse(result).startswith(b"HTTP/1.1 ")


def test_tunnel_kind() -> None:
    assert tunnel_kind(b"\x16\x03\x01") == "tls"
    assert tunnel_kind(b"REDQ\x02") == "spice"
    assert tunnel_kind(b"RE") == "spice"  # the relay checks the rest of the magic
    assert tunnel_kind(b"GET /") is None
    assert tunnel_kind(b"") is None


@pytest.mark.parametrize(
    ("pattern", "host", "port", "ok"),
    [
        ("127.0.0.1:5900", "127.0.0.1", 5900, True),
        ("127.0.0.1:5900", "127.0.0.1", 5901, False),
        ("127.0.0.1:5900-5999", "127.0.0.1", 5999, True),
        ("127.0.0.1:5900-5999", "127.0.0.1", 6000, False),
        ("10.0.0.0/24:*", "10.0.0.77", 1234, True),
        ("10.0.0.0/24:*", "10.0.1.77", 1234, False),
        ("10.0.0.0/24:*", "example.org", 1234, False),
        ("[fd00::]/64:5900", "fd00::9", 5900, True),
        ("[fd00::1]:5900", "fd00::1", 5900, True),
        ("vm1.lab:5900", "VM1.lab.", 5900, True),
        ("*.lab:5900", "vm2.lab", 5900, True),
        ("*.lab:5900", "lab", 5900, False),
        ("*.lab:5900", "evil-lab", 5900, False),
    ],
)
def test_allow_patterns(pattern: str, host: str, port: int, ok: bool) -> None:
    assert AllowList.parse([pattern]).allows(host, port) is ok


@pytest.mark.parametrize("bad", ["nohost", "h:", "h:0", "h:9-1", "h:70000", "a/b:1", "h h:1"])
def test_bad_patterns_name_themselves(bad: str) -> None:
    with pytest.raises(AllowListError, match="allow"):
        parse_pattern(bad)


def test_router_by_name_by_address_by_allow_list_else_refused() -> None:
    vm1 = Target("vm1", ("10.0.0.5", 5900), ("10.0.0.5", 5901))
    router = ConnectRouter.from_config(ConnectSection(allow=("127.0.0.1:5930-5939",)), {"vm1": vm1})
    assert router.route("vm1", 1) is vm1
    assert router.route("10.0.0.5", 5901) is vm1
    assert router.route("10.0.0.5", 5902) is None
    adhoc = router.route("127.0.0.1", 5931)
    assert adhoc is not None and adhoc.name is None
    assert adhoc.plain == adhoc.tls == ("127.0.0.1", 5931)
    assert router.route("127.0.0.1", 5940) is None


def test_target_side_follows_the_viewer_when_it_can() -> None:
    both = Target("t", ("h", 1), ("h", 2), insecure=True)
    assert both.upstream(False, None).label == "h:1"
    assert both.upstream(True, None).label == "h:2 (tls)"
    plain_only = Target("t", ("h", 1), None)
    assert plain_only.upstream(True, None).label == "h:1"  # TLS ends at spicetap
    tls_only = Target("t", None, ("h", 2), insecure=True)
    assert tls_only.upstream(False, None).label == "h:2 (tls)"  # TLS added upstream
    v6 = Target("t", ("fd00::1", 1), ("fd00::1", 2), insecure=True)
    assert v6.upstream(False, None).label == "[fd00::1]:1"  # as archives name servers
    assert v6.upstream(True, None).label == "[fd00::1]:2 (tls)"


def test_router_with_a_bad_pattern_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"\[connect\] allow 'x'"):
        ConnectRouter.from_config(ConnectSection(allow=("x",)), {})


def test_router_admits_a_migration_destination_for_a_while() -> None:
    router = ConnectRouter.from_config(ConnectSection(allow=("127.0.0.1:5930",)), {})
    assert router.route("10.0.0.9", 5901) is None
    router.admit(("10.0.0.9", 5901), time.monotonic() + 60)
    admitted = router.route("10.0.0.9", 5901)
    assert admitted is not None and admitted.plain == ("10.0.0.9", 5901)
    assert router.route("10.0.0.9", 5902) is None  # that address only
    router.admit(("10.0.0.8", 5901), time.monotonic() - 1)  # expired
    assert router.route("10.0.0.8", 5901) is None


def test_router_remembers_where_moved_targets_were_while_channels_are_open_there() -> None:
    a, b, c = ("10.0.0.1", 5900), ("10.0.0.2", 5900), ("10.0.0.3", 5900)
    section = ConnectSection()
    router = ConnectRouter.from_config(section, {"vm1": Target("vm1", a, None)})
    same = {"vm1": Target("vm1", a, None, insecure=True)}  # changed, not moved
    router.reconfigure(ConnectRouter.from_config(section, same))
    assert router.retired == {}
    on_a = same["vm1"]
    router.reconfigure(ConnectRouter.from_config(section, {"vm1": Target("vm1", b, None)}))
    router.reconfigure(ConnectRouter.from_config(section, {"vm1": Target("vm1", c, None)}))
    on_c = router.route("vm1", 1)
    assert on_c is not None and on_c.plain == c
    assert [t.plain for t in router.retired["vm1"]] == [b, a]  # newest first
    for there in (a, c, b, c):  # and back: each place once
        router.reconfigure(ConnectRouter.from_config(section, {"vm1": Target("vm1", there, None)}))
    assert [t.plain for t in router.retired["vm1"]] == [b, a]
    on_a = router.retired["vm1"][1]
    assert router.moved(on_c, [a, c]) == [on_a]  # nothing is open on b: forgotten
    assert router.moved(on_c, [c]) == []
    assert "vm1" not in router.retired  # nothing left to remember
    adhoc = Target(None, a, a)
    assert router.moved(adhoc, [a]) == []


HEADERS = st.sampled_from(
    [
        b"Host: h\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: 3\r\n",
        b"Connection: close\r\n",
        b"Expect: 100-continue\r\n",
    ]
)


@given(st.lists(HEADERS, max_size=4), st.binary(max_size=40))
def test_a_request_with_any_headers_and_tail_is_answered_without_raising(
    headers: list[bytes], tail: bytes
) -> None:
    hs = ConnectHandshake()
    result = hs.feed(b"CONNECT h:5900 HTTP/1.1\r\n" + b"".join(headers) + b"\r\n" + tail)
    if isinstance(result, ConnectRequest):
        assert hs.accept().startswith(b"HTTP/1.1 200 ")
        assert hs.tunnel_data == tail
    elif isinstance(result, Refusal):
        assert hs.refuse(result).startswith(f"HTTP/1.1 {result.status} ".encode())
