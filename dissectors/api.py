"""Public decoding API over the generated dissector modules.

`decode()` never raises for any body: a body that does not fit its definition gives a
Decoded whose `error` says where (offset, field path) and why.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

from dissectors.errors import DecodeError, EncodeError, Malformed, covered_bytes
from dissectors.generated import agent as _agent_mod
from dissectors.generated import caps as _caps_mod
from dissectors.generated import link as _link_mod
from dissectors.generated import spice as _spice_mod
from dissectors.runtime import Writer

C2S = "c2s"
S2C = "s2c"
DIRECTIONS = (C2S, S2C)


# A message's decoding entry: channel name, message name, body struct, decoder, in place.
Entry = tuple[str, str, str, Any, bool]
# A struct's decoded value -> its named view (see Dialect.namer).
Namer = Callable[[dict[str, Any]], dict[str, Any]]


class Dialect:
    """One generated module: its channels, messages, codecs and schema."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.channels: dict[int, tuple[str, str, tuple[str, ...]]] = module.CHANNELS
        self.messages: dict[tuple[int, str, int], tuple[str, str]] = module.MESSAGES
        self.codecs: dict[str, tuple[Any, Any]] = module.CODECS
        self.named: dict[str, str] = module.NAMED
        self.schema: dict[str, tuple[tuple[Any, ...], ...]] = module.SCHEMA
        self.enums: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = module.ENUMS
        self.enum_names = {name: dict(items) for name, (_k, items) in self.enums.items()}
        self.enum_by_value = {
            name: {v: n for n, v in reversed(items)} for name, (_k, items) in self.enums.items()
        }
        self.in_place: frozenset[str] = module.IN_PLACE
        # structs that are one run of fixed-size fields: (member, struct format) in order
        self.flat: dict[str, tuple[tuple[str, str], ...]] = module.FLAT
        # (channel, direction, type) -> (channel name, message name, struct, decoder, whether
        # it decodes in place: no pointers, so no regions to collect)
        self.entries: dict[tuple[int, str, int], Entry] = {
            key: (
                self.channel_name(key[0]),
                name,
                struct,
                self.codecs[struct][0],
                struct in self.in_place,
            )
            for key, (name, struct) in self.messages.items()
        }
        self._tables: dict[tuple[int, str], dict[int, Entry]] = {}
        self._namers: dict[str, Namer] = {}

    def table(self, channel_type: int, direction: str) -> dict[int, Entry]:
        """The entries of one channel's messages in one direction, by message type."""
        key = (channel_type, direction)
        table = self._tables.get(key)
        if table is None:
            table = {
                num: entry
                for (ch, d, num), entry in self.entries.items()
                if ch == channel_type and d == direction
            }
            self._tables[key] = table
        return table

    def channel_name(self, number: int) -> str:
        entry = self.channels.get(number)
        return entry[0] if entry else f"channel{number}"

    def namer(self, struct: str) -> Namer:
        """The function that gives named_value()'s view of a decoded `struct`, made once
        from the schema: per call it only converts, without walking the schema again."""
        namer = self._namers.get(struct)
        if namer is None:
            namer = self._namers[struct] = _namer(self, self.schema[struct])
        return namer

    def decode_struct(self, struct: str, body: bytes) -> tuple[dict[str, Any], int]:
        """Decode with a struct's generated decoder; returns (value, bytes covered).

        Raises Malformed.
        """
        decoder = self.codecs[struct][0]
        regions: list[tuple[int, int]] = []
        try:
            value, stop = decoder(body, 0, len(body), regions, 0)
        except (UnboundLocalError, KeyError) as exc:  # a size field in a case not chosen
            raise Malformed(0, struct, f"field {exc} is absent") from None
        regions.append((0, stop))
        return value, covered_bytes(regions)

    def encode_struct(self, struct: str, value: dict[str, Any]) -> bytes:
        w = Writer()
        try:
            self.codecs[struct][1](w, value)
        except (KeyError, TypeError, IndexError) as exc:
            raise EncodeError(f"cannot encode {struct}: {exc!r}") from None
        except Exception as exc:  # struct.error for out-of-range values
            raise EncodeError(f"cannot encode {struct}: {exc}") from None
        return w.finish()


