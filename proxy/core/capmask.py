"""Which capability bits the proxy clears in the link stage, by name.

Names are SCOPE:CAP, case-insensitive, from our generated capability definitions
(dissectors/defs/caps.proto): SCOPE is `common` or a channel name (`display`, `main`, ...)
and CAP a bit name of that set (`display:codec_h264`, `common:mini_header`).

Masking is symmetric: a masked bit is cleared both in the viewer's LinkMess (so the server
believes the viewer lacks it) and in the server's LinkReply (so the viewer believes the
server lacks it). Each side then computes "both have it" as false, so the two ends agree
on every decision taken from the caps (codecs, compression, mini header, auth selection).
Clearing only one side is not enough for common caps: the viewer would still use the mini
header if only its own announcement were cleared.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dissectors.api import CAPS, SPICE

COMMON = "common"
U32 = struct.Struct("<I")


def _scopes() -> dict[str, tuple[int | None, dict[str, int]]]:
    """scope name -> (channel type or None for common, {CAP name: bit index})."""
    numbers = {name: number for number, (name, _t, _a) in SPICE.channels.items()}
    out: dict[str, tuple[int | None, dict[str, int]]] = {}
    for enum, (_kind, items) in CAPS.enums.items():
        scope = enum.removesuffix("_caps")
        channel = None if scope == COMMON else numbers[scope]
        out[scope] = (channel, {name.lower(): bit for name, bit in items})
    return out


SCOPES = _scopes()


def valid_names() -> list[str]:
    return [f"{scope}:{cap}" for scope, (_ch, caps) in SCOPES.items() for cap in caps]


class UnknownCap(ValueError):
    pass


@dataclass(frozen=True)
class CapMask:
    """Bits to clear: `common` applies to every channel; `channel` per channel type.
    Masks are Python ints over all words (bit i of word w is bit 32*w + i)."""

    common: int = 0
    channel: dict[int, int] = field(default_factory=dict)
    names: tuple[str, ...] = ()  # as configured, normalised: for logs and the archive

    @classmethod
    def parse(cls, names: list[str] | tuple[str, ...]) -> CapMask:
        common = 0
        channel: dict[int, int] = {}
        seen: list[str] = []
        for raw in names:
            text = raw.strip().lower()
            if not text:
                continue
            scope, _, cap = text.partition(":")
            entry = SCOPES.get(scope)
            if entry is None or cap not in entry[1]:
                raise UnknownCap(f"unknown capability {raw!r}; valid: {', '.join(valid_names())}")
            ctype, bits = entry
            if ctype is None:
                common |= 1 << bits[cap]
            else:
                channel[ctype] = channel.get(ctype, 0) | 1 << bits[cap]
            if text not in seen:
                seen.append(text)
        return cls(common, channel, tuple(seen))

    def __bool__(self) -> bool:
        return bool(self.common or any(self.channel.values()))

    def clear(
        self, data: bytearray, offset: int, n_common: int, n_channel: int, channel_type: int
    ) -> list[str]:
        """Clear masked bits in the caps words at `offset` of `data` (in place); returns
        the names of bits that were set and are now cleared."""
        cleared: list[str] = []
        for scope, mask, base, count in (
            (COMMON, self.common, offset, n_common),
            (None, self.channel.get(channel_type, 0), offset + 4 * n_common, n_channel),
        ):
            # Only the words the mask reaches and the message holds: the counts come from
            # the peer, and 2**32 words announced in 38 bytes must not mean 2**32 turns.
            in_data = max(0, (len(data) - base) // 4)
            for w in range(min(count, (mask.bit_length() + 31) // 32, in_data)):
                word_mask = mask >> (32 * w) & 0xFFFFFFFF
                if not word_mask:
                    continue
                pos = base + 4 * w
                (word,) = U32.unpack_from(data, pos)
                hit = word & word_mask
                if hit:
                    U32.pack_into(data, pos, word & ~word_mask & 0xFFFFFFFF)
                    cleared += _bit_names(scope, channel_type, hit, w)
        return cleared


def _bit_names(scope: str | None, channel_type: int, bits: int, word: int) -> list[str]:
    if scope is None:
        scope = next((s for s, (ct, _c) in SCOPES.items() if ct == channel_type), "unknown")
    by_bit = {bit: name for name, bit in SCOPES.get(scope, (None, {}))[1].items()}
    return [
        f"{scope}:{by_bit.get(32 * word + i, f'bit{32 * word + i}')}"
        for i in range(32)
        if bits >> i & 1
    ]
