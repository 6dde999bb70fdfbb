"""The relay core without I/O: forwarding order, limits, vanished peers."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from proxy.core.relay import (
    SESSION_REFUSED,
    AuthFailed,
    ChannelRelay,
    Close,
    Forward,
    Limits,
    Log,
    RecordData,
)
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply, mini
from tests.proxy.test_sasl_framing import exchange


def linked(relay: ChannelRelay, now: float = 0.0) -> None:
    bits = caps_word(1, 3)
    relay.received("c2s", link_mess(bits), now)
    relay.received("s2c", link_reply(bits), now)
    relay.received("c2s", TICKET, now)
    relay.received("s2c", OK, now)


def test_bytes_are_forwarded_unchanged_before_anything_else() -> None:
    relay = ChannelRelay(Limits(), 0.0)
    data = link_mess(caps_word(1, 3))[:7]
    cmds = relay.received("c2s", data, 1.0)
    assert cmds[0] == Forward("c2s", data)
    assert cmds[1] == RecordData("c2s", data, 1.0)


def test_whole_session_passes_and_counts_messages() -> None:
    relay = ChannelRelay(Limits(), 0.0)
    linked(relay)
    assert relay.linked
    cmds = relay.received("s2c", mini(101, b"x" * 1000) + mini(4, b"ping"), 1.0)
    assert [type(c) for c in cmds] == [Forward, RecordData]
    assert relay.messages["s2c"] == 2
    assert relay.tick(100.0) == []  # linked: no link timeout any more


def test_oversized_message_closes_the_channel() -> None:
    relay = ChannelRelay(Limits(max_message=1000), 0.0)
    linked(relay)
    cmds = relay.received("s2c", mini(101, b"")[:2] + (5000).to_bytes(4, "little"), 1.0)
    assert isinstance(cmds[0], Forward)
    close = [c for c in cmds if isinstance(c, Close)]
    assert close and close[0].error and "5000 bytes exceeds" in close[0].reason
    assert any(isinstance(c, Log) for c in cmds)
    assert relay.received("s2c", b"more", 2.0) == []


def test_link_stage_timeout_and_idle_timeout() -> None:
    relay = ChannelRelay(Limits(link_timeout=5.0), 0.0)
    relay.received("c2s", link_mess(caps_word(1))[:10], 1.0)
    assert relay.tick(4.0) == []
    (_log, close) = relay.tick(6.0)
    assert isinstance(close, Close) and "link stage not finished after 5 s" in close.reason
    idle = ChannelRelay(Limits(idle_timeout=30.0), 0.0)
    linked(idle)
    assert idle.tick(20.0) == []
    assert any(isinstance(c, Close) and "idle" in c.reason for c in idle.tick(31.0))


def test_the_operator_ends_a_channel_once_and_not_as_an_error() -> None:
    relay = ChannelRelay(Limits(), 0.0)
    linked(relay)
    assert relay.terminate("ended by the operator", 5.0) == [
        Close("ended by the operator", error=False)
    ]
    assert relay.terminate("again", 6.0) == [] and relay.tick(100.0) == []
    assert relay.peer_closed("c2s", 7.0) == []  # its end is said once
    asked = ChannelRelay(Limits(), 0.0)  # asked through `ending`: the next tick ends it
    linked(asked)
    asked.ending = "ended by the operator"
    assert asked.tick(1.0) == [Close("ended by the operator", error=False)]


def test_peer_vanishing_mid_message_is_an_error_not_a_crash() -> None:
    relay = ChannelRelay(Limits(), 0.0)
    linked(relay)
    relay.received("s2c", mini(101, b"y" * 100)[:50], 1.0)
    (_log, close) = relay.peer_closed("s2c", 2.0)
    assert close == Close(
        "server vanished in the middle of a message (56 more were due)", True, "s2c", True
    )  # 6 + 100 bytes announced, 50 came
    clean = ChannelRelay(Limits(), 0.0)
    linked(clean)
    assert clean.peer_closed("c2s", 1.0) == [Close("viewer closed", error=False)]
    in_link = ChannelRelay(Limits(), 0.0)
    in_link.received("c2s", link_mess(caps_word(1))[:25], 1.0)  # the header, 9 of the body
    (_log, close) = in_link.peer_closed("c2s", 2.0)
    assert close == Close(
        "viewer vanished in the middle of a message (9 bytes of it came)", True, "c2s", True
    )
    cut_header = ChannelRelay(Limits(), 0.0)
    linked(cut_header)
    cut_header.received("s2c", mini(4, b"ping")[:3], 1.0)
    (_log, close) = cut_header.peer_closed("s2c", 2.0)
    assert close == Close(
        "server vanished in the middle of a message (3 bytes of it came)", True, "s2c", True
    )


def test_a_shell_may_forward_first_when_the_relay_passes_bytes_unchanged() -> None:
    relay = ChannelRelay(Limits(), 0.0, follow_migration=True)
    assert not relay.unchanged("c2s")  # the link stage: the guard sees units before they go
    assert not relay.passing  # ...and a shell keeps each side's units in the relay's order
    linked(relay)
    assert relay.unchanged("c2s") and relay.unchanged("s2c")  # not main: nothing to follow
    assert relay.passing
    data = mini(101, b"x" * 10)
    assert relay.received("s2c", data, 1.0, sent=True) == [RecordData("s2c", data, 1.0)]
    relay.peer_closed("c2s", 2.0)
    # the bytes crossed as the viewer left: recorded and counted all the same
    assert relay.received("s2c", data, 2.0, sent=True) == [RecordData("s2c", data, 2.0)]
    assert relay.received("s2c", data, 2.0) == []
    assert relay.messages["s2c"] == 2


# -- the reserve of connections for sessions already begun (proxy/core/admission.py) --------
@pytest.mark.parametrize(
    ("channel_type", "conn", "asked", "refused"),
    [
        (1, 0, True, True),  # a main channel with id 0: a new session, refused
        (1, 0x1234, True, False),  # a migration's main channel carries its session's id
        (2, 0x1234, True, False),  # a display channel of a session already begun
    ],
)
def test_a_new_session_is_refused_when_the_gate_says_no(
    channel_type: int, conn: int, asked: bool, refused: bool
) -> None:
    questions: list[bool] = []

    def gate() -> bool:
        questions.append(True)
        return False

    relay = ChannelRelay(Limits(), 0.0, session_gate=gate)
    message = link_mess(caps_word(1, 3), channel_type=channel_type, conn=conn)
    cmds = relay.received("c2s", message[:16], 1.0)  # the header alone: not known yet
    assert cmds[0] == Forward("c2s", message[:16]) and not questions
    cmds = relay.received("c2s", message[16:], 1.0)
    if refused:  # not forwarded, not recorded, closed without an error
        assert cmds == [Close(SESSION_REFUSED, error=False)] and relay.closed
    else:
        assert cmds[0] == Forward("c2s", message[16:]) and not relay.closed
    assert len(questions) == (1 if channel_type == 1 and conn == 0 else 0)
    relay.received("s2c", link_reply(caps_word(1, 3)), 1.0)
    assert len(questions) <= 1  # asked once at most


def test_the_gate_is_asked_once_and_a_yes_lets_the_session_link() -> None:
    questions: list[bool] = []

    def gate() -> bool:
        questions.append(True)
        return True

    relay = ChannelRelay(Limits(), 0.0, session_gate=gate)
    bits = caps_word(1, 3)
    relay.received("c2s", link_mess(bits, channel_type=1, conn=0), 0.0)
    relay.received("s2c", link_reply(bits), 0.0)
    relay.received("c2s", TICKET, 0.0)
    relay.received("s2c", OK, 0.0)
    assert relay.linked and questions == [True]


def test_a_refused_session_under_a_link_policy_is_refused_too() -> None:
    """With a rewriter the link message is held until whole, then refused unsent."""
    from proxy.core.capmask import CapMask
    from proxy.core.linkrewrite import LinkPolicy

    policy = LinkPolicy(CapMask.parse(["display:codec_h264"]))
    relay = ChannelRelay(Limits(), 0.0, policy, session_gate=lambda: False)
    cmds = relay.received("c2s", link_mess(caps_word(1, 3), channel_type=1, conn=0), 1.0)
    assert not [c for c in cmds if isinstance(c, Forward)]
    assert Close(SESSION_REFUSED, error=False) in cmds and relay.closed


@pytest.mark.parametrize("server_tls", [False, True])
def test_sasl_links_at_its_result_and_over_tls_the_messages_are_guarded(
    server_tls: bool,
) -> None:
    """The SASL exchange is link stage: relayed in the peers' order, under the link timeout.
    After it, behind a TLS server leg (no SASL layer), messages are walked and limited as
    on any channel; behind a plain one the security layer's bytes pass as they are."""
    relay = ChannelRelay(Limits(max_message=1000), 0.0, server_tls=server_tls)
    chunks = exchange()
    for d, data in chunks[:-2]:
        relay.received(d, data, 1.0)
        assert not relay.linked and not relay.unchanged(d)
    relay.received(*chunks[-2], 1.0)  # SASL's result: with a layer, all after it is opaque
    assert relay.linked is not server_tls
    relay.received(*chunks[-1], 1.0)  # the link result
    assert relay.linked
    oversized = mini(101, b"")[:2] + (5000).to_bytes(4, "little")
    cmds = relay.received("s2c", oversized, 2.0)
    assert cmds[0] == Forward("s2c", oversized)
    closed = [c for c in cmds if isinstance(c, Close)]
    if server_tls:
        assert closed and "5000 bytes exceeds" in closed[0].reason
    else:  # SASL-encrypted: nothing to walk
        assert not closed and relay.received("c2s", b"\0" * 50, 3.0)