SPICE = Dialect(_spice_mod)
LINK = Dialect(_link_mod)
CAPS = Dialect(_caps_mod)
AGENT = Dialect(_agent_mod)


class Decoded(NamedTuple):
    """One decoded body (a NamedTuple: built per message, so cheap to create)."""

    channel: str
    channel_type: int
    direction: str
    msg_type: int
    name: str | None  # None: a message type the protocol does not define
    fields: dict[str, Any] | None
    size: int
    covered: int  # bytes of the body the definition accounts for
    error: DecodeError | None
    struct: str | None  # schema name of the body, for renderers
    dialect: Dialect

    @property
    def fully_dissected(self) -> bool:
        return self.error is None and self.name is not None and self.covered == self.size

    def named_fields(self) -> Any:
        """Fields with enum items and flag bits by name (JSON-ready except bytes)."""
        if self.fields is None or self.struct is None:
            return None
        return self.dialect.namer(self.struct)(self.fields)


_new = tuple.__new__


def decode(
    channel_type: int, direction: str, msg_type: int, body: bytes, dialect: Dialect = SPICE
) -> Decoded:
    size = len(body)
    entry = dialect.entries.get((channel_type, direction, msg_type))
    if entry is None:
        channel = dialect.channel_name(channel_type)
        err = DecodeError(0, "", f"no {direction} message {msg_type} in channel {channel}")
        return Decoded(
            channel, channel_type, direction, msg_type, None, None, size, 0, err, None, dialect
        )
    channel, name, struct, decoder, in_place = entry
    regions: list[tuple[int, int]] | None = None if in_place else []
    try:
        fields, stop = decoder(body, 0, size, regions, 0)
    except Malformed as exc:
        return Decoded(
            channel,
            channel_type,
            direction,
            msg_type,
            name,
            None,
            size,
            0,
            exc.error,
            struct,
            dialect,
        )
    except (UnboundLocalError, KeyError) as exc:  # a size field in a case not chosen
        err = DecodeError(0, struct, f"field {exc} is absent")
        return Decoded(
            channel, channel_type, direction, msg_type, name, None, size, 0, err, struct, dialect
        )
    if regions:  # pointers were followed: count the union of what was read
        regions.append((0, stop))
        stop = covered_bytes(regions)
    # built per message: tuple.__new__ skips the NamedTuple's Python-level __new__
    return _new(
        Decoded,
        (channel, channel_type, direction, msg_type, name, fields, size, stop, None, struct,
         dialect),
    )  # fmt: skip


def encode(
    channel_type: int,
    direction: str,
    msg_type: int,
    fields: dict[str, Any],
    dialect: Dialect = SPICE,
) -> bytes:
    """Body bytes of a message from fields shaped as decode() gives them."""
    entry = dialect.messages.get((channel_type, direction, msg_type))
    if entry is None:
        raise EncodeError(f"no {direction} message {msg_type} in channel {channel_type}")
    return dialect.encode_struct(entry[1], fields)


def message_type(channel_type: int, direction: str, name: str, dialect: Dialect = SPICE) -> int:
    for (ch, d, num), (mname, _s) in dialect.messages.items():
        if ch == channel_type and d == direction and mname == name:
            return num
    raise KeyError(f"no {direction} message {name!r} in channel {channel_type}")


def flag_names(dialect: Dialect, enum: str, value: int) -> list[str | int]:
    names: list[str | int] = []
    by_bit = dialect.enum_by_value[enum]
    rest = value
    for bit, name in sorted(by_bit.items()):
        if value >> bit & 1:
            names.append(name)
            rest &= ~(1 << bit)
    if rest:
        names.append(rest)
    return names


