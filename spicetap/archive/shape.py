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


def check_record(obj: dict[str, Any], started: float) -> None:
    """Raise MalformedRecord unless `obj` is a data record the inspectors can use."""
    _expect(obj, "t", int, 0)
    check_time(started + obj.get("t", 0) / 1e9, "its time")
    _expect(obj, "seq", int, 0)
    _expect(obj, "session", int | None, None)
    ch = obj.get("ch", [None, 0, 0])
    if not (isinstance(ch, list) and len(ch) == 3):
        raise MalformedRecord(f"ch is {_type(ch)}, not [channel type, channel id, connection]")
    for value, name in zip(ch, ("channel type", "channel id", "connection"), strict=True):
        if not (isinstance(value, int) or (value is None and name == "channel type")):
            raise MalformedRecord(f"ch's {name} is {_type(value)}, not int")
    _expect(obj, "channel", str, "unknown")
    if obj.get("dir", "c2s") not in ("c2s", "s2c"):
        raise MalformedRecord(f"dir is {obj.get('dir')!r}, not 'c2s' or 's2c'")
    if obj.get("kind", "message") not in RECORD_KINDS:
        raise MalformedRecord(f"kind is {obj.get('kind')!r}, not a record kind")
    _expect(obj, "type", int | None, None)
    _expect(obj, "name", str | None, None)
    _expect(obj, "raw", bytes, b"")  # bytes(5) would be five zeros, not an error
    _expect(obj, "err", str | None, None)
    _expect(obj, "hdr", int, 0)
    _expect(obj, "variant", int | None, None)
    redacted = obj.get("redacted")
    if redacted is not None:
        size = redacted.get("len") if isinstance(redacted, dict) else None
        if not isinstance(size, int) or not 0 <= size <= MAX_REDACTED:
            raise MalformedRecord(f"redacted is {_type(redacted)}, not {{reason, len}}")
    check_view(obj.get("view"))


def check_view(view: Any) -> None:
    """A view is nil or a map of str keys, down to msgpack's plain values (no ext types),
    at most MAX_VIEW_DEPTH deep. A walk with a stack: deep damage must not recurse here."""
    if view is None:
        return
    if not isinstance(view, dict):
        raise MalformedRecord(f"view is {_type(view)}, not a map")
    stack: list[tuple[Any, int]] = [(view, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_VIEW_DEPTH:
            raise MalformedRecord(f"view nests deeper than {MAX_VIEW_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise MalformedRecord(f"view has a key that is {_type(key)}, not str")
                if item.__class__ not in _LEAVES:
                    stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value if item.__class__ not in _LEAVES)
        else:
            raise MalformedRecord(f"view holds {_type(value)}")


def _expect(obj: dict[str, Any], key: str, kind: Any, default: Any) -> None:
    value = obj.get(key, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MalformedRecord(f"{key} is {_type(value)}, not {_name(kind)}")


def _name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace(" | None", " or nil")


def _type(value: Any) -> str:
    return "nil" if value is None else type(value).__name__
