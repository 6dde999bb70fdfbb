"""Records to archive maps (with the privacy policy applied) and back to readable records.

Archive record map (docs/archive-format.md): seq, t (ns since the session's start), session,
ch ([channel type, channel id, connection]), channel (name), dir, kind, type, name,
raw (plaintext bytes, the source of truth; empty when redacted), view (decoded fields by
name; long byte strings shortened: raw has them), err, nfd (not fully dissected),
and, when the privacy policy removed content, redacted {reason, len[, sha256]}.
"""

from __future__ import annotations

import hashlib
from typing import Any

from dissectors.api import AGENT, SPICE, decode
from spicetap.archive.privacy import PrivacyPolicy, strip
from spicetap.archive.shape import check_record
from spicetap.records import Record

VIEW_BYTES = 256  # byte strings longer than this appear in the view as {len, head}
CHANNEL_TYPES = {name: number for number, (name, _t, _a) in SPICE.channels.items()}


_AS_IS = frozenset({int, str, float, bool, type(None)})  # what compact() keeps as it is


def compact(view: Any) -> Any:
    """The view with byte strings over VIEW_BYTES shortened, and memoryviews (a recording
    RecordBuilder's) made bytes; the very same object when nothing in it changes (a view is
    made for one record and not shared)."""
    return _shortened(view) if _needs_compacting(view) else view


def _needs_compacting(view: Any) -> bool:
    # Most views hold numbers, names and short lists: one walk, nothing built.
    cls = view.__class__
    if cls in _AS_IS:
        return False
    if cls is bytes:
        return len(view) > VIEW_BYTES
    if cls is memoryview:
        return True
    if cls is dict or cls is list:
        for value in view.values() if cls is dict else view:
            if value.__class__ not in _AS_IS and _needs_compacting(value):
                return True
    return False


def _shortened(view: Any) -> Any:
    if isinstance(view, bytes | memoryview):
        if len(view) <= VIEW_BYTES:
            return bytes(view)  # bytes as they are
        return {"len": len(view), "head": bytes(view[:32])}
    if isinstance(view, dict):
        return {k: _shortened(v) for k, v in view.items()}
    if isinstance(view, list):
        return [_shortened(v) for v in view]
    return view


def view_of(rec: Record) -> dict[str, Any] | None:
    """render.fields_of(rec), from the record's members: no Decoded made for it."""
    if rec.fields is not None:
        return rec.fields
    if rec.dialect is None or rec.decoded_fields is None or rec.struct is None:
        return None
    return rec.dialect.namer(rec.struct)(rec.decoded_fields)


def to_archive(rec: Record, t0: float, policy: PrivacyPolicy) -> dict[str, Any] | None:
    """The archive map for one record, or None when the policy drops it."""
    decision = policy.decision(rec.channel, rec.direction, rec.kind, rec.name, rec.agent_types)
    if not decision.keep:
        return None
    view = view_of(rec)
    if view is not None:
        view = compact(view)
        if decision.strip_view:
            view = strip(view, decision.strip_view, decision.hash_raw)
    out: dict[str, Any] = {
        "t": round((rec.time - t0) * 1e9),
        "session": rec.session,
        "ch": [CHANNEL_TYPES.get(rec.channel), rec.channel_id, rec.connection],
        "channel": rec.channel,
        "dir": rec.direction,
        "kind": rec.kind,
        "type": rec.msg_type,
        "name": rec.name,
        "raw": rec.raw,
        "view": view,
        "err": rec.error,
        "nfd": rec.not_fully_dissected,
    }
    if rec.dialect is not None and rec.kind in ("message", "agent"):
        # what a reader needs to decode raw again with its own (maybe newer) dissector
        out["hdr"] = len(rec.raw) - rec.size
        if rec.kind == "agent":
            out["variant"] = rec.channel_type
    if decision.redact is not None:
        redacted: dict[str, Any] = {"reason": decision.redact, "len": len(rec.raw)}
        if decision.hash_raw and rec.raw:
            redacted["sha256"] = hashlib.sha256(rec.raw).hexdigest()
        out["raw"] = b""
        out["redacted"] = redacted
    return out