def named_value(dialect: Dialect, spec: tuple[str, bool], value: Any) -> Any:
    """Render `value` of type spec=(type ref, is_array) with names for enums and flags.

    Walks the schema for every value: the reference that Dialect.namer's views must equal.
    """
    tref, is_array = spec
    if value is None:
        return None
    if is_array and isinstance(value, list):
        return [named_value(dialect, (tref, False), v) for v in value]
    if tref.startswith("struct:"):
        return _named_struct(dialect, tref[7:], value)
    if tref.startswith("enum:") and isinstance(value, int):
        return dialect.enum_by_value[tref[5:]].get(value, value)
    if tref.startswith("flags:") and isinstance(value, int):
        return flag_names(dialect, tref[6:], value)
    return value


def _named_struct(dialect: Dialect, struct: str, value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in dialect.schema[struct]:
        _named_entry(dialect, entry, value, out)
    return out


def _named_entry(
    dialect: Dialect, entry: tuple[Any, ...], value: dict[str, Any], out: dict[str, Any]
) -> None:
    if entry[0] == "field":
        _kind, name, tref, is_array, _ptr = entry
        if name in value:
            out[name] = named_value(dialect, (tref, is_array), value[name])
        return
    _kind, name, anon, cases = entry
    if anon:
        for case in cases:
            _named_entry(dialect, case, value, out)
    elif name in value:
        inner: dict[str, Any] = {}
        for case in cases:
            _named_entry(dialect, case, value[name], inner)
        out[name] = inner


# -- named views made once per struct (Dialect.namer) ------------------------------------------
Convert = Callable[[Any], Any]


def _namer(dialect: Dialect, entries: tuple[tuple[Any, ...], ...]) -> Namer:
    steps: list[tuple[str, Convert | None]] = []  # (member, conversion or None: as it is)

    def name(value: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for member, convert in steps:
            if member in value:
                out[member] = value[member] if convert is None else convert(value[member])
        return out

    for entry in entries:
        _add_steps(dialect, entry, steps)
    return name


def _add_steps(
    dialect: Dialect, entry: tuple[Any, ...], steps: list[tuple[str, Convert | None]]
) -> None:
    if entry[0] == "field":
        _kind, member, tref, is_array, _ptr = entry
        steps.append((member, _converter(dialect, tref, is_array)))
        return
    _kind, member, anon, cases = entry
    if anon:  # the cases' members sit in the enclosing struct
        for case in cases:
            _add_steps(dialect, case, steps)
    else:
        steps.append((member, _namer(dialect, cases)))


def _converter(dialect: Dialect, tref: str, is_array: bool) -> Convert | None:
    one = _converter_one(dialect, tref)
    if not is_array:
        return one
    if one is None:
        return _copy_list
    each = one

    def convert_all(value: Any) -> Any:
        return [each(v) for v in value] if isinstance(value, list) else each(value)

    return convert_all


def _converter_one(dialect: Dialect, tref: str) -> Convert | None:
    kind, _, target = tref.partition(":")
    if kind == "struct":

        def struct_view(value: Any) -> Any:
            # looked up when called, not when made: a struct may contain itself
            return None if value is None else dialect.namer(target)(value)

        return struct_view
    if kind == "enum":
        by_value = dialect.enum_by_value[target]
        return lambda value: by_value.get(value, value) if isinstance(value, int) else value
    if kind == "flags":
        return _flags_converter(dialect, target)
    return None


FLAG_VALUES_KEPT = 1024  # per flags type: a field takes a few distinct values


def _flags_converter(dialect: Dialect, target: str) -> Convert:
    known: dict[int, list[str | int]] = {}

    def flags_view(value: Any) -> Any:
        if not isinstance(value, int):
            return value
        names = known.get(value)
        if names is None:
            names = flag_names(dialect, target, value)
            if len(known) < FLAG_VALUES_KEPT:
                known[value] = names
        return list(names)  # each view its own list: views are not shared

    return flags_view


def _copy_list(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