def _closes(cmds: Sequence[object]) -> list[Close]:
    return [c for c in cmds if isinstance(c, Close)]


def test_a_server_closing_before_the_link_result_is_its_error() -> None:
    bits = caps_word(1, 3)
    relay = ChannelRelay(Limits(), 0.0)
    relay.received("c2s", link_mess(bits), 0.0)
    relay.received("s2c", link_reply(bits), 0.0)
    relay.received("c2s", TICKET, 0.0)
    cmds = relay.peer_closed("s2c", 1.0)
    assert _closes(cmds) == [Close("server closed during the link stage", True, "s2c")]
    assert Log("server closed during the link stage") in cmds


def test_a_viewer_giving_up_on_the_link_is_said_but_no_error() -> None:
    relay = ChannelRelay(Limits(), 0.0)
    relay.received("c2s", link_mess(caps_word(1, 3)), 0.0)
    cmds = relay.peer_closed("c2s", 1.0)
    assert cmds == [Close("viewer closed during the link stage", False, "c2s")]
    unlinked = ChannelRelay(Limits(), 0.0)  # a health check: connected, said nothing
    assert unlinked.peer_closed("c2s", 1.0) == [Close("viewer closed", False, "c2s")]


def test_bytes_after_a_refused_link_are_named_as_such() -> None:
    bits = caps_word(1, 3)
    relay = ChannelRelay(Limits(), 0.0)
    relay.received("c2s", link_mess(bits), 0.0)
    relay.received("s2c", link_reply(bits, error=7) + b"\xee" * 300, 0.0)
    assert relay.linked  # refused: the link stage is over
    (close,) = _closes(relay.peer_closed("s2c", 1.0))
    assert close.reason == "server closed, having sent 300 bytes after the link was refused"
    assert close.error and close.direction == "s2c"


