"""Emit a straight-line Python dissector module (decoders, encoders, schema) from the IR.

Each struct becomes `d_<name>(b, p, end, rg, base) -> (dict, p)` and `e_<name>(w, v)`.
Runs of fixed-size integer fields are read with one precompiled struct.Struct; sizes are
checked before reading. The body is b[base:end]: pointers are 32-bit offsets from the
message body's start, so a body decodes where it lies, inside a larger buffer too (a whole
message, header first), without being copied out. `rg` collects the byte regions read
through pointers (as positions in b), so the caller can tell whether a body was fully
dissected; None for a struct that reads no pointer.
The values produced are shaped exactly like dissectors.interp's, which is the oracle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dissectors.protolang import ir

GENERATOR_VERSION = 3  # 2: the FLAT table; 3: base, the body's start in b


@dataclass
class _Names:
    by_id: dict[int, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    order: list[ir.Struct] = field(default_factory=list)

    def of(self, st: ir.Struct) -> str:
        key = id(st)
        if key not in self.by_id:
            base = re.sub(r"\W", "_", st.name)
            name, n = base, 1
            while name in self.taken:
                n += 1
                name = f"{base}_{n}"
            self.taken.add(name)
            self.by_id[key] = name
            self.order.append(st)
        return self.by_id[key]


def _is_simple(m: ir.Member | ir.Switch) -> bool:
    """A member that fits in a run read by one struct.Struct."""
    if isinstance(m, ir.Switch) or m.pointer or m.virtual is not None:
        return False
    if isinstance(m.type, ir.Struct):
        return False
    if m.array is None:
        return True
    return m.array.kind == "const" and isinstance(m.type, ir.Primitive) and m.type.size == 1


def _fmt(m: ir.Member) -> str:
    if m.array is not None:
        return f"{m.array.count}s"
    assert not isinstance(m.type, ir.Struct)
    return m.type.fmt


def _in_place(st: ir.Struct, outer: frozenset[int] = frozenset()) -> bool:
    """Whether st's decoder, and every decoder it calls, reads no pointer: then it needs
    no regions list (rg may be None) to say how much of the body it covered."""
    if id(st) in outer:
        return True  # a struct inside itself: the outer call looks at its members
    inner = outer | {id(st)}
    members = [c.member for m in st.members if isinstance(m, ir.Switch) for c in m.cases]
    members += [m for m in st.members if isinstance(m, ir.Member)]
    for m in members:
        if m.pointer:
            return False
        if isinstance(m.type, ir.Struct) and not _in_place(m.type, inner):
            return False
    return True


def _flat(st: ir.Struct) -> tuple[tuple[str, str], ...] | None:
    """A struct that is one run of fixed-size integers (and byte strings of constant
    length), as (member name, struct format) in wire order; None for any other struct.
    proxy/core/_fastframe.c decodes these bodies without calling the decoder."""
    members: list[tuple[str, str]] = []
    for m in st.members:
        if not isinstance(m, ir.Member) or not _is_simple(m):
            return None
        members.append((m.name, _fmt(m)))
    return tuple(members)


def _min_size(t: ir.Type) -> int:
    if not isinstance(t, ir.Struct):
        return t.size
    total = 0
    for m in t.members:
        if isinstance(m, ir.Switch) or m.virtual is not None:
            continue
        if m.pointer:
            total += 4
        elif m.array is None:
            total += _min_size(m.type)
        elif m.array.kind == "const":
            total += m.array.count * _min_size(m.type)
    return total


class _Emitter:
    def __init__(self) -> None:
        self.names = _Names()
        self.structs: list[str] = []  # struct.Struct constant definitions
        self.struct_ids: dict[str, str] = {}
        self.lines: list[str] = []
        self.ptr_encoders: list[str] = []
        self.tmp = 0

    def const_struct(self, fmt: str) -> str:
        if fmt not in self.struct_ids:
            name = f"_S{len(self.struct_ids)}"
            self.struct_ids[fmt] = name
            self.structs.append(f"{name} = _st.Struct({'<' + fmt!r})")
        return self.struct_ids[fmt]

    def fresh(self, prefix: str) -> str:
        self.tmp += 1
        return f"{prefix}{self.tmp}"

    # -- decoders --------------------------------------------------------------------------
    def decoder(self, st: ir.Struct) -> list[str]:
        fname = self.names.of(st)
        body: list[str] = []
        has_switch = any(isinstance(m, ir.Switch) for m in st.members)
        entries: list[str] = []  # dict entries, when the dict is built once at the end
        if has_switch:
            body.append("o = {}")
        members = list(st.members)
        i = 0
        while i < len(members):
            m = members[i]
            if _is_simple(m):
                run: list[ir.Member] = []
                while i < len(members) and _is_simple(members[i]):
                    mm = members[i]
                    assert isinstance(mm, ir.Member)
                    run.append(mm)
                    i += 1
                self.decode_run(run, st, body)
                for mm in run:
                    self.store(mm.name, f"v_{mm.name}", has_switch, body, entries)
                continue
            i += 1
            path = f"{st.name}.{m.name}"
            if isinstance(m, ir.Switch):
                self.decode_switch(m, st, body)
                continue
            self.decode_member(m, path, body, "    " * 0)
            self.store(m.name, f"v_{m.name}", has_switch, body, entries)
        if has_switch:
            body.append("return o, p")
        else:
            body.append("return {" + ", ".join(entries) + "}, p")
        return [f"def d_{fname}(b, p, end, rg, base):", *("    " + line for line in body), ""]

    @staticmethod
    def store(name: str, expr: str, incremental: bool, body: list[str], entries: list[str]) -> None:
        if incremental:
            body.append(f"o[{name!r}] = {expr}")
        else:
            entries.append(f"{name!r}: {expr}")

    def decode_run(self, run: list[ir.Member], st: ir.Struct, body: list[str]) -> None:
        fmt = "".join(_fmt(m) for m in run)
        const = self.const_struct(fmt)
        size = sum(ir.member_fixed_size(m) or 0 for m in run)
        path = f"{st.name}.{run[0].name}"
        targets = ", ".join(f"v_{m.name}" for m in run) + ("," if len(run) == 1 else "")
        body.append(f"if p + {size} > end: raise _rt.short(p, {size}, end, {path!r})")
        body.append(f"{targets} = {const}.unpack_from(b, p)")
        body.append(f"p += {size}")

    def decode_member(self, m: ir.Member, path: str, body: list[str], _indent: str) -> None:
        var = f"v_{m.name}"
        if m.virtual is not None:
            body.append(f"{var} = {m.virtual!r}")
            return
        if not m.pointer:
            self.decode_value(m, var, "p", path, body)
            return
        off = self.fresh("_off")
        body.append(f"if p + 4 > end: raise _rt.short(p, 4, end, {path!r})")
        body.append(f"{off}, = _U32.unpack_from(b, p)")
        body.append("p += 4")
        # an offset counts from the body's start and must stay inside it (positions in
        # errors are positions in b, as everywhere)
        bad = f"raise _rt.bad_pointer(p - 4, {off}, end - base, {path!r})"
        if m.nonnull:
            body.append(f"if {off} == 0 or {off} > end - base: {bad}")
        else:
            body.append(f"if {off} > end - base: {bad}")
        inner: list[str] = []
        stop = self.fresh("_q")
        self.decode_value(m, var, stop, path, inner, start=f"base + {off}")
        inner.append(f"rg.append((base + {off}, {stop}))")
        if m.nonnull:
            body.extend(inner)
        else:
            body.append(f"if {off} == 0:")
            body.append(f"    {var} = None")
            body.append("else:")
            body.extend("    " + line for line in inner)

    def count_expr(self, m: ir.Member, pos: str, path: str, body: list[str]) -> str | None:
        arr = m.array
        assert arr is not None
        if arr.kind == "const":
            return str(arr.count)
        if arr.kind == "field":
            n = self.fresh("_n")
            body.append(f"{n} = {self.scope_expr(arr.path)}")
            body.append(f"if {n} < 0: raise _rt.bad_count({pos}, {n}, {path!r})")
            return n
        if arr.kind == "image":
            rows = self.scope_expr(arr.rows) if arr.rows else "1"
            n = self.fresh("_n")
            body.append(f"{n} = (({arr.count} * {self.scope_expr(arr.path)} + 7) // 8) * {rows}")
            return n
        if arr.kind == "cstring":
            n = self.fresh("_n")
            body.append(f"{n} = b.find(b'\\0', {pos}, end) - {pos}")
            body.append(f"if {n} < 0: raise _rt.no_nul({pos}, {path!r})")
            return n
        size = ir.type_fixed_size(m.type)
        if size is None:
            return None  # variable-size items up to the end of the message
        n = self.fresh("_n")
        body.append(f"{n} = (end - {pos}) // {size}" if size else f"{n} = 0")
        return n

    @staticmethod
    def scope_expr(path: tuple[str, ...]) -> str:
        return f"v_{path[0]}" + "".join(f"[{p!r}]" for p in path[1:])

    def decode_value(
        self, m: ir.Member, var: str, stop: str, path: str, body: list[str], start: str = "p"
    ) -> None:
        """Decode m's value starting at `start`; leave the end position in `stop`."""
        t = m.type
        if start != stop:
            body.append(f"{stop} = {start}")
        if m.array is None:
            if isinstance(t, ir.Struct):
                body.append(f"{var}, {stop} = d_{self.names.of(t)}(b, {stop}, end, rg, base)")
            else:
                const = self.const_struct(t.fmt)
                body.append(
                    f"if {stop} + {t.size} > end: raise _rt.short({stop}, {t.size}, end, {path!r})"
                )
                body.append(f"{var}, = {const}.unpack_from(b, {stop})")
                body.append(f"{stop} += {t.size}")
            return
        n = self.count_expr(m, stop, path, body)
        if isinstance(t, ir.Struct):
            fn = f"d_{self.names.of(t)}"
            item = self.fresh("_it")
            body.append(f"{var} = []")
            if n is None:
                body.append(f"while {stop} < end:")
                body.append(f"    {item}, {stop} = {fn}(b, {stop}, end, rg, base)")
                body.append(f"    {var}.append({item})")
                return
            least = _min_size(t)
            if least:
                body.append(
                    f"if {stop} + {n} * {least} > end: raise _rt.bad_count({stop}, {n}, {path!r})"
                )
            else:
                # items that may take no bytes: no more of them than the body has bytes
                body.append(f"if {n} > end - base + 1: raise _rt.bad_count({stop}, {n}, {path!r})")
            body.append(f"for _ in range({n}):")
            body.append(f"    {item}, {stop} = {fn}(b, {stop}, end, rg, base)")
            body.append(f"    {var}.append({item})")
            return
        size = f"{n} * {t.size}" if t.size != 1 else n
        body.append(f"if {stop} + {size} > end: raise _rt.bad_count({stop}, {n}, {path!r})")
        if t.size == 1 and (isinstance(t, ir.Primitive) or m.array.kind == "cstring"):
            body.append(f"{var} = b[{stop}:{stop} + {n}]")
        else:
            body.append(f"{var} = list(_st.unpack_from('<%d{t.fmt}' % {n}, b, {stop}))")
        body.append(f"{stop} += {size}" + (" + 1" if m.array.kind == "cstring" else ""))

    def case_test(self, sw: ir.Switch, case: ir.SwitchCase, sel: str) -> str | None:
        flags = isinstance(sw.selector_type, ir.Enum) and sw.selector_type.kind == "flags"
        parts: list[str] = []
        for test in case.tests:
            if test.value is None:
                return None  # default
            expr = f"{sel} & {1 << test.value}" if flags else f"{sel} == {test.value}"
            parts.append(f"not ({expr})" if test.negated else f"({expr})")
        return " or ".join(parts)

    def decode_switch(self, sw: ir.Switch, st: ir.Struct, body: list[str]) -> None:
        sel = self.fresh("_sel")
        body.append(f"{sel} = {self.scope_expr(sw.selector)}")
        first = True
        has_default = False
        for case in sw.cases:
            test = self.case_test(sw, case, sel)
            m = case.member
            if test is None:
                body.append("else:" if not first else "if True:")
                has_default = True
            else:
                body.append(f"{'if' if first else 'elif'} {test}:")
            inner: list[str] = []
            self.decode_member(m, f"{st.name}.{sw.name}.{m.name}", inner, "")
            if sw.anon:
                inner.append(f"o[{m.name!r}] = v_{m.name}")
            else:
                inner.append(f"o[{sw.name!r}] = {{{m.name!r}: v_{m.name}}}")
            body.extend("    " + line for line in inner)
            first = False
            if has_default:
                break
        if not sw.anon and not has_default:
            if first:
                body.append(f"o[{sw.name!r}] = {{}}")
            else:
                body.append("else:")
                body.append(f"    o[{sw.name!r}] = {{}}")

    # -- encoders --------------------------------------------------------------------------
    def encoder(self, st: ir.Struct) -> list[str]:
        fname = self.names.of(st)
        body: list[str] = []
        members = list(st.members)
        i = 0
        while i < len(members):
            m = members[i]
            if _is_simple(m):
                run: list[ir.Member] = []
                while i < len(members) and _is_simple(members[i]):
                    mm = members[i]
                    assert isinstance(mm, ir.Member)
                    run.append(mm)
                    i += 1
                const = self.const_struct("".join(_fmt(mm) for mm in run))
                args = ", ".join(self.get(mm, "v") for mm in run)
                body.append(f"w.out += {const}.pack({args})")
                continue
            i += 1
            if isinstance(m, ir.Switch):
                sel = self.fresh("_sel")
                body.append(f"{sel} = v" + "".join(f"[{p!r}]" for p in m.selector))
                first = True
                for case in m.cases:
                    test = self.case_test(m, case, sel)
                    sub = case.member
                    src = f"v[{sub.name!r}]" if m.anon else f"v[{m.name!r}][{sub.name!r}]"
                    if test is None:
                        body.append("else:" if not first else "if True:")
                    else:
                        body.append(f"{'if' if first else 'elif'} {test}:")
                    inner: list[str] = []
                    self.encode_member(sub, src, inner)
                    body.extend("    " + line for line in (inner or ["pass"]))
                    first = False
                    if test is None:
                        break
                continue
            self.encode_member(m, self.get(m, "v"), body)
        return [f"def e_{fname}(w, v):", *("    " + line for line in (body or ["pass"])), ""]

    @staticmethod
    def get(m: ir.Member, src: str) -> str:
        return f"{src}.get({m.name!r}, 0)" if m.zero else f"{src}[{m.name!r}]"

    def encode_member(self, m: ir.Member, src: str, body: list[str]) -> None:
        if m.virtual is not None:
            return
        if not m.pointer:
            self.encode_value(m, src, body)
            return
        fn = self.fresh("_ep")
        inner: list[str] = []
        self.encode_value(m, "x", inner)
        self.ptr_encoders += [f"def {fn}(w, x):", *("    " + line for line in inner), ""]
        x = self.fresh("_x")
        body.append(f"{x} = {src}")
        if m.nonnull:
            body.append(f"if {x} is None: raise _EncodeError({m.name + ' must not be NULL'!r})")
            body.append(f"w.pointer({fn}, {x})")
        else:
            body.append(f"if {x} is None: w.out += b'\\0\\0\\0\\0'")
            body.append(f"else: w.pointer({fn}, {x})")

    def encode_value(self, m: ir.Member, src: str, body: list[str]) -> None:
        t = m.type
        if m.array is None:
            if isinstance(t, ir.Struct):
                body.append(f"e_{self.names.of(t)}(w, {src})")
            else:
                body.append(f"w.out += {self.const_struct(t.fmt)}.pack({src})")
            return
        if isinstance(t, ir.Struct):
            it = self.fresh("_it")
            body.append(f"for {it} in {src}: e_{self.names.of(t)}(w, {it})")
            return
        x = self.fresh("_a")
        body.append(f"{x} = {src}")
        body.append(f"if isinstance({x}, (bytes, bytearray, memoryview)): w.out += {x}")
        body.append(f"else: w.out += _st.pack('<%d{t.fmt}' % len({x}), *{x})")
        if m.array.kind == "cstring":
            body.append("w.out += b'\\0'")


