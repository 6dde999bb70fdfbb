"""Render records for people (one line, a tree) and for programs (JSON lines).

JSON schema (one object per record, keys always present, version 1):
  time (float, capture epoch seconds), session (int or null: the session's connection id),
  connection (int), channel (str), channel_id (int), direction ("c2s" | "s2c"),
  kind ("open" | "link" | "message" | "agent" | "auth" | "rewrite" | "tls" | "error" | "gap"
  | "close"),
  type (int or null),
  name (str or null), size (int, raw bytes), fields (object or null),
  flags: {"error": str or null, "not_fully_dissected": bool}.
Inside fields: enum values are item names (the number when unknown); flags are lists of
bit names (plus the number of unknown bits); byte strings are {"len": N, "hex": "..."} with
at most the first 64 bytes in hex; a NULL pointer is null.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol


class Decodable(Protocol):
    def named_fields(self) -> Any: ...


class Record(Protocol):
    """What renderers need: a live record (spicetap.records) or one read from an archive."""

    @property
    def time(self) -> float: ...
    @property
    def session(self) -> int | None: ...
    @property
    def connection(self) -> int: ...
    @property
    def channel(self) -> str: ...
    @property
    def channel_id(self) -> int: ...
    @property
    def direction(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def msg_type(self) -> int | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def raw(self) -> bytes: ...
    @property
    def decoded(self) -> Decodable | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def fields(self) -> dict[str, Any] | None: ...
    @property
    def not_fully_dissected(self) -> bool: ...


JSON_VERSION = 1
_HEX_LIMIT = 64


def fields_of(rec: Record) -> dict[str, Any] | None:
    if rec.fields is not None:
        return rec.fields
    if rec.decoded is not None:
        named = rec.decoded.named_fields()
        return named if isinstance(named, dict) else None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return {"len": len(data), "hex": data[:_HEX_LIMIT].hex()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN (SPICE has no floats: a stored view's)
    return value


def to_json(rec: Record) -> str:
    fields = fields_of(rec)
    obj = {
        "time": rec.time,
        "session": rec.session,
        "connection": rec.connection,
        "channel": rec.channel,
        "channel_id": rec.channel_id,
        "direction": rec.direction,
        "kind": rec.kind,
        "type": rec.msg_type,
        "name": rec.name,
        "size": len(rec.raw),
        "fields": _jsonable(fields) if fields is not None else None,
        "flags": {"error": rec.error, "not_fully_dissected": rec.not_fully_dissected},
    }
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _short(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) <= 24 and all(32 <= c < 127 for c in data.rstrip(b"\0")):
            return repr(data.rstrip(b"\0").decode("ascii"))
        return f"<{len(data)} bytes>"
    if isinstance(value, dict):
        return "{…}"
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return "|".join(value)  # flag names
        if len(value) <= 4 and all(isinstance(v, int | str) for v in value):
            return "[" + ",".join(map(str, value)) + "]"
        return f"[{len(value)} items]"
    return str(value)


def _flatten(prefix: str, value: dict[str, Any], parts: list[str], depth: int) -> None:
    for key, v in value.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            if v.keys() >= _RECT:
                parts.append(f"{name}=({v['left']},{v['top']})-({v['right']},{v['bottom']})")
            elif v and depth < 3:
                _flatten(f"{key}.", v, parts, depth + 1)  # keep names short: last level only
        else:
            parts.append(f"{name}={_short(v)}")


_RECT = {"top", "left", "bottom", "right"}


def summary(rec: Record, width: int = 90) -> str:
    if rec.error and rec.kind in ("error", "gap"):
        return rec.error
    parts: list[str] = []
    _flatten("", fields_of(rec) or {}, parts, 0)
    text = " ".join(parts)
    if rec.error:
        text = f"[error: {rec.error}] " + text
    elif rec.not_fully_dissected:
        text = "[not fully dissected] " + text
    return text if len(text) <= width else text[: width - 1] + "…"


def line(rec: Record, t0: float) -> str:
    name = rec.name or (f"type {rec.msg_type}" if rec.msg_type is not None else rec.kind)
    if rec.kind == "agent":
        name = f"agent:{name}"
    elif rec.kind in ("link", "rewrite", "auth"):
        name = f"{rec.kind}:{name}"
    chan = f"{rec.channel}:{rec.channel_id}"
    return (
        f"{rec.time - t0:10.6f} #{rec.connection:<3} {chan:<12} {rec.direction} "
        f"{name:<26} {summary(rec)}"
    )


def tree(rec: Record, t0: float) -> list[str]:
    out = [line(rec, t0)]
    fields = fields_of(rec)
    if fields is not None:
        _tree(fields, "    ", out)
    return out


def _tree(value: dict[str, Any], indent: str, out: list[str]) -> None:
    for key, v in value.items():
        if isinstance(v, dict):
            out.append(f"{indent}{key}:")
            _tree(v, indent + "    ", out)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            out.append(f"{indent}{key}: [{len(v)}]")
            for i, item in enumerate(v):
                out.append(f"{indent}    [{i}]:")
                _tree(item, indent + "        ", out)
        elif isinstance(v, bytes | bytearray | memoryview):
            data = bytes(v)
            more = "…" if len(data) > 32 else ""
            out.append(f"{indent}{key}: <{len(data)} bytes> {data[:32].hex()}{more}")
        else:
            out.append(f"{indent}{key}: {v}")
