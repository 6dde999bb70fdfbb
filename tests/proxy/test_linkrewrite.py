"""Link-stage rewrites in the relay core: capability masking and the auth modes, on bytes
built with the project's own encoders (a simulated viewer and server around the relay)."""

from __future__ import annotations

import functools
import itertools
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.capmask import CapMask, UnknownCap
from proxy.core.credentials import Token, ViewerCredentials, parse_tokens, token_digest
from proxy.core.framing import C2S, S2C, ChannelFramer, LinkUnit, Message
from proxy.core.linkrewrite import LinkPolicy
from proxy.core.relay import (
    ChannelRelay,
    Close,
    Command,
    Forward,
    Limits,
    RecordData,
    RecordEvent,
)
from proxy.core.ticket import TicketError, TicketKey, encrypt_ticket
from spicetap.records import RecordBuilder
from tests.proxy.test_framing import caps_word, full, header, mini
from tests.proxy.test_framing import link_mess as framing_link_mess
from tests.proxy.test_framing import link_reply as framing_link_reply

DISPLAY, MAIN = 2, 1
AUTH_SEL, AUTH_SPICE, AUTH_SASL, MINI = 0, 1, 2, 3
CODEC_MJPEG, CODEC_VP8, CODEC_H264 = 9, 10, 11
SERVER_KEY = TicketKey.generate()  # plays the real server's key pair
PASSWORD = b"s3cret-pw"
OK, DENIED = struct.pack("<I", 0), struct.pack("<I", 7)


def link_mess(common: int, channel: int, channel_type: int = DISPLAY, conn: int = 0) -> bytes:
    return framing_link_mess(common, channel_type, conn, channel_caps=channel)


def link_reply(
    common: int, channel: int, key: bytes = SERVER_KEY.public_der, error: int = 0
) -> bytes:
    return framing_link_reply(common, error, channel_caps=channel, key=key)


def caps_of(unit: bytes | bytearray, fixed: int) -> tuple[int, int]:
    """(common word, channel word) of a LinkMess (fixed 18) or LinkReply (fixed 178) unit."""
    return struct.unpack_from("<II", unit, 16 + fixed)


@dataclass
class Wire:
    """What each peer received through the relay, and everything else it said."""

    relay: ChannelRelay
    to_server: bytearray = field(default_factory=bytearray)
    to_viewer: bytearray = field(default_factory=bytearray)
    recorded: dict[str, bytearray] = field(
        default_factory=lambda: {C2S: bytearray(), S2C: bytearray()}
    )
    commands: list[Command] = field(default_factory=list)

    def send(self, direction: str, data: bytes, now: float = 1.0) -> list[Command]:
        cmds = self.relay.received(direction, data, now)
        for c in cmds:
            if isinstance(c, Forward):
                (self.to_server if c.direction == C2S else self.to_viewer).extend(c.data)
            elif isinstance(c, RecordData):
                self.recorded[c.direction] += c.data
        self.commands += cmds
        return cmds

    def events(self, kind: str) -> list[RecordEvent]:
        return [c for c in self.commands if isinstance(c, RecordEvent) and c.kind == kind]


def wire(policy: LinkPolicy) -> Wire:
    return Wire(ChannelRelay(Limits(), 0.0, policy))


def viewer_ticket(reply_seen: bytes, password: bytes) -> bytes:
    """What spice-gtk sends: the password encrypted with the key in the reply it got."""
    return encrypt_ticket(reply_seen[16 + 4 : 16 + 4 + 162], password)


# -- the plain path stays plain ------------------------------------------------------------
def test_no_policy_and_an_empty_policy_keep_the_plain_path() -> None:
    assert ChannelRelay(Limits(), 0.0).rewriter is None
    assert ChannelRelay(Limits(), 0.0, LinkPolicy()).rewriter is None
    assert ChannelRelay(Limits(), 0.0, LinkPolicy(CapMask.parse(["display:codec_h264"]))).rewriter


# -- capability masking ---------------------------------------------------------------------
MASK = CapMask.parse(["display:codec_h264", "Common:MINI_HEADER", "display:codec_vp8"])
VIEWER_COMMON = caps_word(AUTH_SEL, AUTH_SPICE, MINI)
VIEWER_DISPLAY = caps_word(CODEC_MJPEG, CODEC_H264)
SERVER_COMMON = caps_word(AUTH_SEL, AUTH_SPICE, AUTH_SASL, MINI)


