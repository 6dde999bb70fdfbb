"""The spicetap archive format, version 2 (specified in docs/archive-format.md).

An archive is a stream of msgpack objects. Each is a 2-element array
`[payload: bin, chain: bin(32)]`, where payload is the msgpack encoding of one map and
chain = H(previous chain || payload), H the hash the header names (`chain_hash`: BLAKE3 by
default, or SHA-256; version 1 archives name none and use SHA-256). The first object is the
header (its chain is H(payload)); then one record per event in arrival order; a finished
archive ends with an `end` record carrying an Ed25519 signature over the chain. Hashing
the payload bytes as written (not a re-encoding) lets a reader in any language verify the
chain.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any, Protocol

import blake3
import msgpack

MAGIC = "spicetap-archive"
VERSION = 2  # 2: the header names the chain's hash (chain_hash)
# unchanged in version 2: the signature covers the header's chain, and the header names
# the hash
SIGNATURE_CONTEXT = b"spicetap-archive-v1 end"
SUFFIX = ".spta"
ZSTD_SUFFIX = ".spta.zst"
# zstd frame magic, little-endian 0xFD2FB528: compressed archives are told apart by content.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Record kinds.
KINDS = (
    *("link", "message", "agent", "auth", "rewrite", "tls", "error", "gap", "open", "close"),
    "end",
)


SMALL_PAYLOAD = 4096


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def digest(self) -> bytes: ...


# The chain's hash, by the name a header gives it. BLAKE3 is the default: the chain hashes
# every byte recorded, and measured on a Xeon without SHA extensions SHA-256 ran at 0.24
# GB/s (4 CPU s per GB recorded, most of the recording process's time) and BLAKE3 at 3.6.
# Both give 32 bytes.
CHAIN_HASHES: dict[str, Callable[[bytes], _Hash]] = {
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,
}
DEFAULT_CHAIN_HASH = "blake3"
V1_CHAIN_HASH = "sha256"  # a version 1 header names none


def chain_next(previous: bytes, payload: bytes | memoryview, algo: str) -> bytes:
    """H(previous || payload), H the hash named `algo` (see CHAIN_HASHES)."""
    if len(payload) < SMALL_PAYLOAD:  # one call is cheaper than two for most records
        return CHAIN_HASHES[algo](previous + payload).digest()
    return chain_next_parts(previous, payload, algo=algo)  # no copy of a megabyte payload


def chain_next_parts(previous: bytes, *parts: bytes | memoryview, algo: str) -> bytes:
    """H(previous || parts...), for a payload written in parts."""
    digest = CHAIN_HASHES[algo](previous)
    for part in parts:
        digest.update(part)
    return digest.digest()


def chain_start(header_payload: bytes, algo: str) -> bytes:
    return CHAIN_HASHES[algo](header_payload).digest()


def chain_hash_of(header: dict[str, Any]) -> str:
    """The chain hash a header names (a version 1 header: SHA-256); ValueError if unknown."""
    algo = header.get("chain_hash", V1_CHAIN_HASH)
    if not isinstance(algo, str) or algo not in CHAIN_HASHES:
        known = ", ".join(CHAIN_HASHES)
        raise ValueError(f"unknown chain hash {algo!r} (this spicetap knows {known})")
    return str(algo)


def packer(autoreset: bool = True) -> Any:
    """A reusable msgpack Packer (one per writer: a Packer is not thread-safe).
    autoreset=False: pack() keeps the bytes in the packer, for getbuffer() and reset()."""
    return msgpack.Packer(use_bin_type=True, autoreset=autoreset)


def pack_payload(obj: dict[str, Any], with_packer: Any = None) -> bytes:
    data: bytes = (with_packer or packer()).pack(obj)
    return data


# An object's bytes, as msgpack packs [payload, chain] (use_bin_type, smallest headers):
# fixarray of 2, the payload as bin 8/16/32, the chain as bin 8. Written by hand around
# the payload, so that it is copied once into the output, not packed a second time.
_HEAD8 = struct.Struct(">BBB")
_HEAD16 = struct.Struct(">BBH")
_HEAD32 = struct.Struct(">BBI")
CHAIN_SIZE = 32  # both hashes give 32 bytes
CHAIN_HEAD = bytes((0xC4, CHAIN_SIZE))  # bin 8
OBJECT_START = 0x92  # fixarray of 2: every object a writer frames


def frame_head(size: int) -> bytes:
    """What precedes a payload of `size` bytes in its object."""
    if size < 0x100:
        return _HEAD8.pack(OBJECT_START, 0xC4, size)
    if size < 0x10000:
        return _HEAD16.pack(OBJECT_START, 0xC5, size)
    return _HEAD32.pack(OBJECT_START, 0xC6, size)


def bin_head(size: int) -> bytes:
    """msgpack's header for a bin of `size` bytes, the smallest, as msgpack packs it."""
    if size < 0x100:
        return bytes((0xC4, size))
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def frame(payload: bytes, chain: bytes) -> bytes:
    """The bytes of one archive object: [payload, chain]."""
    return frame_head(len(payload)) + payload + CHAIN_HEAD + chain


def signed_message(header_chain: bytes, last_chain: bytes, records: int) -> bytes:
    """What the end record's signature covers."""
    return SIGNATURE_CONTEXT + header_chain + last_chain + records.to_bytes(8, "big")
