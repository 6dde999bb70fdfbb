r"""The filter language of `spicetap show -f EXPR` (and `stats -f`): text in, a predicate out.

No I/O. `compile_filter(text)` parses once and builds a tree of closures (never `eval`);
`Filter.matches(record, t0)` runs it per record.

Language
--------
Predicates (bare words):
  main display inputs cursor playback record tunnel smartcard usbredir port webdav
                          the record's channel
  c2s s2c                 its direction
  open link tls message agent gap close
                          its kind
  error                   flags.error is set (error and gap records, and decode errors)
  undissected             flags.not_fully_dissected
  true false

Fields (left of an operator):
  channel channel_id direction kind name (alias msg) type size session connection
  time                    seconds since the first record of the input (t0)
  error, flags.error      the record's error message (a string, or null)
  flags.not_fully_dissected
  a.b.c                   a decoded field by dotted path, as `show --json` prints it under
                          "fields"; `fields.x` reaches a decoded field whose name is also a
                          column or keyword (fields.time, fields.name); `fields` is the whole
                          dict (null when the record has none)
  a[0].b, a[-1], a[*].b   index a list; `[*]`: any element (true when one element matches)

Operators:  == != < <= > >=   ~ !~ (re.search)   in [v, ...]   in lo..hi   not in   contains
Values:     12  0x1f  -3  2.5  1e3  'text'  "text"  true  false  null  and bare words
  A bare word on the right is a string compared without regard to case, for enum and
  message names: `msg == draw_copy`, `data.src_bitmap.descriptor.type == lz_rgb`.
  Quoted strings compare exactly; escapes \\ \" \' \n \r \t \xNN (a raw byte when matched
  against bytes), any other backslash pair is kept as it is, so `~ "^draw_\w+"` works.

Meaning:
  - A missing path, or a value of another type than the literal, makes a comparison false;
    nothing ever raises while matching.
  - `!=`, `!~` and `not in` are the negation of `==`, `~` and `in` on a field that exists:
    `flags != PRIMARY` is true when the field exists and the bit is not set.
  - On a list field (flag names, arrays) a comparison holds when it holds for one element, so
    `flags == PRIMARY` tests a flag bit; `contains` tests the container itself: a substring of
    a string, a byte string (or a byte value 0..255) in bytes, an element of a list, a key of
    a dict.
  - `lo..hi` is half open: `time in 2.5..10` is `time >= 2.5 and time < 10`; a bound may be
    left out (`size in 1000..`).
  - Comparisons bind tighter than `not`, `not` than `and`, `and` than `or`. Operands of
    `and`/`or` run cheapest first (predicates before decoded fields): matching is pure, so
    order does not change the result, and records rejected by their header are never decoded.

Grammar:
  filter     := or_expr END
  or_expr    := and_expr (("or" | "||") and_expr)*
  and_expr   := unary (("and" | "&&") unary)*
  unary      := ("not" | "!") unary | "(" or_expr ")" | comparison | PREDICATE
  comparison := path ("==" | "!=" | "<" | "<=" | ">" | ">=") value
              | path ("~" | "!~") STRING_OR_WORD
              | path ["not"] "in" ("[" [value ("," value)* [","]] "]" | range)
              | path "contains" value
  range      := [number] ".." [number]      (at least one bound)
  path       := WORD ("." WORD | "[" (["-"] INT | "*") "]")*
  value      := STRING | number | WORD
  number     := ["-"] (INT | FLOAT)
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple, NoReturn

from spicetap.render import Record, fields_of

__all__ = ["Filter", "FilterError", "FilterRecord", "compile_filter", "decoded_fields"]

MAX_DEPTH = 64  # nesting of parentheses and `not`: bounds the recursion of parse and match


class FilterError(ValueError):
    """A filter that does not parse: one line naming the column and what was expected."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


# What a filter reads from a record: the same as what renderers read.
FilterRecord = Record


def decoded_fields(rec: FilterRecord) -> dict[str, Any] | None:
    """The named field dict: what `show --json` prints, so paths read the same."""
    return fields_of(rec)


# A compiled node: (record, t0, env) -> bool. env[0] caches the record's decoded fields.
Node = Callable[[FilterRecord, float, list[Any]], bool]
Getter = Callable[[FilterRecord, float, list[Any]], Any]
Test = Callable[[Any], bool]

_MISSING: Any = object()
_UNSET: Any = object()
_NUMS = frozenset({int, float, bool})
_BYTES = frozenset({bytes, bytearray, memoryview})

