"""The lockout table (proxy/core/lockout.py) and the link refusal it answers with."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from proxy.core.framing import C2S, S2C, ChannelFramer, LinkUnit
from proxy.core.linkrewrite import LinkPolicy
from proxy.core.lockout import (
    LINK_REFUSAL,
    MAX_LINK_MESSAGE,
    Lockout,
    LockoutPolicy,
    address_key,
    link_message_size,
)
from proxy.core.relay import AuthFailed, ChannelRelay, Command, Limits
from proxy.core.ticket import TicketKey
from tests.proxy.test_framing import OK, TICKET, caps_word
from tests.proxy.test_framing import link_mess as framing_link_mess
from tests.proxy.test_framing import link_reply as framing_link_reply
from tests.proxy.test_linkrewrite import DENIED, inject_policy, linked_through, wire
from tests.proxy.test_sasl_framing import exchange
from tests.proxy.test_sasl_framing import field as sasl_field


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("::ffff:10.0.0.5", "10.0.0.5"),  # a dual-stack socket's IPv4 viewer
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),  # the same host, another address
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("?", "?"),  # no address known: counted as given
    ],
)
def test_addresses_are_counted_by_host_and_ipv6_by_its_64(host: str, key: str) -> None:
    assert address_key(host) == key


def test_failures_within_the_window_lock_an_address_out_for_the_duration() -> None:
    lockout = Lockout(LockoutPolicy(failures=3, window=60, duration=300))
    assert lockout.failed("10.0.0.5", 100.0) is None
    assert lockout.failed("10.0.0.5", 110.0) is None
    assert lockout.locked_for("10.0.0.5", 111.0) == 0
    locked = lockout.failed("10.0.0.5", 120.0)
    assert locked is not None
    assert (locked.address, locked.failures, locked.seconds) == ("10.0.0.5", 3, 300)
    assert lockout.locked_for("10.0.0.5", 150.0) == 270.0
    assert lockout.locked_for("10.0.0.6", 150.0) == 0  # another address is not
    assert lockout.locked_for("10.0.0.5", 420.0) == 0  # over
    assert (lockout.failures_total, lockout.lockouts_total, lockout.refused_total) == (3, 1, 1)


def test_failures_older_than_the_window_do_not_count() -> None:
    lockout = Lockout(LockoutPolicy(failures=3, window=60, duration=300))
    lockout.failed("10.0.0.5", 0.0)
    lockout.failed("10.0.0.5", 50.0)
    assert lockout.failed("10.0.0.5", 61.0) is None  # the first fell out of the window
    assert lockout.failed("10.0.0.5", 62.0) is not None


def test_a_lock_starts_a_fresh_count_and_failures_while_locked_do_not_extend_it() -> None:
    lockout = Lockout(LockoutPolicy(failures=2, window=600, duration=100))
    lockout.failed("h", 0.0)
    assert lockout.failed("h", 1.0) is not None
    assert lockout.failed("h", 2.0) is None  # a channel already past the check fails
    assert lockout.failed("h", 3.0) is None
    assert lockout.locked_for("h", 50.0) == 51.0  # still ends at 101
    assert lockout.failed("h", 200.0) is not None  # after it, the count goes on


def test_ipv6_guesses_from_one_64_add_up() -> None:
    lockout = Lockout(LockoutPolicy(failures=2))
    lockout.failed("2001:db8::1", 0.0)
    assert lockout.failed("2001:db8::ffff:2", 1.0) is not None
    assert lockout.locked_for("2001:db8::3", 2.0) > 0
    assert lockout.locked_for("2001:db8:0:1::3", 2.0) == 0


def test_no_lockout_when_failures_is_0_but_failures_are_counted() -> None:
    lockout = Lockout(LockoutPolicy(failures=0))
    for i in range(50):
        assert lockout.failed("h", float(i)) is None
    assert lockout.locked_for("h", 51.0) == 0
    assert lockout.failures_total == 50 and lockout.entries(51.0) == []


def test_a_new_policy_applies_to_counts_already_there() -> None:
    lockout = Lockout(LockoutPolicy(failures=5))
    for i in range(3):
        lockout.failed("h", float(i))
    lockout.policy = LockoutPolicy(failures=4)  # a reload lowers it
    assert lockout.failed("h", 3.0) is not None


def test_the_table_is_bounded_forgetting_the_address_heard_from_longest_ago() -> None:
    lockout = Lockout(LockoutPolicy(failures=2), max_addresses=3)
    for host in ("a", "b", "c"):
        lockout.failed(host, 0.0)
    lockout.failed("a", 1.0)  # locks a, and a is now the most recent
    lockout.failed("d", 2.0)  # b goes
    assert [e.address for e in lockout.entries(3.0)] == ["a", "c", "d"]
    assert lockout.failed("b", 4.0) is None  # its first failure again


def test_entries_list_locked_addresses_first_and_forget_stale_ones() -> None:
    lockout = Lockout(LockoutPolicy(failures=2, window=10, duration=100))
    lockout.failed("old", 0.0)
    lockout.failed("z", 95.0)
    lockout.failed("locked", 96.0)
    lockout.failed("locked", 97.0)
    entries = lockout.entries(100.0)
    assert [(e.address, e.failures, e.locked_for) for e in entries] == [
        ("locked", 0, 97.0),
        ("z", 1, 0.0),
    ]
    assert lockout.locked_count(100.0) == 1


def test_release_one_address_or_all() -> None:
    lockout = Lockout(LockoutPolicy(failures=1))
    lockout.failed("10.0.0.1", 0.0)
    lockout.failed("2001:db8::1", 0.0)
    assert lockout.release("2001:db8::99") == ["2001:db8::/64"]  # any address of the /64
    assert lockout.locked_for("2001:db8::1", 1.0) == 0
    assert lockout.release("10.9.9.9") == []
    assert lockout.release() == ["10.0.0.1"]
    assert lockout.locked_for("10.0.0.1", 1.0) == 0


def test_the_refusal_is_a_link_reply_with_permission_denied() -> None:
    """Our own framer, as a viewer's, reads it as a refused link (what spice-server sends
    for a link it will not serve)."""
    framer = ChannelFramer(1 << 20)
    framer.feed(C2S, framing_link_mess(caps_word(1, 3)))
    events = framer.feed(S2C, LINK_REFUSAL)
    assert [e.kind for e in events if isinstance(e, LinkUnit)] == ["header", "link_reply"]
    assert framer.link_error == 7
    assert framer.state[S2C] == "done"


def test_link_message_size_says_how_much_of_a_viewers_link_to_read() -> None:
    message = framing_link_mess(caps_word(1, 3))
    assert link_message_size(message[:10]) is None
    assert link_message_size(message[:16]) == len(message)
    assert link_message_size(b"GET / HTTP/1.1\r\n\r\n") == 18  # no SPICE: read no more
    huge = b"REDQ" + (2).to_bytes(4, "little") * 2 + (1 << 20).to_bytes(4, "little")
    assert link_message_size(huge) == 16
    assert len(message) <= MAX_LINK_MESSAGE


def test_policy_values_are_checked() -> None:
    with pytest.raises(ValueError, match="lockout policy"):
        LockoutPolicy(failures=-1)
    with pytest.raises(ValueError, match="lockout policy"):
        LockoutPolicy(window=0)
    assert LockoutPolicy(failures=0).describe() == "off"
    assert "3 failed" in LockoutPolicy(failures=3).describe()


# -- the relay says when a viewer's credentials were refused -----------------------------------
def _failures(commands: Sequence[Command]) -> list[str]:
    return [c.by for c in commands if isinstance(c, AuthFailed)]


def _plain(result: bytes) -> list[Command]:
    relay = ChannelRelay(Limits(), 0.0)
    bits = caps_word(1, 3)
    commands = relay.received(C2S, framing_link_mess(bits), 0.0)
    commands += relay.received(S2C, framing_link_reply(bits), 0.0)
    commands += relay.received(C2S, TICKET, 0.0)
    return commands + relay.received(S2C, result, 0.0)


def test_pass_through_counts_the_servers_permission_denied_only() -> None:
    assert _failures(_plain(DENIED)) == ["server"]
    assert _failures(_plain(OK)) == []
    assert _failures(_plain(struct.pack("<I", 4))) == []  # e.g. BAD_CONNECTION_ID: no guess


def test_a_failed_sasl_login_counts() -> None:
    refused = exchange(result=struct.pack("<I", 1) + sasl_field(b"Authentication failed\0"))
    for outcome, expected in ((refused, ["server"]), (exchange(), [])):
        relay = ChannelRelay(Limits(), 0.0)
        commands: list[Command] = []
        for direction, data in outcome:
            commands += relay.received(direction, data, 0.0)
        assert _failures(commands) == expected


def test_intercept_counts_the_servers_refusal() -> None:
    w = wire(LinkPolicy(auth="intercept", key=TicketKey.generate()))
    linked_through(w, b"wrong", result=DENIED)
    assert _failures(w.commands) == ["server"]


def test_inject_counts_spicetaps_refusal_but_not_the_servers() -> None:
    w = wire(inject_policy())
    linked_through(w, b"wrong-viewer-pw")
    assert _failures(w.commands) == ["spicetap"]
    # the server refusing spicetap's own password is the operator's problem, not a guess
    w = wire(inject_policy())
    linked_through(w, b"viewer-pw", result=DENIED)
    assert _failures(w.commands) == []
    assert [e.fields["result"] for e in w.events("auth")] == ["PERMISSION_DENIED"]
