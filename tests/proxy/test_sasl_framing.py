"""SASL's exchange through the framer (proxy/core/saslwire.py): every field found, SASL's
result, then the link result and SPICE messages behind a TLS server leg, or opaque bytes of
the security layer behind a plain one."""

from __future__ import annotations

import struct

import pytest

from proxy.core.framing import C2S, S2C, ChannelError, ChannelFramer, Event, LinkUnit, Message
from proxy.core.saslwire import MAX_DATA
from spicetap.records import SASL_NOTE, SASL_OVER_TLS_NOTE, RecordBuilder
from tests.proxy.test_framing import OK, caps_word, link_mess, link_reply, mini
from tests.proxy.test_recording import init

SASL = struct.pack("<I", 2)  # LinkAuthMechanism: SASL
BOTH = caps_word(0, 2, 3)  # auth selection, SASL, mini header


def field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def exchange(
    result: bytes = OK, channel_type: int = 2, conn: int = 0x1234
) -> list[tuple[str, bytes]]:
    """A DIGEST-MD5 login's shape: the list, the choice, a challenge, the client's answer,
    the server's last word (complete), SASL's result, then (if that is OK) the link's."""
    return [
        (C2S, link_mess(BOTH, channel_type, conn)),
        (S2C, link_reply(BOTH)),
        (C2S, SASL),
        (S2C, field(b",DIGEST-MD5,")),
        (C2S, field(b"DIGEST-MD5") + field(b"")),
        (S2C, field(b'nonce="abc",qop="auth"\0') + b"\0"),
        (C2S, field(b'username="u",response=0123\0')),
        (S2C, field(b"rspauth=4567\0") + b"\1" + result),
        *([(S2C, OK)] if result == OK else []),
    ]


EXCHANGE_UNITS = [
    (C2S, "header"),
    (C2S, "link_mess"),
    (S2C, "header"),
    (S2C, "link_reply"),
    (C2S, "auth_mechanism"),
    (S2C, "sasl"),  # the list
    (C2S, "sasl"),  # the name
    (C2S, "sasl"),  # the first (empty) data
    (S2C, "sasl"),
    (S2C, "sasl_complete"),
    (C2S, "sasl"),
    (S2C, "sasl"),
    (S2C, "sasl_complete"),
    (S2C, "sasl_result"),
]
AFTER = [(S2C, mini(103, b"init" * 8)), (C2S, mini(101, b"")), (S2C, mini(4, b"ping"))]


def feed(chunks: list[tuple[str, bytes]], layer: bool) -> tuple[ChannelFramer, list[Event]]:
    f = ChannelFramer()
    f.sasl_layer = layer
    events: list[Event] = []
    for d, data in chunks:
        events += f.feed(d, data)
    return f, events


def units(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.direction, e.kind) for e in events if isinstance(e, LinkUnit)]


def test_behind_a_tls_server_leg_messages_follow_the_exchange() -> None:
    f, events = feed(exchange() + AFTER, layer=False)
    assert units(events) == [*EXCHANGE_UNITS, (S2C, "link_result")]
    assert f.auth == "sasl" and f.sasl_result == f.result == 0 and f.linked
    messages = [(e.direction, e.msg_type) for e in events if isinstance(e, Message)]
    assert messages == [(S2C, 103), (C2S, 101), (S2C, 4)]
    assert not [e for e in events if isinstance(e, ChannelError)]
    # every byte is in some unit: the exchange's fields whole, each with its length
    link = b"".join(e.data for e in events if isinstance(e, LinkUnit))
    sent = b"".join(data for _d, data in exchange())
    assert sorted(link) == sorted(sent)


def test_behind_a_plain_server_leg_the_security_layer_is_opaque() -> None:
    f, events = feed(exchange() + AFTER, layer=True)
    # the link result comes inside the layer: the first of its opaque units
    layered = [(S2C, "sasl"), (S2C, "sasl"), (C2S, "sasl"), (S2C, "sasl")]
    assert units(events) == [*EXCHANGE_UNITS, *layered]
    assert f.sasl_result == 0 and f.result is None
    assert not [e for e in events if isinstance(e, Message)]
    assert f.state == {C2S: "sasl", S2C: "sasl"} and f.link_over


