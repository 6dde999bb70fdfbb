"""Read archives as streams: never all in memory; a truncated tail is reported, not fatal."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack
import zstandard

from spicetap.archive import format as fmt

READ_CHUNK = 1 << 16  # small reads keep damage in a compressed frame local to it
MAX_OBJECT = 1 << 30  # one record never exceeds this; a bigger length is damage, not data


class ArchiveError(Exception):
    """The file is not a readable spicetap archive (one-line message naming the file)."""


@dataclass(frozen=True, slots=True)
class Entry:
    payload: bytes  # exactly as written: the chain covers these bytes
    chain: bytes
    obj: dict[str, Any]
    offset: int  # position of the object in the (decompressed) stream


# Migrations: version N -> N+1, applied in order to every header and record read.
Migration = Callable[[dict[str, Any]], dict[str, Any]]


def _same(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


# from version: (header, record). 1 -> 2 changes no map: version 2 headers name their chain
# hash, and one that names none chains with SHA-256 (format.chain_hash_of).
MIGRATIONS: dict[int, tuple[Migration, Migration]] = {1: (_same, _same)}


def migrate(version: int, header: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """Bring a header (record=None) or a record from `version` up to the current version."""
    obj = header if record is None else record
    v = version
    while v < fmt.VERSION:
        step = MIGRATIONS.get(v)
        if step is None:
            raise ArchiveError(f"no migration from archive format version {v}")
        obj = step[0](obj) if record is None else step[1](obj)
        v += 1
    return obj


def _open_stream(path: Path) -> IO[bytes]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ArchiveError(f"{path}: is a directory") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read ({exc.strerror})") from None
    head = f.read(4)
    f.seek(0)
    if head == fmt.ZSTD_MAGIC:
        return _ZstdFrames(f)  # type: ignore[return-value]
    return f


class _ZstdFrames:
    """Decompress one zstd frame after another, so a damaged frame (its checksum fails) does
    not take the good frames before it along: each flush of the writer is one frame."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.pending = b""
        self.in_frame = False  # bytes of an unfinished frame were consumed
        self.incomplete = False  # the file ended inside a frame
        self.read_from_file = 0
        self.frame_end = 0  # file offset just past the last whole frame

    def read(self, _size: int) -> bytes:
        while True:
            chunk = self.pending
            if not chunk:
                chunk = self.f.read(READ_CHUNK)
                self.read_from_file += len(chunk)
            self.pending = b""
            if not chunk:
                self.incomplete = self.in_frame
                return b""
            self.in_frame = True
            out = self.obj.decompress(chunk)
            if self.obj.eof:  # frame complete: what follows starts the next frame
                self.pending = self.obj.unused_data
                self.frame_end = self.read_from_file - len(self.pending)
                self.obj = self.dctx.decompressobj()
                self.in_frame = False
            if out:
                return out

    def close(self) -> None:
        self.f.close()