@pytest.mark.parametrize("refused", [False, True])
def test_the_link_stage_buffers_at_most_64_kib_for_the_other_side(refused: bool) -> None:
    """A viewer flooding ahead of the server's link reply (or after a refusal) made the
    proxy buffer all of it until the link timeout: gigabytes on loopback."""
    bits = caps_word(1, 3)
    relay = ChannelRelay(Limits(), 0.0)
    relay.received("c2s", link_mess(bits), 0.0)
    if refused:
        relay.received("s2c", link_reply(bits, error=7), 0.0)
    flood, forwarded = b"\xff" * 16384, 0
    cmds: Sequence[object] = []
    for _ in range(100):  # 1.6 MB at most
        cmds = relay.received("c2s", flood, 0.5)
        forwarded += sum(len(c.data) for c in cmds if isinstance(c, Forward))
        if relay.closed:
            break
    assert relay.closed and forwarded <= (64 << 10) + len(flood)
    (close,) = _closes(cmds)
    what = "after the link was refused" if refused else "ahead of the server's link reply"
    assert close.error and close.direction == "c2s" and what in close.reason
    assert relay.guard.buf["c2s"] == bytearray()


def test_a_server_hanging_up_in_sasl_is_how_it_refuses_not_an_error() -> None:
    """spice-server closes the connection when a SASL step fails (a wrong password): a
    failed login (the lockout counts it), not an error of the channel."""
    relay = ChannelRelay(Limits(), 0.0)
    for direction, data in exchange()[:7]:  # up to the client's answer
        relay.received(direction, data, 0.0)
    assert not relay.linked
    cmds = relay.peer_closed("s2c", 1.0)
    assert cmds == [AuthFailed("server"), Close("server closed during SASL", False, "s2c")]
