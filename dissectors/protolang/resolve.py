"""Turn a parsed .proto file into the resolved intermediate form (ir.Protocol).

Resolves type names and typedefs, inline structs, switch selectors and array-size fields
(checked against the fields that precede them), channel inheritance and message numbers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dissectors.protolang import ast, ir
from dissectors.protolang.lexer import ProtoError
from dissectors.protolang.parser import parse

_DIRECTIONS = {"server": "s2c", "client": "c2s"}


def _attr(attrs: tuple[ast.Attribute, ...], name: str) -> ast.Attribute | None:
    for a in attrs:
        if a.name == name:
            return a
    return None


class _Resolver:
    def __init__(self, tree: ast.ProtoFile) -> None:
        self.tree = tree
        self.enums: dict[str, ir.Enum] = {}
        self.typedefs: dict[str, ast.Typedef] = {}
        self.struct_defs: dict[str, ast.StructDef] = {}
        self.structs: dict[str, ir.Struct] = {}
        self.channel_defs: dict[str, ast.ChannelDef] = {}
        self.in_progress: set[str] = set()
        self.channel_cache: dict[str, dict[str, dict[int, ir.Message]]] = {}

    def declare(self, name: str, pos: ast.Pos) -> None:
        taken = (
            name in ir.PRIMITIVES
            or name in self.enums
            or name in self.typedefs
            or name in self.struct_defs
            or name in self.channel_defs
        )
        if taken:
            raise ProtoError(pos, f"{name!r} is defined twice")

    # -- types -----------------------------------------------------------------------------
    def enum(self, d: ast.EnumDef) -> ir.Enum:
        items: list[tuple[str, int]] = []
        seen: set[str] = set()
        next_value = 0
        for item in d.items:
            if item.name in seen:
                raise ProtoError(item.pos, f"{d.kind} item {item.name!r} is listed twice")
            seen.add(item.name)
            value = next_value if item.value is None else item.value
            limit = d.bits if d.kind == "flags" else 1 << d.bits
            if not 0 <= value < limit:
                raise ProtoError(item.pos, f"value {value} does not fit {d.kind}{d.bits}")
            items.append((item.name, value))
            next_value = value + 1
        prefix = _attr(d.attrs, "prefix")
        fmt = {8: "B", 16: "H", 32: "I"}[d.bits]
        return ir.Enum(
            d.name, d.kind, d.bits // 8, fmt, tuple(items), str(prefix.args[0]) if prefix else ""
        )

    def type_named(self, ref: ast.TypeName) -> tuple[ir.Type, str]:
        name = ref.name
        seen: set[str] = set()
        while name in self.typedefs:
            if name in seen:
                raise ProtoError(ref.pos, f"typedef {name!r} refers to itself")
            seen.add(name)
            name = self.typedefs[name].type.name
        if name in ir.PRIMITIVES:
            return ir.PRIMITIVES[name], ref.name
        if name in self.enums:
            return self.enums[name], ref.name
        if name in self.struct_defs:
            return self.struct(self.struct_defs[name]), ref.name
        raise ProtoError(ref.pos, f"unknown type {ref.name!r}")

    def struct(self, d: ast.StructDef, name: str | None = None) -> ir.Struct:
        name = name or d.name or "anonymous"
        if d.name is not None and d.name in self.structs:
            return self.structs[d.name]
        if name in self.in_progress:
            raise ProtoError(d.pos, f"{d.kind} {name!r} contains itself")
        self.in_progress.add(name)
        members: list[ir.Member | ir.Switch] = []
        scope: dict[str, ir.Member] = {}
        for f in d.fields:
            if isinstance(f, ast.Switch):
                sw = self.switch(f, scope)
                members.append(sw)
                if sw.anon:
                    for case in sw.cases:
                        scope[case.member.name] = case.member
            else:
                m = self.member(f, scope)
                if m.name in scope:
                    raise ProtoError(f.pos, f"field {m.name!r} is defined twice")
                members.append(m)
                scope[m.name] = m
        self.in_progress.discard(name)
        result = ir.Struct(name, d.kind, tuple(members))
        if d.name is not None and d.name in self.struct_defs:
            self.structs[d.name] = result
        return result

    def lookup(self, path: tuple[str, ...], scope: dict[str, ir.Member], pos: ast.Pos) -> ir.Member:
        member = scope.get(path[0])
        if member is None:
            raise ProtoError(pos, f"{path[0]!r} is not a field defined before this one")
        for part in path[1:]:
            if not isinstance(member.type, ir.Struct) or member.array or member.pointer:
                raise ProtoError(pos, f"{member.name!r} has no fields")
            found = None
            for m in member.type.members:
                if isinstance(m, ir.Member) and m.name == part:
                    found = m
            if found is None:
                raise ProtoError(pos, f"{member.type.name} has no field {part!r}")
            member = found
        if isinstance(member.type, ir.Struct) or member.array or member.pointer:
            raise ProtoError(pos, f"{'.'.join(path)!r} is not an integer field")
        return member

    def member(self, v: ast.Variable, scope: dict[str, ir.Member]) -> ir.Member:
        mtype: ir.Type
        if isinstance(v.type, ast.StructDef):
            mtype, type_name = self.struct(v.type), v.type.name or "struct"
        else:
            mtype, type_name = self.type_named(v.type)
        array = None
        if v.array is not None:
            array = self.array(v.array, scope, v.pos)
            if array.kind in ("image", "cstring") and not (
                isinstance(mtype, ir.Primitive) and mtype.size == 1
            ):
                raise ProtoError(v.pos, f"{array.kind} arrays must hold 8-bit integers")
        virtual = _attr(v.attrs, "virtual")
        vvalue = None
        if virtual is not None:
            if not virtual.args or not isinstance(virtual.args[0], int):
                raise ProtoError(virtual.pos, "@virtual needs an integer value")
            vvalue = virtual.args[0]
        return ir.Member(
            name=v.name,
            type=mtype,
            type_name=type_name,
            pointer=v.pointer,
            array=array,
            nonnull=_attr(v.attrs, "nonnull") is not None,
            virtual=vvalue,
            zero=_attr(v.attrs, "zero") is not None,
        )

    def array(self, size: ast.ArraySize, scope: dict[str, ir.Member], pos: ast.Pos) -> ir.Array:
        if isinstance(size, ast.ConstSize):
            return ir.Array("const", count=size.value)
        if isinstance(size, ast.FieldSize):
            self.lookup(size.path, scope, pos)
            return ir.Array("field", path=size.path)
        if isinstance(size, ast.RemainingSize):
            return ir.Array("remaining")
        if isinstance(size, ast.ImageSize):
            self.lookup(size.width, scope, pos)
            if size.rows is not None:
                self.lookup(size.rows, scope, pos)
            return ir.Array("image", count=size.bpp, path=size.width, rows=size.rows or ())
        return ir.Array("cstring")

    def switch(self, s: ast.Switch, scope: dict[str, ir.Member]) -> ir.Switch:
        selector = self.lookup(s.selector, scope, s.pos)
        stype = selector.type
        assert not isinstance(stype, ir.Struct)  # lookup() guarantees an integer
        cases: list[ir.SwitchCase] = []
        for case in s.cases:
            tests: list[ir.CaseTest] = []
            for label in case.labels:
                if label.value is None:
                    tests.append(ir.CaseTest(None))
                    continue
                value: int | None
                if isinstance(label.value, int):
                    value = label.value
                elif isinstance(stype, ir.Enum):
                    value = stype.value_of(label.value)
                    if value is None:
                        raise ProtoError(
                            label.pos,
                            f"{label.value!r} is not an item of {stype.kind} {stype.name}",
                        )
                else:
                    raise ProtoError(label.pos, f"case {label.value!r} needs an enum selector")
                tests.append(ir.CaseTest(value, label.negated))
            cases.append(ir.SwitchCase(tuple(tests), self.member(case.field, scope)))
        return ir.Switch(
            s.name, s.selector, stype, tuple(cases), _attr(s.attrs, "anon") is not None
        )

    # -- channels --------------------------------------------------------------------------
    def channel_messages(
        self, name: str, pos: ast.Pos, chain: tuple[str, ...] = ()
    ) -> dict[str, dict[int, ir.Message]]:
        # Cached so a message inherited by several channels is one Struct, decoded by one
        # generated function.
        if name not in self.channel_cache:
            self.channel_cache[name] = self._channel_messages(name, pos, chain)
        return {k: dict(v) for k, v in self.channel_cache[name].items()}

    def _channel_messages(
        self, name: str, pos: ast.Pos, chain: tuple[str, ...]
    ) -> dict[str, dict[int, ir.Message]]:
        d = self.channel_defs.get(name)
        if d is None:
            raise ProtoError(pos, f"unknown channel {name!r}")
        if name in chain:
            raise ProtoError(d.pos, f"channel {name!r} inherits from itself")
        out: dict[str, dict[int, ir.Message]] = {"s2c": {}, "c2s": {}}
        if d.parent is not None:
            inherited = self.channel_messages(d.parent.name, d.parent.pos, (*chain, name))
            out = {k: dict(v) for k, v in inherited.items()}
        last = {k: max(v, default=0) for k, v in out.items()}
        own: dict[str, set[int]] = {"s2c": set(), "c2s": set()}
        for cm in d.messages:
            direction = _DIRECTIONS[cm.direction]
            table = out[direction]
            by_name = {m.name: n for n, m in table.items()}
            number = cm.number
            if cm.name in by_name:  # a derived channel overrides its parent's message
                old = by_name[cm.name]
                if number is None and old not in own[direction]:
                    number = old
                if old not in own[direction]:
                    del table[old]
            if number is None:
                number = last[direction] + 1
            if number in own[direction]:
                raise ProtoError(cm.pos, f"message number {number} is used twice in {name}")
            if isinstance(cm.body, ast.TypeName):
                body, _ = self.type_named(cm.body)
                if not isinstance(body, ir.Struct):
                    raise ProtoError(cm.pos, f"{cm.body.name!r} is not a message or struct")
            else:
                body = self.struct(cm.body, f"{name}.{cm.name}")
            table[number] = ir.Message(cm.name, number, direction, body)
            own[direction].add(number)
            if cm.number is not None or number > last[direction]:
                last[direction] = number  # an override keeping its parent's number does not
        return out

    def run(self, source: str, sha256: str) -> ir.Protocol:
        for d in self.tree.definitions:
            if isinstance(d, ast.EnumDef):
                self.declare(d.name, d.pos)
                self.enums[d.name] = self.enum(d)
            elif isinstance(d, ast.Typedef):
                self.declare(d.name, d.pos)
                self.typedefs[d.name] = d
            elif isinstance(d, ast.StructDef):
                assert d.name is not None
                self.declare(d.name, d.pos)
                self.struct_defs[d.name] = d
            else:
                self.declare(d.name, d.pos)
                self.channel_defs[d.name] = d
        for td in self.typedefs.values():
            self.type_named(td.type)
        for sd in self.struct_defs.values():
            self.struct(sd)
        channels: list[ir.Channel] = []
        if self.tree.protocol is not None:
            number = 0
            for pc in self.tree.protocol.channels:
                number = number if pc.number is None else pc.number
                if any(c.number == number for c in channels):
                    raise ProtoError(pc.pos, f"channel number {number} is used twice")
                msgs = self.channel_messages(pc.type.name, pc.type.pos)
                cdef = self.channel_defs[pc.type.name]
                attrs = tuple(a.name for a in cdef.attrs)
                channels.append(
                    ir.Channel(pc.name, pc.type.name, number, msgs["s2c"], msgs["c2s"], attrs)
                )
                number += 1
        else:
            for cname, cdef in self.channel_defs.items():
                self.channel_messages(cname, cdef.pos)  # still checked
        name = self.tree.protocol.name if self.tree.protocol else Path(source).stem
        return ir.Protocol(name, source, sha256, tuple(channels), dict(self.structs), self.enums)


def overlay(base: ast.ProtoFile, extra: ast.ProtoFile) -> ast.ProtoFile:
    """Apply our own definitions on top of a file: a struct, enum or typedef of the same name
    replaces the original; a channel of the same name replaces the messages it names and adds
    the others. Used for wire facts that spice.proto does not state."""
    by_name = {d.name: d for d in extra.definitions}
    merged: list[ast.Definition] = []
    for d in base.definitions:
        new = by_name.pop(d.name, None)
        if new is None:
            merged.append(d)
        elif isinstance(d, ast.ChannelDef) and isinstance(new, ast.ChannelDef):
            replaced = {(m.direction, m.name): m for m in new.messages}
            msgs = [replaced.pop((m.direction, m.name), m) for m in d.messages]
            msgs += replaced.values()
            merged.append(ast.ChannelDef(d.name, d.parent, tuple(msgs), d.attrs, d.pos))
        elif type(new) is type(d):
            merged.append(new)
        else:
            raise ProtoError(new.pos, f"{new.name!r} overlays a definition of another kind")
    merged += by_name.values()
    return ast.ProtoFile(base.path, tuple(merged), extra.protocol or base.protocol)


def resolve(tree: ast.ProtoFile, sha256: str = "") -> ir.Protocol:
    return _Resolver(tree).run(Path(tree.path).name, sha256)


def load(path: Path, overlays: tuple[Path, ...] = ()) -> ir.Protocol:
    """Parse and resolve a .proto file (plus overlays); raises ProtoError naming file:line:col.

    The recorded sha256 covers the main file followed by each overlay.
    """
    digest = hashlib.sha256()
    tree: ast.ProtoFile | None = None
    for p in (path, *overlays):
        data = p.read_bytes()
        digest.update(data)
        parsed = parse(data.decode("utf-8"), str(p))
        tree = parsed if tree is None else overlay(tree, parsed)
    assert tree is not None
    return resolve(tree, digest.hexdigest())