CHANNELS = (
    "main", "display", "inputs", "cursor", "playback", "record",
    "tunnel", "smartcard", "usbredir", "port", "webdav",
)  # fmt: skip
KINDS = ("open", "link", "tls", "message", "agent", "gap", "close")  # error: see below
DIRECTIONS = ("c2s", "s2c")
_ATTRS = {  # column -> attribute of the record
    "channel": "channel",
    "channel_id": "channel_id",
    "direction": "direction",
    "kind": "kind",
    "name": "name",
    "msg": "name",
    "type": "msg_type",
    "session": "session",
    "connection": "connection",
    "error": "error",
    "flags.error": "error",
    "flags.not_fully_dissected": "not_fully_dissected",
}
_COMPUTED: dict[str, Callable[[FilterRecord, float], Any]] = {
    "size": lambda r, t0: len(r.raw),
    "time": lambda r, t0: r.time - t0,
}
_COLUMNS = frozenset({*_ATTRS, *_COMPUTED})


def _channel_is(name: str) -> Node:
    return lambda r, t0, e: r.channel == name


def _kind_is(name: str) -> Node:
    return lambda r, t0, e: r.kind == name


def _direction_is(name: str) -> Node:
    return lambda r, t0, e: r.direction == name


_PREDICATES: dict[str, Node] = {
    **{c: _channel_is(c) for c in CHANNELS},
    **{k: _kind_is(k) for k in KINDS},
    **{d: _direction_is(d) for d in DIRECTIONS},
    "error": lambda r, t0, e: r.error is not None,
    "undissected": lambda r, t0, e: r.not_fully_dissected,
    "true": lambda r, t0, e: True,
    "false": lambda r, t0, e: False,
}
_RESERVED = frozenset({"and", "or", "not", "in", "contains"})
_CONSTANTS: dict[str, Any] = {"true": True, "false": False, "null": None}

