"""The WebSocket front without a browser: request heads, the upgrade handshake, the frame
codec (masking, lengths, fragments, control frames, close codes, limits, garbage), the
trio stream adapter and static files over in-memory streams, and one relayed channel."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.http import MAX_HEAD, HeadReader, HttpError, Request
from proxy.core.relay import Limits
from proxy.core.websocket import (
    Closed,
    Event,
    Payload,
    Reply,
    WebSocketConnection,
    accept,
    accept_key,
    encode_frame,
    origin_is_valid,
)
from proxy.io.server import ChannelProxy, Routing
from proxy.io.static import static_response
from proxy.io.streams import PeerProtocolError
from proxy.io.websocket import WebSocketStream, open_websocket, serve_websocket
from tests.proxy.linkserver import LinkServer
from tests.proxy.test_framing import caps_word, link_mess, link_reply

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example key...
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # ...and its accept value
CHROMIUM_UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1:5959\r\nConnection: Upgrade\r\nPragma: no-cache\r\n"
    "Upgrade: websocket\r\nOrigin: http://127.0.0.1:5959\r\nSec-WebSocket-Version: 13\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
).encode()


# --- a client's side of the wire, written independently of the code under test ---


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """A client frame (§5.2): masked with `mask` (random by default), b"" for unmasked."""
    mask = os.urandom(4) if mask is None else mask
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if mask else payload
    return head + mask + body


def server_frames(data: bytes) -> list[tuple[int, bool, bytes]]:
    """Parse unmasked server frames: (opcode, fin, payload)."""
    out = []
    while data:
        first, second = data[0], data[1]
        assert not second & 0x80, "server frames are never masked"
        n, at = second & 0x7F, 2
        if n == 126:
            n, at = struct.unpack_from("!H", data, 2)[0], 4
        elif n == 127:
            n, at = struct.unpack_from("!Q", data, 2)[0], 10
        out.append((first & 0x0F, bool(first & 0x80), data[at : at + n]))
        data = data[at + n :]
    return out


def payload_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Payload))


def failed_with(events: list[Event]) -> int:
    """The close code we failed the connection with; the close frame says the same."""
    *_, reply, closed = events
    assert isinstance(closed, Closed) and closed.error
    assert isinstance(reply, Reply)
    ((opcode, fin, body),) = server_frames(reply.data)
    assert opcode == 0x8 and fin and struct.unpack("!H", body[:2])[0] == closed.code
    return closed.code


def request(raw: bytes) -> Request:
    reader = HeadReader()
    result = reader.feed(raw)
    assert isinstance(result, Request), result
    return result


# --- request heads ---


def test_head_split_anywhere_keeps_the_bytes_after_it() -> None:
    tail = b"\x82\x80abcd"
    raw = CHROMIUM_UPGRADE + tail
    for cut in range(1, len(raw)):
        reader = HeadReader()
        first = reader.feed(raw[:cut])
        result = first if first is not None else reader.feed(raw[cut:])
        assert isinstance(result, Request)
        assert result.headers["sec-websocket-key"] == KEY
        assert result.tokens("connection") == ["upgrade"]
        # bytes after the head stay with the reader; later ones the shell passes on itself
        assert reader.rest + (raw[cut:] if first is not None else b"") == tail


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/2\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", 400),  # HTTP/1.1 needs Host
        (b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"A: b\r\n" * 65 + b"\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS on a ws:// port
    ],
)
def test_bad_heads_are_errors_not_exceptions(raw: bytes, status: int) -> None:
    result = HeadReader().feed(raw)
    assert isinstance(result, HttpError) and result.status == status


def test_head_is_bounded_and_eof_inside_it_is_an_error() -> None:
    reader = HeadReader()
    assert reader.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD) == HttpError(
        431, f"request head over {MAX_HEAD} bytes"
    )
    # whole in one read: h11 alone would take it, as its bound is on incomplete heads
    whole = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert HeadReader().feed(whole) == HttpError(431, f"request head over {MAX_HEAD} bytes")
    reader = HeadReader()
    assert reader.feed(b"GET / HTTP/1.1\r\n") is None
    result = reader.feed(b"")
    assert isinstance(result, HttpError) and result.status == 400


# --- the upgrade handshake ---


def test_chromium_upgrade_is_accepted_with_binary() -> None:
    result = accept(request(CHROMIUM_UPGRADE))
    assert not isinstance(result, HttpError)
    reply, subprotocol = result
    assert subprotocol == "binary"
    assert reply.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert f"Sec-WebSocket-Accept: {ACCEPT}\r\n".encode() in reply
    assert b"Sec-WebSocket-Protocol: binary\r\n" in reply
    assert reply.endswith(b"\r\n\r\n") and b"Content-Length" not in reply


def test_accept_key_is_sha1_of_key_and_guid() -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    assert accept_key(key) == base64.b64encode(digest).decode()


def _upgrade(**changes: str | None) -> bytes:
    fields = {
        "Host": "x",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": KEY,
    }
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"GET /ws HTTP/1.1\r\n{lines}\r\n".encode()


def test_no_subprotocol_offered_none_answered_and_firefox_connection_list() -> None:
    result = accept(request(_upgrade(Connection="keep-alive, Upgrade", Upgrade="WebSocket")))
    assert not isinstance(result, HttpError)
    assert result[1] is None and b"Sec-WebSocket-Protocol" not in result[0]
    result = accept(request(_upgrade(Sec_WebSocket_Protocol="base64, binary")))
    assert not isinstance(result, HttpError) and result[1] == "binary"


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"Sec_WebSocket_Protocol": "chat"}, 400),  # websockify refuses too
        ({"Sec_WebSocket_Version": "8"}, 426),
        ({"Sec_WebSocket_Version": None}, 426),
        ({"Sec_WebSocket_Key": None}, 400),
        ({"Sec_WebSocket_Key": "c2hvcnQ="}, 400),  # 5 bytes, not 16
        ({"Sec_WebSocket_Key": "not base64!!"}, 400),
        ({"Connection": "keep-alive"}, 400),
        ({"Upgrade": "h2c"}, 400),
    ],
)
def test_bad_upgrades_are_refused(changes: dict[str, str | None], status: int) -> None:
    result = accept(request(_upgrade(**changes)))
    assert isinstance(result, HttpError) and result.status == status


@pytest.mark.parametrize(
    ("origin", "tls", "allowed", "ok"),
    [
        (None, False, (), True),  # not a browser
        ("http://x", False, (), True),  # spicetap's own page (Host: x)
        ("HTTP://X/", False, (), True),
        ("https://x", True, (), True),
        ("http://x", True, (), False),  # the page over http, the socket over https: another origin
        ("https://evil.example", False, (), False),
        ("https://portal.example:8443", False, ("https://portal.example:8443",), True),
        ("https://evil.example", False, ("https://portal.example:8443",), False),
        ("https://anything.example", False, ("*",), True),
        ("null", False, (), False),  # a sandboxed or file:// page
    ],
)
def test_pages_from_other_origins_are_refused_unless_allowed(
    origin: str | None, tls: bool, allowed: tuple[str, ...], ok: bool
) -> None:
    result = accept(request(_upgrade(Origin=origin)), tls, allowed)
    if ok:
        assert not isinstance(result, HttpError)
    else:
        assert isinstance(result, HttpError) and result.status == 403
        assert "is not allowed" in result.reason


def test_post_and_http10_are_refused() -> None:
    for raw in (_upgrade().replace(b"GET", b"POST"), _upgrade().replace(b"HTTP/1.1", b"HTTP/1.0")):
        result = accept(request(raw))
        assert isinstance(result, HttpError) and result.status == 400


# --- frames ---


def test_masked_binary_frames_give_their_payload_in_every_length_form() -> None:
    for size in (0, 1, 125, 126, 65535, 65536, 200_000):
        data = os.urandom(size)
        ws = WebSocketConnection(1 << 20)
        events = ws.receive_data(client_frame(0x2, data))
        assert payload_of(events) == data
        assert not [e for e in events if not isinstance(e, Payload)]


def test_any_split_gives_the_same_payload_and_replies() -> None:
    data = os.urandom(300)
    wire = (
        client_frame(0x2, data[:100], fin=False)
        + client_frame(0x9, b"are you there")
        + client_frame(0x0, data[100:299], fin=False)
        + client_frame(0x0, data[299:])
        + client_frame(0x2, b"")
        + client_frame(0x8, struct.pack("!H", 1000) + b"bye")
    )
    for cut in range(len(wire)):
        for step in (1, 7) if cut == 0 else (None,):
            ws = WebSocketConnection(1 << 20)
            if step:
                events = [
                    e
                    for i in range(0, len(wire), step)
                    for e in ws.receive_data(wire[i : i + step])
                ]
            else:
                events = ws.receive_data(wire[:cut]) + ws.receive_data(wire[cut:])  # cut > 0
            assert payload_of(events) == data
            replies = [server_frames(e.data)[0] for e in events if isinstance(e, Reply)]
            assert replies == [(0xA, True, b"are you there"), (0x8, True, struct.pack("!H", 1000))]
            assert events[-1] == Closed(1000, "bye", error=False)


def test_unmasked_client_frame_fails_with_1002() -> None:
    ws = WebSocketConnection(1 << 20)
    assert failed_with(ws.receive_data(client_frame(0x2, b"hello", mask=b""))) == 1002
    assert ws.receive_data(client_frame(0x2, b"more")) == []  # nothing after the end


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (client_frame(0x1, b"text"), 1003),  # websockify: text frames are not supported
        (client_frame(0x0, b"orphan"), 1002),
        (client_frame(0x2, b"a", fin=False) + client_frame(0x2, b"b"), 1002),
        (client_frame(0x3, b""), 1002),
        (client_frame(0xB, b""), 1002),
        (client_frame(0x9, b"x" * 126), 1002),
        (client_frame(0x9, b"x", fin=False), 1002),
        (bytes([0xC2, 0x80]) + b"\0\0\0\0", 1002),  # RSV1 without an extension
        (bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"mask", 1002),
        (client_frame(0x8, b"\x03"), 1002),  # a 1-byte close payload
        (client_frame(0x8, struct.pack("!H", 1005)), 1002),  # reserved, never sent
        (client_frame(0x8, struct.pack("!H", 999)), 1002),
        (client_frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe"), 1007),
    ],
)
def test_protocol_errors_fail_with_the_right_code(wire: bytes, code: int) -> None:
    assert failed_with(WebSocketConnection(1 << 20).receive_data(wire)) == code


def test_oversized_frame_fails_from_its_header_alone() -> None:
    ws = WebSocketConnection(1000)
    head = struct.pack("!BBQ", 0x82, 0xFF, 10**12) + b"mask"  # no payload sent at all
    assert failed_with(ws.receive_data(head)) == 1009


def test_oversized_fragmented_message_fails() -> None:
    ws = WebSocketConnection(1000)
    events = ws.receive_data(client_frame(0x2, b"a" * 600, fin=False))
    assert payload_of(events) == b"a" * 600
    assert failed_with(ws.receive_data(client_frame(0x0, b"b" * 600))) == 1009


def test_ping_pong_and_flood_of_frames_without_data() -> None:
    ws = WebSocketConnection(1 << 20)
    (reply,) = ws.receive_data(client_frame(0x9, b"12345"))
    assert isinstance(reply, Reply) and server_frames(reply.data) == [(0xA, True, b"12345")]
    assert ws.receive_data(client_frame(0xA, b"unsolicited")) == []
    events: list[Event] = []
    for _ in range(101):
        events += ws.receive_data(client_frame(0xA, b""))
    assert failed_with(events) == 1008
    ws = WebSocketConnection(1 << 20)  # data in between resets the count
    for _ in range(300):
        assert ws.receive_data(client_frame(0x9, b"") + client_frame(0x2, b"x"))[-1] == Payload(
            b"x"
        )


def test_close_handshake_both_ways() -> None:
    ws = WebSocketConnection(1 << 20)
    reply, closed = ws.receive_data(client_frame(0x8, b""))
    assert isinstance(reply, Reply) and server_frames(reply.data) == [(0x8, True, b"")]
    assert closed == Closed(1005, "", error=False)
    assert ws.send(b"late") == b"" and ws.close() == b""
    # we close first: one close frame; the browser's answer ends it without a reply
    ws = WebSocketConnection(1 << 20)
    assert server_frames(ws.close(1000)) == [(0x8, True, struct.pack("!H", 1000))]
    assert ws.close() == b""
    assert ws.receive_data(client_frame(0x9, b"p")) == []  # no pong after our close
    assert ws.receive_data(client_frame(0x8, struct.pack("!H", 1000))) == [
        Closed(1000, "", error=False)
    ]


def test_eof_without_close_is_abnormal() -> None:
    ws = WebSocketConnection(1 << 20)
    ws.receive_data(client_frame(0x2, b"abc")[:4])
    assert ws.receive_data(b"") == [Closed(1006, "connection dropped without a close frame", True)]
    assert ws.receive_data(b"") == []


def test_server_frames_are_unmasked_and_shortest() -> None:
    for size in (0, 125, 126, 65535, 65536):
        frame = WebSocketConnection(10).send(b"z" * size)
        assert server_frames(frame) == [(0x2, True, b"z" * size)]
        assert len(frame) - size == (2 if size < 126 else 4 if size < 65536 else 10)
    assert encode_frame(0x2, b"") == b"\x82\x00"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64))
def test_garbage_never_raises(data: bytes, step: int) -> None:
    ws = WebSocketConnection(256)
    events: list[Event] = []
    for i in range(0, len(data), step):
        events += ws.receive_data(data[i : i + step])
    events += ws.receive_data(b"")
    assert all(isinstance(e, Payload | Reply | Closed) for e in events)
    assert sum(isinstance(e, Closed) for e in events) == 1 and isinstance(events[-1], Closed)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
def test_random_messages_split_at_random_points(messages: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(client_frame(0x2, m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    ws = WebSocketConnection(1 << 16)
    events: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        if a < b:  # b"" would mean EOF
            events += ws.receive_data(wire[a:b])
    assert payload_of(events) == b"".join(messages)


# --- the trio adapter over in-memory streams ---


async def _upgraded(early: bytes = b"") -> tuple[WebSocketStream, trio.abc.Stream]:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(CHROMIUM_UPGRADE + early)
    limits = Limits(max_message=1 << 16)
    ws = await open_websocket(server, limits, Path("/nonexistent"), ("test", 0))
    assert ws is not None
    answer = await client.receive_some()
    assert answer.startswith(b"HTTP/1.1 101 ") and ACCEPT.encode() in answer
    return ws, client


async def test_stream_carries_payload_both_ways_and_answers_pings() -> None:
    ws, client = await _upgraded(early=client_frame(0x2, b"REDQ"))  # sent with the head
    assert await ws.receive_some(100) == b"REDQ"
    await client.send_all(client_frame(0x9, b"hi") + client_frame(0x2, b"0123456789"))
    assert await ws.receive_some(4) == b"0123"  # max_bytes holds, the rest waits
    assert server_frames(bytes(await client.receive_some())) == [(0xA, True, b"hi")]
    assert await ws.receive_some(100) == b"456789"
    await ws.send_all(b"server bytes")
    assert server_frames(bytes(await client.receive_some())) == [(0x2, True, b"server bytes")]
    await client.send_all(client_frame(0x8, struct.pack("!H", 1001)))
    assert await ws.receive_some(100) == b""  # the browser closed: EOF for the relay
    assert server_frames(bytes(await client.receive_some())) == [
        (0x8, True, struct.pack("!H", 1001))
    ]
    await ws.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await ws.receive_some(1)


async def test_closing_from_our_side_sends_a_close_frame_even_forcefully() -> None:
    ws, client = await _upgraded()
    await trio.aclose_forcefully(ws)
    assert server_frames(bytes(await client.receive_some())) == [
        (0x8, True, struct.pack("!H", 1000))
    ]
    assert await client.receive_some() == b""


async def test_protocol_error_after_the_data_before_it_plus_a_close_frame() -> None:
    """The payload that came before the bad frame is relayed first; then the error, which
    the channel records as the viewer's (a plain b"" would read as a clean close)."""
    ws, client = await _upgraded()
    await client.send_all(client_frame(0x2, b"REDQ") + client_frame(0x1, b"text"))
    assert await ws.receive_some(100) == b"REDQ"
    with pytest.raises(PeerProtocolError, match=r"^WebSocket: .*\(1003\)$"):
        await ws.receive_some(100)
    ((opcode, _, body),) = server_frames(bytes(await client.receive_some()))
    assert opcode == 0x8 and body[:2] == struct.pack("!H", 1003)


