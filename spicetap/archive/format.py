"""The spicetap archive format, version 1 (specified in docs/archive-format.md).

An archive is a stream of msgpack objects. Each is a 2-element array
`[payload: bin, chain: bin(32)]`, where payload is the msgpack encoding of one map and
chain = SHA-256(previous chain || payload). The first object is the header (its chain is
SHA-256(payload)); then one record per event in arrival order; a finished archive ends with
an `end` record carrying an Ed25519 signature over the chain. Hashing the payload bytes as
written (not a re-encoding) lets a reader in any language verify the chain.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack

MAGIC = "spicetap-archive"
VERSION = 1
SIGNATURE_CONTEXT = b"spicetap-archive-v1 end"
SUFFIX = ".spta"
ZSTD_SUFFIX = ".spta.zst"
# zstd frame magic, little-endian 0xFD2FB528: compressed archives are told apart by content.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Record kinds.
KINDS = ("link", "message", "agent", "auth", "tls", "error", "gap", "open", "close", "end")


SMALL_PAYLOAD = 4096


def chain_next(previous: bytes, payload: bytes | memoryview) -> bytes:
    """SHA-256(previous || payload)."""
    if len(payload) < SMALL_PAYLOAD:  # one call is cheaper than two for most records
        return hashlib.sha256(previous + payload).digest()
    return chain_next_parts(previous, payload)  # in two parts: no copy of a megabyte payload


def chain_next_parts(previous: bytes, *parts: bytes | memoryview) -> bytes:
    """SHA-256(previous || parts...), for a payload written in parts."""
    digest = hashlib.sha256(previous)
    for part in parts:
        digest.update(part)
    return digest.digest()


def chain_start(header_payload: bytes) -> bytes:
    return hashlib.sha256(header_payload).digest()


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
CHAIN_HEAD = b"\xc4\x20"  # bin 8, 32 bytes


def frame_head(size: int) -> bytes:
    """What precedes a payload of `size` bytes in its object."""
    if size < 0x100:
        return _HEAD8.pack(0x92, 0xC4, size)
    if size < 0x10000:
        return _HEAD16.pack(0x92, 0xC5, size)
    return _HEAD32.pack(0x92, 0xC6, size)


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
