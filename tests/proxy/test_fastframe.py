"""proxy/core/_fastframe.c against the Python it stands in for: the framer's loop
(framing.frame_messages) and the records that spicetap.records' Python builder makes."""

from __future__ import annotations

import gc
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dissectors.api import C2S, S2C, SPICE
from proxy.core import _fastframe, framing
from proxy.core.framing import AssemblyLike, PyAssembly, frame_messages
from spicetap import records
from spicetap.records import Record, RecordBuilder
from spicetap.show import iter_capture
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply

IDENT = (0x1234, 7, "inputs", 0)
INPUTS = 3


@pytest.fixture
def pure_python(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within this fixture the framer and the records run without the extension."""
    monkeypatch.setattr(framing, "FRAME", frame_messages)
    monkeypatch.setattr(records, "FLAT_BUILDER", None)
    yield


def test_the_extension_is_built_and_used() -> None:
    """The install builds it (gcc, python3-dev): without it every test below would compare
    the Python with itself."""
    assert framing.FRAME is _fastframe.frame
    assert records.FLAT_BUILDER is _fastframe.FlatBuilder


def test_the_built_extension_is_not_older_than_its_source() -> None:
    """pytest alone does not rebuild it: after an edit of the C, `pip install -e .` (or the
    README's test command, which runs it) must, or these tests would test the old build."""
    source = Path(__file__).resolve().parents[2] / "proxy" / "core" / "_fastframe.c"
    built = Path(_fastframe.__file__ or "")
    assert built.stat().st_mtime >= source.stat().st_mtime, f"{built} is older than {source}"


def _echo(*args: Any) -> tuple[Any, ...]:
    return args


def _stream(messages: list[tuple[int, int, bytes]], mini: bool, tail: bytes) -> bytes:
    out = b""
    for serial, msg_type, body in messages:
        if mini:
            out += struct.pack("<HI", msg_type, len(body)) + body
        else:
            out += struct.pack("<QHII", serial, msg_type, len(body), serial & 0xFFFF) + body
    return out + tail


@settings(max_examples=400, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF), st.binary(max_size=40)),
        max_size=8,
    ),
    mini=st.booleans(),
    limit=st.integers(0, 64),
    tail=st.binary(max_size=24),
    direction=st.sampled_from([C2S, S2C]),
)
def test_frame_matches_the_python_loop(
    messages: list[tuple[int, int, bytes]], mini: bool, limit: int, tail: bytes, direction: str
) -> None:
    """Same events, same stop, same cut and the same over-limit reason, for any stream."""
    data = _stream(messages, mini, tail)
    ours: list[Any] = []
    theirs: list[Any] = []
    assert _fastframe.frame(direction, data, mini, limit, _echo, ours) == frame_messages(
        direction, data, mini, limit, _echo, theirs
    )
    assert ours == theirs


def _fast_builder(ctype: int) -> Any:
    """The C builder for one channel, as RecordBuilder makes it."""
    fast, at = RecordBuilder._builder(ctype, IDENT)
    assert isinstance(fast, _fastframe.FlatBuilder)
    at(12.5)  # its records' time, and its fallback's
    assert fast.time == 12.5
    return fast


FLAT_MESSAGES = sorted(
    (key, struct_name)
    for key, (_name, struct_name) in SPICE.messages.items()
    if struct_name in SPICE.flat
)
SIZES = {
    name: struct.calcsize("<" + "".join(f for _m, f in members))
    for name, members in SPICE.flat.items()
}


def test_inputs_and_acks_have_flat_layouts() -> None:
    """What the fast path is for: every input a viewer sends is a fixed run of integers."""
    flat = {(ch, d, SPICE.messages[(ch, d, t)][0]) for (ch, d, t), _s in FLAT_MESSAGES}
    for name in ("key_down", "key_up", "mouse_motion", "mouse_position", "mouse_press"):
        assert (INPUTS, C2S, name) in flat
    assert (INPUTS, S2C, "mouse_motion_ack") in flat
    assert len(FLAT_MESSAGES) > 100


