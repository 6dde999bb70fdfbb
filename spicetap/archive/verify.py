"""`spicetap verify`: is an archive intact, truncated, or tampered with (and where)?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spicetap.archive import format as fmt
from spicetap.archive.keys import raw_public
from spicetap.archive.reader import ArchiveError, ArchiveReader

SCAN_LIMIT = 64 << 20  # how far past a suspected truncation to look for later records


@dataclass(frozen=True)
class Verdict:
    status: str  # "intact" | "truncated" | "tampered"
    records: int  # records whose chain checked out
    detail: str
    first_bad: int | None = None  # sequence number (or index) of the first bad record
    signed_by: str | None = None  # hex of the signing public key

    def line(self, path: Path) -> str:
        return f"{path}: {self.status}: {self.detail}"


def verify(path: Path, trusted: Ed25519PublicKey | None = None) -> Verdict:
    try:
        reader = ArchiveReader(path)
    except ArchiveError as exc:
        msg = str(exc)
        status = "truncated" if "truncated" in msg else "tampered"
        if status == "truncated" and _later_record(path, 0, 0) is not None:
            status = "tampered"  # the header's length was altered: records follow it
        return Verdict(status, 0, msg.split(": ", 1)[-1], first_bad=0)
    with reader:
        try:
            algo = fmt.chain_hash_of(reader.header)
        except ValueError as exc:  # not one a version this spicetap reads may name
            return Verdict("tampered", 0, f"the header names {exc}", first_bad=0)
        chain = fmt.chain_start(reader.header_entry.payload, algo)
        if chain != reader.header_entry.chain:
            return Verdict("tampered", 0, "the header's hash does not match", first_bad=0)
        header_chain = chain
        count = 0
        end = None
        before = chain
        for index, entry in enumerate(reader.entries()):
            before, chain = chain, fmt.chain_next(chain, entry.payload, algo)
            seq = index  # by position: a tampered payload may lie about its own seq
            if chain != entry.chain:
                return Verdict(
                    "tampered",
                    count,
                    f"record {seq} (byte {entry.offset}) does not match the hash chain",
                    first_bad=seq,
                )
            if entry.obj.get("kind") == "end":
                end = entry.obj
                break
            count += 1
        if end is None:
            stop = reader.stop_offset
            if reader.truncated and stop is not None and not reader.compressed:
                if _reframed(path, stop, chain, algo):
                    return Verdict(
                        "tampered",
                        count,
                        f"record {count} (byte {stop}) is whole, but its framing was altered",
                        first_bad=count,
                    )
                later = _later_record(path, stop, count)
                if later is not None:  # a length was altered: the file goes on past it
                    return Verdict(
                        "tampered",
                        count,
                        f"record {count} (byte {stop}) is damaged; record {later} follows it",
                        first_bad=count,
                    )
            if reader.damaged and not reader.truncated:
                return Verdict(
                    "tampered",
                    count,
                    f"{reader.damaged}, "
                    + (f"after record {count - 1}" if count else "before the first record"),
                    first_bad=count,
                )
            why = reader.damaged or "no end record"
            return Verdict(
                "truncated",
                count,
                f"{count} records intact, then {why} (the session did not finish writing)",
                first_bad=None,
            )
        return _check_end(end, header_chain, before, count, trusted, reader)


def _reframed(path: Path, start: int, chain: bytes, algo: str) -> bool:
    """Whether the file's last object, which reads as cut short, is in fact whole: its
    payload and chain are all there and match the hash chain, and only the bytes that frame
    them (the array marker, a type or a length) were changed. A cut file never reads so:
    its last object lacks at least its chain's final byte."""
    with path.open("rb") as f:
        f.seek(start)
        data = f.read(SCAN_LIMIT)
    chain_at = len(data) - len(fmt.CHAIN_HEAD) - fmt.CHAIN_SIZE
    found = data[-fmt.CHAIN_SIZE :]
    # the head is 3, 4 or 6 bytes (bin 8, 16, 32 payloads: format.frame_head)
    return any(
        fmt.chain_next(chain, data[head:chain_at], algo) == found
        for head in (3, 4, 6)
        if head <= chain_at
    )


def _later_record(path: Path, start: int, expected: int) -> int | None:
    """The seq of a well-formed record after `start`, if any: then the file was not cut."""
    with path.open("rb") as f:
        f.seek(start + 1)
        data = f.read(SCAN_LIMIT)
    pos = data.find(b"\x92")
    while pos >= 0:
        if pos + 1 < len(data) and 0xC4 <= data[pos + 1] <= 0xC6:
            up = msgpack.Unpacker(raw=False, max_buffer_size=len(data))
            up.feed(data[pos:])
            try:
                obj = up.unpack()
                inner = msgpack.unpackb(obj[0], raw=False) if isinstance(obj, list) else None
            except Exception:
                inner = None
            if (
                isinstance(inner, dict)
                and isinstance(obj[1], bytes)
                and len(obj[1]) == 32
                and isinstance(inner.get("seq"), int)
                and inner["seq"] >= expected
            ):
                return int(inner["seq"])
        pos = data.find(b"\x92", pos + 1)
    return None


def _check_end(
    end: dict[str, object],
    header_chain: bytes,
    last_chain: bytes,
    count: int,
    trusted: Ed25519PublicKey | None,
    reader: ArchiveReader,
) -> Verdict:
    seq = end.get("seq")
    after = reader.bytes_after_end()
    if after:  # whatever they are: nothing may follow the end record
        return Verdict(
            "tampered",
            count,
            f"{_bytes(after)} follow{'s' if after == 1 else ''} the end record",
            first_bad=count + 1,
        )
    extra = next(reader._entries(), None)  # the frame holding the end record goes on
    if extra is not None:
        return Verdict("tampered", count, "data follows the end record", first_bad=count + 1)
    if reader.truncated:  # the end record is there, but the file was cut after it
        return Verdict(
            "truncated", count, f"{count} records and the end record intact, then {reader.damaged}"
        )
    if end.get("records") != count:
        return Verdict(
            "tampered",
            count,
            f"end record counts {end.get('records')} records, the archive has {count}",
            first_bad=seq if isinstance(seq, int) else None,
        )
    sig, pub = end.get("signature"), end.get("public_key")
    if not isinstance(sig, bytes) or not isinstance(pub, bytes):
        return Verdict("intact", count, f"{count} records, hash chain intact (unsigned)")
    try:
        key = Ed25519PublicKey.from_public_bytes(pub)
        key.verify(sig, fmt.signed_message(header_chain, last_chain, count))
    except (InvalidSignature, ValueError):  # ValueError: not 32 bytes, not a key
        return Verdict(
            "tampered",
            count,
            "the end record's signature is not valid",
            first_bad=seq if isinstance(seq, int) else None,
        )
    if trusted is not None and raw_public(trusted) != pub:
        return Verdict(
            "tampered",
            count,
            "signed by a key that is not the trusted one",
            first_bad=seq if isinstance(seq, int) else None,
            signed_by=pub.hex(),
        )
    # Without a trusted key, the signature only proves the archive is as its signer left
    # it: anyone can sign a forgery with a key of their own.
    signer = "" if trusted is not None else " (signer unchecked: no trusted key; give --key)"
    return Verdict(
        "intact",
        count,
        f"{count} records, hash chain and signature valid{signer}",
        signed_by=pub.hex(),
    )


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n:,} bytes"