@functools.cache
def masked_session() -> list[tuple[str, bytes]]:
    """One session (OAEP is randomised: the same ticket bytes in every test run)."""
    return [
        (C2S, link_mess(VIEWER_COMMON, VIEWER_DISPLAY)),
        (S2C, link_reply(SERVER_COMMON, caps_word(CODEC_H264))),
        (C2S, struct.pack("<I", 1) + viewer_ticket(link_reply(0, 0), PASSWORD)),
        # mini header masked: both sides use the full header from here on
        (S2C, OK + full(1, 103, b"\x01" * 32)),
        (C2S, full(1, 3, b"pong")),
    ]


def test_masked_caps_are_cleared_on_both_sides_and_nothing_else_changes() -> None:
    w = wire(LinkPolicy(MASK))
    session = masked_session()
    for d, data in session:
        w.send(d, data)
    sent_c2s = b"".join(data for d, data in session if d == C2S)
    sent_s2c = b"".join(data for d, data in session if d == S2C)
    assert len(w.to_server) == len(sent_c2s) and len(w.to_viewer) == len(sent_s2c)
    assert caps_of(w.to_server, 18) == (caps_word(AUTH_SEL, AUTH_SPICE), caps_word(CODEC_MJPEG))
    assert caps_of(w.to_viewer, 178) == (caps_word(AUTH_SEL, AUTH_SPICE, AUTH_SASL), 0)
    # only the caps words differ; the ticket and everything after pass unchanged
    diff = [i for i, (a, b) in enumerate(zip(w.to_server, sent_c2s, strict=True)) if a != b]
    assert all(16 + 18 <= i < 16 + 26 for i in diff)
    assert w.to_viewer[16 + 4 : 16 + 166] == SERVER_KEY.public_der  # key untouched
    # recorded = forwarded, byte for byte; the rewrites say what the senders really sent
    assert w.recorded == {C2S: w.to_server, S2C: w.to_viewer}
    mess, reply = w.events("rewrite")
    assert (mess.name, mess.direction, mess.raw) == ("link_mess", C2S, session[0][1][16:])
    assert mess.fields == {"cleared": ["common:mini_header", "display:codec_h264"]}
    assert (reply.name, reply.raw) == ("link_reply", session[1][1][16:])
    assert reply.fields == {"cleared": ["common:mini_header", "display:codec_h264"]}
    assert w.relay.linked and w.relay.rewriter is None  # back on the plain path
    assert w.relay.messages == {C2S: 1, S2C: 1}  # framed with the full header


def test_after_the_link_stage_bytes_are_forwarded_as_the_same_object() -> None:
    w = wire(LinkPolicy(MASK))
    for d, data in masked_session():
        w.send(d, data)
    chunk = full(2, 4, b"ping")
    forward = w.send(S2C, chunk)[0]
    assert isinstance(forward, Forward) and forward.data is chunk


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_split_gives_the_same_bytes(data: st.DataObject) -> None:
    whole = wire(LinkPolicy(MASK))
    for d, chunk in masked_session():
        whole.send(d, chunk)
    split = wire(LinkPolicy(MASK))
    for d, chunk in masked_session():
        cuts = sorted(data.draw(st.lists(st.integers(0, len(chunk)), max_size=5)))
        for a, b in itertools.pairwise([0, *cuts, len(chunk)]):
            split.send(d, chunk[a:b])
    assert (split.to_server, split.to_viewer) == (whole.to_server, whole.to_viewer)
    assert split.events("rewrite") == whole.events("rewrite")


def test_viewer_bytes_wait_for_the_reply_in_one_chunk() -> None:
    """A viewer that sends its link message and ticket at once (no auth selection)."""
    w = wire(LinkPolicy(MASK))
    ticket = viewer_ticket(link_reply(0, 0), PASSWORD)
    w.send(C2S, link_mess(caps_word(AUTH_SPICE, MINI), 0) + ticket)
    assert len(w.to_server) == 16 + 26  # the ticket waits: its place depends on the reply
    w.send(S2C, link_reply(caps_word(AUTH_SPICE, MINI), 0))
    assert w.to_server.endswith(ticket)


def test_a_refused_link_passes_unchanged() -> None:
    w = wire(LinkPolicy(MASK, "intercept", TicketKey.generate()))
    w.send(C2S, link_mess(VIEWER_COMMON, VIEWER_DISPLAY))
    refused = link_reply(0, 0, key=bytes(162), error=5)  # NEED_SECURED
    w.send(S2C, refused)
    assert w.to_viewer == refused and w.relay.linked