@pytest.mark.parametrize("layer", [False, True])
def test_any_cut_of_the_streams_gives_the_same_units(layer: bool) -> None:
    """Each direction fed a byte at a time (the other direction's bytes in between, in the
    order the peers sent them): the same units, the same messages; a security layer's
    bytes come as they are fed, the same bytes."""
    _f, whole = feed(exchange() + AFTER, layer)
    pieces = [(d, data[i : i + 1]) for d, data in exchange() + AFTER for i in range(len(data))]
    _f, cut = feed(pieces, layer)
    n = len(EXCHANGE_UNITS)
    assert units(cut)[:n] == units(whole)[:n] == EXCHANGE_UNITS
    assert [e.raw for e in cut if isinstance(e, Message)] == [
        e.raw for e in whole if isinstance(e, Message)
    ]
    for d in (C2S, S2C):
        cut_rest, whole_rest = (
            b"".join(e.data for e in evs[n:] if e.direction == d)
            for evs in ([e for e in cut if isinstance(e, LinkUnit)],
                        [e for e in whole if isinstance(e, LinkUnit)])
        )  # fmt: skip
        assert cut_rest == whole_rest


def test_a_refusal_after_sasl_says_why() -> None:
    """spice-server's answer to a weak security layer: result 1 and a reason."""
    reason = field(b"Authentication failed\0")
    f, events = feed(exchange(result=struct.pack("<I", 1) + reason), layer=True)
    assert units(events)[-2:] == [(S2C, "sasl_result"), (S2C, "sasl_reason")]
    assert events[-1] == LinkUnit(S2C, "sasl_reason", reason)
    assert f.sasl_result == 1 and f.state == {C2S: "done", S2C: "done"}


def test_a_link_reply_in_place_of_sasl_data_is_the_servers_refusal() -> None:
    """A mechanism not on the list: spice-server answers with a link reply (INVALID_DATA)."""
    chunks = [*exchange()[:5], (S2C, link_reply(BOTH, error=6))]
    f, events = feed(chunks, layer=False)
    assert units(events)[-2:] == [(S2C, "header"), (S2C, "link_reply")]
    assert f.link_error == 6 and f.state[S2C] == "done"
    assert not [e for e in events if isinstance(e, ChannelError)]


@pytest.mark.parametrize(
    ("at", "bad", "reason"),
    [
        (4, field(b""), "SASL mechanism name of 0 bytes (1 to 100 allowed)"),
        (4, field(b"x" * 101), "SASL mechanism name of 101 bytes (1 to 100 allowed)"),
        (6, struct.pack("<I", MAX_DATA + 1), f"SASL client data of {MAX_DATA + 1} bytes"),
        (5, field(b"challenge") + b"\2", "SASL completion flag 2 (0 or 1 expected)"),
    ],
)
def test_a_broken_exchange_is_one_secret_error(at: int, bad: bytes, reason: str) -> None:
    chunks = exchange()
    chunks[at] = (chunks[at][0], bad)
    f, events = feed(chunks[: at + 1], layer=False)
    (error,) = [e for e in events if isinstance(e, ChannelError)]
    assert error.reason.startswith(reason) and error.secret  # SASL bytes are never kept
    assert f.state[chunks[at][0]] == "dead"


def test_link_only_stops_where_sasl_begins() -> None:
    """The link rewriter's framers: nothing of SASL concerns them."""
    f = ChannelFramer(link_only=True)
    for d, data in exchange()[:3]:
        f.feed(d, data)
    assert f.state == {C2S: "sasl", S2C: "sasl"}


@pytest.mark.parametrize("server_tls", [False, True])
def test_records_of_a_sasl_main_channel(server_tls: bool) -> None:
    """Behind a TLS server leg the main channel's INIT is read after SASL, so the channel
    joins its session; behind a plain one it stays lengths, its session unknown."""
    b = RecordBuilder()
    tls = {"viewer": server_tls, "server": server_tls}
    b.opened(1, 0.0, ("127.0.0.1", 4000), ("127.0.0.1", 5900), {"tls": tls})
    recs = []
    for d, data in [*exchange(channel_type=1, conn=0), (S2C, init(0x5EC7))]:
        recs += b.data(1, 1.0, d, data)
    recs += b.closed(1, 2.0, "viewer closed")  # a main channel without INIT is held till then
    (auth,) = [r for r in recs if r.kind == "auth"]
    assert auth.fields == (SASL_OVER_TLS_NOTE if server_tls else SASL_NOTE)
    flags = [r.fields for r in recs if r.name == "sasl_complete"]
    assert flags == [{"complete": False}, {"complete": True}]
    (sasl_result,) = [r for r in recs if r.name == "sasl_result"]
    assert sasl_result.fields == {"error": "OK"}
    results = [r.fields for r in recs if r.name == "link_result"]
    assert results == ([{"error": "OK"}] if server_tls else [])  # or inside the layer
    messages = [r for r in recs if r.kind == "message"]
    if server_tls:
        assert [m.name for m in messages] == ["init"] and messages[0].session == 0x5EC7
        assert {r.session for r in recs if r.kind != "open"} == {0x5EC7}
    else:
        assert not messages and recs[-2].name == "sasl" and recs[-2].kind == "link"
        assert {r.session for r in recs} == {None}