# ---------------------------------------------------------------------------------------
# Tokens

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<num>(?:0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?![A-Za-z0-9_]))
  | (?P<word>[A-Za-z0-9_]+)
  | (?P<op>\.\.|==|!=|<=|>=|&&|\|\||!~|[<>~!()\[\],.*-])
    """,
    re.VERBOSE | re.ASCII | re.DOTALL,
)
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)


class _Tok(NamedTuple):
    kind: str  # "str" | "num" | "word" | "op" | "end"
    text: str
    col: int  # 1-based
    value: Any = None  # str: (text, bytes); num: int | float


def _unescape(body: str) -> tuple[str, bytes]:
    text: list[str] = []
    data = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(body):
        plain = body[pos : m.start()]
        text.append(plain)
        data += plain.encode("utf-8", "surrogatepass")
        esc = m.group(1)
        if len(esc) == 3:  # xNN: one raw byte
            text.append(chr(int(esc[1:], 16)))
            data.append(int(esc[1:], 16))
        else:
            ch = _ESCAPES.get(esc, "\\" + esc)
            text.append(ch)
            data += ch.encode("utf-8", "surrogatepass")
        pos = m.end()
    text.append(body[pos:])
    data += body[pos:].encode("utf-8", "surrogatepass")
    return "".join(text), bytes(data)


def _tokenize(text: str, fail: Callable[[int, str], NoReturn]) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        col = pos + 1
        if m is None:
            ch = text[pos]
            if ch in "\"'":
                fail(col, f"unterminated string: no closing {ch}")
            if ch == "=":
                fail(col, "'=' is not an operator: use '=='")
            if ch in "&|":
                fail(col, f"'{ch}' is not an operator: use '{ch}{ch}'")
            fail(col, f"unexpected character {ch!r}")
        kind = m.lastgroup or ""
        tok = m.group()
        if kind == "str":
            toks.append(_Tok("str", tok, col, _unescape(tok[1:-1])))
        elif kind == "num":
            try:
                if tok[:2] in ("0x", "0X"):
                    value: int | float = int(tok, 16)
                elif "." in tok or "e" in tok or "E" in tok:
                    value = float(tok)
                else:
                    value = int(tok)
            except ValueError:  # more digits than int() accepts
                fail(col, f"number too long: {tok[:12]}...")
            toks.append(_Tok("num", tok, col, value))
        elif kind != "ws":
            toks.append(_Tok(kind, tok, col))
        pos = m.end()
    toks.append(_Tok("end", "", len(text) + 1))
    return toks


# ---------------------------------------------------------------------------------------
# Tests on one value: literal -> Test. All of them are total: any value in, a bool out.


class _Lit(NamedTuple):
    value: Any  # None | bool | int | float | str
    data: bytes | None  # strings: their bytes (\xNN escapes are raw bytes)
    bare: bool  # a bare word: compared without regard to case
    col: int


def _eq_base(lit: _Lit) -> Test:
    v = lit.value
    if v is None:
        return lambda x: x is None
    if isinstance(v, bool | int | float):
        return lambda x: type(x) in _NUMS and x == v
    s: str = v
    data = lit.data
    if lit.bare:
        n, low = len(s), s.lower()

        def eq_word(x: Any) -> bool:
            if type(x) is str:
                return x == s or (len(x) == n and x.lower() == low)
            return type(x) in _BYTES and x == data

        return eq_word
    return lambda x: (type(x) is str and x == s) or (type(x) in _BYTES and x == data)


def _order(op: str, v: float) -> Test:
    tests: dict[str, Test] = {
        "<": lambda x: type(x) in _NUMS and x < v,
        "<=": lambda x: type(x) in _NUMS and x <= v,
        ">": lambda x: type(x) in _NUMS and x > v,
        ">=": lambda x: type(x) in _NUMS and x >= v,
    }
    return tests[op]


def _regex(pattern: str, data: bytes | None) -> Test | str:
    """A test, or the reason the pattern is bad."""
    with warnings.catch_warnings():  # FutureWarning on "[[": still a valid pattern
        warnings.simplefilter("ignore")
        try:
            pat = re.compile(pattern)
        except (re.error, OverflowError, RecursionError, ValueError) as exc:
            return str(exc)
        try:
            bpat: re.Pattern[bytes] | None = re.compile(data) if data is not None else None
        except (re.error, OverflowError, RecursionError, ValueError):
            bpat = None

    def base(x: Any) -> bool:
        if type(x) is str:
            return pat.search(x) is not None
        if bpat is not None and type(x) in _BYTES:
            return bpat.search(x) is not None
        return False

    return base


def _in_list(lits: Sequence[_Lit]) -> Test:
    if lits and all(isinstance(lit.value, str) for lit in lits):
        exact = frozenset(lit.value for lit in lits)
        folded = frozenset(lit.value.lower() for lit in lits if lit.bare)
        datas = frozenset(lit.data for lit in lits)

        def base(x: Any) -> bool:
            if type(x) is str:
                return x in exact or (bool(folded) and x.lower() in folded)
            return type(x) in _BYTES and bytes(x) in datas

        return base
    tests = [_eq_base(lit) for lit in lits]
    return lambda x: any(t(x) for t in tests)


def _in_range(lo: float, hi: float) -> Test:
    return lambda x: type(x) in _NUMS and lo <= x < hi


def _contains(lit: _Lit) -> Test:
    v = lit.value
    eq = _eq_base(lit)
    needle: bytes | int | None = lit.data
    if isinstance(v, int) and not isinstance(v, bool):
        needle = v if 0 <= v <= 255 else None

    def test(x: Any) -> bool:
        tx = type(x)
        if tx is str:
            return type(v) is str and v in x
        if tx in _BYTES:
            return needle is not None and needle in (x if tx is bytes else bytes(x))
        if isinstance(x, list):
            return any(eq(i) for i in x)
        if isinstance(x, dict):
            return type(v) is str and v in x
        return False

    return test


# ---------------------------------------------------------------------------------------
# Paths into the decoded fields

_STAR = "*"  # in a path's steps, as opposed to str keys which come wrapped in a tuple
Step = tuple[str] | int | str  # ("key",) | index | _STAR


def _fields_env(r: FilterRecord, e: list[Any]) -> Any:
    v = e[0]
    if v is _UNSET:
        v = e[0] = decoded_fields(r)
    return v


def _step(v: Any, s: Step) -> Any:
    if isinstance(s, tuple):
        return v.get(s[0], _MISSING) if isinstance(v, dict) else _MISSING
    if isinstance(s, int) and isinstance(v, list) and -len(v) <= s < len(v):
        return v[s]
    return _MISSING


def _path_getter(steps: tuple[Step, ...]) -> tuple[Getter, bool]:
    """A getter of one value (or _MISSING), or, with `[*]`, of a list of values."""
    if all(isinstance(s, tuple) for s in steps):
        keys = tuple(s[0] for s in steps if isinstance(s, tuple))

        def get_keys(r: FilterRecord, t0: float, e: list[Any]) -> Any:
            v = _fields_env(r, e)
            for k in keys:
                if not isinstance(v, dict):
                    return _MISSING
                v = v.get(k, _MISSING)
                if v is _MISSING:
                    return v
            return v

        return get_keys, False
    if _STAR not in steps:

        def get_one(r: FilterRecord, t0: float, e: list[Any]) -> Any:
            v = _fields_env(r, e)
            for s in steps:
                v = _step(v, s)
                if v is _MISSING:
                    return v
            return v

        return get_one, False

    def get_all(r: FilterRecord, t0: float, e: list[Any]) -> Any:
        values = [_fields_env(r, e)]
        for s in steps:
            if s == _STAR:
                values = [i for v in values if isinstance(v, list) for i in v]
            else:
                values = [w for v in values if (w := _step(v, s)) is not _MISSING]
        return values

    return get_all, True


# ---------------------------------------------------------------------------------------
# Nodes


@dataclass(frozen=True, slots=True)
class _Compiled:
    fn: Node
    cost: int  # rough relative price of one evaluation: orders and/or operands
    fields: bool  # reads decoded fields


def _each(base: Test) -> Test:
    """A comparison on a list field holds when it holds for one element."""

    def test(x: Any) -> bool:
        if isinstance(x, list):
            return any(base(i) for i in x)
        return base(x)

    return test


def _compare(getter: Getter, multi: bool, test: Test, negate: bool) -> Node:
    """A comparison on a decoded field: missing is false, negation needs the field."""
    if multi:
        if negate:
            return lambda r, t0, e: bool(vs := getter(r, t0, e)) and not any(map(test, vs))
        return lambda r, t0, e: any(map(test, getter(r, t0, e)))
    if negate:
        return lambda r, t0, e: (v := getter(r, t0, e)) is not _MISSING and not test(v)
    return lambda r, t0, e: (v := getter(r, t0, e)) is not _MISSING and test(v)


def _compare_column(column: str, test: Test, negate: bool) -> Node:
    """A comparison on a record attribute: always there, never a list."""
    if column in _COMPUTED:
        get = _COMPUTED[column]
        if negate:
            return lambda r, t0, e: not test(get(r, t0))
        return lambda r, t0, e: test(get(r, t0))
    attr = attrgetter(_ATTRS[column])
    if negate:
        return lambda r, t0, e: not test(attr(r))
    return lambda r, t0, e: test(attr(r))


def _column_is(column: str, lit: _Lit, negate: bool) -> Node:
    """`column == word`, the commonest test, in one closure."""
    attr = attrgetter(_ATTRS[column])
    s: str = lit.value
    n, low = len(s), s.lower()
    if not lit.bare:
        if negate:
            return lambda r, t0, e: attr(r) != s
        return lambda r, t0, e: attr(r) == s

    def eq(r: FilterRecord, t0: float, e: list[Any]) -> bool:
        x = attr(r)
        return x == s or (type(x) is str and len(x) == n and x.lower() == low)

    if negate:
        return lambda r, t0, e: not eq(r, t0, e)
    return eq


def _both(a: Node, b: Node) -> Node:
    return lambda r, t0, e: a(r, t0, e) and b(r, t0, e)


def _either(a: Node, b: Node) -> Node:
    return lambda r, t0, e: a(r, t0, e) or b(r, t0, e)


def _tree(pair: Callable[[Node, Node], Node], fns: Sequence[Node]) -> Node:
    """A balanced tree of two-operand closures: few calls, and log(n) deep."""
    if len(fns) == 1:
        return fns[0]
    mid = len(fns) // 2
    return pair(_tree(pair, fns[:mid]), _tree(pair, fns[mid:]))


def _join(op: str, parts: list[_Compiled]) -> _Compiled:
    parts = sorted(parts, key=lambda p: p.cost)  # stable: equal costs keep the text's order
    fn = _tree(_both if op == "and" else _either, [p.fn for p in parts])
    return _Compiled(fn, sum(p.cost for p in parts), any(p.fields for p in parts))


# ---------------------------------------------------------------------------------------
# Parser: recursive descent straight to closures

_CMP_OPS = frozenset({"==", "!=", "<", "<=", ">", ">=", "~", "!~"})
_NEGATED = {"!=": "==", "!~": "~", "not": "in"}  # `not` as in `x not in [...]`
_NAMES = sorted({*_PREDICATES, *_COLUMNS, "msg", "fields"})


def _shown(text: str) -> str:
    """A token for an error message: quoted, short, on one line."""
    short = text if len(text) <= 24 else text[:21] + "..."
    return repr(short) if not short.isprintable() or "'" in short else f"'{short}'"


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.toks = _tokenize(text, self.fail_at)
        self.i = 0
        self.depth = 0

    def fail_at(self, col: int, what: str) -> NoReturn:
        raise FilterError(f"{self.source}: column {col}: {what}", col)

    def expected(self, what: str, after: bool = True) -> NoReturn:
        tok = self.toks[self.i]
        msg = f"expected {what}"
        if after and self.i > 0:
            msg += f" after {_shown(self.toks[self.i - 1].text)}"
        if tok.kind != "end":
            msg += f", found {_shown(tok.text)}"
        self.fail_at(tok.col, msg)

    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def is_op(self, *texts: str) -> bool:
        tok = self.toks[self.i]
        return tok.kind in ("op", "word") and tok.text in texts

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def parse(self) -> _Compiled:
        if self.peek().kind == "end":
            self.expected("an expression (a filter is empty)")
        node = self.or_expr()
        if self.peek().kind != "end":
            self.expected("'and', 'or' or the end of the filter")
        return node

    def or_expr(self) -> _Compiled:
        parts = [self.and_expr()]
        while self.is_op("or", "||"):
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else _join("or", parts)

    def and_expr(self) -> _Compiled:
        parts = [self.unary()]
        while self.is_op("and", "&&"):
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else _join("and", parts)

    def unary(self) -> _Compiled:
        tok = self.peek()
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail_at(tok.col, f"nested more than {MAX_DEPTH} deep")
        try:
            if self.is_op("not", "!"):
                self.take()
                inner = self.unary()
                f = inner.fn
                return _Compiled(lambda r, t0, e: not f(r, t0, e), inner.cost, inner.fields)
            if self.is_op("("):
                self.take()
                node = self.or_expr()
                if not self.is_op(")"):
                    self.expected(f"')' to close the '(' at column {tok.col}", after=False)
                self.take()
                return node
            if tok.kind == "word" and tok.text not in _RESERVED:
                return self.word()
            self.expected("a predicate, a comparison, 'not' or '('")
        finally:
            self.depth -= 1

    def word(self) -> _Compiled:
        tok = self.peek()
        nxt = self.peek(1)
        operand = nxt.text in (*_CMP_OPS, "in", "contains", "not", "[", ".")
        if nxt.text == "not" and self.peek(2).text != "in":
            operand = False  # `display not ...`: reported below as a missing 'and'
        if tok.text in _PREDICATES and not operand:
            self.take()
            return _Compiled(_PREDICATES[tok.text], 1, False)
        if not operand and tok.text not in _COLUMNS and tok.text != "fields":
            close = difflib.get_close_matches(tok.text, _NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail_at(
                tok.col,
                f"unknown name {_shown(tok.text)}{hint}: expected a predicate (a channel such as "
                "display, c2s, s2c, link, agent, error, undissected) or a comparison such "
                "as 'size > 100'",
            )
        return self.comparison(self.path())

    def path(self) -> str | tuple[Getter, bool]:
        """A column's name, or a getter of decoded fields and whether it yields many."""
        first = self.take()
        steps: list[Step] = [(first.text,)]
        while self.is_op(".", "["):
            if self.take().text == ".":
                seg = self.peek()
                if not (seg.kind == "word" or (seg.kind == "num" and seg.text.isdigit())):
                    self.expected("a field name")
                steps.append((self.take().text,))
                continue
            sign = -1 if self.is_op("-") else 1
            if sign < 0:
                self.take()
            idx = self.peek()
            if idx.kind == "num" and isinstance(idx.value, int):
                steps.append(sign * idx.value)
            elif idx.text == "*" and sign > 0:
                steps.append(_STAR)
            else:
                self.expected("an index (an integer or '*')")
            self.take()
            if not self.is_op("]"):
                self.expected("']'")
            self.take()
        names = [s[0] for s in steps if isinstance(s, tuple)]
        dotted = ".".join(names)
        plain = len(names) == len(steps) and (len(steps) == 1 or dotted.startswith("flags."))
        if plain and dotted in _COLUMNS:
            return dotted
        if steps[0] == ("fields",):
            steps = steps[1:]
        return _path_getter(tuple(steps))

    def value(self, after: str) -> _Lit:
        tok = self.peek()
        if tok.kind == "str":
            self.take()
            text, data = tok.value
            return _Lit(text, data, False, tok.col)
        if tok.kind == "word" and tok.text not in _RESERVED:
            self.take()
            if tok.text in _CONSTANTS:
                return _Lit(_CONSTANTS[tok.text], None, False, tok.col)
            return _Lit(tok.text, tok.text.encode(), True, tok.col)
        number = self.number()
        if number is None:
            self.expected(f"a value{after}")
        return _Lit(number, None, False, tok.col)

    def number(self) -> int | float | None:
        neg = self.is_op("-")
        tok = self.peek(1 if neg else 0)
        if tok.kind != "num":
            if neg:
                self.take()
                self.expected("a number")
            return None
        self.i += 2 if neg else 1
        value: int | float = tok.value
        return -value if neg else value

    def comparison(self, target: str | tuple[Getter, bool]) -> _Compiled:
        op = self.peek()
        if op.text not in (*_CMP_OPS, "in", "contains", "not"):
            self.expected("a comparison operator (== != < <= > >= ~ in contains)")
        self.take()
        if op.text == "not":
            if not self.is_op("in"):
                self.expected("'in'")
            self.take()
        negate = op.text in _NEGATED
        opname = _NEGATED.get(op.text, op.text)
        elementwise = True
        cost = 1
        lit: _Lit | None = None
        if opname == "==":
            lit = self.value("")
            test = _eq_base(lit)
        elif opname in ("<", "<=", ">", ">="):
            number = self.number()
            if number is None:
                self.expected("a number")
            test = _order(opname, number)
        elif opname == "~":
            lit = self.value("")
            if not isinstance(lit.value, str):
                self.fail_at(lit.col, f"expected a string (a regular expression) after '{op.text}'")
            regex = _regex(lit.value, lit.data)
            if isinstance(regex, str):
                self.fail_at(lit.col, f"bad regular expression: {regex}")
            test, cost = regex, 5
        elif opname == "contains":
            test, elementwise, cost = _contains(self.value("")), False, 2
        else:
            test = self.in_operand()
        if isinstance(target, str):
            if (
                opname == "=="
                and lit is not None
                and isinstance(lit.value, str)
                and target in _ATTRS
            ):
                return _Compiled(_column_is(target, lit, negate), 1 + cost, False)
            return _Compiled(_compare_column(target, test, negate), 1 + cost, False)
        getter, multi = target
        if elementwise:
            test = _each(test)
        return _Compiled(_compare(getter, multi, test, negate), 10 + 5 * multi + cost, True)

    def in_operand(self) -> Test:
        if self.is_op("["):
            self.take()
            lits: list[_Lit] = []
            while not self.is_op("]"):
                lits.append(self.value(" or ']'"))
                if self.is_op(","):
                    self.take()
                elif not self.is_op("]"):
                    self.expected("',' or ']'")
            self.take()
            return _in_list(lits)
        lo = self.number()
        if not self.is_op(".."):
            self.expected("'..'" if lo is not None else "'[' or a range such as 2.5..10")
        self.take()
        hi = self.number()
        if lo is None and hi is None:
            self.expected("a number (a range needs at least one bound)")
        return _in_range(-math.inf if lo is None else lo, math.inf if hi is None else hi)


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """A compiled filter. `matches(record, t0)`: whether `record` passes, where `t0` is the
    time of the input's first record (for `time`). Never raises."""

    text: str
    uses_fields: bool  # may decode fields: callers can tell a header-only filter
    matches: Callable[[FilterRecord, float], bool]  # a closure: no method lookup per record


def compile_filter(text: str, source: str = "-f") -> Filter:
    """Parse `text`; FilterError says where it does not parse ("-f: column 14: ...")."""
    node = _Parser(text, source).parse()
    fn = node.fn
    if node.fields:

        def matches(record: FilterRecord, t0: float) -> bool:
            return fn(record, t0, [_UNSET])  # a fresh cache for this record's fields

    else:

        def matches(record: FilterRecord, t0: float) -> bool:
            return fn(record, t0, _NO_ENV)

    return Filter(text, node.fields, matches)


_NO_ENV: list[Any] = []  # never read: no node of a filter without fields touches env