def test_unknown_cap_names_list_the_valid_ones() -> None:
    with pytest.raises(UnknownCap) as exc:
        CapMask.parse(["display:stream_codec_h264"])
    message = str(exc.value)
    assert "display:stream_codec_h264" in message and "display:codec_h264" in message
    assert "common:mini_header" in message and "\n" not in message
    with pytest.raises(UnknownCap):
        CapMask.parse(["nosuch:thing"])


# -- intercept -------------------------------------------------------------------------------
def linked_through(w: Wire, password: bytes, result: bytes = OK, channel: int = MAIN) -> bytes:
    """Run the link stage; returns the ticket the server received."""
    both = caps_word(AUTH_SEL, AUTH_SPICE, MINI)
    w.send(C2S, link_mess(both, 0, channel_type=channel))
    w.send(S2C, link_reply(both | caps_word(AUTH_SASL), 0))
    reply_seen = bytes(w.to_viewer)
    before = len(w.to_server)
    w.send(C2S, struct.pack("<I", 1) + viewer_ticket(reply_seen, password))
    ticket = bytes(w.to_server[before + 4 :])
    if ticket:
        w.send(S2C, result)
    return ticket


def test_intercept_swaps_the_key_and_re_encrypts_the_password() -> None:
    ours = TicketKey.generate()
    w = wire(LinkPolicy(auth="intercept", key=ours))
    ticket = linked_through(w, PASSWORD)
    assert w.to_viewer[16 + 4 : 16 + 166] == ours.public_der
    assert len(ticket) == 128 and SERVER_KEY.decrypt(ticket) == PASSWORD
    (reply,) = w.events("rewrite")
    assert reply.fields == {"pub_key": "replaced by spicetap's", "cleared": ["common:auth_sasl"]}
    assert reply.raw[4:166] == SERVER_KEY.public_der  # what the server really sent
    (auth,) = w.events("auth")
    assert auth.fields == {"mode": "intercept", "result": "OK", "by": "server"}
    assert PASSWORD not in repr(w.commands).encode()


def test_intercept_relays_the_servers_refusal() -> None:
    w = wire(LinkPolicy(auth="intercept", key=TicketKey.generate()))
    linked_through(w, b"wrong", result=DENIED)
    assert w.to_viewer.endswith(DENIED)
    (auth,) = w.events("auth")
    assert auth.fields["result"] == "PERMISSION_DENIED" and auth.fields["by"] == "server"


def test_a_viewer_choosing_sasl_anyway_is_refused() -> None:
    w = wire(LinkPolicy(auth="intercept", key=TicketKey.generate()))
    both = caps_word(AUTH_SEL, AUTH_SPICE, AUTH_SASL)
    w.send(C2S, link_mess(both, 0))
    w.send(S2C, link_reply(both, 0))
    cmds = w.send(C2S, struct.pack("<I", 2) + b"\x05\0\0\0start")
    assert w.to_viewer.endswith(DENIED)
    assert any(isinstance(c, Close) and "SASL" in c.reason for c in cmds)


# -- inject ----------------------------------------------------------------------------------
def inject_policy(**kw: object) -> LinkPolicy:
    viewers = ViewerCredentials(b"viewer-pw", kw.pop("tokens", None))  # type: ignore[arg-type]
    return LinkPolicy(
        auth="inject", key=TicketKey.generate(), viewers=viewers, server_password=PASSWORD
    )


def test_inject_logs_in_with_the_server_password() -> None:
    w = wire(inject_policy())
    ticket = linked_through(w, b"viewer-pw")
    assert SERVER_KEY.decrypt(ticket) == PASSWORD
    (auth,) = w.events("auth")
    assert auth.fields == {
        "mode": "inject",
        "result": "OK",
        "credential": "password",
        "by": "server",
    }
    assert b"viewer-pw" not in repr(w.commands).encode()
    assert PASSWORD not in repr(w.commands).encode()
    assert w.relay.token is None  # a shared password: nothing one session's end revokes


def test_inject_refuses_a_wrong_viewer_password_without_telling_the_server() -> None:
    w = wire(inject_policy())
    ticket = linked_through(w, PASSWORD)  # even the real server password is wrong here
    assert ticket == b""  # nothing after the auth mechanism reached the server
    assert w.to_viewer.endswith(DENIED)
    close = [c for c in w.commands if isinstance(c, Close)]
    assert close and not close[0].error and "refused by spicetap" in close[0].reason
    (auth,) = w.events("auth")
    assert auth.fields["by"] == "spicetap" and auth.fields["result"] == "PERMISSION_DENIED"
    assert w.relay.received(C2S, b"more", 2.0) == []