async def test_a_dropped_connection_is_a_close_not_a_protocol_error() -> None:
    """A tab closed mid-session ends TCP without a close frame: the viewer closed."""
    ws, client = await _upgraded()
    await client.send_all(client_frame(0x2, b"REDQ"))
    await client.aclose()
    assert await ws.receive_some(100) == b"REDQ"
    assert await ws.receive_some(100) == b""


async def _http(raw: bytes, root: Path) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(raw)
    await client.send_eof()  # as a browser does once it has the response: no lingering
    assert await open_websocket(server, Limits(), root, ("test", 0)) is None
    out = b""
    for _ in range(100):
        chunk = await client.receive_some()
        if not chunk:
            return out
        out += chunk
    raise AssertionError("response did not end")


@pytest.fixture
def web_root(tmp_path: Path) -> Path:
    root = tmp_path / "spice-html5"
    (root / "sub").mkdir(parents=True)
    (root / "spice_auto.html").write_text("<html>auto</html>")
    (root / "main.js").write_text("export {};")
    (root / "sub" / "x.css").write_text("body{}")
    (tmp_path / "secret.txt").write_text("do not serve")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root


async def test_static_files_are_served_with_types(web_root: Path) -> None:
    page = await _http(
        b"GET /spice_auto.html?host=127.0.0.1&port=1 HTTP/1.1\r\nHost: x\r\n\r\n", web_root
    )
    assert page.startswith(b"HTTP/1.1 200 OK\r\n") and page.endswith(b"<html>auto</html>")
    assert b"Content-Length: 17\r\n" in page and b"text/html" in page
    js = await _http(b"GET /main.js HTTP/1.1\r\nHost: x\r\n\r\n", web_root)
    assert b"Content-Type: text/javascript" in js  # module scripts need a JavaScript type
    css = await _http(b"GET /sub/x%2Ecss HTTP/1.1\r\nHost: x\r\n\r\n", web_root)
    assert css.endswith(b"body{}")
    head = await _http(b"HEAD /main.js HTTP/1.1\r\nHost: x\r\n\r\n", web_root)
    assert b"Content-Length: 10\r\n" in head and head.endswith(b"\r\n\r\n")
    index = await _http(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", web_root)
    assert index.startswith(b"HTTP/1.1 302 ") and b"Location: /spice_auto.html\r\n" in index


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/../secret.txt", 403),
        ("/sub/../../secret.txt", 403),
        ("/%2e%2e/secret.txt", 403),
        ("/%2E%2E%2Fsecret.txt", 403),  # an encoded slash still makes a ".." segment
        ("/..%5csecret.txt", 403),
        ("/sub//x.css", 403),
        ("/main.js%00.html", 403),
        ("/%ff", 400),
        ("secret.txt", 400),
        ("http://x/secret.txt", 400),
        ("/link.txt", 404),  # a symlink out of the directory
        ("/sub", 404),  # no directory listings
        ("/missing.js", 404),
    ],
)
async def test_paths_outside_the_directory_are_refused(
    web_root: Path, target: str, status: int
) -> None:
    answer = await _http(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), web_root)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:100]
    assert b"do not serve" not in answer


