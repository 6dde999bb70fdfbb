"""A slow, direct interpreter of the intermediate form: the oracle for the generated code.

Decoded values: integers (enums and flags too) are ints; arrays of 8-bit integers are bytes;
other arrays are lists; structs are dicts; a NULL pointer is None; members of an @anon switch
sit in the enclosing dict, a named switch is a dict holding the chosen case's member ({} when
no case matched).

Encoding writes the fixed part first, then what pointers point to, in the order the pointers
were met (breadth first), the way spice-server's marshaller lays out sub-marshallers.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from dissectors.errors import EncodeError, Malformed
from dissectors.protolang import ir

_U32 = struct.Struct("<I")


def _scope_value(scope: dict[str, Any], path: tuple[str, ...]) -> int:
    value: Any = scope
    for part in path:
        value = value[part]
    return int(value)


def case_matches(sw: ir.Switch, selector: int) -> ir.SwitchCase | None:
    flags = isinstance(sw.selector_type, ir.Enum) and sw.selector_type.kind == "flags"
    for case in sw.cases:
        for test in case.tests:
            if test.value is None:
                return case
            hit = bool(selector & (1 << test.value)) if flags else selector == test.value
            if hit != test.negated:
                return case
    return None


def image_bytes(bpp: int, width: int, rows: int) -> int:
    return ((bpp * width + 7) // 8) * rows


class _Decoder:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.end = len(buf)
        self.regions: list[tuple[int, int]] = []

    def need(self, pos: int, size: int, path: str) -> None:
        if pos + size > self.end:
            raise Malformed(pos, path, f"needs {size} bytes, {max(self.end - pos, 0)} left")

    def struct(self, st: ir.Struct, pos: int, path: str) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        for m in st.members:
            if isinstance(m, ir.Switch):
                case = case_matches(m, _scope_value(out, m.selector))
                if case is None:
                    if not m.anon:
                        out[m.name] = {}
                    continue
                sub = case.member
                val, pos = self.member(sub, pos, out, f"{path}.{m.name}.{sub.name}")
                if m.anon:
                    out[sub.name] = val
                else:
                    out[m.name] = {sub.name: val}
            else:
                out[m.name], pos = self.member(m, pos, out, f"{path}.{m.name}")
        return out, pos

    def member(self, m: ir.Member, pos: int, scope: dict[str, Any], path: str) -> tuple[Any, int]:
        if m.virtual is not None:
            return m.virtual, pos
        if not m.pointer:
            return self.value(m, pos, scope, path)
        self.need(pos, 4, path)
        (offset,) = _U32.unpack_from(self.buf, pos)
        if offset == 0:
            if m.nonnull:
                raise Malformed(pos, path, "NULL pointer in a field that must not be NULL")
            return None, pos + 4
        if offset > self.end:  # == end is a valid pointer to an empty array
            raise Malformed(pos, path, f"pointer {offset} is past the end ({self.end})")
        val, stop = self.value(m, offset, scope, path)
        self.regions.append((offset, stop))
        return val, pos + 4

    def count(self, m: ir.Member, pos: int, scope: dict[str, Any], path: str) -> int:
        arr = m.array
        assert arr is not None
        if arr.kind == "const":
            return arr.count
        if arr.kind == "field":
            n = _scope_value(scope, arr.path)
            if n < 0:
                raise Malformed(pos, path, f"negative array size {n}")
            return n
        if arr.kind == "image":
            rows = _scope_value(scope, arr.rows) if arr.rows else 1
            return image_bytes(arr.count, _scope_value(scope, arr.path), rows)
        if arr.kind == "cstring":
            nul = self.buf.find(b"\0", pos)
            if nul < 0:
                raise Malformed(pos, path, "string has no terminating NUL")
            return nul - pos
        size = ir.type_fixed_size(m.type)  # "remaining": to the end of the message
        if size is None:
            return -1
        return (self.end - pos) // size if size else 0

    def value(self, m: ir.Member, pos: int, scope: dict[str, Any], path: str) -> tuple[Any, int]:
        t = m.type
        if m.array is None:
            return self.single(t, pos, path)
        n = self.count(m, pos, scope, path)
        if isinstance(t, ir.Struct):
            items: list[Any] = []
            if n < 0:  # variable-size items up to the end of the message
                while pos < self.end:
                    item, pos = self.struct(t, pos, f"{path}[{len(items)}]")
                    items.append(item)
                return items, pos
            fixed = t.fixed_size()
            if fixed is not None:
                self.need(pos, fixed * n, path)
            for i in range(n):
                item, pos = self.struct(t, pos, f"{path}[{i}]")
                items.append(item)
            return items, pos
        size = t.size * n
        self.need(pos, size, path)
        if t.size == 1 and (isinstance(t, ir.Primitive) or m.array.kind == "cstring"):
            data = bytes(self.buf[pos : pos + size])
            return data, pos + size + (1 if m.array.kind == "cstring" else 0)
        return list(struct.unpack_from(f"<{n}{t.fmt}", self.buf, pos)), pos + size

    def single(self, t: ir.Type, pos: int, path: str) -> tuple[Any, int]:
        if isinstance(t, ir.Struct):
            return self.struct(t, pos, path)
        self.need(pos, t.size, path)
        return struct.unpack_from("<" + t.fmt, self.buf, pos)[0], pos + t.size


def decode(body_type: ir.Struct, buf: bytes) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Decode one message body; returns the values and the byte regions read.

    Raises Malformed when the body does not fit the definition.
    """
    d = _Decoder(buf)
    try:
        value, stop = d.struct(body_type, 0, "")
    except KeyError as exc:  # a size or selector field inside a case that was not chosen
        raise Malformed(0, "", f"field {exc} is absent") from None
    d.regions.append((0, stop))
    return value, d.regions


