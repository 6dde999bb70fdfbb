"""`spicetap stats`: per channel and message type counts, bytes, rates, duration, and how much
of the traffic the dissector understood."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dissectors.api import SPICE
from spicetap.inputs import AnyRecord


@dataclass
class Stats:
    first: float | None = None
    last: float | None = None
    messages: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    bytes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    channel_bytes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    not_fully_dissected: int = 0
    errors: int = 0
    seen_types: set[tuple[str, str, int]] = field(default_factory=set)
    connections: set[int] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)

    def add(self, rec: AnyRecord) -> None:
        if self.first is None:
            self.first = rec.time
        self.last = rec.time
        self.kinds[rec.kind] += 1
        self.connections.add(rec.connection)
        if rec.session is not None:
            self.sessions.add(rec.session)
        if rec.kind in ("error", "gap"):
            self.errors += 1
        if rec.kind not in ("message", "agent"):
            return
        name = rec.name or f"type {rec.msg_type}"
        channel = rec.channel if rec.kind == "message" else f"{rec.channel}/agent"
        key = (channel, rec.direction, name)
        self.messages[key] += 1
        self.bytes[key] += len(rec.raw)
        self.channel_bytes[channel] += len(rec.raw)
        if rec.not_fully_dissected:
            self.not_fully_dissected += 1
        if rec.kind == "message" and rec.msg_type is not None and rec.name is not None:
            self.seen_types.add((rec.channel, rec.direction, rec.msg_type))

    @property
    def duration(self) -> float:
        if self.first is None or self.last is None:
            return 0.0
        return self.last - self.first

    def coverage(self) -> dict[str, Any]:
        known = {(SPICE.channel_name(ch), d, t) for (ch, d, t) in SPICE.messages}
        channels = {c for c, _d, _t in self.seen_types}
        known_here = {k for k in known if k[0] in channels}
        return {
            "message_types_seen": len(self.seen_types),
            "message_types_known_in_these_channels": len(known_here),
            "message_types_known": len(known),
            "not_fully_dissected": self.not_fully_dissected,
            "errors": self.errors,
        }

    def to_dict(self) -> dict[str, Any]:
        per: dict[str, list[dict[str, Any]]] = defaultdict(list)
        d = self.duration or 1.0
        for (channel, direction, name), n in sorted(self.messages.items()):
            b = self.bytes[(channel, direction, name)]
            per[channel].append(
                {
                    "direction": direction,
                    "name": name,
                    "count": n,
                    "bytes": b,
                    "per_s": n / d,
                    "bytes_per_s": b / d,
                }
            )
        return {
            "duration": self.duration,
            "sessions": sorted(self.sessions),
            "connections": len(self.connections),
            "records": dict(self.kinds),
            "channels": {c: {"bytes": self.channel_bytes[c], "messages": per[c]} for c in per},
            "coverage": self.coverage(),
        }


def collect(records: Iterable[AnyRecord]) -> Stats:
    stats = Stats()
    for rec in records:
        stats.add(rec)
    return stats