async def test_missing_package_is_a_clear_404_and_post_is_405(tmp_path: Path) -> None:
    answer = await _http(b"GET /spice.html HTTP/1.1\r\nHost: x\r\n\r\n", tmp_path / "none")
    assert answer.startswith(b"HTTP/1.1 404 ") and b"apt-get install spice-html5" in answer
    post = Request("POST", "/", "1.1", {"host": "x"})
    assert (await static_response(tmp_path, post)).startswith(b"HTTP/1.1 405 ")


async def test_refused_upgrade_says_why_and_426_names_the_version() -> None:
    answer = await _http(_upgrade(Sec_WebSocket_Version="8"), Path("/nonexistent"))
    assert answer.startswith(b"HTTP/1.1 426 ") and b"Sec-WebSocket-Version: 13\r\n" in answer


async def test_silent_connection_times_out_quietly() -> None:
    _client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(2):
        assert await open_websocket(server, Limits(link_timeout=0.2), Path("/x"), ("t", 0)) is None


# --- one channel relayed over real loopback TCP, through the shared ChannelProxy ---


async def test_websocket_channel_is_relayed_to_the_upstream() -> None:
    link, reply = link_mess(caps_word(1, 3)), link_reply(caps_word(1, 3))
    server = LinkServer(link, reply)
    async with trio.open_nursery() as nursery:
        proxy = ChannelProxy(Limits(), None)
        routing = Routing(await server.start(nursery))
        serving = await nursery.start(serve_websocket, proxy, routing, "127.0.0.1", 0)
        (ws_listener,) = serving.listeners
        client = await trio.open_tcp_stream("127.0.0.1", ws_listener.socket.getsockname()[1])
        async with client:
            with trio.fail_after(10):
                await client.send_all(CHROMIUM_UPGRADE + client_frame(0x2, link))
                answer = b""
                while not answer.endswith(encode_frame(0x2, reply)):  # bounded by fail_after
                    answer += await client.receive_some()
                await server.linked.wait()
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert bytes(server.got) == link
        (channel,) = proxy.state.channels.values()
        assert channel.viewer[0] == "127.0.0.1"
        nursery.cancel_scope.cancel()


