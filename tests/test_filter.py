"""The `-f` filter language: grammar, operators, meaning, errors, and a real capture."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dissectors.regen import LAB_CAPTURES
from spicetap.filter import (
    CHANNELS,
    KINDS,
    MAX_DEPTH,
    FilterError,
    FilterRecord,
    compile_filter,
)
from spicetap.records import Record
from spicetap.render import fields_of
from spicetap.show import iter_capture
from tests.conftest import require

T0 = 1000.0


@dataclass
class Rec:
    """A record as the filter sees it; `label` names it in the expectations below."""

    label: str
    channel: str = "main"
    direction: str = "s2c"
    kind: str = "message"
    name: str | None = None
    fields: dict[str, Any] | None = None
    time: float = T0
    msg_type: int | None = None
    raw: bytes = b""
    error: str | None = None
    not_fully_dissected: bool = False
    session: int | None = 7
    connection: int = 1
    channel_id: int = 0
    decoded: Any = None


def _box(right: int) -> dict[str, int]:
    return {"top": 0, "left": 0, "bottom": 400, "right": right}


RECORDS = [
    Rec("link", kind="link", name="link_mess", direction="c2s", connection=1, session=None,
        fields={"channel_type": "MAIN", "common_caps": [13], "channel_caps": [15, 9]},
        raw=b"x" * 26),
    Rec("init", name="init", msg_type=103, time=T0 + 0.5, raw=b"x" * 32,
        fields={"session_id": 7, "agent_connected": 1, "name": "vm", "time": 99}),
    Rec("channels", name="channels_list", msg_type=104, time=T0 + 1,
        fields={"num_of_channels": 3, "channels": [
            {"type": 2, "id": 0}, {"type": 3, "id": 0}, {"type": 9, "id": 1}]}),
    Rec("big_copy", channel="display", name="draw_copy", msg_type=304, time=T0 + 2.5,
        connection=2, raw=b"x" * 7000,
        fields={"base": {"surface_id": 0, "box": _box(1200), "clip": {"type": "NONE"}},
                "data": {"src_bitmap": {"descriptor": {"type": "LZ_RGB", "flags": []}},
                         "rop_descriptor": ["OP_PUT"]}}),
    Rec("small_copy", channel="display", name="draw_copy", msg_type=304, time=T0 + 3,
        connection=2, raw=b"x" * 300,
        fields={"base": {"surface_id": 0, "box": _box(64), "clip": {"type": "RECTS"}},
                "data": {"src_bitmap": {"descriptor": {"type": "QUIC", "flags": ["TOP_DOWN"]}},
                         "rop_descriptor": ["OP_PUT", "INVERS_SRC"]}}),
    Rec("surface", channel="display", name="surface_create", msg_type=314, time=T0 + 4,
        connection=2, fields={"surface_id": 0, "width": 720, "format": "32_xRGB",
                              "flags": ["PRIMARY"]}),
    Rec("key", channel="inputs", direction="c2s", name="key_modifiers", msg_type=103,
        time=T0 + 10, connection=3, fields={"modifiers": ["SCROLL_LOCK", "NUM_LOCK"]}),
    Rec("clip", kind="agent", direction="c2s", name="clipboard", msg_type=4, time=T0 + 12,
        fields={"type": "UTF8_TEXT", "data": b"hello\x00w\xc3\xb6rld", "note": "Hi There"}),
    Rec("partial", channel="usbredir", name="data", msg_type=101, time=T0 + 13,
        connection=4, not_fully_dissected=True, fields={"data": memoryview(b"\x01\x02abc")}),
    Rec("bad", kind="error", name="agent", time=T0 + 14, error="bad agent header (size 9)"),
    Rec("gap", channel="display", kind="gap", time=T0 + 15, connection=2,
        error="12 bytes missing from the capture"),
    Rec("close", channel="display", kind="close", name="fin", time=T0 + 16, connection=2,
        direction="c2s"),
]  # fmt: skip
LABELS = [r.label for r in RECORDS]


def sel(text: str) -> list[str]:
    f = compile_filter(text)
    return [r.label for r in RECORDS if f.matches(r, T0)]


def all_but(*labels: str) -> list[str]:
    return [x for x in LABELS if x not in labels]


def error_of(text: str) -> str:
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    return str(info.value)


def test_record_is_a_filter_record() -> None:
    rec: FilterRecord = Record(0.0, None, 1, "main", 0, "c2s", "link", None, "header", b"")
    assert compile_filter("link and main and name == header").matches(rec, 0.0)


# ---------------------------------------------------------------------------------------
# Predicates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("main", ["link", "init", "channels", "clip", "bad"]),
        ("display", ["big_copy", "small_copy", "surface", "gap", "close"]),
        ("inputs", ["key"]),
        ("usbredir", ["partial"]),
        ("cursor", []),
        ("c2s", ["link", "key", "clip", "close"]),
        ("s2c", all_but("link", "key", "clip", "close")),
        ("link", ["link"]),
        ("agent", ["clip"]),
        ("gap", ["gap"]),
        ("close", ["close"]),
        ("message", ["init", "channels", "big_copy", "small_copy", "surface", "key", "partial"]),
        ("error", ["bad", "gap"]),  # flags.error set: not only kind == error
        ("undissected", ["partial"]),
        ("true", LABELS),
        ("false", []),
    ],
)
def test_predicates(text: str, expected: list[str]) -> None:
    assert sel(text) == expected


@pytest.mark.parametrize("kind", [*KINDS, "error"])
def test_every_kind_has_a_predicate(kind: str) -> None:
    rec = Rec("x", kind=kind, error="oops" if kind == "error" else None)
    assert compile_filter(kind).matches(rec, T0)
    assert compile_filter(f"kind == {kind}").matches(rec, T0)
    others = [k for k in KINDS if k != kind]
    assert not compile_filter(" or ".join(others)).matches(rec, T0)


@pytest.mark.parametrize("channel", CHANNELS)
def test_every_channel_has_a_predicate(channel: str) -> None:
    rec = Rec("x", channel=channel)
    assert compile_filter(channel).matches(rec, T0)
    assert not compile_filter(" or ".join(c for c in CHANNELS if c != channel)).matches(rec, T0)


# ---------------------------------------------------------------------------------------
# Columns and operators


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("channel == inputs", ["key"]),
        ("channel != main and s2c", ["big_copy", "small_copy", "surface", "partial", "gap"]),
        ("channel_id == 1", []),
        ("direction == c2s and main", ["link", "clip"]),
        ("kind == agent", ["clip"]),
        ("kind == 'error'", ["bad"]),
        ("name == init", ["init"]),
        ("msg == draw_copy", ["big_copy", "small_copy"]),
        ("msg == DRAW_Copy", ["big_copy", "small_copy"]),  # bare words ignore case
        ("msg == 'DRAW_COPY'", []),  # quoted strings do not
        ('msg == "draw_copy"', ["big_copy", "small_copy"]),
        ("name == null", ["gap"]),
        ("type == 304", ["big_copy", "small_copy"]),
        ("type == 0x130", ["big_copy", "small_copy"]),
        ("type == null and message", []),
        ("type >= 300", ["big_copy", "small_copy", "surface"]),
        ("size > 1000", ["big_copy"]),
        ("size >= 300", ["big_copy", "small_copy"]),
        ("size < 30 and size != 0", ["link"]),
        ("size <= 26 and size > 0", ["link"]),
        ("session == null", ["link"]),
        ("connection == 3", ["key"]),
        ("connection in [3, 4]", ["key", "partial"]),
        ("error ~ 'agent'", ["bad"]),
        ("flags.error ~ '^12 bytes'", ["gap"]),
        ("error == null and display", ["big_copy", "small_copy", "surface", "close"]),
        ("flags.not_fully_dissected == true", ["partial"]),
        ("flags.not_fully_dissected != false", ["partial"]),
        ("msg ~ '^draw_'", ["big_copy", "small_copy"]),
        ("msg !~ 'a' and main", ["link", "init"]),
        ('name ~ "^(init|clip)"', ["init", "clip"]),
        ("msg ~ draw", ["big_copy", "small_copy"]),  # a bare word is a pattern too
        ("name contains copy", ["big_copy", "small_copy"]),
        ("name in [init, DATA, 'fin']", ["init", "partial", "close"]),
        ("name not in [init, data] and message and main", ["channels"]),
        ("name in []", []),
    ],
)
def test_columns(text: str, expected: list[str]) -> None:
    assert sel(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("time < 1", ["link", "init"]),  # seconds after t0
        ("time >= 2.5 and time < 10", ["big_copy", "small_copy", "surface"]),
        ("time in 2.5..10", ["big_copy", "small_copy", "surface"]),
        ("time in 2.5 .. 10", ["big_copy", "small_copy", "surface"]),
        ("time in 14..", ["bad", "gap", "close"]),
        ("time in ..0.5", ["link"]),
        ("time not in 1..16", ["link", "init", "close"]),
        ("time in 1e1..1.2e1", ["key"]),
        ("time == 0", ["link"]),
        ("size in 300..7000", ["small_copy"]),  # half open
        ("size in 300..7001", ["big_copy", "small_copy"]),
        ("time in -5..0.5", ["link"]),
    ],
)
def test_time_and_ranges(text: str, expected: list[str]) -> None:
    assert sel(text) == expected


def test_time_is_relative_to_t0() -> None:
    f = compile_filter("time in 0..1")
    assert [r.label for r in RECORDS if f.matches(r, T0 + 2.5)] == ["big_copy", "small_copy"]


# ---------------------------------------------------------------------------------------
# Decoded fields


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("display and msg == draw_copy and base.box.right > 1000", ["big_copy"]),
        ("base.box.right > 1000", ["big_copy"]),
        ("base.box.right <= 64", ["small_copy"]),
        ("base.box == 3", []),  # a dict is not a number
        ("base.clip.type == none", ["big_copy"]),
        ("data.src_bitmap.descriptor.type == LZ_RGB", ["big_copy"]),
        ("data.src_bitmap.descriptor.type == lz_rgb", ["big_copy"]),
        ("data.src_bitmap.descriptor.type in [quic, jpeg]", ["small_copy"]),
        ("data.src_bitmap.descriptor.type != LZ_RGB", ["small_copy"]),  # missing: false
        ("format == 32_xRGB", ["surface"]),
        ("width == 720 && surface_id == 0", ["surface"]),
        ("session_id == 7", ["init"]),
        ("agent_connected == true", ["init"]),  # 1 == true, as in Python
        ("channel_type == MAIN", ["link"]),
        ("nosuch == 1 or nosuch != 1 or nosuch.deeper ~ '' or nosuch contains x", []),
        ("base.box.right.more == 1", []),
        ("fields.name == vm", ["init"]),  # a decoded field named like a column
        ("fields.time == 99", ["init"]),
        ("fields == null", ["bad", "gap", "close"]),
        ("fields contains session_id", ["init"]),
        ("note == 'hi there'", []),
        ("note == 'Hi There'", ["clip"]),
        ("note contains There", ["clip"]),
    ],
)
def test_decoded_fields(text: str, expected: list[str]) -> None:
    assert sel(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("flags == PRIMARY", ["surface"]),  # a flag bit is set
        ("flags contains primary", ["surface"]),
        ("flags != PRIMARY", []),  # only surface has `flags`
        ("data.rop_descriptor == INVERS_SRC", ["small_copy"]),
        ("data.rop_descriptor != INVERS_SRC", ["big_copy"]),
        ("data.src_bitmap.descriptor.flags contains TOP_DOWN", ["small_copy"]),
        ("data.src_bitmap.descriptor.flags == null", []),
        ("modifiers contains NUM_LOCK and modifiers contains scroll_lock", ["key"]),
        ("common_caps == 13", ["link"]),
        ("channel_caps > 10", ["link"]),  # any element
        ("channel_caps contains 9", ["link"]),
        ("channel_caps in [1, 2, 9]", ["link"]),
        ("channels[0].type == 2", ["channels"]),
        ("channels[2].id == 1", ["channels"]),
        ("channels[-1].type == 9", ["channels"]),
        ("channels[3].type == 9", []),
        ("channels[-4].type == 2", []),
        ("channels[*].type == 3", ["channels"]),
        ("channels[*].type != 4", ["channels"]),  # no element is 4
        ("channels[*].type != 3", []),
        ("channels[*].id > 0", ["channels"]),
        ("channels[*].missing == 1", []),
        ("channels[*] contains type", ["channels"]),
        ("num_of_channels[*] == 3", []),  # [*] on a non-list: nothing
        ("channels.type == 3", []),  # lists need an index
    ],
)
def test_lists_and_flags(text: str, expected: list[str]) -> None:
    assert sel(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('data contains "hello"', ["clip"]),
        ("data contains 'w\\xc3\\xb6rld'", ["clip"]),  # \xNN: raw bytes
        ("data contains 'wörld'", ["clip"]),  # text: UTF-8
        ("data contains '\\x00'", ["clip"]),
        ("data contains 0", ["clip"]),  # a byte value
        ("data contains 1 and usbredir", ["partial"]),  # memoryview too
        ("data contains 'abc'", ["partial"]),
        ("data contains 300", []),
        ("data == '\\x01\\x02abc'", ["partial"]),
        ("data ~ '^hel+o'", ["clip"]),
        ("data ~ '\\x02a'", ["partial"]),
        ("data in ['\\x01\\x02abc', x]", ["partial"]),
        ("data > 3", []),
        ("type ~ '^UTF8'", []),  # `type` is the column (message type), a number
        ("fields.type ~ '^UTF8'", ["clip"]),
    ],
)
def test_bytes(text: str, expected: list[str]) -> None:
    assert sel(text) == expected


# ---------------------------------------------------------------------------------------
# Boolean logic and precedence


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("main and c2s", ["link", "clip"]),
        ("main && c2s", ["link", "clip"]),
        ("inputs or usbredir", ["key", "partial"]),
        ("inputs || usbredir", ["key", "partial"]),
        ("not main and not display", ["key", "partial"]),
        ("!main && !display", ["key", "partial"]),
        ("not (main or display)", ["key", "partial"]),
        ("not not inputs", ["key"]),
        ("!!inputs", ["key"]),
        # not > and > or
        ("inputs or main and c2s", ["link", "key", "clip"]),
        ("(inputs or main) and c2s", ["link", "key", "clip"]),
        ("inputs or (main and c2s)", ["link", "key", "clip"]),
        ("c2s and main or inputs", ["link", "key", "clip"]),
        ("c2s and (main or display)", ["link", "clip", "close"]),
        ("not main or inputs", all_but("link", "init", "channels", "clip", "bad")),
        ("not main and c2s or gap", ["key", "gap", "close"]),
        ("not msg == draw_copy and display", ["surface", "gap", "close"]),  # not binds looser
        ("((((inputs))))", ["key"]),
        ("main and c2s and link and true", ["link"]),
        ("gap or close or bad == 1 or inputs or link", ["link", "key", "gap", "close"]),
        ("display and not (gap or close) and not surface_id == 0", ["big_copy", "small_copy"]),
    ],
)
def test_boolean_logic(text: str, expected: list[str]) -> None:
    assert sel(text) == expected


def test_long_chains_do_not_nest_deeply() -> None:
    f = compile_filter(" or ".join(["cursor"] * 5000 + ["inputs"]))
    assert [r.label for r in RECORDS if f.matches(r, T0)] == ["key"]
    f = compile_filter(" and ".join(["c2s"] * 5000))
    assert len([r for r in RECORDS if f.matches(r, T0)]) == 4


def test_nesting_limit() -> None:
    ok = "(" * (MAX_DEPTH - 1) + "main" + ")" * (MAX_DEPTH - 1)
    assert compile_filter(ok).matches(RECORDS[0], T0)
    assert "nested more than" in error_of("(" * 5000 + "main" + ")" * 5000)
    assert "nested more than" in error_of("not " * 5000 + "main")


# ---------------------------------------------------------------------------------------
# Laziness: decoded fields are named once per record, and only when needed


@dataclass
class CountingDecoded:
    value: dict[str, Any]
    calls: list[int] = field(default_factory=list)

    def named_fields(self) -> Any:
        self.calls.append(1)
        return self.value


def test_fields_are_named_lazily_and_once() -> None:
    dec = CountingDecoded({"a": 1, "b": {"c": [1, 2]}})
    rec = Rec("x", channel="display", decoded=dec)
    f = compile_filter("display and a == 1 and b.c[*] == 2 and b.c[0] < 5 and b contains c")
    assert f.uses_fields
    assert f.matches(rec, T0)
    assert len(dec.calls) == 1
    f = compile_filter("a == 1 and cursor")  # the cheap test runs first, whatever the order
    assert not f.matches(rec, T0)
    assert len(dec.calls) == 1
    f = compile_filter("display and msg == draw_copy or time > 5")
    assert not f.uses_fields
    f.matches(rec, T0)
    assert len(dec.calls) == 1


def test_link_units_fields_win_over_decoded() -> None:
    dec = CountingDecoded({"a": 1})
    rec = Rec("x", fields={"a": 2}, decoded=dec)
    assert compile_filter("a == 2").matches(rec, T0)
    assert dec.calls == []


def test_named_fields_that_are_not_a_dict() -> None:
    rec = Rec("x", decoded=CountingDecoded([1, 2]))  # type: ignore[arg-type]
    assert not compile_filter("a == 1 or fields != null").matches(rec, T0)


# ---------------------------------------------------------------------------------------
# Literals and tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("size == 0x1b58", ["big_copy"]),
        ("size == 0X1B58", ["big_copy"]),
        ("size == 7000.0", ["big_copy"]),
        ("size == 7e3", ["big_copy"]),
        ("time == -0", ["link"]),
        ("base.box.right > -1 and base.box.right < 100", ["small_copy"]),
        ("name=='init'", ["init"]),
        ("name\t==\n'init'", ["init"]),
        ("name == 'it''s'", []),  # two strings in a row do not join
    ],
)
def test_literals(text: str, expected: list[str]) -> None:
    if text == "name == 'it''s'":
        assert "expected 'and', 'or'" in error_of(text)
        return
    assert sel(text) == expected


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        (r"'a\'b'", "a'b"),
        (r'"a\"b"', 'a"b'),
        (r"'a\\b'", "a\\b"),
        (r"'a\nb'", "a\nb"),
        (r"'\t\r'", "\t\r"),
        (r"'\x41\x42'", "AB"),
        (r"'\w+\.'", r"\w+\."),  # other escapes stay for regular expressions
        ("'\"'", '"'),
    ],
)
def test_string_escapes(literal: str, value: str) -> None:
    rec = Rec("x", fields={"s": value})
    assert compile_filter(f"s == {literal}").matches(rec, T0)


def test_regex_escapes_reach_re() -> None:
    rec = Rec("x", fields={"s": "draw_copy.x"})
    assert compile_filter(r"s ~ '^draw_\w+\.x$'").matches(rec, T0)
    assert not compile_filter(r"s ~ '^draw_\w+\.y$'").matches(rec, T0)


# ---------------------------------------------------------------------------------------
# Errors: one line, the column, what was expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("size >", "-f: column 7: expected a number after '>'"),
        ("msg == draw_copy and size >", "-f: column 28: expected a number after '>'"),
        ("size > )", "-f: column 8: expected a number after '>', found ')'"),
        ("size > abc", "-f: column 8: expected a number after '>', found 'abc'"),
        ("msg ==", "-f: column 7: expected a value after '=='"),
        ("msg == and main", "-f: column 8: expected a value after '==', found 'and'"),
        (
            "display and",
            "-f: column 12: expected a predicate, a comparison, 'not' or '(' after 'and'",
        ),
        (
            "display or )",
            "-f: column 12: expected a predicate, a comparison, 'not' or '(' after 'or', found ')'",
        ),
        ("", "-f: column 1: expected an expression (a filter is empty)"),
        ("   ", "-f: column 4: expected an expression (a filter is empty)"),
        ("(display", "-f: column 9: expected ')' to close the '(' at column 1"),
        ("(main and (display)", "-f: column 20: expected ')' to close the '(' at column 1"),
        (
            "display)",
            "-f: column 8: expected 'and', 'or' or the end of the filter after "
            "'display', found ')'",
        ),
        (
            "display main",
            "-f: column 9: expected 'and', 'or' or the end of the filter after "
            "'display', found 'main'",
        ),
        ("msg = draw_copy", "-f: column 5: '=' is not an operator: use '=='"),
        ("main & c2s", "-f: column 6: '&' is not an operator: use '&&'"),
        ("main | c2s", "-f: column 6: '|' is not an operator: use '||'"),
        ("main $", "-f: column 6: unexpected character '$'"),
        ("name == 'abc", "-f: column 9: unterminated string: no closing '"),
        (
            "name",
            "-f: column 5: expected a comparison operator (== != < <= > >= ~ in "
            "contains) after 'name'",
        ),
        (
            "base.box.right",
            "-f: column 15: expected a comparison operator (== != < <= > >= ~ "
            "in contains) after 'right'",
        ),
        (
            "base.box.right 5",
            "-f: column 16: expected a comparison operator (== != < <= > >= "
            "~ in contains) after 'right', found '5'",
        ),
        ("msg ~ 5", "-f: column 7: expected a string (a regular expression) after '~'"),
        (
            "msg ~ '('",
            "-f: column 7: bad regular expression: missing ), unterminated "
            "subpattern at position 0",
        ),
        ("time in 5", "-f: column 10: expected '..' after '5'"),
        (
            "time in x",
            "-f: column 9: expected '[' or a range such as 2.5..10 after 'in', found 'x'",
        ),
        (
            "time in ..",
            "-f: column 11: expected a number (a range needs at least one bound) after '..'",
        ),
        ("x in [1, 2", "-f: column 11: expected ',' or ']' after '2'"),
        ("x in [1 2]", "-f: column 9: expected ',' or ']' after '1', found '2'"),
        ("x in [1,,2]", "-f: column 9: expected a value or ']' after ',', found ','"),
        (
            "x not 5",
            "-f: column 1: unknown name 'x': expected a predicate (a channel such as "
            "display, c2s, s2c, link, agent, error, undissected) or a comparison such as "
            "'size > 100'",
        ),
        (
            "x[abc] == 1",
            "-f: column 3: expected an index (an integer or '*') after '[', found 'abc'",
        ),
        ("x[1 == 1", "-f: column 5: expected ']' after '1', found '=='"),
        ("x[-*] == 1", "-f: column 4: expected an index (an integer or '*') after '-', found '*'"),
        ("x. == 1", "-f: column 4: expected a field name after '.', found '=='"),
        ("x == -y", "-f: column 7: expected a number after '-', found 'y'"),
        (
            "dispaly",
            "-f: column 1: unknown name 'dispaly' (did you mean 'display'?): "
            "expected a predicate (a channel such as display, c2s, s2c, link, agent, error, "
            "undissected) or a comparison such as 'size > 100'",
        ),
        (
            "main and not",
            "-f: column 13: expected a predicate, a comparison, 'not' or '(' after 'not'",
        ),
        ("size > " + "9" * 5000, "-f: column 8: number too long: 999999999999..."),
        (
            "name == 'a\nb' b",
            "-f: column 15: expected 'and', 'or' or the end of the filter "
            "after \"'a\\nb'\", found 'b'",
        ),
        (
            "x == " + "y" * 40 + " z",
            "-f: column 47: expected 'and', 'or' or the end of the "
            "filter after 'yyyyyyyyyyyyyyyyyyyyy...', found 'z'",
        ),
    ],
)
def test_errors(text: str, message: str) -> None:
    assert error_of(text) == message


def test_error_names_its_source_and_column() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter("main and", source="--filter")
    assert str(info.value).startswith("--filter: column 9: ")
    assert info.value.column == 9
    assert isinstance(info.value, ValueError)


def test_suggestions() -> None:
    assert "did you mean 'inputs'" in error_of("input")
    assert "did you mean 'undissected'" in error_of("undisected")
    assert "did you mean" not in error_of("zzzzzz")


# ---------------------------------------------------------------------------------------
# Garbage in: FilterError or a filter that never raises


SAMPLE_TOKENS = [
    "main", "display", "c2s", "link", "error", "undissected", "msg", "name", "type", "size",
    "time", "base.box.right", "channels[0].type", "channels[*].id", "fields", "flags",
    "flags.error", "data", "and", "or", "not", "&&", "||", "!", "(", ")", "==", "!=", "<",
    "<=", ">", ">=", "~", "!~", "in", "contains", "[", "]", ",", "..", "-", ".", "*", "0",
    "1", "0x10", "2.5", "1e3", "'x'", '"\\x00"', "'^d'", "draw_copy", "PRIMARY", "true",
    "false", "null", "'['", "=", "&", "'",
]  # fmt: skip


def _check_garbage(text: str) -> None:
    try:
        f = compile_filter(text)
    except FilterError as exc:
        msg = str(exc)
        assert "\n" not in msg and "\r" not in msg
        m = re.match(r"-f: column (\d+): ", msg)
        assert m is not None, msg
        assert int(m.group(1)) == exc.column
        assert 1 <= exc.column <= len(text) + 1
        return
    for rec in RECORDS:
        assert f.matches(rec, T0) in (True, False)


@settings(max_examples=600, deadline=None)
@given(st.text(max_size=60))
def test_random_text_raises_only_filter_error(text: str) -> None:
    _check_garbage(text)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(SAMPLE_TOKENS), max_size=14), st.booleans())
def test_random_token_soup_raises_only_filter_error(tokens: list[str], spaced: bool) -> None:
    _check_garbage((" " if spaced else "").join(tokens))


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="()[]!~=<>.-*,'\"\\ &|0x1e9ainotrdspl_", max_size=40))
def test_random_symbols_raise_only_filter_error(text: str) -> None:
    _check_garbage(text)


# ---------------------------------------------------------------------------------------
# A real capture: the filter selects what a hand-written predicate selects


def _get(rec: Record, *path: str) -> Any:
    value: Any = fields_of(rec)
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _right(rec: Record) -> Any:
    return _get(rec, "base", "box", "right")


HAND_WRITTEN = {
    "display and msg == draw_copy and base.box.right > 100": lambda r, t0: (
        r.channel == "display"
        and r.name == "draw_copy"
        and isinstance(_right(r), int)
        and _right(r) > 100
    ),
    "main and c2s and not link": lambda r, t0: (
        r.channel == "main" and r.direction == "c2s" and r.kind != "link"
    ),
    "time in 0.5..3 or size > 5000": lambda r, t0: 0.5 <= r.time - t0 < 3 or len(r.raw) > 5000,
    "name in [ping, pong] && !(cursor || inputs)": lambda r, t0: (
        r.name in ("ping", "pong") and r.channel not in ("cursor", "inputs")
    ),
    "link and channel_type == DISPLAY": lambda r, t0: (
        r.kind == "link" and _get(r, "channel_type") == "DISPLAY"
    ),
    "data.src_bitmap.descriptor.type == lz_rgb": lambda r, t0: (
        _get(r, "data", "src_bitmap", "descriptor", "type") == "LZ_RGB"
    ),
}


@pytest.fixture(scope="module")
def viewer_records() -> list[Record]:
    path = LAB_CAPTURES / "remote-viewer-plain.pcapng"
    require(path.is_file(), f"lab capture {path}")
    return list(iter_capture(Path(path)))


@pytest.mark.parametrize("text", list(HAND_WRITTEN))
def test_real_capture_matches_hand_written_predicate(
    viewer_records: list[Record], text: str
) -> None:
    t0 = viewer_records[0].time
    f = compile_filter(text)
    want = [i for i, r in enumerate(viewer_records) if HAND_WRITTEN[text](r, t0)]
    got = [i for i, r in enumerate(viewer_records) if f.matches(r, t0)]
    assert got == want
    assert got, f"{text!r} selects nothing in the capture: the test proves little"