def test_inject_result_is_what_the_viewers_link_stage_expects() -> None:
    """The viewer-side stream the archive keeps is well formed: a framer reads it whole."""
    w = wire(inject_policy())
    linked_through(w, b"nope")
    framer = ChannelFramer()
    framer.feed(C2S, link_mess(caps_word(AUTH_SEL, AUTH_SPICE, MINI), 0, channel_type=MAIN))
    events = framer.feed(S2C, bytes(w.to_viewer))
    units = [e.kind for e in events if isinstance(e, LinkUnit)]
    assert units[-1] == "link_result" and framer.result == 7


def test_tokens_are_one_session_each() -> None:
    tokens = [Token(b"tok-1", expires=100.0)]
    creds = ViewerCredentials(None, tokens)
    assert creds.check(b"tok-1", MAIN, 0, 1.0).ok
    assert creds.check(b"tok-1", DISPLAY, 0xABC, 2.0).ok  # binds the session
    assert creds.check(b"tok-1", DISPLAY, 0xABC, 200.0).ok  # its channels, even later
    assert not creds.check(b"tok-1", DISPLAY, 0xDEF, 3.0).ok  # another session
    assert not creds.check(b"tok-1", MAIN, 0, 4.0).ok  # used
    assert not creds.check(b"wrong", MAIN, 0, 1.0).ok
    late = ViewerCredentials(None, [Token(b"t2", expires=10.0)])
    assert late.check(b"t2", MAIN, 0, 11.0).reason == "token expired"
    assert "tok-1" not in repr(creds) and "tok-1" not in repr(tokens)


def test_token_file_expiry_becomes_a_monotonic_deadline() -> None:
    text = "# comment\nabc 2000-01-01T00:00:10Z\nxyz\n"
    wall = 946684800.0  # 2000-01-01T00:00:00Z
    a, b = parse_tokens(text, wall, 50.0)
    assert (a.secret, a.expires, b.expires) == (b"abc", 60.0, None)
    with pytest.raises(ValueError, match="line 1") as exc:
        parse_tokens("secret-token tomorrow", wall, 0.0)
    assert "secret-token" not in str(exc.value)


@pytest.mark.parametrize("expiry", ["nan", "inf", "1e999", "-99999999999", "9" * 23])
def test_a_token_expiry_that_is_no_time_is_refused(expiry: str) -> None:
    """NaN compares false with every time: such a token would never have expired."""
    with pytest.raises(ValueError, match=f"line 2: expiry '{expiry}' is not a Unix time"):
        parse_tokens(f"ok 2000000000\nsecret-token {expiry}", 946684800.0, 0.0)


