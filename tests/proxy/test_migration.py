"""Following a migration: the scanner holds exactly the migration messages, however the
stream is cut; the rewrite sends the viewer to spicetap and keeps everything else."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dissectors.api import decode, encode
from proxy.core.framing import FULL_HEADER, MINI_HEADER
from proxy.core.migration import (
    MIGRATE_BEGIN,
    MIGRATE_BEGIN_SEAMLESS,
    MIGRATE_SWITCH_HOST,
    Destination,
    Held,
    MigrationScanner,
    Pass,
    destination,
    rewrite,
)
from proxy.core.relay import (
    SASL_LAYER_MIGRATION,
    ChannelRelay,
    Close,
    Forward,
    Limits,
    Log,
    RecordData,
    RecordEvent,
    Redirect,
)
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply
from tests.proxy.test_sasl_framing import exchange

MAIN = 1


def _dst_info(host: bytes, port: int, sport: int, subject: bytes = b"") -> dict[str, object]:
    return {
        "port": port,
        "sport": sport,
        "host_size": len(host),
        "host_data": host,
        "cert_subject_size": len(subject),
        "cert_subject_data": subject,
    }


SEAMLESS = encode(
    MAIN,
    "s2c",
    MIGRATE_BEGIN_SEAMLESS,
    {"dst_info": _dst_info(b"10.0.0.9\0", 5951, 0xFFFF), "src_mig_version": 1},
)
BEGIN = encode(
    MAIN,
    "s2c",
    MIGRATE_BEGIN,
    {"dst_info": _dst_info(b"dst.example\0", 5900, 5901, b"C=XX,O=Example,CN=dst\0")},
)
SWITCH = encode(MAIN, "s2c", MIGRATE_SWITCH_HOST, _dst_info(b"h\0", 0xFFFF, 5902))


def test_destination_of_each_message() -> None:
    assert destination(MIGRATE_BEGIN_SEAMLESS, SEAMLESS) == Destination(
        "10.0.0.9", 5951, None, None
    )
    assert destination(MIGRATE_BEGIN, BEGIN) == Destination(
        "dst.example", 5900, 5901, "C=XX,O=Example,CN=dst"
    )
    assert destination(MIGRATE_SWITCH_HOST, SWITCH) == Destination("h", None, 5902, None)


def test_rewrite_changes_only_the_address() -> None:
    new = rewrite(MIGRATE_BEGIN, BEGIN, "127.0.0.1", 40001, 40002, "O=spicetap,CN=127.0.0.1")
    assert destination(MIGRATE_BEGIN, new) == Destination(
        "127.0.0.1", 40001, 40002, "O=spicetap,CN=127.0.0.1"
    )
    seamless = rewrite(MIGRATE_BEGIN_SEAMLESS, SEAMLESS, "127.0.0.1", 40001, None, None)
    fields = decode(MAIN, "s2c", MIGRATE_BEGIN_SEAMLESS, seamless).fields
    assert fields is not None and fields["src_mig_version"] == 1
    assert fields["dst_info"]["cert_subject_data"] is None  # a NULL pointer, as the server's
    assert decode(MAIN, "s2c", MIGRATE_BEGIN_SEAMLESS, seamless).covered == len(seamless)


def _mini(msg_type: int, body: bytes) -> bytes:
    return MINI_HEADER.pack(msg_type, len(body)) + body


STREAM = (
    _mini(4, b"\x01" * 300)  # ping
    + _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)
    + _mini(2, b"")
    + _mini(MIGRATE_SWITCH_HOST, SWITCH)
    + _mini(4, b"\x02" * 70)
)


def _run(scanner: MigrationScanner, cuts: list[int], data: bytes) -> list[Pass | Held]:
    parts: list[Pass | Held] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        parts += scanner.feed(data[a:b])
    return parts


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_scanner_holds_exactly_the_migration_messages_however_cut(cuts: list[int]) -> None:
    parts = _run(MigrationScanner(mini_header=True, max_message=1 << 20), cuts, STREAM)
    held = [p for p in parts if isinstance(p, Held)]
    assert [(h.msg_type, h.body) for h in held] == [
        (MIGRATE_BEGIN_SEAMLESS, SEAMLESS),
        (MIGRATE_SWITCH_HOST, SWITCH),
    ]
    # everything, in order, comes out exactly once
    rebuilt = b"".join(p.data if isinstance(p, Pass) else p.header + p.body for p in parts)
    assert rebuilt == STREAM


def test_full_header_and_reframing() -> None:
    full = FULL_HEADER.pack(7, MIGRATE_BEGIN, len(BEGIN), 0) + BEGIN
    scanner = MigrationScanner(mini_header=False, max_message=1 << 20)
    (held,) = scanner.feed(full)
    assert isinstance(held, Held) and held.body == BEGIN
    new_body = rewrite(MIGRATE_BEGIN, BEGIN, "127.0.0.1", 1, 2, None)
    framed = scanner.reframe(held, new_body)
    assert FULL_HEADER.unpack_from(framed) == (7, MIGRATE_BEGIN, len(new_body), 0)
    assert framed[FULL_HEADER.size :] == new_body


# -- the relay following a migration on the main channel ---------------------------------


def _linked_main(relay: ChannelRelay, tail: bytes = b"") -> Sequence[object]:
    bits = caps_word(1, 3)
    relay.received("c2s", link_mess(bits, channel_type=1), 0.0)
    relay.received("s2c", link_reply(bits), 0.0)
    relay.received("c2s", TICKET, 0.0)
    return list(relay.received("s2c", OK + tail, 0.0))  # the result and what follows


def _forwarded(commands: Sequence[object]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, Forward))


def test_relay_holds_the_migration_message_until_redirected() -> None:
    relay = ChannelRelay(Limits(), 0.0, follow_migration=True)
    before = _mini(4, b"p" * 10)
    first = _linked_main(relay, before + _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)[:9])
    assert _forwarded(first) == OK + before  # the message's start waits
    later = relay.received("s2c", _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)[9:] + _mini(2, b""), 1)
    (redirect,) = [c for c in later if isinstance(c, Redirect)]
    assert redirect.destination == Destination("10.0.0.9", 5951, None, None)
    assert _forwarded(later) == b""  # nothing may overtake the held message
    assert _forwarded(relay.received("s2c", _mini(4, b"q"), 2)) == b""
    done = relay.redirected("127.0.0.1", 40001, None, None, 3.0)
    sent = _forwarded(done)
    new_body = rewrite(MIGRATE_BEGIN_SEAMLESS, SEAMLESS, "127.0.0.1", 40001, None, None)
    assert sent == _mini(MIGRATE_BEGIN_SEAMLESS, new_body) + _mini(2, b"") + _mini(4, b"q")
    recorded = b"".join(c.data for c in done if isinstance(c, RecordData))
    assert recorded == sent  # the archive holds what the viewer got...
    (event,) = [c for c in done if isinstance(c, RecordEvent)]
    assert event.raw == _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)  # ...and the original
    assert event.fields["from"]["port"] == 5951 and event.fields["to"]["port"] == 40001


def test_relay_without_following_or_off_main_passes_migration_messages() -> None:
    plain = ChannelRelay(Limits(), 0.0)
    stream = _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)
    assert _forwarded(_linked_main(plain, stream)) == OK + stream
    display = ChannelRelay(Limits(), 0.0, follow_migration=True)
    bits = caps_word(1, 3)
    display.received("c2s", link_mess(bits, channel_type=2), 0.0)
    display.received("s2c", link_reply(bits), 0.0)
    display.received("c2s", TICKET, 0.0)
    out = display.received("s2c", OK + stream, 0.0)
    assert _forwarded(out) == OK + stream and not any(isinstance(c, Redirect) for c in out)


def test_a_failed_redirect_forwards_the_original_loudly() -> None:
    relay = ChannelRelay(Limits(), 0.0, follow_migration=True)
    _linked_main(relay, _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS) + _mini(4, b"x"))
    out = relay.redirect_failed("no listener", 1.0)
    assert _forwarded(out) == _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS) + _mini(4, b"x")
    assert any("cannot follow the migration" in getattr(c, "message", "") for c in out)


def test_an_unchanged_redirect_forwards_the_original_quietly_then_the_rest() -> None:
    """Behind the CONNECT front the viewer follows by itself: no log, the original first."""
    relay = ChannelRelay(Limits(), 0.0, follow_migration=True)
    _linked_main(relay, _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS) + _mini(4, b"x"))
    out = relay.redirect_unchanged(1.0)
    assert _forwarded(out) == _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS) + _mini(4, b"x")
    recorded = b"".join(c.data for c in out if isinstance(c, RecordData))
    assert recorded == _forwarded(out)
    assert not [c for c in out if isinstance(c, Log)] and relay.waiting is None


@pytest.mark.parametrize("host", [None, b"\0", b""])
def test_a_migration_message_naming_no_host_is_forwarded_unchanged(host: bytes | None) -> None:
    """A NULL pointer (None) or an empty name: nowhere to follow, said in the log; the
    channel goes on (it once raised in the pump, which left the channel hanging)."""
    fields = _dst_info(b"", 5900, 0xFFFF)
    fields.update(host_data=host, host_size=len(host or b""))
    switch = encode(MAIN, "s2c", MIGRATE_SWITCH_HOST, fields)
    relay = ChannelRelay(Limits(), 0.0, follow_migration=True)
    out = _linked_main(relay, _mini(MIGRATE_SWITCH_HOST, switch) + _mini(4, b"x"))
    assert _forwarded(out) == OK + _mini(MIGRATE_SWITCH_HOST, switch) + _mini(4, b"x")
    logs = [c.message for c in out if isinstance(c, Log)]
    assert logs == ["migrate_switch_host names no destination host: forwarded unchanged"]
    assert not relay.closed and relay.waiting is None


def test_a_server_closing_mid_message_loses_no_recorded_byte() -> None:
    relay = ChannelRelay(Limits(), 0.0, follow_migration=True)
    cut = _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)[:20]
    assert _forwarded(_linked_main(relay, cut)) == OK  # held: the message is incomplete
    out = relay.peer_closed("s2c", 1.0)
    assert b"".join(c.data for c in out if isinstance(c, RecordData)) == cut
    assert any(isinstance(c, Close) and c.error for c in out)


@pytest.mark.parametrize("server_tls", [True, False])
def test_a_sasl_main_channel_is_followed_when_no_layer_hides_it(server_tls: bool) -> None:
    """After SASL over TLS the main channel is clear SPICE: its migration message is held
    for a redirect as after a ticket. Behind a SASL security layer nothing can be read:
    everything passes as it came (the viewer would follow the server by itself)."""
    relay = ChannelRelay(Limits(), 0.0, follow_migration=True, server_tls=server_tls)
    chunks = exchange(channel_type=MAIN, conn=0)
    out: list[object] = []
    for d, data in chunks:
        out += relay.received(d, data, 0.0)
    migrate = _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)
    later = relay.received("s2c", migrate + _mini(4, b"x"), 1.0)
    redirects = [c for c in later if isinstance(c, Redirect)]
    if server_tls:
        assert [r.destination for r in redirects] == [Destination("10.0.0.9", 5951, None, None)]
        assert _forwarded(later) == b""  # held until redirected
    else:
        assert not redirects and _forwarded(later) == migrate + _mini(4, b"x")
    # behind a layer the operator is told once that a migration would escape spicetap,
    # and the server's side no longer waits on Python for migration messages
    said = [c.message for c in out + later if isinstance(c, Log)]
    assert said == ([] if server_tls else [SASL_LAYER_MIGRATION])
    assert relay.unchanged("s2c") == (not server_tls)
    sent = b"".join(data for d, data in chunks if d == "s2c")
    assert _forwarded([c for c in out if getattr(c, "direction", "") == "s2c"]) == sent


@pytest.mark.parametrize("follow", [True, False])
@pytest.mark.parametrize("cut", [1, 3, 7, 12])
def test_the_relay_learns_the_session_from_init_and_passes_it_unchanged(
    cut: int, follow: bool
) -> None:
    """A reload routes a session's later channels by its id: the main channel's INIT says
    it (held until whole: a few dozen bytes), cut anywhere, and passes on as it came;
    not following migrations, the rest then passes unscanned."""
    from tests.proxy.test_recording import SESSION_ID, init

    relay = ChannelRelay(Limits(), 0.0, follow_migration=follow)
    stream = init() + _mini(4, b"p" * 10) + init(0x1234)  # a second INIT is no session
    bits = caps_word(1, 3)
    relay.received("c2s", link_mess(bits, channel_type=1, conn=0), 0.0)  # a new session
    relay.received("s2c", link_reply(bits), 0.0)
    relay.received("c2s", TICKET, 0.0)
    first = relay.received("s2c", OK + stream[:cut], 0.0)
    assert relay.session is None
    rest = relay.received("s2c", stream[cut:], 1.0)
    assert _forwarded(first) + _forwarded(rest) == OK + stream
    assert relay.session == SESSION_ID
    assert relay.unchanged("s2c") is not follow  # the fast path, once INIT is read
    display = ChannelRelay(Limits(), 0.0, follow_migration=True)
    display.received("c2s", link_mess(caps_word(1, 3), channel_type=2, conn=SESSION_ID), 0.0)
    assert display.session == SESSION_ID  # other channels say it in their link message


def test_not_following_a_main_channel_whose_first_message_is_no_init_is_read_no_further() -> None:
    relay = ChannelRelay(Limits(), 0.0)
    stream = _mini(4, b"p" * 10) + _mini(MIGRATE_BEGIN_SEAMLESS, SEAMLESS)
    bits = caps_word(1, 3)
    relay.received("c2s", link_mess(bits, channel_type=1, conn=0), 0.0)  # a new session
    relay.received("s2c", link_reply(bits), 0.0)
    relay.received("c2s", TICKET, 0.0)
    commands = relay.received("s2c", OK + stream[:3], 0.0)  # a cut header: kept back
    assert not relay.unchanged("s2c")
    commands += relay.received("s2c", stream[3:], 1.0)
    assert _forwarded(commands) == OK + stream
    assert not [c for c in commands if isinstance(c, Redirect)]
    assert relay.session is None and relay.unchanged("s2c")


def test_not_following_a_main_channel_that_joins_a_session_is_not_scanned() -> None:
    relay = ChannelRelay(Limits(), 0.0)
    _linked_main(relay, b"")  # links with a connection id: a session begun before
    assert relay.session == 0x1234 and relay.unchanged("s2c")
