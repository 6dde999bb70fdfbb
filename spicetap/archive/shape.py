"""What an archived record must hold for the inspectors to rely on it.

A record can parse as msgpack, even carry a valid hash chain (anyone can recompute one),
and still hold a name that is a number or a view that is a string. Every inspector
(show, stats, filters, export) reads records through ArchivedRecord, which checks them
here first: a record that fails is skipped with a one-line warning, so no consumer needs
its own guard. The types are those of docs/archive-format.md.
"""

from __future__ import annotations

import math
from typing import Any

from spicetap.archive import format as fmt

# pcapng keeps nanoseconds since the epoch in 64 bits (the year 2554): a time outside
# that span is damage, and export could not write it.
TIME_LIMIT = 2**64 / 1e9
MAX_VIEW_DEPTH = 32  # the dissectors' views nest a few levels; renderers recurse
MAX_REDACTED = 1 << 30  # as reader.MAX_OBJECT: no record held more
RECORD_KINDS = frozenset(fmt.KINDS) - {"end"}
_LEAVES = (type(None), bool, int, float, str, bytes)


class MalformedRecord(ValueError):
    """A record whose fields have the wrong types or values (the message names the field)."""


def check_time(seconds: float, what: str) -> None:
    if not math.isfinite(seconds) or not -TIME_LIMIT < seconds < TIME_LIMIT:
        raise MalformedRecord(f"{what} is {seconds:g} s since 1970, not within 584 years of it")


def started_of(header: dict[str, Any]) -> float:
    """The header's `started` (seconds since the epoch), or MalformedRecord."""
    started = header.get("started", 0.0)
    if isinstance(started, bool) or not isinstance(started, int | float):
        raise MalformedRecord(f"started is {_type(started)}, not a number")
    check_time(float(started), "started")
    return float(started)


_NIL = type(None)
# Each field, the exact types msgpack gives it (a bool is not an int here), its default.
_FIELDS = (
    ("t", (int,), 0),
    ("seq", (int,), 0),
    ("session", (int, _NIL), None),
    ("channel", (str,), "unknown"),
    ("type", (int, _NIL), None),
    ("name", (str, _NIL), None),
    ("raw", (bytes,), b""),  # bytes(5) would be five zeros, not an error
    ("err", (str, _NIL), None),
    ("hdr", (int,), 0),
    ("variant", (int, _NIL), None),
)
_LEAF_TYPES = frozenset(_LEAVES)


def check_record(obj: dict[str, Any], started: float) -> None:
    """Raise MalformedRecord unless `obj` is a data record the inspectors can use. Run on
    every record read: exact type lookups, no isinstance() of unions (about 1 us)."""
    for key, allowed, default in _FIELDS:
        value = obj.get(key, default)
        if value.__class__ not in allowed:
            names = " or ".join("nil" if t is _NIL else t.__name__ for t in allowed)
            raise MalformedRecord(f"{key} is {_type(value)}, not {names}")
    check_time(started + obj.get("t", 0) / 1e9, "its time")
    ch = obj.get("ch", _NO_CH)
    if ch.__class__ is not list or len(ch) != 3:
        raise MalformedRecord(f"ch is {_type(ch)}, not [channel type, channel id, connection]")
    kind, number, conn = ch
    for value, name in ((number, "channel id"), (conn, "connection"), (kind, "channel type")):
        if value.__class__ is not int and not (value is None and name == "channel type"):
            raise MalformedRecord(f"ch's {name} is {_type(value)}, not int")
    if obj.get("dir", "c2s") not in ("c2s", "s2c"):
        raise MalformedRecord(f"dir is {obj.get('dir')!r}, not 'c2s' or 's2c'")
    if obj.get("kind", "message") not in RECORD_KINDS:
        raise MalformedRecord(f"kind is {obj.get('kind')!r}, not a record kind")
    redacted = obj.get("redacted")
    if redacted is not None:
        size = redacted.get("len") if isinstance(redacted, dict) else None
        if size.__class__ is not int or not 0 <= size <= MAX_REDACTED:
            raise MalformedRecord(f"redacted is {_type(redacted)}, not {{reason, len}}")
    view = obj.get("view")
    if view is None:
        return
    if view.__class__ is not dict:
        raise MalformedRecord(f"view is {_type(view)}, not a map")
    # A message with raw bytes is decoded again (records.redecode), its stored view never
    # read: most records of a session, so their walk (half of this check's time) is spared.
    decoded_again = (
        obj.get("kind", "message") in ("message", "agent")
        and obj.get("raw")
        and obj.get("type") is not None
        and (ch[0] is not None or obj.get("kind") == "agent")
    )
    if not decoded_again:
        check_view(view)


_NO_CH = [None, 0, 0]


def check_view(view: Any) -> None:
    """A view is nil or a map of str keys, down to msgpack's plain values (no ext types),
    at most MAX_VIEW_DEPTH deep. A walk with a stack: deep damage must not recurse here."""
    if view is None:
        return
    if view.__class__ is not dict:
        raise MalformedRecord(f"view is {_type(view)}, not a map")
    leaves = _LEAF_TYPES
    stack: list[tuple[Any, int]] = [(view, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_VIEW_DEPTH:
            raise MalformedRecord(f"view nests deeper than {MAX_VIEW_DEPTH} levels")
        if value.__class__ is dict:
            for key, item in value.items():
                if key.__class__ is not str:
                    raise MalformedRecord(f"view has a key that is {_type(key)}, not str")
                if item.__class__ not in leaves:
                    stack.append((item, depth + 1))
        elif value.__class__ is list:
            stack.extend((item, depth + 1) for item in value if item.__class__ not in leaves)
        else:
            raise MalformedRecord(f"view holds {_type(value)}")


def _type(value: Any) -> str:
    return "nil" if value is None else type(value).__name__