def _python_record(ctype: int, d: str, msg_type: int, data: bytes, at: float) -> Record:
    saved = records.FLAT_BUILDER
    records.FLAT_BUILDER = None
    try:
        build, set_time = RecordBuilder._builder(ctype, IDENT)
    finally:
        records.FLAT_BUILDER = saved
    set_time(at)
    hsize = 6
    out: Record = build(d, msg_type, data, 0, hsize, len(data), None, 0)
    return out


@settings(max_examples=600, deadline=None)
@given(
    pick=st.sampled_from(FLAT_MESSAGES),
    extra=st.integers(-3, 5),
    seed=st.binary(min_size=64, max_size=64),
)
def test_flat_records_equal_the_python_builders(
    pick: tuple[tuple[int, str, int], str], extra: int, seed: bytes
) -> None:
    """Every message with a flat layout, its body exact, longer (not fully dissected) or
    shorter (the Python builder's error): the same record, item by item and type by type."""
    (ctype, d, msg_type), struct_name = pick
    size = max(SIZES[struct_name] + extra, 0)
    body = (seed * (size // len(seed) + 1))[:size]
    data = struct.pack("<HI", msg_type, size) + body
    fast = _fast_builder(ctype)
    ours = fast(d, msg_type, data, 0, 6, len(data), None, 0)
    theirs = _python_record(ctype, d, msg_type, data, 12.5)
    assert ours == theirs
    assert [type(x) for x in ours] == [type(x) for x in theirs]
    assert ours.fields is None and ours.decoded_fields == theirs.decoded_fields
    assert list(ours.decoded_fields or {}) == list(theirs.decoded_fields or {})  # member order


def test_records_of_the_fast_path_are_not_tracked_by_the_cycle_collector() -> None:
    fast = _fast_builder(INPUTS)
    data = struct.pack("<HI", 101, 4) + struct.pack("<I", 0x1E)  # key_down, scancode of A
    rec = fast(C2S, 101, data, 0, 6, len(data), None, 0)
    assert rec.name == "key_down" and rec.decoded_fields == {"code": 0x1E}
    assert not gc.is_tracked(rec)
    assert rec.decoded is not None and rec.decoded.fully_dissected


def _session_chunks(messages: bytes, mini: bool = True) -> list[tuple[str, bytes]]:
    """An inputs channel with the mini header (or the full one), then `messages` from the
    viewer."""
    bits = caps_word(1, 3) if mini else caps_word(1)
    return [
        (C2S, link_mess(bits, channel_type=INPUTS)),
        (S2C, link_reply(bits)),
        (C2S, TICKET),
        (S2C, OK),
        (C2S, messages),
    ]


def _mini(msg_type: int, body: bytes) -> bytes:
    return struct.pack("<HI", msg_type, len(body)) + body


def _feed_all(chunks: list[tuple[str, bytes]], cut: int) -> list[Record]:
    builder = RecordBuilder(max_message=64)
    builder.opened(1, 1.0)
    out: list[Record] = []
    for i, (d, data) in enumerate(chunks):
        pieces = [data] if i < len(chunks) - 1 else [data[:cut], data[cut:]]
        for n, piece in enumerate(pieces):
            out += builder.data(1, 2.0 + i + n / 10, d, piece)
    out += builder.closed(1, 9.0, "viewer closed")
    return out


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.one_of(
            st.tuples(st.sampled_from([101, 102]), st.binary(min_size=0, max_size=6)),
            st.tuples(st.integers(100, 120), st.binary(max_size=12)),
            st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=80)),
        ),
        max_size=12,
    ),
    cut=st.integers(0, 400),
    mini=st.booleans(),
)
def test_whole_channels_record_the_same_with_and_without_the_extension(
    messages: list[tuple[int, bytes]], cut: int, mini: bool
) -> None:
    """Link stage, inputs both flat and not, unknown types, short bodies, a message over
    the limit (64 bytes here), chunks cut anywhere, the close: one list of records."""
    stream = b"".join(
        _mini(t, b) if mini else struct.pack("<QHII", 9 + i, t, len(b), 0) + b
        for i, (t, b) in enumerate(messages)
    )
    chunks = _session_chunks(stream, mini)
    ours = _feed_all(chunks, cut)
    saved = framing.FRAME, records.FLAT_BUILDER
    framing.FRAME, records.FLAT_BUILDER = frame_messages, None
    try:
        theirs = _feed_all(chunks, cut)
    finally:
        framing.FRAME, records.FLAT_BUILDER = saved
    assert ours == theirs
    if messages and len(messages[0][1]) <= 64:  # linked: the messages were framed
        assert any(r.kind == "message" for r in ours)


