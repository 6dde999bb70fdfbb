"""The end record of a compressed archive, read from its last zstd frame, so that listing
many archives (`spicetap sessions`) need not decompress each whole.

A compressed archive is whole zstd frames, one per flush of the writer, and a flush
writes whole objects (spicetap.archive.writer), so the last frame starts at an object and
a finished archive's last object is its end record. The frames are walked by their
headers alone (RFC 8878 §3.1.1), without decompressing any but the last. Like
spicetap.archive.tail this reads and does not verify; where the frames cannot be walked
(damage) it says so, and the archive is read through instead."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from spicetap.archive import format as fmt

SKIPPABLE = 0x184D2A50  # skippable frames: this magic's low 4 bits are free (§3.1.2)
# Frame_Header_Descriptor: content size flag (2 bits), single segment, unused, reserved,
# checksum, dictionary id flag (2 bits)
ID_BYTES = (0, 1, 2, 4)
SIZE_BYTES = (0, 2, 4, 8)  # flag 0 with a single segment: 1
BLOCK_HEADER = 3  # little-endian: last (1 bit), type (2 bits), size (21 bits)
RAW, RLE, COMPRESSED = 0, 1, 2
CHECKSUM = 4
ARRAY_OF_TWO_OBJECTS = 2


class TailUnreadable(Exception):
    """The file's frames or its last frame's objects cannot be read this way."""


def _frame_end(data: mmap.mmap, at: int) -> int | None:
    """Where the zstd frame starting at `at` ends, or None when the data ends first."""
    size = len(data)
    if at + 4 > size:
        return None
    magic = int.from_bytes(data[at : at + 4], "little")
    if magic & 0xFFFFFFF0 == SKIPPABLE:
        if at + 8 > size:
            return None
        end = at + 8 + int.from_bytes(data[at + 4 : at + 8], "little")
        return end if end <= size else None
    if data[at : at + 4] != fmt.ZSTD_MAGIC:
        raise TailUnreadable(f"no zstd frame at byte {at}")
    if at + 5 > size:
        return None
    descriptor = data[at + 4]
    if descriptor & 0x08:
        raise TailUnreadable(f"reserved bit set in the frame at byte {at}")
    single = bool(descriptor & 0x20)
    size_flag = descriptor >> 6
    content_size = 1 if single and size_flag == 0 else SIZE_BYTES[size_flag]
    pos = at + 5 + (0 if single else 1) + ID_BYTES[descriptor & 0x03] + content_size
    while True:
        if pos + BLOCK_HEADER > size:
            return None
        header = int.from_bytes(data[pos : pos + BLOCK_HEADER], "little")
        kind = (header >> 1) & 0x03
        if kind not in (RAW, RLE, COMPRESSED):
            raise TailUnreadable(f"reserved block type in the frame at byte {at}")
        pos += BLOCK_HEADER + (1 if kind == RLE else header >> 3)
        if header & 1:  # the frame's last block
            break
    pos += CHECKSUM if descriptor & 0x04 else 0
    return pos if pos <= size else None


def last_frame(data: mmap.mmap) -> tuple[int, int] | None:
    """Start and end of the last whole frame (a frame the data ends inside is not), or None
    when there is none. TailUnreadable when the frames cannot be walked."""
    at, last = 0, None
    while at < len(data):
        end = _frame_end(data, at)
        if end is None:
            break
        if int.from_bytes(data[at : at + 4], "little") & 0xFFFFFFF0 != SKIPPABLE:
            last = (at, end)
        at = end
    return last


def compressed_end_at_tail(path: Path) -> dict[str, Any] | None:
    """The end record a compressed archive's last whole frame ends with, or None.
    TailUnreadable when that cannot be told without reading the file through; OSError
    when it cannot be read."""
    with path.open("rb") as f:
        if f.seek(0, 2) == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = last_frame(data)
            if found is None:
                return None
            try:
                content = (
                    zstandard.ZstdDecompressor()
                    .decompressobj()
                    .decompress(data[found[0] : found[1]])
                )
            except zstandard.ZstdError as exc:
                raise TailUnreadable(f"the last frame: {exc}") from None
    return _end_of(content)


def _end_of(content: bytes) -> dict[str, Any] | None:
    """The end record `content` (whole objects) ends with, or None."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(content) + 1)
    unpacker.feed(content)
    last: Any = None
    try:
        for obj in unpacker:
            last = obj
        whole = unpacker.tell() == len(content)
        if not whole or not _is_object(last):
            raise TailUnreadable("the last frame is not whole objects")
        record = msgpack.unpackb(last[0], raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise TailUnreadable("the last frame is not whole objects") from None
    return record if isinstance(record, dict) and record.get("kind") == "end" else None


def _is_object(obj: Any) -> bool:
    """[payload: bin, chain: bin 32], as every object of an archive is."""
    return (
        isinstance(obj, list)
        and len(obj) == ARRAY_OF_TWO_OBJECTS
        and isinstance(obj[0], bytes)
        and isinstance(obj[1], bytes)
        and len(obj[1]) == fmt.CHAIN_SIZE
    )
