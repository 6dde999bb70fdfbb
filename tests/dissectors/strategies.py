"""Hypothesis strategies that build valid decoded values for any IR struct.

Values take exactly the shape decoders return, and sizes agree with the arrays they
count, so encode(value) must decode back to the same value.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from dissectors.interp import case_matches, image_bytes
from dissectors.protolang import ir

SMALL = st.integers(min_value=0, max_value=3)


def _size_fields(s: ir.Struct) -> set[str]:
    names: set[str] = set()

    def visit(m: ir.Member | ir.Switch) -> None:
        if isinstance(m, ir.Switch):
            for case in m.cases:
                visit(case.member)
            return
        if m.array is not None and m.array.kind in ("field", "image"):
            names.add(m.array.path[0])
            if m.array.rows:
                names.add(m.array.rows[0])

    for m in s.members:
        visit(m)
    return names


def _scalar(t: ir.Primitive | ir.Enum) -> st.SearchStrategy[int]:
    if isinstance(t, ir.Enum) and t.kind == "enum" and t.items:
        values = [v for _n, v in t.items]
        return st.sampled_from(values) | st.integers(0, (1 << (8 * t.size)) - 1)
    if isinstance(t, ir.Primitive) and t.signed:
        bits = 8 * t.size - 1
        return st.integers(-(1 << bits), (1 << bits) - 1)
    return st.integers(0, (1 << (8 * t.size)) - 1)


def struct_value(draw: st.DrawFn, s: ir.Struct, depth: int = 0) -> dict[str, Any]:
    sizes = _size_fields(s)
    out: dict[str, Any] = {}
    for m in s.members:
        if isinstance(m, ir.Switch):
            sel: Any = out
            for part in m.selector:
                sel = sel[part]
            case = case_matches(m, int(sel))
            if case is None:
                if not m.anon:
                    out[m.name] = {}
                continue
            val = member_value(draw, case.member, out, depth)
            if m.anon:
                out[case.member.name] = val
            else:
                out[m.name] = {case.member.name: val}
            continue
        if m.name in sizes and m.array is None and not isinstance(m.type, ir.Struct):
            out[m.name] = draw(SMALL)
            continue
        out[m.name] = member_value(draw, m, out, depth)
    return out


def _scope(scope: dict[str, Any], path: tuple[str, ...]) -> int:
    value: Any = scope
    for part in path:
        value = value[part]
    return int(value)


def member_value(draw: st.DrawFn, m: ir.Member, scope: dict[str, Any], depth: int) -> Any:
    if m.virtual is not None:
        return m.virtual
    if m.zero:
        return 0
    if m.pointer and not m.nonnull and draw(st.booleans()):
        return None
    t = m.type
    if m.array is None:
        if isinstance(t, ir.Struct):
            return struct_value(draw, t, depth + 1)
        return draw(_scalar(t))
    arr = m.array
    if arr.kind == "const":
        n = arr.count
    elif arr.kind == "field":
        n = _scope(scope, arr.path)
    elif arr.kind == "image":
        rows = _scope(scope, arr.rows) if arr.rows else 1
        n = image_bytes(arr.count, _scope(scope, arr.path), rows)
    else:
        n = draw(SMALL)
    if isinstance(t, ir.Struct):
        return [struct_value(draw, t, depth + 1) for _ in range(n)]
    if t.size == 1 and (isinstance(t, ir.Primitive) or arr.kind == "cstring"):
        if arr.kind == "cstring":
            return draw(st.binary(min_size=n, max_size=n).map(lambda b: b.replace(b"\0", b"x")))
        return draw(st.binary(min_size=n, max_size=n))
    return [draw(_scalar(t)) for _ in range(n)]


@st.composite
def message_values(draw: st.DrawFn, s: ir.Struct) -> dict[str, Any]:
    return struct_value(draw, s)
