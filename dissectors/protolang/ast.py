"""Syntax tree of a spice.proto file, exactly as written (names unresolved)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pos:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str
    args: tuple[int | str, ...]
    pos: Pos


# Array sizes: `[3]`, `[field]`, `[a.b]`, `[]`, `[image_size(bpp, w, h)]`, `[cstring()]`.
@dataclass(frozen=True, slots=True)
class ConstSize:
    value: int


@dataclass(frozen=True, slots=True)
class FieldSize:
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RemainingSize:
    pass


@dataclass(frozen=True, slots=True)
class ImageSize:
    bpp: int
    width: tuple[str, ...]
    rows: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class CStringSize:
    pass


ArraySize = ConstSize | FieldSize | RemainingSize | ImageSize | CStringSize


@dataclass(frozen=True, slots=True)
class TypeName:
    name: str
    pos: Pos


@dataclass(frozen=True, slots=True)
class Variable:
    type: TypeName | StructDef  # StructDef: a struct declared inline
    pointer: bool
    name: str
    array: ArraySize | None
    attrs: tuple[Attribute, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class CaseLabel:
    value: str | int | None  # None: `default`
    negated: bool
    pos: Pos


@dataclass(frozen=True, slots=True)
class Case:
    labels: tuple[CaseLabel, ...]
    field: Variable


@dataclass(frozen=True, slots=True)
class Switch:
    selector: tuple[str, ...]
    cases: tuple[Case, ...]
    name: str
    attrs: tuple[Attribute, ...]
    pos: Pos


Field = Variable | Switch


@dataclass(frozen=True, slots=True)
class StructDef:
    kind: str  # "struct" | "message"
    name: str | None
    fields: tuple[Field, ...]
    attrs: tuple[Attribute, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class EnumItem:
    name: str
    value: int | None
    attrs: tuple[Attribute, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class EnumDef:
    kind: str  # "enum" | "flags"
    bits: int
    name: str
    items: tuple[EnumItem, ...]
    attrs: tuple[Attribute, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Typedef:
    name: str
    type: TypeName
    attrs: tuple[Attribute, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    direction: str  # "server" | "client"
    body: StructDef | TypeName
    name: str
    number: int | None
    attrs: tuple[Attribute, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class ChannelDef:
    name: str
    parent: TypeName | None
    messages: tuple[ChannelMessage, ...]
    attrs: tuple[Attribute, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class ProtocolChannel:
    type: TypeName
    name: str
    number: int | None
    pos: Pos


@dataclass(frozen=True, slots=True)
class ProtocolDef:
    name: str
    channels: tuple[ProtocolChannel, ...]
    pos: Pos


Definition = Typedef | StructDef | EnumDef | ChannelDef


@dataclass(frozen=True, slots=True)
class ProtoFile:
    path: str
    definitions: tuple[Definition, ...]
    protocol: ProtocolDef | None
