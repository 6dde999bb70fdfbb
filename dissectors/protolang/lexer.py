"""Tokens of the spice.proto language (spice-common docs/spice_protocol.txt)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dissectors.protolang.ast import Pos


class ProtoError(Exception):
    """A .proto file is wrong; the message starts with file:line:col."""

    def __init__(self, pos: Pos, message: str) -> None:
        super().__init__(f"{pos}: {message}")
        self.pos = pos


class ProtoSyntaxError(ProtoError):
    """The text does not follow the grammar."""


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # "ident", "int", "name" (digit-led enum item), "attr", "punct", "eof"
    text: str
    pos: Pos

    def describe(self) -> str:
        return "end of file" if self.kind == "eof" else repr(self.text)


# Order matters: hex before decimal; a decimal must not run into letters or `_`,
# so enum items such as `1BIT_LE` or `16_555` lex as one "name" token.
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\f\v]+)
  | (?P<nl>\n)
  | (?P<line_comment>//[^\n]*)
  | (?P<block_comment>/\*.*?\*/)
  | (?P<unterminated>/\*)
  | (?P<hex>[+-]?0[xX][0-9a-fA-F]+(?![0-9A-Za-z_]))
  | (?P<int>[+-]?[0-9]+(?![0-9A-Za-z_]))
  | (?P<name>[0-9][0-9A-Za-z_]*)
  | (?P<attr>@[A-Za-z_][A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{}()\[\];:,=*.!])
    """,
    re.VERBOSE | re.DOTALL,
)


def tokenize(text: str, file: str) -> list[Token]:
    tokens: list[Token] = []
    line, line_start, i = 1, 0, 0
    while i < len(text):
        m = _TOKEN_RE.match(text, i)
        pos = Pos(file, line, i - line_start + 1)
        if m is None:
            raise ProtoSyntaxError(pos, f"unexpected character {text[i]!r}")
        kind = m.lastgroup
        chunk = m.group()
        if kind == "unterminated":
            raise ProtoSyntaxError(pos, "unterminated /* comment")
        if kind in ("hex", "int"):
            tokens.append(Token("int", chunk, pos))
        elif kind in ("name", "attr", "ident", "punct"):
            tokens.append(Token(kind, chunk, pos))
        newlines = chunk.count("\n")
        if newlines:
            line += newlines
            line_start = i + chunk.rindex("\n") + 1
        i = m.end()
    tokens.append(Token("eof", "", Pos(file, line, i - line_start + 1)))
    return tokens
