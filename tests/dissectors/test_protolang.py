"""The spice.proto language: grammar constructs, resolution, and errors naming file:line:col."""

from __future__ import annotations

import pytest

from dissectors import interp
from dissectors.protolang import ir
from dissectors.protolang.lexer import ProtoError, ProtoSyntaxError
from dissectors.protolang.parser import parse
from dissectors.protolang.resolve import overlay, resolve

SAMPLE = """
// line comment
/* block
   comment */
typedef coord int32 @ctype(SPICE_COORD);
enum16 level { LOW = 0x100, MEDIUM, HIGH = 0x1000 } @prefix(LVL_);
flags8 bits { A, B = 3, 1ST_ITEM, } ;
enum8 fmt { INVALID, 1BIT_LE, 16_555 = 16 };
struct Point { coord x; coord y; };
struct Named {
    uint8 len;
    uint8 name[len] @end;
    uint8 text[cstring()];
    uint8 img[image_size(4, len, len)];
    uint32 pad @zero;
    uint32 fake @virtual(7);
    int8 fixed[3];
};
struct Sw {
    bits flags;
    level lvl;
    switch (flags) { case A: uint16 a; case !B: uint8 not_b; } u @anon;
    switch (lvl) { case LOW: case MEDIUM: Point p; default: uint8 other; } v;
    Point *ptr @nonnull;
    uint32 len2;
    uint8 *opt[len2] @zero_terminated @marshall;
    uint8 last;
};
message Empty {} @declare;
channel Base {
    message { uint32 x; } first;
    Empty second = 10;
 client:
    Empty ack;
};
channel Child : Base {
 server:
    message { uint64 y; } first;
    Empty third;
 client:
    message { Point p; } @ctype(X) moved = 101;
} @ifdef(USE_CHILD);
protocol Test { Base base = 1; Child child; };
"""


def test_sample_resolves() -> None:
    p = resolve(parse(SAMPLE, "sample.proto"))
    assert [(c.name, c.number) for c in p.channels] == [("base", 1), ("child", 2)]
    base, child = p.channels
    assert {n: m.name for n, m in base.server.items()} == {1: "first", 10: "second"}
    # the child's `first` overrides the parent's under the same number; numbering goes on
    assert {n: m.name for n, m in child.server.items()} == {1: "first", 10: "second", 11: "third"}
    assert child.server[1].body.members[0].name == "y"
    assert {n: m.name for n, m in child.client.items()} == {1: "ack", 101: "moved"}
    assert child.attrs == ("ifdef",)
    level = p.enums["level"]
    assert level.items == (("LOW", 0x100), ("MEDIUM", 0x101), ("HIGH", 0x1000))
    assert level.prefix == "LVL_"
    assert p.enums["bits"].items == (("A", 0), ("B", 3), ("1ST_ITEM", 4))
    assert p.enums["fmt"].items == (("INVALID", 0), ("1BIT_LE", 1), ("16_555", 16))
    point = p.structs["Point"]
    assert point.fixed_size() == 8
    x = point.members[0]
    assert isinstance(x, ir.Member) and x.type_name == "coord"