def _schema_entry(m: ir.Member | ir.Switch, names: _Names) -> str:
    if isinstance(m, ir.Switch):
        cases = ", ".join(_schema_entry(c.member, names) for c in m.cases)
        return f"('switch', {m.name!r}, {m.anon!r}, ({cases}{',' if len(m.cases) == 1 else ''}))"
    t = m.type
    if isinstance(t, ir.Struct):
        tref = "struct:" + names.of(t)
    elif isinstance(t, ir.Enum):
        tref = f"{t.kind}:{t.name}"
    else:
        tref = t.name
    return f"('field', {m.name!r}, {tref!r}, {m.array is not None!r}, {m.pointer!r})"


def generate(protocol: ir.Protocol, sources: str) -> str:
    """Python source of the dissector module for `protocol`."""
    em = _Emitter()
    roots: list[ir.Struct] = list(protocol.structs.values())
    for ch in protocol.channels:
        for table in (ch.server, ch.client):
            roots += [msg.body for msg in table.values()]
    for st in roots:
        em.names.of(st)
    # Walk the struct graph: decoders for every struct reachable from the roots.
    decoders: list[str] = []
    encoders: list[str] = []
    done = 0
    while done < len(em.names.order):
        st = em.names.order[done]
        done += 1
        decoders += em.decoder(st)
        encoders += em.encoder(st)
    out = [
        f"# Generated by `spicetap regen` from {sources}. Do not edit.",
        f"# source-sha256: {protocol.sha256}",
        f"# generator-version: {GENERATOR_VERSION}",
        "# ruff: noqa",
        "# mypy: ignore-errors",
        "import struct as _st",
        "",
        "from dissectors import runtime as _rt",
        "from dissectors.errors import EncodeError as _EncodeError",
        "",
        "_U32 = _rt.U32",
        *em.structs,
        "",
        *decoders,
        *em.ptr_encoders,
        *encoders,
        f"PROTOCOL = {protocol.name!r}",
        f"SOURCE_SHA256 = {protocol.sha256!r}",
        "",
        "# channel number -> (name, type name, attributes)",
        "CHANNELS = {",
        *(
            f"    {ch.number}: ({ch.name!r}, {ch.type_name!r}, {ch.attrs!r}),"
            for ch in protocol.channels
        ),
        "}",
        "",
        "# (channel number, direction, message type) -> (message name, body struct)",
        "MESSAGES = {",
    ]
    for ch in protocol.channels:
        for table in (ch.server, ch.client):
            for num, msg in sorted(table.items()):
                key = (ch.number, msg.direction, num)
                out.append(f"    {key!r}: ({msg.name!r}, {em.names.of(msg.body)!r}),")
    out += ["}", "", "# struct name -> (decoder, encoder)", "CODECS = {"]
    for st in em.names.order:
        n = em.names.of(st)
        out.append(f"    {n!r}: (d_{n}, e_{n}),")
    out += ["}", "", "# structs whose decoders read no pointer: they need no regions list"]
    out += ["IN_PLACE = frozenset({"]
    for st in em.names.order:
        if _in_place(st):
            out.append(f"    {em.names.of(st)!r},")
    out += ["})", "", "# structs that are one run of fixed-size fields -> ((member, format), ...)"]
    out += ["FLAT = {"]
    for st in em.names.order:
        flat = _flat(st)
        if flat is not None:
            out.append(f"    {em.names.of(st)!r}: {flat!r},")
    out += ["}", "", "# named structs and messages of the source -> struct name", "NAMED = {"]
    for name, st in protocol.structs.items():
        out.append(f"    {name!r}: {em.names.of(st)!r},")
    out += ["}", "", "# struct name -> members, for renderers (see dissectors.runtime.SchemaEntry)"]
    out.append("SCHEMA = {")
    for st in em.names.order:
        entries = ", ".join(_schema_entry(m, em.names) for m in st.members)
        comma = "," if len(st.members) == 1 else ""
        out.append(f"    {em.names.of(st)!r}: ({entries}{comma}),")
    out += ["}", "", "# enum or flags name -> (kind, items as (name, value or bit index))"]
    out.append("ENUMS = {")
    for name, en in protocol.enums.items():
        out.append(f"    {name!r}: ({en.kind!r}, {en.items!r}),")
    out += ["}", ""]
    return "\n".join(out)