def test_real_captures_record_the_same_with_and_without_the_extension(
    lab_captures: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every channel of real sessions (display, cursor, audio, usbredir, ...)."""
    assert lab_captures
    flat = 0
    for path in lab_captures:
        ours = list(iter_capture(path))
        with monkeypatch.context() as m:
            m.setattr(framing, "FRAME", frame_messages)
            m.setattr(records, "FLAT_BUILDER", None)
            theirs = list(iter_capture(path))
        assert ours == theirs, path.name
        flat += sum(1 for r in ours if r.kind == "message" and r.struct in SPICE.flat)
    assert flat > 100  # the fast path had real messages to make


@pytest.mark.usefixtures("pure_python")
def test_the_python_path_alone_still_records() -> None:
    """Without the extension (a source tree nobody built) nothing is lost, only speed."""
    key = _mini(101, struct.pack("<I", 0x1E))
    out = _feed_all(_session_chunks(key * 3), cut=7)
    keys = [r for r in out if r.kind == "message"]
    assert [r.decoded_fields for r in keys] == [{"code": 0x1E}] * 3
    assert gc.is_tracked(keys[0])  # made by Python, not by the extension


@pytest.mark.parametrize(
    ("layouts", "error"),
    [
        ({C2S: {}, S2C: {101: "key_down"}}, TypeError),
        ({C2S: {}, S2C: {101: ("key_down", "S", (("code", "x"),))}}, ValueError),
        ({C2S: {}, S2C: {101: ("key_down", "S", (("code", "Ix"),))}}, ValueError),
        ({C2S: {}, S2C: {101: ("key_down", "S", (("code", "-1s"),))}}, ValueError),
        ({C2S: {}, S2C: {101: ("key_down", "S", ((1, "I"),))}}, TypeError),
        ({C2S: {}, S2C: {70000: ("key_down", "S", (("code", "I"),))}}, ValueError),
        ({C2S: {}, S2C: {-1: ("key_down", "S", (("code", "I"),))}}, ValueError),
        ({C2S: {}}, ValueError),
        ({C2S: {}, 5: {}}, TypeError),
    ],
)
def test_bad_layouts_are_refused(layouts: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        _fastframe.FlatBuilder(Record, IDENT, layouts, frozenset(), SPICE, INPUTS, _echo)


def test_a_layout_of_many_members_decodes_them_all() -> None:
    members = tuple((f"m{i}", "H") for i in range(300))
    layouts = {C2S: {7: ("wide", "Wide", members)}, S2C: {}}
    fast = _fastframe.FlatBuilder(Record, IDENT, layouts, frozenset(), SPICE, INPUTS, _echo)
    body = struct.pack("<300H", *range(300))
    data = _mini(7, body)
    rec = fast(C2S, 7, data, 0, 6, len(data), None, 0)
    assert rec.decoded_fields == {f"m{i}": i for i in range(300)} and rec.covered == 600


class Short(NamedTuple):  # a record type with fewer fields than Record
    time: float


def test_bad_calls_are_refused_not_crashes() -> None:
    fast = _fast_builder(INPUTS)
    data = _mini(101, b"\0\0\0\0")
    with pytest.raises(ValueError, match="start <= body <= end"):
        fast(C2S, 101, data, 0, 6, len(data) + 1, None, 0)
    with pytest.raises(TypeError):
        fast(C2S, 101, data)
    with pytest.raises(TypeError, match="bytes"):
        fast(C2S, 101, bytearray(data), 0, 6, len(data), None, 0)
    with pytest.raises(TypeError, match="a number"):
        fast.time = "3"
    with pytest.raises(TypeError):
        _fastframe.FlatBuilder(tuple, IDENT, {C2S: {}, S2C: {}}, frozenset(), SPICE, 3, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the 20 fields of Record"):
        _fastframe.FlatBuilder(Short, IDENT, {C2S: {}, S2C: {}}, frozenset(), SPICE, 3, _echo)
    with pytest.raises(TypeError):
        _fastframe.frame(C2S, bytearray(data), True, 64, _echo, [])  # type: ignore[arg-type]


def test_a_failing_builder_stops_framing_with_its_exception() -> None:
    def boom(*_args: Any) -> None:
        raise RuntimeError("builder failed")

    with pytest.raises(RuntimeError, match="builder failed"):
        _fastframe.frame(C2S, _mini(1, b"x") * 2, True, 64, boom, [])


def test_whole_second_times_record_as_the_python_builder_does() -> None:
    """RecordBuilder.data takes any number as a time: an int one is kept as it is."""
    key = _mini(101, struct.pack("<I", 0x1E))
    chunks = _session_chunks(key)
    builder = RecordBuilder()
    builder.opened(1, 1)
    ours = [r for d, data in chunks for r in builder.data(1, 2, d, data)]
    saved = framing.FRAME, records.FLAT_BUILDER
    framing.FRAME, records.FLAT_BUILDER = frame_messages, None
    try:
        builder = RecordBuilder()
        builder.opened(1, 1)
        theirs = [r for d, data in chunks for r in builder.data(1, 2, d, data)]
    finally:
        framing.FRAME, records.FLAT_BUILDER = saved
    assert ours == theirs and [type(r.time) for r in ours] == [type(r.time) for r in theirs]
    assert ours[-1].name == "key_down" and ours[-1].time == 2


def test_references_balance() -> None:
    """What the records share (time, names, dialect) is neither leaked nor freed early, and
    neither is what the fallback and the frame loop pass along."""
    fast = _fast_builder(INPUTS)
    time_object = fast.time
    key = _mini(101, struct.pack("<I", 0x1E))
    odd = _mini(4, b"ping")  # no flat layout: the fallback makes its record
    data = (key + odd) * 50
    shared = [SPICE, time_object, C2S, "key_down", data]
    _fastframe.frame(C2S, data, True, 64, fast, [])  # the fallback's caches warm
    gc.collect()
    before = [sys.getrefcount(x) for x in shared]
    for _ in range(20):
        events: list[Any] = []
        _fastframe.frame(C2S, data, True, 64, fast, events)
        assert len(events) == 100
        del events
    gc.collect()
    assert [sys.getrefcount(x) for x in shared] == before


def test_a_builder_never_initialised_refuses_to_work() -> None:
    bare = _fastframe.FlatBuilder.__new__(_fastframe.FlatBuilder)
    data = _mini(101, b"\0\0\0\0")
    with pytest.raises(RuntimeError, match="did not succeed"):
        bare(C2S, 101, data, 0, 6, len(data), None, 0)
    with pytest.raises(RuntimeError, match="did not succeed"):
        _fastframe.frame(C2S, data, True, 64, bare, [])
    with pytest.raises(RuntimeError, match="did not succeed"):
        bare.time  # noqa: B018


def test_limits_beyond_64_bits_frame_as_python_does() -> None:
    data = _mini(101, b"\0\0\0\0") * 2
    for limit in (2**70, -(2**70), -1):
        assert _fastframe.frame(C2S, data, True, limit, _echo, []) == frame_messages(
            C2S, data, True, limit, _echo, []
        )


@pytest.mark.parametrize("make", [_fastframe.Assembly, PyAssembly], ids=["c", "python"])
def test_an_assembly_fills_a_message_by_copies_and_hands_it_out_once(
    make: Callable[[int], AssemblyLike],
) -> None:
    assembly = make(10)
    source = bytearray(b"hello")
    with memoryview(source) as view:
        assert assembly.add(view) == 5
    source[:] = b"XXXXX"  # what was given may change: a copy was kept
    assert (assembly.filled, assembly.missing, assembly.partial()) == (5, 5, b"hello")
    with pytest.raises(ValueError, match="not whole: 5 of 10"):
        assembly.take()
    assert assembly.add(b"world and more") == 5  # only what the message still misses
    whole = assembly.take()
    assert whole == b"helloworld" and type(whole) is bytes and assembly.missing == 0
    for again in (assembly.take, assembly.partial, lambda: assembly.add(b"x")):
        with pytest.raises(ValueError, match="taken"):
            again()
    with pytest.raises(ValueError, match="> 0"):
        make(0)
