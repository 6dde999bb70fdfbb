"""Recursive-descent parser for the spice.proto language.

Follows spice-common's docs/spice_protocol.txt and what spice.proto really uses where the two
differ: `image_size` takes three arguments (bpp, width, rows), a switch case holds one field,
structs may be declared inline as a field's type, and enum item names may start with a digit.
Our own definition files may leave out the closing `protocol` block.
"""

from __future__ import annotations

from pathlib import Path

from dissectors.protolang import ast
from dissectors.protolang.lexer import ProtoSyntaxError, Token, tokenize

_ENUM_KEYWORDS = {
    "enum8": ("enum", 8),
    "enum16": ("enum", 16),
    "enum32": ("enum", 32),
    "flags8": ("flags", 8),
    "flags16": ("flags", 16),
    "flags32": ("flags", 32),
    # spice_protocol.txt spells them flag8/16/32; spice.proto uses flags8/16/32.
    "flag8": ("flags", 8),
    "flag16": ("flags", 16),
    "flag32": ("flags", 32),
}


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.i = 0

    # -- token helpers ---------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def fail(self, expected: str) -> ProtoSyntaxError:
        return ProtoSyntaxError(self.tok.pos, f"expected {expected}, found {self.tok.describe()}")

    def at(self, text: str) -> bool:
        return self.tok.kind in ("punct", "ident") and self.tok.text == text

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> Token:
        if not self.at(text):
            raise self.fail(repr(text))
        tok = self.tok
        self.i += 1
        return tok

    def ident(self, what: str = "an identifier") -> Token:
        if self.tok.kind != "ident":
            raise self.fail(what)
        tok = self.tok
        self.i += 1
        return tok

    def integer(self) -> int:
        if self.tok.kind != "int":
            raise self.fail("an integer")
        value = int(self.tok.text, 0)
        self.i += 1
        return value

    # -- file ------------------------------------------------------------------------------
    def file(self, path: str) -> ast.ProtoFile:
        definitions: list[ast.Definition] = []
        protocol: ast.ProtocolDef | None = None
        while self.tok.kind != "eof":
            if protocol is not None:
                raise self.fail("end of file after the protocol block")
            if self.at("protocol"):
                protocol = self.protocol()
            else:
                definitions.append(self.definition())
        return ast.ProtoFile(path, tuple(definitions), protocol)

    def definition(self) -> ast.Definition:
        tok = self.tok
        if tok.kind == "ident":
            if tok.text == "typedef":
                return self.typedef()
            if tok.text in ("struct", "message"):
                struct = self.struct_body(tok.text, named=True)
                self.expect(";")
                return struct
            if tok.text in _ENUM_KEYWORDS:
                return self.enum()
            if tok.text == "channel":
                return self.channel()
        raise self.fail("a definition (typedef, struct, message, enum, flags, channel, protocol)")

    def attributes(self) -> tuple[ast.Attribute, ...]:
        attrs: list[ast.Attribute] = []
        while self.tok.kind == "attr":
            tok = self.tok
            self.i += 1
            args: list[int | str] = []
            if self.accept("("):
                while not self.accept(")"):
                    if self.tok.kind == "int":
                        args.append(self.integer())
                    elif self.tok.kind in ("ident", "name"):
                        args.append(self.tok.text)
                        self.i += 1
                    else:
                        raise self.fail("an attribute value (integer or identifier) or ')'")
                    if not self.at(")"):
                        self.expect(",")
            attrs.append(ast.Attribute(tok.text[1:], tuple(args), tok.pos))
        return tuple(attrs)

    def typedef(self) -> ast.Typedef:
        start = self.expect("typedef")
        name = self.ident("the new type's name")
        target = self.ident("the aliased type")
        attrs = self.attributes()
        self.expect(";")
        return ast.Typedef(name.text, ast.TypeName(target.text, target.pos), attrs, start.pos)

    def enum(self) -> ast.EnumDef:
        start = self.tok
        kind, bits = _ENUM_KEYWORDS[start.text]
        self.i += 1
        name = self.ident(f"the {kind} name")
        self.expect("{")
        items: list[ast.EnumItem] = []
        while not self.accept("}"):
            if self.tok.kind not in ("ident", "name", "int"):
                raise self.fail(f"a {kind} item name or '}}'")
            item = self.tok
            self.i += 1
            value = self.integer() if self.accept("=") else None
            item_attrs = self.attributes()
            items.append(ast.EnumItem(item.text, value, item_attrs, item.pos))
            if not self.at("}"):
                self.expect(",")
        attrs = self.attributes()
        self.expect(";")
        return ast.EnumDef(kind, bits, name.text, tuple(items), attrs, start.pos)

    # -- structs and fields ----------------------------------------------------------------
    def struct_body(self, kind: str, *, named: bool) -> ast.StructDef:
        start = self.expect(kind)
        name = self.ident(f"the {kind} name").text if named or self.tok.kind == "ident" else None
        self.expect("{")
        fields: list[ast.Field] = []
        while not self.accept("}"):
            fields.append(self.field())
        attrs = self.attributes() if named else ()
        return ast.StructDef(kind, name, tuple(fields), attrs, start.pos)

    def field(self) -> ast.Field:
        if self.at("switch"):
            return self.switch()
        return self.variable()

    def variable(self) -> ast.Variable:
        start = self.tok
        vtype: ast.TypeName | ast.StructDef
        if self.at("struct"):
            vtype = self.struct_body("struct", named=True)
        else:
            t = self.ident("a field type")
            vtype = ast.TypeName(t.text, t.pos)
        pointer = self.accept("*")
        name = self.ident("a field name")
        array = self.array_size() if self.accept("[") else None
        attrs = self.attributes()
        self.expect(";")
        return ast.Variable(vtype, pointer, name.text, array, attrs, start.pos)

    def path(self) -> tuple[str, ...]:
        parts = [self.ident("a field name").text]
        while self.accept("."):
            parts.append(self.ident("a field name after '.'").text)
        return tuple(parts)

    def array_size(self) -> ast.ArraySize:
        size: ast.ArraySize
        if self.accept("]"):
            return ast.RemainingSize()
        if self.tok.kind == "int":
            size = ast.ConstSize(self.integer())
        elif self.at("image_size"):
            self.i += 1
            self.expect("(")
            bpp = self.integer()
            self.expect(",")
            width = self.path()
            rows = self.path() if self.accept(",") else None
            self.expect(")")
            size = ast.ImageSize(bpp, width, rows)
        elif self.at("cstring"):
            self.i += 1
            self.expect("(")
            self.expect(")")
            size = ast.CStringSize()
        elif self.tok.kind == "ident":
            size = ast.FieldSize(self.path())
        else:
            raise self.fail(
                "an array size (integer, field name, image_size(...), cstring() or ']')"
            )
        self.expect("]")
        return size

    def switch(self) -> ast.Switch:
        start = self.expect("switch")
        self.expect("(")
        selector = self.path()
        self.expect(")")
        self.expect("{")
        cases: list[ast.Case] = []
        while not self.accept("}"):
            labels: list[ast.CaseLabel] = []
            while self.at("case") or self.at("default"):
                tok = self.tok
                self.i += 1
                if tok.text == "default":
                    labels.append(ast.CaseLabel(None, False, tok.pos))
                else:
                    negated = self.accept("!")
                    value: str | int
                    if self.tok.kind == "int":
                        value = self.integer()
                    elif self.tok.kind in ("ident", "name"):
                        value = self.tok.text
                        self.i += 1
                    else:
                        raise self.fail("a case value")
                    labels.append(ast.CaseLabel(value, negated, tok.pos))
                self.expect(":")
            if not labels:
                raise self.fail("'case', 'default' or '}'")
            cases.append(ast.Case(tuple(labels), self.variable()))
        name = self.ident("the switch's name")
        attrs = self.attributes()
        self.expect(";")
        return ast.Switch(selector, tuple(cases), name.text, attrs, start.pos)

    # -- channels and protocol -------------------------------------------------------------
    def channel(self) -> ast.ChannelDef:
        start = self.expect("channel")
        name = self.ident("the channel name")
        parent = None
        if self.accept(":"):
            p = self.ident("the parent channel name")
            parent = ast.TypeName(p.text, p.pos)
        self.expect("{")
        direction = "server"  # spice_protocol.txt: server if not specified
        messages: list[ast.ChannelMessage] = []
        while not self.accept("}"):
            if self.tok.text in ("server", "client") and self.peek().text == ":":
                direction = self.tok.text
                self.i += 2
                continue
            mstart = self.tok
            body: ast.StructDef | ast.TypeName
            if self.at("message"):
                body = self.struct_body("message", named=False)
            else:
                t = self.ident("'server:', 'client:', 'message' or a message type")
                body = ast.TypeName(t.text, t.pos)
            attrs = list(self.attributes())
            mname = self.ident("the message name")
            attrs += self.attributes()
            number = self.integer() if self.accept("=") else None
            attrs += self.attributes()
            self.expect(";")
            messages.append(
                ast.ChannelMessage(direction, body, mname.text, number, tuple(attrs), mstart.pos)
            )
        channel_attrs = self.attributes()
        self.expect(";")
        return ast.ChannelDef(name.text, parent, tuple(messages), channel_attrs, start.pos)

    def protocol(self) -> ast.ProtocolDef:
        start = self.expect("protocol")
        name = self.ident("the protocol name")
        self.expect("{")
        channels: list[ast.ProtocolChannel] = []
        while not self.accept("}"):
            t = self.ident("a channel type or '}'")
            cname = self.ident("the channel's name")
            number = self.integer() if self.accept("=") else None
            self.expect(";")
            channels.append(
                ast.ProtocolChannel(ast.TypeName(t.text, t.pos), cname.text, number, t.pos)
            )
        self.expect(";")
        return ast.ProtocolDef(name.text, tuple(channels), start.pos)


def parse(text: str, file: str = "<string>") -> ast.ProtoFile:
    """Parse spice.proto source; raises ProtoSyntaxError naming file:line:col."""
    return _Parser(tokenize(text, file)).file(file)


def parse_file(path: Path) -> ast.ProtoFile:
    return parse(path.read_text(encoding="utf-8"), str(path))