class _Encoder:
    def __init__(self) -> None:
        self.out = bytearray()
        self.pending: deque[tuple[int, ir.Member, Any, dict[str, Any]]] = deque()

    def struct(self, st: ir.Struct, value: dict[str, Any]) -> None:
        for m in st.members:
            if isinstance(m, ir.Switch):
                case = case_matches(m, _scope_value(value, m.selector))
                if case is None:
                    continue
                sub = case.member
                val = value[sub.name] if m.anon else value[m.name][sub.name]
                self.member(sub, val, value)
            else:
                self.member(m, value.get(m.name, 0) if m.zero else value[m.name], value)

    def member(self, m: ir.Member, val: Any, scope: dict[str, Any]) -> None:
        if m.virtual is not None:
            return
        if not m.pointer:
            self.value(m, val, scope)
            return
        if val is None:
            if m.nonnull:
                raise EncodeError(f"{m.name} must not be NULL")
            self.out += _U32.pack(0)
            return
        self.pending.append((len(self.out), m, val, scope))
        self.out += _U32.pack(0)

    def value(self, m: ir.Member, val: Any, scope: dict[str, Any]) -> None:
        t = m.type
        if m.array is None:
            self.single(t, val)
        elif isinstance(t, ir.Struct):
            for item in val:
                self.struct(t, item)
        elif isinstance(val, bytes | bytearray | memoryview):
            self.out += val
            if m.array.kind == "cstring":
                self.out += b"\0"
        else:
            self.out += struct.pack(f"<{len(val)}{t.fmt}", *val)

    def single(self, t: ir.Type, val: Any) -> None:
        if isinstance(t, ir.Struct):
            self.struct(t, val)
        else:
            try:
                self.out += struct.pack("<" + t.fmt, val)
            except struct.error as exc:
                raise EncodeError(f"{val!r} does not fit {t.name}: {exc}") from None

    def finish(self) -> bytes:
        while self.pending:
            patch, m, val, scope = self.pending.popleft()
            _U32.pack_into(self.out, patch, len(self.out))
            self.value(m, val, scope)
        return bytes(self.out)


def encode(body_type: ir.Struct, value: dict[str, Any]) -> bytes:
    """Encode one message body from values shaped as decode() returns them."""
    enc = _Encoder()
    try:
        enc.struct(body_type, value)
        return enc.finish()
    except (KeyError, TypeError, struct.error) as exc:
        raise EncodeError(f"cannot encode {body_type.name}: {exc!r}") from None
