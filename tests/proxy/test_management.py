"""The management API: routing, request validation, session grouping, the Prometheus text,
and the h11 shell over in-memory streams (bad requests, limits, timeouts)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import replace
from typing import Any

import pytest
import trio
import trio.testing

from proxy.core import management as core
from proxy.core.lockout import Lockout, LockoutPolicy
from proxy.core.management import (
    ChannelView,
    ConnectRequest,
    HttpError,
    RecorderView,
    Totals,
    group_sessions,
    metrics_text,
    parse_connect,
    route,
    session_id,
    sessions_json,
    user_query,
)
from proxy.core.relay import ChannelRelay, Limits
from proxy.io import management as shell
from proxy.io.management import ManagementApi, ManagementOptions
from proxy.io.server import ChannelStats, ProxyState
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply, mini

MAIN, DISPLAY = 1, 2


def view(
    conn: int,
    ctype: int | None,
    cid: int | None,
    started: float,
    viewer: str = "10.0.0.1",
    sent: int = 10,
) -> ChannelView:
    return ChannelView(
        conn=conn,
        connection_id=cid,
        channel_type=ctype,
        channel_id=0,
        viewer=(viewer, 40000 + conn),
        upstream="127.0.0.1:5930",
        started=started,
        linked=ctype is not None,
        bytes={"c2s": sent, "s2c": 2 * sent},
        messages={"c2s": 1, "s2c": 2},
    )


TOTALS = Totals(2, 7, 1, {"c2s": 1000, "s2c": 5000}, {"c2s": 10, "s2c": 50})


# -- routing and validation ----------------------------------------------------------------
def test_routes_and_their_errors() -> None:
    assert route("GET", "/metrics") == "/metrics"
    assert route("GET", "/api/sessions?pretty=1") == "/api/sessions"
    with pytest.raises(HttpError) as nf:
        route("GET", "/nope")
    assert nf.value.status == 404
    with pytest.raises(HttpError) as na:
        route("GET", "/api/spice/connect")
    assert na.value.status == 405 and na.value.headers == (("allow", "POST"),)
    assert route("DELETE", "/api/sessions/42") == "/api/sessions/{id}"
    assert session_id("/api/sessions/42") == 42
    with pytest.raises(HttpError) as get_one:
        route("GET", "/api/sessions/42")  # GET /api/sessions lists them all
    assert get_one.value.status == 405 and get_one.value.headers == (("allow", "DELETE"),)
    for bad in ("0", "-1", "4294967296", "1e3", "x", "٣"):  # not a SPICE connection id
        with pytest.raises(HttpError, match="no such session") as no_such:
            session_id("/api/sessions/" + bad)
        assert no_such.value.status == 404


def test_connect_request_minimal_and_full() -> None:
    assert parse_connect(b'{"host": "127.0.0.1", "port": 5900}') == ConnectRequest(
        "127.0.0.1", 5900
    )
    full = json.dumps(
        {
            "host": "[::1]",
            "port": 5901,
            "timeout": 2,
            "tls": True,
            "hostSubject": "C=XX,CN=x",
            "password": "pw",
        }
    )
    assert parse_connect(full.encode()) == ConnectRequest("::1", 5901, 2.0, True, "C=XX,CN=x", "pw")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"port": 5900}', '"host"'),
        (b'{"host": "", "port": 5900}', '"host"'),
        (b'{"host": "h", "port": "5900"}', '"port"'),
        (b'{"host": "h", "port": 0}', '"port"'),
        (b'{"host": "h", "port": true}', '"port"'),
        (b'{"host": "h", "port": 70000}', '"port"'),
        (b'{"host": "h", "port": 1, "timeout": 0}', '"timeout"'),
        (b'{"host": "h", "port": 1, "timeout": 1000}', '"timeout"'),
        (b'{"host": "h", "port": 1, "timeout": "5"}', '"timeout"'),
        (b'{"host": "h", "port": 1, "tls": "yes"}', '"tls"'),
        (b'{"host": "h", "port": 1, "hostSubject": "CN=x"}', "needs"),
        (b'{"host": "h", "port": 1, "password": 5}', '"password"'),
        (b'{"host": "h", "port": 1, "password": "' + b"x" * 61 + b'"}', "at most 60"),
        (b'{"host": "h", "port": 1, "pasword": "x"}', "unknown key 'pasword'"),
        # RecursionError inside json (a 500 once); Python 3.13's json parses it: not an object
        (b"[" * 5000 + b"]" * 5000, "JSON"),
        # names the resolver cannot take as they are (IDNA raised out of it: a 500 once),
        # and what becomes empty or is cut short on the way there
        (b'{"host": "a..b", "port": 1}', '"host"'),
        (b'{"host": "' + b"a" * 64 + b'.invalid", "port": 1}', '"host"'),
        (b'{"host": "' + b"a" * 253 + b'", "port": 1}', '"host"'),
        (b'{"host": "\\ud800", "port": 1}', '"host"'),
        (b'{"host": "[]", "port": 1}', '"host"'),
        (b'{"host": " ", "port": 1}', '"host"'),
        (b'{"host": "127.0.0.1\\u0000junk", "port": 1}', '"host"'),
    ],
)
def test_bad_connect_requests_are_400_naming_the_problem(body: bytes, says: str) -> None:
    with pytest.raises(HttpError) as err:
        parse_connect(body)
    assert err.value.status == 400 and says in err.value.message


# -- sessions --------------------------------------------------------------------------------
def test_main_channel_joins_its_session_by_viewer_host_and_order() -> None:
    channels = [
        view(0, MAIN, 0, 100.0),  # a main links with connection id 0
        view(1, DISPLAY, 0xABC, 100.5),
        view(2, MAIN, 0, 101.0, viewer="10.0.0.2"),  # another viewer, main only so far
        view(3, None, None, 102.0),  # still linking
        view(4, DISPLAY, 0xABC, 100.6),
    ]
    groups = group_sessions(channels)
    assert [(sid, [c.conn for c in members]) for sid, members in groups] == [
        (0xABC, [0, 1, 4]),
        (None, [2]),
        (None, [3]),
    ]


def test_the_recorders_knowledge_beats_the_guess() -> None:
    channels = [
        view(0, MAIN, 0, 100.0),
        view(1, MAIN, 0, 100.2),
        view(2, DISPLAY, 0x77, 100.5),
    ]
    guessed = dict(group_sessions(channels))
    assert [c.conn for c in guessed[0x77]] == [1, 2]  # the latest main before it
    known = group_sessions(channels, {0: 0x77})
    assert [(sid, [c.conn for c in m]) for sid, m in known] == [(0x77, [0, 2]), (None, [1])]
    assert [sid for sid, _ in guessed.items()] == [None, 0x77]  # oldest first


def test_sessions_json() -> None:
    data = sessions_json([view(0, MAIN, 0, 0.0), view(1, DISPLAY, 5, 1.5)], TOTALS)
    (session,) = data["sessions"]
    assert session["connectionId"] == 5
    assert session["viewer"] == "10.0.0.1:40000"
    assert session["started"] == "1970-01-01T00:00:00.000+00:00"
    assert session["bytes"] == {"c2s": 20, "s2c": 40}
    assert [c["channel"] for c in session["channels"]] == ["main", "display"]
    assert session["channels"][1] == {
        "conn": 1,
        "channel": "display",
        "channelType": 2,
        "channelId": 0,
        "viewer": "10.0.0.1:40001",
        "forwardedBy": None,
        "upstream": "127.0.0.1:5930",
        "started": "1970-01-01T00:00:01.500+00:00",
        "linked": True,
        "bytes": {"c2s": 10, "s2c": 20},
        "messages": {"c2s": 1, "s2c": 2},
    }
    assert session["forwardedBy"] is None
    # behind a trusted proxy or balancer: the viewer it named, and which one it was
    behind = replace(view(0, MAIN, 0, 0.0), viewer=("203.0.113.9", 0),
                     forwarded_by=("10.0.0.2", 41000))  # fmt: skip
    (session,) = sessions_json([behind], TOTALS)["sessions"]
    assert (session["viewer"], session["forwardedBy"]) == ("203.0.113.9", "10.0.0.2:41000")
    assert session["channels"][0]["forwardedBy"] == "10.0.0.2:41000"
    assert data["totals"] == {
        "sessions": 1,
        "channelsOpen": 2,
        "channelsTotal": 7,
        "channelErrors": 1,
        "bytes": {"c2s": 1000, "s2c": 5000},
        "messages": {"c2s": 10, "s2c": 50},
    }
    json.dumps(data)  # JSON-ready as it is
    assert session["user"] is None  # no token naming its user


def test_a_session_says_whose_it_is_once_a_channel_knows() -> None:
    """The main channel links with its token before the session has an id; the user its
    token names shows on the session (a main channel alone, or after a display)."""
    main = replace(view(0, MAIN, 0, 0.0), user="alice")
    (session,) = sessions_json([main, view(1, DISPLAY, 5, 1.5)], TOTALS)["sessions"]
    assert session["user"] == "alice"


def test_one_users_sessions() -> None:
    """GET /api/sessions?user=NAME lists that user's sessions; the totals stay the
    proxy's."""
    alice = [replace(view(0, MAIN, 5, 0.0), user="alice"), view(1, DISPLAY, 5, 0.5)]
    bob = [replace(view(2, MAIN, 7, 1.0, viewer="10.0.0.2"), user="bob")]
    channels = [*alice, *bob, view(3, MAIN, 9, 2.0, viewer="10.0.0.3")]
    everyone = sessions_json(channels, TOTALS)
    assert [s["user"] for s in everyone["sessions"]] == ["alice", "bob", None]
    only = sessions_json(channels, TOTALS, None, user_query("/api/sessions?user=alice"))
    assert [s["connectionId"] for s in only["sessions"]] == [5]
    assert only["totals"]["sessions"] == 3
    # a connection still to send its link message is listed, but is not a session
    linking = sessions_json([*channels, view(4, None, None, 2.5, viewer="10.0.0.2")], TOTALS)
    assert [s["connectionId"] for s in linking["sessions"]] == [5, 7, 9, None]
    assert linking["totals"]["sessions"] == 3
    assert user_query("/api/sessions?user=Alice%20Smith") == "Alice Smith"
    assert user_query("/api/sessions") is None