def redecode(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, bool] | None:
    """Decode a record's raw bytes with this spicetap's dissector: (named fields, not fully
    dissected), or None when there is nothing to decode (redacted, or not a message)."""
    raw = obj.get("raw") or b""
    kind, hdr = obj.get("kind"), obj.get("hdr")
    if not isinstance(raw, bytes) or not isinstance(hdr, int) or kind not in ("message", "agent"):
        return None
    if not raw:
        return None
    msg_type, direction = obj.get("type"), obj.get("dir")
    if not isinstance(msg_type, int) or direction not in ("c2s", "s2c"):
        return None
    if kind == "agent":
        variant = obj.get("variant") or 0
        if not isinstance(variant, int):
            return None
        dec = decode(variant, direction, msg_type, raw[hdr:], AGENT)
    else:
        ch = (obj.get("ch") or [None])[0]
        if not isinstance(ch, int):
            return None
        dec = decode(ch, direction, msg_type, raw[hdr:])
    named = dec.named_fields()
    return (named if isinstance(named, dict) else None), not dec.fully_dissected


class ArchivedRecord:
    """A record read back from an archive, shaped like spicetap.records.Record for renderers
    and filters. Its fields are decoded again from `raw` (the source of truth) only when
    asked for; for redacted records, and when nothing can be decoded, the stored view."""

    __slots__ = (
        "_fields",
        "_nfd",
        "_obj",
        "channel",
        "channel_id",
        "connection",
        "direction",
        "error",
        "kind",
        "msg_type",
        "name",
        "raw",
        "redacted",
        "same_dissector",
        "seq",
        "session",
        "time",
    )

    decoded = None  # no live Decoded: `fields` holds the named view

    def __init__(self, obj: dict[str, Any], started: float, same_dissector: bool) -> None:
        check_record(obj, started)  # from here on, every field has its documented type
        ch = obj.get("ch", [None, 0, 0])
        self._obj = obj
        self.time = started + obj.get("t", 0) / 1e9
        self.session: int | None = obj.get("session")
        self.connection: int = ch[2]
        self.channel: str = obj.get("channel", "unknown")
        self.channel_id: int = ch[1]
        self.direction: str = obj.get("dir", "c2s")
        self.kind: str = obj.get("kind", "message")
        self.msg_type: int | None = obj.get("type")
        self.name: str | None = obj.get("name")
        self.raw: bytes = obj.get("raw", b"")
        self.error: str | None = obj.get("err")
        self.seq: int = obj.get("seq", 0)
        self.redacted: dict[str, Any] | None = obj.get("redacted")
        self.same_dissector = same_dissector
        self._fields: Any = _UNSET
        self._nfd: bool | None = bool(obj.get("nfd")) if same_dissector else None

    def _decode(self) -> None:
        fresh = redecode(self._obj)
        if fresh is None:
            self._fields, nfd = self._obj.get("view"), bool(self._obj.get("nfd"))
        else:
            self._fields, nfd = fresh
        if self._nfd is None:
            self._nfd = nfd

    @property
    def fields(self) -> dict[str, Any] | None:
        if self._fields is _UNSET:
            self._decode()
        result: dict[str, Any] | None = self._fields
        return result

    @property
    def not_fully_dissected(self) -> bool:
        if self._nfd is None:
            self._decode()
        return bool(self._nfd)


_UNSET: Any = object()


def from_archive(
    obj: dict[str, Any], started: float, same_dissector: bool = False
) -> ArchivedRecord:
    """`same_dissector`: the archive was written by this very dissector, so its stored
    "not fully dissected" flags hold and nothing needs decoding unless fields are read."""
    return ArchivedRecord(obj, started, same_dissector)
