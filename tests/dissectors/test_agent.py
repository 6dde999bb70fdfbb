"""VD agent reassembly: messages split over AGENT_DATA chunks anywhere, negotiated layouts."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dissectors.agent import AGENT_HEADER, AgentMessage, AgentReassembler, AgentStreamError


def agent_msg(msg_type: int, body: bytes, opaque: int = 0) -> bytes:
    return AGENT_HEADER.pack(1, msg_type, opaque, len(body)) + body


def announce(caps: int) -> bytes:
    return agent_msg(6, struct.pack("<II", 0, caps))


GRAB_PLAIN = agent_msg(7, struct.pack("<I", 1))  # types: [UTF8_TEXT]
GRAB_SELECTION = agent_msg(7, bytes([0, 0, 0, 0]) + struct.pack("<I", 1))
CLIPBOARD = agent_msg(4, struct.pack("<I", 1) + b"x" * 5000)  # more than two 2048-byte chunks


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(0, 5100), max_size=8))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    stream = GRAB_PLAIN + CLIPBOARD + agent_msg(9, b"")
    r = AgentReassembler()
    out = [m for c in chunks(stream, cuts) for m in r.feed("c2s", c)]
    assert all(isinstance(m, AgentMessage) for m in out)
    msgs = [m for m in out if isinstance(m, AgentMessage)]
    assert [m.decoded.name for m in msgs] == ["clipboard_grab", "clipboard", "clipboard_release"]
    assert all(m.decoded.fully_dissected for m in msgs)
    assert msgs[1].decoded.fields is not None
    assert msgs[1].decoded.fields["data"] == b"x" * 5000
    assert b"".join(m.raw for m in msgs) == stream
    assert r.pending("c2s") == 0


def test_selection_layout_follows_both_announcements() -> None:
    r = AgentReassembler()
    selection = 1 << 6
    r.feed("c2s", announce(selection))
    # only one side announced: still the plain layout
    (plain,) = r.feed("s2c", GRAB_PLAIN)
    assert isinstance(plain, AgentMessage) and plain.decoded.fully_dissected
    r.feed("s2c", announce(selection))
    (sel,) = r.feed("c2s", GRAB_SELECTION)
    assert isinstance(sel, AgentMessage)
    assert sel.decoded.fields == {"selection": 0, "reserved": b"\0\0\0", "types": [1]}
    assert sel.decoded.fully_dissected


def test_bad_header_stops_that_direction_only() -> None:
    r = AgentReassembler()
    bad = struct.pack("<IIQI", 7, 1, 0, 4) + b"abcd"
    (err,) = r.feed("c2s", bad)
    assert isinstance(err, AgentStreamError) and "protocol 7" in err.reason
    assert r.feed("c2s", GRAB_PLAIN) == []
    (ok,) = r.feed("s2c", GRAB_PLAIN)
    assert isinstance(ok, AgentMessage)


def test_oversized_agent_message_is_refused() -> None:
    r = AgentReassembler()
    (err,) = r.feed("s2c", struct.pack("<IIQI", 1, 4, 0, 1 << 30))
    assert isinstance(err, AgentStreamError)
