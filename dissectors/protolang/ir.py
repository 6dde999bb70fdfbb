"""Resolved, immutable intermediate form of a protocol: what decoders and encoders follow.

Wire rules captured here (spice-common's marshallers are the reference):
- integers are little-endian, structs have no padding;
- a pointer is a uint32 offset from the start of the message body, 0 meaning NULL;
- flags items are bit indexes (item `X = 3` tests value & (1 << 3));
- attributes that only shape spice-common's C structs (@end, @ctype, @as_ptr, @chunk,
  @nomarshal, @ptr_array, @outvar, @to_ptr, @declare, ...) change nothing on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Primitive:
    name: str
    size: int
    signed: bool
    fmt: str  # struct module format character

    @property
    def display(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Enum:
    name: str
    kind: str  # "enum" | "flags"
    size: int
    fmt: str
    items: tuple[tuple[str, int], ...]  # flags: (name, bit index)
    prefix: str

    def names(self) -> dict[int, str]:
        return {value: name for name, value in reversed(self.items)}

    def value_of(self, name: str) -> int | None:
        for item, value in self.items:
            if item == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Array:
    kind: str  # "const" | "field" | "remaining" | "image" | "cstring"
    count: int = 0  # const: count; image: bits per pixel
    path: tuple[str, ...] = ()  # field: the size field; image: the width
    rows: tuple[str, ...] = ()  # image: the row count (empty: one row)


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    type: Type
    type_name: str  # as written (a typedef keeps its own name)
    pointer: bool = False
    array: Array | None = None
    nonnull: bool = False
    virtual: int | None = None  # @virtual(v): not on the wire, always v
    zero: bool = False  # @zero: on the wire, always written as 0


@dataclass(frozen=True, slots=True)
class CaseTest:
    value: int | None  # None: default
    negated: bool = False


@dataclass(frozen=True, slots=True)
class SwitchCase:
    tests: tuple[CaseTest, ...]
    member: Member


@dataclass(frozen=True, slots=True)
class Switch:
    name: str
    selector: tuple[str, ...]
    selector_type: Primitive | Enum
    cases: tuple[SwitchCase, ...]
    anon: bool  # members of an @anon switch live directly in the enclosing struct


@dataclass(frozen=True, slots=True)
class Struct:
    name: str
    kind: str  # "struct" | "message"
    members: tuple[Member | Switch, ...]

    def fixed_size(self) -> int | None:
        """Wire size when it never varies (pointers count 4 bytes), else None."""
        total = 0
        for m in self.members:
            if isinstance(m, Switch):
                return None
            size = member_fixed_size(m)
            if size is None:
                return None
            total += size
        return total


Type = Primitive | Enum | Struct


def type_fixed_size(t: Type) -> int | None:
    if isinstance(t, Struct):
        return t.fixed_size()
    return t.size


def member_fixed_size(m: Member) -> int | None:
    if m.virtual is not None:
        return 0
    if m.pointer:
        return 4
    elem = type_fixed_size(m.type)
    if m.array is None:
        return elem
    if m.array.kind == "const" and elem is not None:
        return elem * m.array.count
    return None


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    number: int
    direction: str  # "s2c" (server section) | "c2s" (client section)
    body: Struct


@dataclass(frozen=True, slots=True)
class Channel:
    name: str  # as named in the protocol block, e.g. "main"
    type_name: str  # e.g. "MainChannel"
    number: int
    server: dict[int, Message] = field(default_factory=dict)
    client: dict[int, Message] = field(default_factory=dict)
    attrs: tuple[str, ...] = ()

    def messages(self, direction: str) -> dict[int, Message]:
        return self.server if direction == "s2c" else self.client


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    source: str  # file name, for headers and messages
    sha256: str
    channels: tuple[Channel, ...]
    structs: dict[str, Struct]  # every named struct and message
    enums: dict[str, Enum]

    def channel(self, number: int) -> Channel | None:
        for ch in self.channels:
            if ch.number == number:
                return ch
        return None


PRIMITIVES: dict[str, Primitive] = {
    "int8": Primitive("int8", 1, True, "b"),
    "uint8": Primitive("uint8", 1, False, "B"),
    "int16": Primitive("int16", 2, True, "h"),
    "uint16": Primitive("uint16", 2, False, "H"),
    "int32": Primitive("int32", 4, True, "i"),
    "uint32": Primitive("uint32", 4, False, "I"),
    "int64": Primitive("int64", 8, True, "q"),
    "uint64": Primitive("uint64", 8, False, "Q"),
    # The descriptor itself travels out of band (SCM_RIGHTS); spice-common's marshaller
    # writes one byte on the wire saying whether a descriptor follows.
    "unix_fd": Primitive("unix_fd", 1, False, "B"),
}