# --- the command line and the configuration ---


def test_ws_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spicetap.cli import main
    from spicetap.config import load_config

    assert main(["proxy", "--ws-tls", "--upstream", "127.0.0.1:1"]) == 2
    assert "--ws-tls needs --ws-listen" in capsys.readouterr().err
    assert main(["proxy", "--ws-listen", "127.0.0.1:x", "--upstream", "127.0.0.1:1"]) == 2
    assert "--ws-listen '127.0.0.1:x': expected HOST:PORT" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text('[proxy]\nws_listen = "127.0.0.1:5959"\n')
    assert load_config(config).proxy.ws_listen == "127.0.0.1:5959"
    assert main(["proxy", "--config", str(config)]) == 2  # no upstream for it
    assert "--ws-listen needs --upstream" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("allowed", "valid"),
    [
        ("*", True),
        ("https://portal.example:8443", True),
        ("https://portal.example:8443/", True),  # compared without it: still fine
        ("HTTPS://Portal.Example", True),
        ("http://[::1]:8080", True),
        ("portal.example", False),  # no scheme: a browser's Origin never looks so
        ("https://portal.example/app", False),  # a path: never in an Origin
        ("", False),
    ],
)
def test_allowed_origins_are_checked_against_the_form_browsers_send(
    allowed: str, valid: bool
) -> None:
    assert origin_is_valid(allowed) is valid


async def test_a_browser_dropping_tls_without_close_notify_closed_it(tmp_path: Path) -> None:
    """As on the TLS front: a closed tab ends TCP without close_notify. The WebSocket front
    called that a TLS protocol error of the viewer's."""
    import ssl

    from proxy.io.server import ChannelProxy, accept_tls
    from proxy.tls import issue_server_cert, load_or_create_ca, server_context

    ca = load_or_create_ca(tmp_path)
    cert, key = issue_server_cert(ca, "O=test,CN=127.0.0.1", ["127.0.0.1"], tmp_path / "s")
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca-cert.pem"))
    browser_raw, server_raw = trio.testing.memory_stream_pair()
    browser = trio.SSLStream(browser_raw, trust, server_hostname="127.0.0.1")
    proxy = ChannelProxy(Limits(), None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(browser.do_handshake)
        wrapped = await accept_tls(proxy, server_raw, server_context(cert, key, None))
    assert wrapped is not None
    await browser.send_all(b"last words")
    await browser_raw.aclose()  # TCP ends, no close_notify
    assert await wrapped.receive_some(100) == b"last words"
    assert await wrapped.receive_some(100) == b""