# -- metrics ---------------------------------------------------------------------------------
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-z_]+="[^"\\]*",?)*\})? (-?[0-9.e+]+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Strict enough for Prometheus' text format 0.0.4: every sample's family has HELP and
    TYPE first, once; counters end in _total; no sample twice."""
    assert text.endswith("\n")
    families: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in families
            families[name] = ""
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert families.get(name) == "" and kind in ("counter", "gauge")
            families[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, line
            name = match.group(1)
            assert families.get(name), f"{name} has no HELP/TYPE before it"
            if families[name] == "counter":
                assert name.endswith("_total")
            key = name + (match.group(2) or "")
            assert key not in samples
            samples[key] = float(match.group(3))
    return samples


def test_metrics_text() -> None:
    channels = [view(0, MAIN, 0, 0.0), view(1, DISPLAY, 5, 1.0), view(2, None, None, 2.0)]
    text = metrics_text(channels, TOTALS, RecorderView(3, 1234, 4096, False, 2), 50_000_000)
    m = parse_metrics(text)
    assert m["spicetap_channels_open"] == 2
    assert m["spicetap_channels_total"] == 7
    assert m["spicetap_channel_errors_total"] == 1
    assert m['spicetap_bytes_total{direction="c2s"}'] == 1000
    assert m['spicetap_bytes_total{direction="s2c"}'] == 5000
    assert m['spicetap_messages_total{direction="s2c"}'] == 50
    assert m['spicetap_channels_open_by_type{channel="main"}'] == 1
    assert m['spicetap_channels_open_by_type{channel="display"}'] == 1
    assert m['spicetap_channels_open_by_type{channel="linking"}'] == 1
    assert m['spicetap_channels_open_by_type{channel="webdav"}'] == 0  # every type, always
    assert m["spicetap_recorder_backlog"] == 3
    assert m["spicetap_recorder_backlog_bytes"] == 1234
    assert m["spicetap_recorder_lost_bytes_total"] == 4096
    assert m["spicetap_recorder_failed"] == 0
    assert m["spicetap_recorder_resumed_total"] == 2
    assert m["process_resident_memory_bytes"] == 50_000_000


def test_metrics_without_recorder_or_rss() -> None:
    m = parse_metrics(metrics_text([], TOTALS, None, None))
    assert not [k for k in m if "recorder" in k or "process" in k]


def test_label_values_are_escaped() -> None:
    out = core._Metrics()
    out.family("x", "gauge", "help")
    out.sample("x", 1, label='a"b\\c\nd')
    assert out.text().splitlines()[-1] == 'x{label="a\\"b\\\\c\\nd"} 1'


# -- the h11 shell over memory streams -------------------------------------------------------
def live_state() -> ProxyState:
    """One relayed main channel that has linked and carried two messages."""
    state = ProxyState(total_channels=3, errors=1)
    relay = ChannelRelay(Limits(), time.monotonic())
    relay.received("c2s", link_mess(caps_word(1, 3), channel_type=MAIN, conn=0), 0.0)
    relay.received("s2c", link_reply(caps_word(1, 3)), 0.0)
    relay.received("c2s", TICKET, 0.0)
    relay.received("s2c", OK + mini(103, b"init") + mini(4, b"ping"), 0.0)
    state.channels[7] = ChannelStats(7, ("127.0.0.1", 41000), "up:5930", time.monotonic(), relay)
    state.closed_bytes["c2s"] = 100
    return state


async def exchange(api: ManagementApi, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes, read the whole response (the server closes)."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.handle, server)
        await client.send_all(raw)
        response = b""
        with trio.fail_after(10):
            while chunk := await client.receive_some(65536):
                response += chunk
        await client.aclose()  # as a client does once it has the answer (the server lingers)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def api(state: ProxyState | None = None) -> ManagementApi:
    return ManagementApi(ManagementOptions(("127.0.0.1", 0)), state or ProxyState(), None)


async def test_sessions_over_http() -> None:
    status, headers, body = await exchange(api(live_state()), request("GET", "/api/sessions"))
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    data = json.loads(body)
    (session,) = data["sessions"]
    (channel,) = session["channels"]
    assert channel["channel"] == "main" and channel["linked"]
    assert channel["messages"] == {"c2s": 0, "s2c": 2}
    assert data["totals"]["bytes"]["c2s"] == 100 + channel["bytes"]["c2s"]


async def test_metrics_over_http() -> None:
    status, headers, body = await exchange(api(live_state()), request("GET", "/metrics"))
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_metrics(body.decode())
    assert m['spicetap_messages_total{direction="s2c"}'] == 2
    assert m["process_resident_memory_bytes"] > 1_000_000


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (request("GET", "/nothing"), 404),
        (request("DELETE", "/api/sessions"), 400),  # whose? (/api/sessions?user=NAME)
        (request("PUT", "/api/sessions"), 405),
        (request("GET", "/api/sessions?usr=a"), 400),
        (request("GET", "/api/sessions?user=a&user=b"), 400),
        (request("DELETE", "/api/sessions?user="), 400),
        (request("POST", "/api/spice/connect", b"{}"), 400),
        (request("POST", "/api/spice/connect", b"x" * 70_000), 413),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 3000, 431),  # never ends
        # whole in one read: h11 alone bounds only incomplete heads
        (request("GET", "/metrics", extra="X-Pad: " + "y" * 20_000 + "\r\n"), 431),
    ],
)
async def test_bad_requests_get_an_error_status_and_json(raw: bytes, status: int) -> None:
    got, headers, body = await exchange(api(), raw)
    assert got == status
    assert "error" in json.loads(body)
    if status == 405:
        assert headers["allow"] == "GET, DELETE"


async def test_chunked_body_over_the_limit_is_413() -> None:
    chunk = b"%x\r\n%s\r\n" % (40_000, b"x" * 40_000)
    raw = b"POST /api/spice/connect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    got, _, _ = await exchange(api(), raw + chunk * 2 + b"0\r\n\r\n")
    assert got == 413


async def test_a_request_that_never_completes_gets_408(monkeypatch: Any) -> None:
    monkeypatch.setattr(shell, "REQUEST_TIMEOUT", 0.2)
    got, _, _ = await exchange(api(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line
    assert got == 408


async def test_a_bug_costs_one_request_not_the_server(monkeypatch: Any) -> None:
    def broken(*_args: Any) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(shell, "metrics_text", broken)
    got, _, body = await exchange(api(), request("GET", "/metrics"))
    assert got == 500 and json.loads(body) == {"error": "internal error"}


@pytest.mark.parametrize("sent", [b"", b"GET /metr"])
async def test_client_vanishing_mid_request_is_quiet(caplog: Any, sent: bytes) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api().handle, server)
        await client.send_all(sent)
        await client.aclose()
    assert not caplog.records  # nothing to report, least of all an "internal error"


async def test_head_gets_the_headers_without_a_body() -> None:
    """h11 refuses a body in a reply to HEAD: the client once got no reply at all."""
    status, headers, body = await exchange(api(), request("HEAD", "/api/sessions"))
    assert status == 405 and headers["allow"] == "GET, DELETE" and body == b""
    status, _, body = await exchange(api(), request("HEAD", "/nowhere"))
    assert status == 404 and body == b""


async def test_a_free_probe_slot_is_taken_however_short_the_timeout() -> None:
    """A timeout of 1e-300 s once ran out waiting for a free slot: "too many probes"."""
    body = json.dumps({"host": "127.0.0.1", "port": 1, "timeout": 1e-300}).encode()
    status, _, answer = await exchange(api(), request("POST", "/api/spice/connect", body))
    assert status == 200 and json.loads(answer)["error"] in ("Timeout", "Connection refused")


async def test_connect_probe_of_a_closed_port_over_http() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    body = json.dumps({"host": "127.0.0.1", "port": port, "timeout": 5}).encode()
    status, _, answer = await exchange(api(), request("POST", "/api/spice/connect", body))
    assert status == 200
    assert json.loads(answer) == {
        "success": False,
        "host": "127.0.0.1",
        "port": port,
        "error": "Connection refused",
        "detail": "Connection refused",
    }


def test_management_from_the_config_file(tmp_path: Any) -> None:
    from proxy.cli import _management
    from spicetap.cli import build_parser
    from spicetap.config import load_config

    path = tmp_path / "spicetap.toml"
    path.write_text('[proxy]\nupstream = "127.0.0.1:5930"\nmanagement = "127.0.0.1:0"\n')
    config = load_config(path)
    args = build_parser().parse_args(["proxy", "--config", str(path)])
    options = _management(args, config.proxy, None)
    assert options is not None and options.listen == ("127.0.0.1", 0)
    assert options.tls is not None  # probes with "tls": true have a context to check with
    flag = build_parser().parse_args(["proxy", "--management", "[::1]:9000"])
    from_flag = _management(flag, config.proxy, None)  # the option wins over the file
    assert from_flag is not None and from_flag.listen == ("::1", 9000)


async def test_time_spent_waiting_for_a_probe_slot_comes_out_of_the_timeout(
    monkeypatch: Any,
) -> None:
    """A request's timeout bounds the whole answer: it once waited up to `timeout` for a
    slot and then gave the probe a whole `timeout` more."""
    from proxy.core.probe import ProbeOutcome
    from proxy.io import management as io_management

    given: list[float] = []

    async def fake_probe(target: Any) -> ProbeOutcome:
        given.append(target.timeout)
        return ProbeOutcome("Timeout", "no answer")

    monkeypatch.setattr(io_management, "probe", fake_probe)
    a = api()
    borrowers = [object() for _ in range(io_management.MAX_PROBES)]
    for b in borrowers:
        a.probes.acquire_on_behalf_of_nowait(b)
    body = json.dumps({"host": "127.0.0.1", "port": 1, "timeout": 1.0}).encode()
    async with trio.open_nursery() as nursery:
        answers: list[int] = []

        async def ask() -> None:
            answers.append((await exchange(a, request("POST", "/api/spice/connect", body)))[0])

        nursery.start_soon(ask)
        await trio.sleep(0.3)  # all slots busy meanwhile
        a.probes.release_on_behalf_of(borrowers[0])
    assert answers == [200]
    (timeout,) = given
    assert 0 <= timeout <= 0.75


async def test_a_client_that_expects_100_continue_gets_it_then_the_answer() -> None:
    """curl sends larger bodies only after "100 Continue" (it waits a second without)."""
    client, server = trio.testing.memory_stream_pair()
    body = json.dumps({"host": "127.0.0.1", "port": 1, "timeout": 1e-300}).encode()
    head = request("POST", "/api/spice/connect", extra="Expect: 100-continue\r\n")
    head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api().handle, server)
        await client.send_all(head)
        with trio.fail_after(10):
            interim = await client.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await client.send_all(body)
        response = b""
        with trio.fail_after(10):
            while chunk := await client.receive_some(65536):
                response += chunk
        await client.aclose()
    assert response.startswith(b"HTTP/1.1 200 ")


async def test_a_client_still_sending_a_refused_body_reads_the_413_not_a_reset() -> None:
    """Closing with the client's bytes unread resets the connection: a client still
    sending a body past MAX_BODY saw ECONNRESET instead of the answer. Over real TCP."""
    import socket

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    body = b"x" * (4 << 20)  # far past MAX_BODY, and more than the socket buffers hold
    head = b"POST /api/spice/connect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"

    def client() -> tuple[bytes, str | None]:
        got, problem = b"", None
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                while data := sock.recv(65536):
                    got += data
            except OSError as exc:
                problem = repr(exc)
        return got, problem

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, api().handle, listeners)
        got, problem = await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()
    assert problem is None
    assert got.startswith(b"HTTP/1.1 413 ") and b"body over" in got


# -- authentication: a bearer token -----------------------------------------------------------
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (TOKEN, None),
        ("QWxhZGRpbjpvcGVuIHNlc2FtZQ==", None),  # base64, padding at the end
        ("short", "at least 16"),
        ("", "at least 16"),
        ("0123456789abcdef 123", "may hold only"),  # a space would end the header's token
        ("0123456789abcdef=x", "may hold only"),  # padding only at the end
        ("0123456789abcdéf0", "may hold only"),
    ],
)
def test_token_rules(token: str, problem: str | None) -> None:
    found = core.token_problem(token)
    assert (found is None) if problem is None else (problem in str(found))


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, None),  # missing: the bare challenge
        (b"Bearer wrong-token-of-some-length", "invalid_token"),
        (b"Basic " + TOKEN.encode(), "invalid_token"),
        (b"Bearer " + TOKEN.encode() + b"x", "invalid_token"),
        (b"Bearer " + TOKEN[:-1].encode(), "invalid_token"),
        (b"Bearer", "invalid_token"),
    ],
)
def test_a_request_without_the_token_gets_401_and_the_challenge(
    header: bytes | None, error: str | None
) -> None:
    with pytest.raises(HttpError) as refused:
        core.authorize(header, TOKEN.encode())
    assert refused.value.status == 401
    ((name, challenge),) = refused.value.headers
    assert name == "www-authenticate" and challenge.startswith('Bearer realm="spicetap"')
    assert (error is None) == ("error=" not in challenge)


@pytest.mark.parametrize("header", [b"Bearer ", b"bearer ", b"BEARER  "])
def test_the_token_lets_the_request_through(header: bytes) -> None:
    core.authorize(header + TOKEN.encode() + b" ", TOKEN.encode())  # no exception


def locked_api(state: ProxyState | None = None) -> ManagementApi:
    options = ManagementOptions(("127.0.0.1", 0), token=TOKEN.encode())
    return ManagementApi(options, state or ProxyState(), None)


async def test_every_path_wants_the_token_when_there_is_one(caplog: Any) -> None:
    a = locked_api(live_state())
    bearer = f"Authorization: Bearer {TOKEN}\r\n"
    for method, path in (("GET", "/api/sessions"), ("GET", "/metrics"), ("GET", "/nope")):
        status, headers, body = await exchange(a, request(method, path))
        assert status == 401, path  # even a path that does not exist: nothing is revealed
        assert headers["www-authenticate"] == 'Bearer realm="spicetap"'
        assert json.loads(body) == {"error": "a bearer token is required"}
        wrong = await exchange(a, request(method, path, extra="Authorization: Bearer nope\r\n"))
        assert wrong[0] == 401 and "invalid_token" in wrong[1]["www-authenticate"]
    assert (await exchange(a, request("GET", "/api/sessions", extra=bearer)))[0] == 200
    assert (await exchange(a, request("GET", "/metrics", extra=bearer)))[0] == 200
    assert (await exchange(a, request("GET", "/nope", extra=bearer)))[0] == 404
    # six refusals in a burst: one log line (the first), and never the token
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "1 request(s) refused" in refusals[0].getMessage()
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


async def test_an_address_sending_wrong_tokens_is_locked_out_of_the_api(caplog: Any) -> None:
    """Apart from viewers' failures: the memory stream's client has no address ("?")."""
    state = ProxyState(lockout=Lockout(LockoutPolicy(failures=3, duration=120)))
    a = locked_api(state)
    bearer = f"Authorization: Bearer {TOKEN}\r\n"
    for _ in range(5):  # no token at all is no guess
        assert (await exchange(a, request("GET", "/metrics")))[0] == 401
    for _ in range(3):
        wrong = await exchange(a, request("GET", "/metrics", extra="Authorization: Bearer x\r\n"))
        assert wrong[0] == 401
    status, headers, body = await exchange(a, request("GET", "/metrics", extra=bearer))
    assert status == 429 and 119 <= int(headers["retry-after"]) <= 120
    assert json.loads(body)["error"].startswith("too many wrong tokens from ?: try again in")
    assert "management API: address ? locked out for 120 s: 3 wrong tokens" in caplog.text
    data = json.loads(a.lockouts("GET", None).body)
    assert data["addresses"] == [] and data["api"][0]["address"] == "?"
    assert data["api"][0]["locked"]  # viewers' counts are not the API's
    assert state.lockout is not None and not state.lockout.entries(time.monotonic())
    released = json.loads(a.lockouts("DELETE", None).body)["released"]
    assert released == ["?"]
    assert (await exchange(a, request("GET", "/metrics", extra=bearer)))[0] == 200


async def test_a_refused_request_is_answered_before_its_body_is_sent() -> None:
    """The head decides: a client without the token gets 401 without sending its body, and
    one that asked for "100 Continue" is not invited to send it."""
    for extra in ("", "Expect: 100-continue\r\n"):
        client, server = trio.testing.memory_stream_pair()
        head = request("POST", "/api/spice/connect", extra=extra)
        head = head.replace(b"Content-Length: 0", b"Content-Length: 60000")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(locked_api().handle, server)
            await client.send_all(head)
            with trio.fail_after(10):
                answer = await client.receive_some(65536)
            await client.aclose()
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:40]


async def test_the_api_over_https_with_a_token(tmp_path: Any) -> None:
    """Real TCP and TLS: the certificate comes from spicetap's CA; a client that trusts the
    CA gets its answer with the token, 401 without; a plain HTTP client gets nothing."""
    import http.client
    import socket
    import ssl

    from proxy.tls import issue_server_cert, load_or_create_ca, server_context

    ca = load_or_create_ca(tmp_path)
    cert, key = issue_server_cert(ca, "O=spicetap,CN=127.0.0.1", ["127.0.0.1"], tmp_path)
    options = ManagementOptions(
        ("127.0.0.1", 0), token=TOKEN.encode(), https=server_context(cert, key, None)
    )
    a = ManagementApi(options, live_state(), None)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca-cert.pem"))

    def client() -> list[tuple[int, bytes]]:
        answers = []
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=trust)
            try:
                conn.request("GET", "/api/sessions", headers=headers)
                response = conn.getresponse()
                answers.append((response.status, response.read()))
            finally:
                conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            with contextlib.suppress(OSError):  # a reset is as good as an end here
                while data := plain.recv(4096):
                    got += data
            answers.append((0, got))
        return answers

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, a.handle, listeners)
        (denied, allowed, plain) = await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()
    assert denied[0] == 401
    assert allowed[0] == 200 and json.loads(allowed[1])["sessions"]
    assert b"HTTP/1.1" not in plain[1] and b"sessions" not in plain[1]


async def test_idle_api_connections_are_capped_apart_from_the_channels(
    caplog: Any,
) -> None:
    """Idle clients hold a connection up to REQUEST_TIMEOUT; uncounted, a few hundred used
    up the descriptors the channels need. Past MAX_CONNECTIONS a new one is closed at once;
    once one ends, the API answers again."""
    import socket

    from proxy.io.management import MAX_CONNECTIONS, serve_management

    options = ManagementOptions(("127.0.0.1", 0))

    def clients(port: int) -> tuple[bytes, bytes]:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as over:
                refused = over.recv(100)  # closed at once: end of stream
            idle.pop().close()
            for _ in range(100):  # the server sees that close a moment later
                answer = b""
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as conn,
                    contextlib.suppress(OSError),  # still refused: a reset
                ):
                    conn.sendall(request("GET", "/api/sessions"))
                    answer = conn.recv(100)
                if answer:
                    return refused, answer
                time.sleep(0.05)
            return refused, b""
        finally:
            for sock in idle:
                sock.close()

    async with trio.open_nursery() as nursery:
        serving = await nursery.start(serve_management, options, live_state(), None)
        port = serving.listeners[0].socket.getsockname()[1]
        refused, answer = await trio.to_thread.run_sync(clients, port)
        nursery.cancel_scope.cancel()
    assert refused == b"" and answer.startswith(b"HTTP/1.1 200")
    assert "32 open, the limit (the API's own)" in caplog.text


# -- lockouts --------------------------------------------------------------------------------
def locked_state() -> ProxyState:
    lockout = Lockout(LockoutPolicy(failures=2, window=60, duration=300))
    now = time.monotonic()
    for host in ("10.0.0.9", "10.0.0.9", "2001:db8::5", "10.0.0.3"):
        lockout.failed(host, now)
    lockout.locked_for("10.0.0.9", now)  # one connection turned away
    return ProxyState(lockout=lockout)


async def test_lockouts_are_listed_and_released_over_http() -> None:
    state = locked_state()
    status, _, body = await exchange(api(state), request("GET", "/api/lockouts"))
    assert status == 200
    data = json.loads(body)
    assert data["policy"] == {"failures": 2, "window": 60, "duration": 300}
    assert data["totals"] == {"failures": 4, "lockouts": 1, "refused": 1, "lockedNow": 1}
    first, *rest = data["addresses"]
    assert first["address"] == "10.0.0.9" and first["locked"]
    assert 299 <= first["lockedFor"] <= 300
    assert [(e["address"], e["failures"], e["locked"]) for e in rest] == [
        ("10.0.0.3", 1, False),
        ("2001:db8::/64", 1, False),
    ]
    query = "/api/lockouts?address=2001:db8::77"  # any address of the /64
    status, _, body = await exchange(api(state), request("GET", query))
    assert [e["address"] for e in json.loads(body)["addresses"]] == ["2001:db8::/64"]
    deleted = request("DELETE", "/api/lockouts?address=10.0.0.9")
    status, _, body = await exchange(api(state), deleted)
    assert (status, json.loads(body)) == (200, {"success": True, "released": ["10.0.0.9"]})
    assert state.lockout is not None and not state.lockout.locked_for("10.0.0.9", time.monotonic())
    status, _, body = await exchange(api(state), request("DELETE", "/api/lockouts"))
    assert json.loads(body)["released"] == []  # the others had failures, no lock
    status, _, body = await exchange(api(state), request("GET", "/api/lockouts"))
    assert json.loads(body)["addresses"] == []


@pytest.mark.parametrize(
    "query", ["?address=", "?address=10.0.0.300", "?addr=10.0.0.1", "?address=2001:db8::/48"]
)
async def test_a_lockout_query_that_is_no_address_is_400(query: str) -> None:
    status, _, body = await exchange(api(locked_state()), request("GET", "/api/lockouts" + query))
    assert status == 400 and "address" in json.loads(body)["error"]


async def test_lockout_counters_in_the_metrics() -> None:
    status, _, body = await exchange(api(locked_state()), request("GET", "/metrics"))
    m = parse_metrics(body.decode())
    assert m["spicetap_auth_failures_total"] == 4
    assert m["spicetap_lockouts_total"] == 1
    assert m["spicetap_lockout_refused_total"] == 1
    assert m["spicetap_addresses_locked_out"] == 1
    status, _, body = await exchange(api(), request("GET", "/metrics"))  # no lockout: none
    assert "spicetap_lockouts_total" not in body.decode()
    status, _, _ = await exchange(api(), request("GET", "/api/lockouts"))
    assert status == 409