class ArchiveReader:
    """Iterate the entries of one archive file (header first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.truncated = False
        self.damaged: str | None = None  # why reading stopped early, when not a clean end
        self.version = 0
        self.end: dict[str, Any] | None = None  # the end record, once reached
        self.stop_offset: int | None = None  # where an unfinished object starts
        self._stream = _open_stream(path)
        self._file = self._stream.f if isinstance(self._stream, _ZstdFrames) else self._stream
        self.compressed = isinstance(self._stream, _ZstdFrames)
        self._unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=MAX_OBJECT, max_bin_len=MAX_OBJECT, strict_map_key=False
        )
        self._eof = False
        self._fed = 0  # bytes of the (decompressed) stream given to the unpacker
        try:
            self.header = self._read_header()
        except ArchiveError:
            self._stream.close()
            raise

    def _read_header(self) -> dict[str, Any]:
        first = next(self._entries(), None)
        if first is None:
            if self.truncated:
                raise ArchiveError(f"{self.path}: truncated inside the archive header")
            if self.damaged:
                raise ArchiveError(f"{self.path}: damaged archive header ({self.damaged})")
            raise ArchiveError(f"{self.path}: not a spicetap archive ({self.damaged or 'empty'})")
        header = first.obj
        if header.get("format") != fmt.MAGIC or not isinstance(header.get("version"), int):
            raise ArchiveError(f"{self.path}: not a spicetap archive (no valid header)")
        version = header.get("version")
        if not isinstance(version, int) or version > fmt.VERSION:
            raise ArchiveError(
                f"{self.path}: archive format version {version} is newer than this spicetap "
                f"reads ({fmt.VERSION}); upgrade spicetap"
            )
        self.version = version
        self.header_entry = first
        return migrate(version, header, None)

    def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            data = self._stream.read(READ_CHUNK)
        except zstandard.ZstdError as exc:  # frames carry checksums: this is damage
            self._eof = True
            self.damaged = f"compressed data is damaged ({exc})"
            return False
        if not data:
            self._eof = True
            if getattr(self._stream, "incomplete", False):
                self.truncated = True
                self.damaged = self.damaged or "the file ends inside a compressed frame"
            return False
        self._unpacker.feed(data)
        self._fed += len(data)
        return True

    def _entries(self) -> Iterator[Entry]:
        up = self._unpacker
        # where the object being read begins: tell() moves on inside an object that spans
        # two reads, so it is taken once an object is whole
        start = up.tell()
        while True:
            offset = start
            try:
                obj = up.unpack()
            except msgpack.OutOfData:
                if self._fill():
                    continue
                if self.damaged is None and (up.tell() != offset or self._has_leftover()):
                    self.truncated = True
                    self.damaged = self.damaged or f"truncated at byte {offset}"
                    self.stop_offset = offset
                return
            except (
                ValueError,
                TypeError,
                msgpack.ExtraData,
                msgpack.FormatError,
                msgpack.StackError,
            ) as exc:
                self.damaged = f"unreadable object at byte {offset} ({type(exc).__name__})"
                return
            if not (
                isinstance(obj, list)
                and len(obj) == 2
                and isinstance(obj[0], bytes)
                and isinstance(obj[1], bytes)
            ):
                self.damaged = f"object at byte {offset} is not [payload, chain]"
                return
            try:
                inner = msgpack.unpackb(obj[0], raw=False, strict_map_key=False)
            except (
                ValueError,
                TypeError,
                msgpack.ExtraData,
                msgpack.FormatError,
                msgpack.StackError,
            ):
                self.damaged = f"payload at byte {offset} is not msgpack"
                return
            if not isinstance(inner, dict):
                self.damaged = f"payload at byte {offset} is not a map"
                return
            start = up.tell()
            yield Entry(obj[0], obj[1], inner, offset)

    def _has_leftover(self) -> bool:
        # msgpack keeps bytes of a partial object buffered: any byte left means truncation
        try:
            return bool(self._unpacker.read_bytes(1))
        except ValueError:  # "an object is incomplete": bytes are left indeed
            return True

    def entries(self) -> Iterator[Entry]:
        """Entries after the header, records migrated to the current version."""
        # records of an older version go through its migrations, unless none changes them
        steps = range(self.version, fmt.VERSION)
        migrating = any(MIGRATIONS.get(v, (_same, None))[1] is not _same for v in steps)
        for entry in self._entries():
            if migrating:
                entry = Entry(
                    entry.payload,
                    entry.chain,
                    migrate(self.version, self.header, entry.obj),
                    entry.offset,
                )
            yield entry

    def records(self) -> Iterator[dict[str, Any]]:
        """Data records; the end record, when present, is left in `self.end`."""
        for entry in self.entries():
            if entry.obj.get("kind") == "end":
                self.end = entry.obj
                return
            yield entry.obj

    def bytes_after_end(self) -> int | None:
        """Once records() has reached the end record: how many bytes the file holds after
        it (nothing may), without reading them. For a compressed file, the bytes of its
        frame after it and the file's bytes after that frame; None while that frame goes
        on (it is not known yet where it ends)."""
        end: int = self._unpacker.tell()
        buffered = self._fed - end
        size = os.fstat(self._file.fileno()).st_size
        if not isinstance(self._stream, _ZstdFrames):
            return size - end
        if self._stream.in_frame:
            return None
        return buffered + size - self._stream.frame_end

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