def test_sample_encodes_every_construct() -> None:
    p = resolve(parse(SAMPLE, "sample.proto"))
    named = p.structs["Named"]
    value = {
        "len": 2,
        "name": b"ab",
        "text": b"hi",
        "img": b"\x01\x02",
        "pad": 0,
        "fake": 7,
        "fixed": b"xyz",
    }
    raw = interp.encode(named, value)
    # len, name, text + NUL, image (4 bits x 2 wide = 1 byte per row, 2 rows), pad, fixed;
    # the @virtual field is not on the wire
    assert raw == b"\x02ab" + b"hi\0" + b"\x01\x02" + b"\0\0\0\0" + b"xyz"
    assert interp.decode(named, raw)[0] == value

    sw = p.structs["Sw"]
    value2 = {
        "flags": 1,
        "lvl": 0x101,
        "a": 5,
        "v": {"p": {"x": -1, "y": 2}},
        "ptr": {"x": 3, "y": 4},
        "opt": b"xy",
        "len2": 2,
        "last": 33,
    }
    raw2 = interp.encode(sw, value2)
    # flags has bit A, so `a` (case A) is chosen: the first matching case wins
    assert raw2[:5] == b"\x01\x01\x01\x05\x00"
    decoded, regions = interp.decode(sw, raw2)
    assert decoded == value2
    # pointees follow the fixed part, in the order the pointers appear
    # fixed part: flags, lvl(2), a(2), p(8), ptr(4), len2(4), opt(4), last(1) = 26 bytes
    ptr_off = int.from_bytes(raw2[13:17], "little")
    opt_off = int.from_bytes(raw2[21:25], "little")
    assert (ptr_off, opt_off) == (26, 34)
    assert raw2[26:34] == b"\x03\0\0\0\x04\0\0\0"
    assert raw2[34:] == b"xy"
    assert sorted(regions) == [(0, 26), (26, 34), (34, 36)]


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        ("struct A { uint32 x }", "1:21", "expected ';', found '}'"),
        ("enum8 e { A = }", "1:15", "expected an integer"),
        ("channel C { message { } ; };", "1:25", "expected the message name"),
        ("/* never closed", "1:1", "unterminated /* comment"),
        ("struct A {\n  uint32 x[;\n};", "2:12", "expected an array size"),
        ("struct A { uint8 x; } ;\nprotocol P { A a; };\nstruct B {};", "3:1", "end of file"),
        ("struct A { $ };", "1:12", "unexpected character '$'"),
        ("struct A { uint8 x; switch (x) { uint8 y; } u; };", "1:34", "'case', 'default'"),
        ("typedef;", "1:8", "expected the new type's name"),
    ],
)
def test_syntax_errors_name_file_line_col(text: str, where: str, expected: str) -> None:
    with pytest.raises(ProtoSyntaxError) as info:
        parse(text, "bad.proto")
    assert str(info.value).startswith(f"bad.proto:{where}: ")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        ("struct A { Nope x; };", "1:12", "unknown type 'Nope'"),
        ("struct A { uint8 x; };\nstruct A { uint8 y; };", "2:1", "defined twice"),
        ("struct A { uint8 d[n]; uint8 n; };", "1:12", "'n' is not a field defined before"),
        (
            "enum8 e { X, Y }; struct A { e k; switch (k) { case Z: uint8 z; } u; };",
            "1:48",
            "'Z' is not an item of enum e",
        ),
        ("enum8 e { X = 300 };", "1:11", "does not fit enum8"),
        ("channel A : B {};\nprotocol P { A a; };", "1:13", "unknown channel 'B'"),
        (
            "channel A { Empty x = 1; Empty y = 1; };\nmessage Empty {};\nprotocol P { A a; };",
            "1:26",
            "message number 1 is used twice",
        ),
        ("struct A { A inner; };", "1:1", "contains itself"),
    ],
)
def test_resolve_errors_name_file_line_col(text: str, where: str, expected: str) -> None:
    with pytest.raises(ProtoError) as info:
        resolve(parse(text, "bad.proto"))
    assert str(info.value).startswith(f"bad.proto:{where}: ")
    assert expected in str(info.value)


def test_overlay_replaces_messages_and_structs() -> None:
    base = parse(
        "struct S { uint8 a; }; channel C { message { S s; } one; Empty two; };"
        "message Empty {}; protocol P { C c = 3; };",
        "base.proto",
    )
    extra = parse("struct S { uint16 a; }; channel C { message { uint32 z; } two; };", "x.proto")
    p = resolve(overlay(base, extra))
    (ch,) = p.channels
    assert ch.number == 3
    assert ch.server[2].body.members[0].name == "z"
    s = p.structs["S"].members[0]
    assert isinstance(s, ir.Member) and s.type == ir.PRIMITIVES["uint16"]


def test_reference_proto_every_construct(spice_ir: ir.Protocol) -> None:
    # spot checks that show inheritance, numbering and inline structs resolved like upstream
    display = next(c for c in spice_ir.channels if c.name == "display")
    assert display.server[302].name == "draw_fill"
    assert display.server[122].name == "stream_create"
    assert display.client[101].name == "init"
    inputs = next(c for c in spice_ir.channels if c.name == "inputs")
    assert inputs.client[111].name == "mouse_motion"
    smartcard = next(c for c in spice_ir.channels if c.name == "smartcard")
    assert smartcard.attrs == ("ifdef",)
