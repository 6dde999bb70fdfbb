"""Streaming, append-only archive writer with a bounded loss window and rotation.

Records are framed and chained as they arrive, kept in a small buffer and written out when
the buffer reaches `max_buffer` bytes; every byte is the kernel's once its oldest record is
`interval` seconds old (checked on every write and on `tick()`), so a process killed with
SIGKILL loses at most that window, and the reader stops cleanly at the last whole record.
The file is written around the page cache where it can be (appender.py).
With compression each flush is one zstd frame, so the same holds for compressed archives.
Nothing of the session is held beyond the buffer and the file's stages (appender.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spicetap import __version__
from spicetap.archive import format as fmt
from spicetap.archive.appender import Appender
from spicetap.archive.keys import raw_public

# A record's raw bytes this long are written from where they are (see _append_direct);
# shorter ones are copied into the buffer, where many share one write.
DIRECT_RAW = 256 * 1024


@dataclass(frozen=True)
class FlushPolicy:
    interval: float = 0.1  # seconds a record may wait in memory: the loss window on a crash
    max_buffer: int = 1 << 20
    fsync: bool = False  # also survive power loss, at a cost per flush
    # Write around the page cache (O_DIRECT) where the filesystem allows (appender.py).
    direct: bool = True
    # Written through the page cache, hand its pages back to the free pool as the archive
    # grows (Appender._release_cache); False keeps them cached.
    release_cache: bool = True


@dataclass(frozen=True)
class Rotation:
    max_bytes: int | None = None  # start a new part past this size
    max_seconds: float | None = None  # or past this age


def part_path(first: Path, part: int) -> Path:
    if part == 1:
        return first
    name = first.name
    for suffix in (fmt.ZSTD_SUFFIX, fmt.SUFFIX):
        if name.endswith(suffix):
            return first.with_name(f"{name[: -len(suffix)]}.part{part}{suffix}")
    return first.with_name(f"{name}.part{part}")


class ArchiveWriter:
    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        *,
        signing_key: Ed25519PrivateKey | None = None,
        flush: FlushPolicy = FlushPolicy(),
        rotation: Rotation = Rotation(),
        compress: bool = False,
        clock: Callable[[], float] = time.monotonic,
        chain_hash: str = fmt.DEFAULT_CHAIN_HASH,
    ) -> None:
        if chain_hash not in fmt.CHAIN_HASHES:  # a caller's mistake: config checks users'
            raise ValueError(f"unknown chain hash {chain_hash!r}")
        self.chain_hash = chain_hash
        self.first_path = path
        self.base_header = dict(header)
        self.key = signing_key
        self.policy = flush
        self.rotation = rotation
        self.compressor = (
            zstandard.ZstdCompressor(level=3, write_checksum=True) if compress else None
        )
        self.clock = clock
        self.packer = fmt.packer(autoreset=False)
        self.seq = 0
        self.part = 0
        self.paths: list[Path] = []
        self.closed = False
        self._open_part(previous=None)

    # -- parts -----------------------------------------------------------------------------
    def _open_part(self, previous: dict[str, Any] | None) -> None:
        self.part += 1
        path = part_path(self.first_path, self.part)
        path.parent.mkdir(parents=True, exist_ok=True)
        policy = self.policy
        self._file = Appender(
            path, direct=policy.direct, release_cache=policy.release_cache, fsync=policy.fsync
        )
        self.paths.append(path)
        header = {
            "format": fmt.MAGIC,
            "version": fmt.VERSION,
            "spicetap": __version__,
            **self.base_header,
            "part": self.part,
            "previous": previous,
            "compressed": self.compressor is not None,
            "chain_hash": self.chain_hash,
        }
        payload = fmt.pack_payload(header)
        self.header_chain = self.chain = fmt.chain_start(payload, self.chain_hash)
        self.part_records = 0
        self.part_started = self.clock()
        self._buf = bytearray(fmt.frame(payload, self.chain))
        self._oldest: float | None = self.clock()
        self._write_out(push=True)  # a new archive has its header at once

    def _rotate_if_due(self) -> None:
        r = self.rotation
        too_big = r.max_bytes is not None and self.part_bytes + len(self._buf) >= r.max_bytes
        too_old = r.max_seconds is not None and self.clock() - self.part_started >= r.max_seconds
        if too_big or too_old:
            nxt = part_path(self.first_path, self.part + 1).name
            self._finish_part("rotated", next_part=nxt)
            prev = {"file": self.paths[-1].name, "chain": self.chain.hex(), "seq": self.seq}
            self._open_part(previous=prev)

    # -- writing ---------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> int:
        """Append one record (seq is assigned here); returns its sequence number."""
        if self.closed:
            raise ValueError("archive is closed")
        seq = self.seq
        self.seq += 1
        record["seq"] = seq
        raw = record.get("raw")
        direct = self.compressor is None and isinstance(raw, bytes) and len(raw) >= DIRECT_RAW
        if direct:
            self._append_direct(record)  # written out, all but its chain
        else:
            self._append(record)
        self.part_records += 1
        now = self.clock()
        if self._oldest is None:
            self._oldest = now
        if now - self._oldest >= self.policy.interval:
            self._write_out(push=True)
            self._rotate_if_due()
        elif len(self._buf) >= self.policy.max_buffer:
            self._write_out()
            self._rotate_if_due()
        elif direct:  # a stream of long records alone must rotate too
            self._rotate_if_due()
        return seq

    def _append(self, record: dict[str, Any]) -> None:
        # The payload stays in the packer's buffer: hashed and copied into ours from there,
        # once (packing [payload, chain] would copy a megabyte payload twice more).
        packer = self.packer
        packer.pack(record)
        payload = packer.getbuffer()
        try:
            self.chain = chain = fmt.chain_next(self.chain, payload, self.chain_hash)
            buf = self._buf
            buf += fmt.frame_head(len(payload))
            buf += payload
            buf += fmt.CHAIN_HEAD
            buf += chain
        finally:
            payload.release()
            packer.reset()

    def _append_direct(self, record: dict[str, Any]) -> None:
        """_append for a record whose raw is long: its payload is the same map with raw
        packed last, so the raw bytes are hashed and written from where they are instead of
        being copied into the packer and then into the buffer (two copies of a megabyte of
        display data per message). Written out at once: the buffer, then the raw."""
        raw = record["raw"]
        packer = self.packer
        packer.pack_map_header(len(record))
        for key, value in record.items():
            if key != "raw":
                packer.pack(key)
                packer.pack(value)
        packer.pack("raw")
        head = bytes(packer.getbuffer()) + fmt.bin_head(len(raw))
        packer.reset()
        self.chain = chain = fmt.chain_next_parts(self.chain, head, raw, algo=self.chain_hash)
        self._buf += fmt.frame_head(len(head) + len(raw))
        self._buf += head
        self._write_out()
        self._to_file(raw)
        self._buf += fmt.CHAIN_HEAD
        self._buf += chain

    def tick(self) -> None:
        """Call now and then while idle: writes out records older than the flush interval."""
        due = self._oldest is not None and self.clock() - self._oldest >= self.policy.interval
        if due:
            self._write_out(push=True)
            self._rotate_if_due()

    def flush(self) -> None:
        self._write_out(push=True)

    def _write_out(self, push: bool = False) -> None:
        """Hand the buffer to the file; with `push`, every byte to the kernel."""
        if self._buf:
            data: bytes | bytearray = self._buf  # written as it is: no copy of the buffer
            if self.compressor is not None:
                data = self.compressor.compress(data)  # one whole zstd frame per flush
            self._to_file(data)
            self._buf.clear()
        if push:
            self._file.push()
        if not self._file.held:
            self._oldest = None

    def _to_file(self, data: bytes | bytearray) -> None:
        self._file.write(data)

    @property
    def part_bytes(self) -> int:
        """Bytes of this part handed to the file (the buffer's not yet)."""
        return self._file.size

    # -- ending ----------------------------------------------------------------------------
    def _finish_part(
        self, status: str, next_part: str | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        end: dict[str, Any] = {
            "seq": self.seq,
            "kind": "end",
            "status": status,
            "records": self.part_records,
            "ended": time.time(),
            "next": next_part,
            **(extra or {}),
        }
        if self.key is not None:
            message = fmt.signed_message(self.header_chain, self.chain, self.part_records)
            end["signature"] = self.key.sign(message)
            end["public_key"] = raw_public(self.key.public_key())
        self._append(end)
        self._write_out()
        self._file.close()  # pushes what it holds

    def close(self, status: str = "complete", extra: dict[str, Any] | None = None) -> None:
        """Write the signed end record and close. `status` says why the session ended."""
        if self.closed:
            return
        self._finish_part(status, extra=extra)
        self.closed = True

    def abandon(self) -> None:
        """Close without an end record (tests use it to stand for a crash)."""
        if not self.closed:
            self._write_out()
            self._file.close()
        self.closed = True
