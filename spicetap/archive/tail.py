"""The end record of an uncompressed archive, read from the file's last bytes, so that
listing many archives (`spicetap sessions`) need not read each whole.

Each object of an archive is `[payload: bin, chain: bin 32]` (spicetap.archive.format): the
byte 0x92 (a 2-element array), the payload's bin header (0xc4 and a 1-byte length, 0xc5 and
2 bytes, 0xc6 and 4, big-endian), the payload, then 0xc4 0x20 and the 32-byte chain. A
finished archive's last object is its end record. This reads; it does not verify (the
chain and the signature are `spicetap verify`'s): an archive whose last object is no end
record, cut short or still being written, has none here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

TAIL = 4096  # an end record is a few hundred bytes (signature and key included)
CHAIN_HEADER = b"\xc4\x20"  # bin 8 of 32 bytes
CHAIN = 32
BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}
ARRAY_OF_TWO = 0x92


def end_at_tail(path: Path) -> dict[str, Any] | None:
    """The end record the file ends with, or None. OSError when it cannot be read."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - TAIL))
        tail = f.read()
    body_end = len(tail) - CHAIN - len(CHAIN_HEADER)
    if body_end < 2 or tail[body_end : body_end + 2] != CHAIN_HEADER:
        return None
    for start in range(body_end - 2, -1, -1):  # the nearest object start that fits
        if tail[start] != ARRAY_OF_TWO:
            continue
        width = BIN_LENGTH_BYTES.get(tail[start + 1])
        payload = start + 2 + (width or 0)
        if width is None or payload > body_end:
            continue
        if payload + int.from_bytes(tail[start + 2 : payload], "big") != body_end:
            continue
        try:
            obj = msgpack.unpackb(tail[payload:body_end], raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            continue
        if isinstance(obj, dict) and obj.get("kind") == "end":
            return obj
    return None