def test_a_tokens_file_line_may_name_the_tokens_user() -> None:
    text = "t1 2000-01-01T00:00:10Z user=alice@corp\nt2 user=bob # a comment\nt3\n"
    t1, t2, t3 = parse_tokens(text, 946684800.0, 0.0)
    assert (t1.user, t1.expires) == ("alice@corp", 10.0)
    assert (t2.user, t2.expires, t3.user) == ("bob", None, None)
    for bad, says in [
        ("t user=", "line 1: a user name is not empty"),
        ("t 1 2 user=x", r"line 1: expected TOKEN \[EXPIRY\] \[user=NAME\]"),
        ("t user=" + "x" * 129, "line 1: a user name is at most 128 characters"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_tokens(bad, 946684800.0, 0.0)


def test_a_token_no_viewer_could_present_is_refused() -> None:
    with pytest.raises(ValueError, match="line 1: a token is at most 60 bytes") as exc:
        parse_tokens("t" * 61, 946684800.0, 0.0)
    assert "t" * 61 not in str(exc.value)


def test_inject_over_a_relay_with_a_token() -> None:
    policy = inject_policy(tokens=[Token(b"one-time")])
    w = wire(policy)
    assert SERVER_KEY.decrypt(linked_through(w, b"one-time")) == PASSWORD
    again = wire(policy)
    assert linked_through(again, b"one-time") == b""  # a second session: refused
    display = wire(policy)  # a channel of the first session binds it
    assert linked_through(display, b"one-time", channel=DISPLAY)
    # each channel keeps what the operator's end of its session revokes the token by
    assert w.relay.token == display.relay.token == token_digest(b"one-time")
    assert again.relay.token is None


def test_the_auth_records_name_the_tokens_user() -> None:
    policy = inject_policy(tokens=[Token(b"alices", user="alice")])
    w = wire(policy)
    assert linked_through(w, b"alices")
    (ok,) = w.events("auth")
    assert ok.fields["user"] == "alice" and ok.fields["result"] == "OK"
    assert w.relay.user == "alice"
    again = wire(policy)
    assert linked_through(again, b"alices") == b""  # a second session, refused: who tried
    (refused,) = again.events("auth")
    assert refused.fields["user"] == "alice" and refused.fields["by"] == "spicetap"
    other = wire(inject_policy())
    assert linked_through(other, b"viewer-pw")
    assert "user" not in other.events("auth")[0].fields and other.relay.user is None


# -- tickets and records ---------------------------------------------------------------------
def test_ticket_crypto_matches_spice_servers_reading() -> None:
    key = TicketKey.generate()
    assert len(key.public_der) == 162
    assert key.decrypt(encrypt_ticket(key.public_der, b"pw")) == b"pw"
    with pytest.raises(TicketError):
        key.decrypt(bytes(128))
    with pytest.raises(TicketError):
        encrypt_ticket(key.public_der, b"x" * 61)
    assert "private" not in repr(key)


def test_sasl_selection_is_said_plainly_in_the_records() -> None:
    b = RecordBuilder()
    both = caps_word(AUTH_SEL, AUTH_SASL)
    b.data(0, 0.0, C2S, link_mess(both, 0))
    b.data(0, 0.0, S2C, link_reply(both, 0))
    recs = b.data(0, 0.0, C2S, struct.pack("<I", 2) + b"sasl bytes")
    auth = [r for r in recs if r.kind == "auth"]
    assert auth and auth[0].name == "sasl" and auth[0].fields
    assert auth[0].fields["may_be_encrypted"] is True


def test_rewrite_events_become_records_of_their_connection() -> None:
    b = RecordBuilder()
    b.opened(3, 0.0, ("127.0.0.1", 1), ("127.0.0.1", 2))
    b.data(3, 0.0, C2S, link_mess(0, 0, conn=0x77))
    (rec,) = b.event(3, 0.5, C2S, "rewrite", "link_mess", {"cleared": ["x:y"]}, b"orig")
    assert (rec.kind, rec.name, rec.channel, rec.session, rec.raw) == (
        "rewrite",
        "link_mess",
        "display",
        0x77,
        b"orig",
    )


def test_messages_after_a_masked_mini_header_use_the_full_header() -> None:
    w = wire(LinkPolicy(MASK))
    for d, data in masked_session():
        w.send(d, data)
    framer = ChannelFramer()
    events = framer.feed(C2S, bytes(w.recorded[C2S])) + framer.feed(S2C, bytes(w.recorded[S2C]))
    msgs = [e for e in events if isinstance(e, Message)]
    assert not framer.mini_header and [m.msg_type for m in msgs] == [103, 3]
    assert mini(1, b"") != full(1, 1, b"")  # the two headers really differ


def test_a_hostile_peer_under_a_policy_is_a_clear_error() -> None:
    w = wire(LinkPolicy(MASK))
    w.send(C2S, link_mess(VIEWER_COMMON, VIEWER_DISPLAY))
    cmds = w.send(S2C, b"HTTP/1.0 400 Bad Request\r\n\r\n" + bytes(64))
    (close,) = [c for c in cmds if isinstance(c, Close)]
    assert close.error and "bad link magic" in close.reason
    assert w.relay.received(S2C, b"more", 2.0) == []
    viewer = wire(LinkPolicy(MASK))
    (close,) = [c for c in viewer.send(C2S, header(1 << 30)) if isinstance(c, Close)]
    assert close.error and "exceeds" in close.reason


def _returns_within(seconds: float, work: Callable[[], object]) -> object:
    """work()'s result, or a failure if it has not returned after `seconds` (a thread, so
    that a regression fails the test instead of hanging it)."""
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"still running after {seconds} s"
    return done[0]


@pytest.mark.parametrize("n_channel", [0x9C120000, 0xFFFFFFFF])
def test_caps_counts_past_the_message_are_not_walked(n_channel: int) -> None:
    """A 38-byte link message announcing 2**32 caps words once held the channel's lock for
    hours: the mask walked every announced word."""
    unit = bytearray(link_mess(VIEWER_COMMON, VIEWER_DISPLAY))
    struct.pack_into("<I", unit, 16 + 10, n_channel)  # LinkMess: conn u32, type u8, id u8, ...
    cleared = _returns_within(10, lambda: MASK.clear(bytearray(unit), 16 + 18, 1, n_channel, 2))
    # the words that are there are still masked
    assert cleared == ["common:mini_header", "display:codec_h264"]
    w = wire(LinkPolicy(MASK))
    _returns_within(10, lambda: w.send(C2S, bytes(unit)))
