"""Archive writer/reader/verify: round trip, tampering, truncation, crashes, rotation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from spicetap.archive import appender as appender_mod
from spicetap.archive import format as fmt
from spicetap.archive import reader as reader_mod
from spicetap.archive import writer as writer_mod
from spicetap.archive.reader import ArchiveError, ArchiveReader
from spicetap.archive.verify import verify
from spicetap.archive.writer import ArchiveWriter, FlushPolicy, Rotation
from spicetap.cli import main

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def record(i: int) -> dict[str, Any]:
    return {
        "t": i * 1000,
        "kind": "message",
        "ch": [2, 0, 1],
        "dir": "s2c",
        "raw": bytes([i % 251]) * (i % 97 + 1),
        "view": {"i": i},
    }


def write(path: Path, n: int, *, compress: bool = False, close: bool = True) -> None:
    w = ArchiveWriter(
        path,
        {"session": {"viewer": "127.0.0.1:1"}},
        signing_key=KEY,
        compress=compress,
        flush=FlushPolicy(interval=0),
    )
    for i in range(n):
        w.write(record(i))
    if close:
        w.close()
    else:
        w.abandon()


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / ("a.spta.zst" if compress else "a.spta")
    write(path, 300, compress=compress)
    with ArchiveReader(path) as r:
        assert r.header["format"] == fmt.MAGIC and r.header["version"] == fmt.VERSION
        assert r.header["session"] == {"viewer": "127.0.0.1:1"}
        assert r.header["compressed"] is compress
        recs = list(r.records())
        assert r.end is not None and r.end["status"] == "complete"
    assert [x["seq"] for x in recs] == list(range(300))
    assert [{k: v for k, v in x.items() if k != "seq"} for x in recs] == [
        record(i) for i in range(300)
    ]
    v = verify(path)
    assert (v.status, v.records) == ("intact", 300)
    assert v.signed_by == KEY.public_key().public_bytes_raw().hex()
    # no trusted key: the signature proves only that the signer left it so
    assert v.detail.endswith("signature valid (signer unchecked: no trusted key; give --key)")
    assert verify(path, KEY.public_key()).detail.endswith("hash chain and signature valid")


def test_a_forged_end_records_public_key_is_tampering(tmp_path: Path) -> None:
    """An end record whose public_key is not a key at all (a forger's slip, or a flip
    before its chain was recomputed): a verdict, not a ValueError."""
    path = tmp_path / "a.spta"
    write(path, 3)
    offsets = _object_offsets(path)
    data = path.read_bytes()
    up = msgpack.Unpacker(raw=False)
    up.feed(data[offsets[-1] :])
    payload, _chain = up.unpack()
    end = msgpack.unpackb(payload, raw=False)
    end["public_key"] = b"short"
    up = msgpack.Unpacker(raw=False)
    up.feed(data)
    objects = [up.unpack() for _ in offsets]  # [payload, chain] each
    chain = objects[-2][1]  # the last record's: the forged end record chains on from it
    forged_payload = fmt.pack_payload(end)
    forged_chain = fmt.chain_next(chain, forged_payload, fmt.DEFAULT_CHAIN_HASH)
    forged = data[: offsets[-1]] + fmt.frame(forged_payload, forged_chain)
    path.write_bytes(forged)
    v = verify(path)
    assert v.status == "tampered" and "signature is not valid" in v.detail, v


def _object_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    up = msgpack.Unpacker(raw=False)
    up.feed(data)
    offsets = []
    while True:
        offsets.append(up.tell())
        try:
            up.unpack()
        except msgpack.OutOfData:
            return offsets[:-1]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_names_the_first_bad_record(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("flip")
    path = folder / "a.spta"
    write(path, 40)
    offsets = _object_offsets(path)  # header, 40 records, end
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    bad = folder / "bad.spta"
    bad.write_bytes(bytes(raw))
    v = verify(bad)
    assert v.status == "tampered", (pos, v)
    obj = max(i for i, off in enumerate(offsets) if off <= pos)  # 0 = header
    # the verdict names the object holding the flipped byte (record seq = obj - 1), or, when
    # the flip broke msgpack framing, the position where reading stopped
    assert v.first_bad is not None
    assert v.first_bad <= max(obj - 1, 0)


def test_every_flipped_byte_is_tampering_never_truncation(tmp_path: Path) -> None:
    # each byte of a small archive, flipped in its low and in its high bit: hypothesis
    # once took a flip in the end record's framing for a cut file (the record read as
    # longer than the file), one draw in a hundred
    path = tmp_path / "a.spta"
    write(path, 3)
    raw = path.read_bytes()
    bad = tmp_path / "bad.spta"
    for pos in range(len(raw)):
        for bit in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[pos] ^= bit
            bad.write_bytes(bytes(flipped))
            v = verify(bad)
            assert v.status == "tampered", (pos, bit, v)


@pytest.mark.parametrize("compress", [False, True])
def test_truncation_keeps_a_readable_prefix(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / "a.spta"
    write(path, 200, compress=compress)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, len(data) // 5):
        cut_path = tmp_path / f"cut{cut}.spta"
        cut_path.write_bytes(data[:cut])
        v = verify(cut_path)
        assert v.status == "truncated", v
        with ArchiveReader(cut_path) as r:
            recs = list(r.records())
        assert [x["seq"] for x in recs] == list(range(len(recs)))
        assert v.records == len(recs)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "tail",
    [os.urandom(3000), b"hello world\n", bytes(1000), b"\x00", b"\x92\xc4", b"copy"],
    ids=["random", "text", "zeros", "one-byte", "object-start", "whole-copy"],
)
def test_any_byte_after_the_end_record_is_tampering(
    tmp_path: Path,
    compress: bool,
    tail: bytes,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    path = tmp_path / "a.spta"
    write(path, 20, compress=compress)
    if tail == b"copy":  # a second archive appended: well-formed objects after the end
        tail = path.read_bytes()
    path.write_bytes(path.read_bytes() + tail)
    v = verify(path)
    assert (v.status, v.records) == ("tampered", 20)
    follow = f"{len(tail):,} bytes follow" if len(tail) > 1 else "1 byte follows"
    assert v.detail == f"{follow} the end record"
    assert main(["verify", str(path)]) == 3
    assert capsys.readouterr().out == f"{path}: tampered: {follow} the end record\n"
    for command in (["show"], ["stats", "--json"], ["export", "json"]):
        extra = ["-o", str(tmp_path / "o.jsonl")] if command[0] == "export" else []
        assert main([*command, str(path), *extra]) == 0
        warning = capsys.readouterr().err
        assert (
            f"{path}: {len(tail):,} byte" in warning and "after the end record not read" in warning
        )


@pytest.mark.parametrize(("flush", "good"), [(3600.0, 0), (0.0, 10)])
def test_damage_in_a_compressed_archive_says_after_which_record(
    tmp_path: Path, flush: float, good: int
) -> None:
    """One frame for every record (a capture imported at once), or one per record."""
    path = tmp_path / "a.spta"
    w = ArchiveWriter(path, {}, signing_key=KEY, compress=True, flush=FlushPolicy(flush))
    for i in range(20):
        w.write(record(i))
        if i == good - 1:
            damage_at = path.stat().st_size + 20  # inside the frame of record `good`
    w.close()
    damage_at = damage_at if good else path.stat().st_size // 2
    data = bytearray(path.read_bytes())
    data[damage_at] ^= 0xFF
    path.write_bytes(bytes(data))
    v = verify(path)
    assert (v.status, v.records, v.first_bad) == ("tampered", good, good)
    where = f"after record {good - 1}" if good else "before the first record"
    assert v.detail.startswith("compressed data is damaged") and v.detail.endswith(where)


def test_unfinished_archive_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "a.spta"
    write(path, 10, close=False)
    v = verify(path)
    assert v.status == "truncated" and v.records == 10


WRITER_SCRIPT = """
import sys, time
from pathlib import Path
from spicetap.archive.writer import ArchiveWriter, FlushPolicy
w = ArchiveWriter(Path(sys.argv[1]), {"session": {}}, flush=FlushPolicy(interval=0.02))
i = 0
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    w.write({"t": i, "kind": "message", "raw": i.to_bytes(4, "big") * 64})
    if i == 200:
        print("running", flush=True)
    i += 1
    time.sleep(0.0005)
"""


def test_sigkill_mid_session_leaves_a_readable_prefix(tmp_path: Path) -> None:
    path = tmp_path / "killed.spta"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"running"
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    v = verify(path)
    assert v.status == "truncated", v
    with ArchiveReader(path) as r:
        recs = list(r.records())
    assert len(recs) > 200
    for i, rec in enumerate(recs):  # a prefix of what was written, in order
        assert rec["seq"] == i and rec["raw"] == i.to_bytes(4, "big") * 64


@pytest.mark.parametrize("raw", [0, writer_mod.DIRECT_RAW])
def test_rotation_by_size_links_parts(tmp_path: Path, raw: int) -> None:
    """Small records, and long ones written in place (with a flush interval they never
    reach: each is written out as it comes)."""
    path = tmp_path / "s.spta"
    w = ArchiveWriter(
        path,
        {"session": {}},
        signing_key=KEY,
        flush=FlushPolicy(interval=0 if not raw else 60),
        rotation=Rotation(max_bytes=20_000 if not raw else 3 * raw),
    )
    for i in range(400 if not raw else 12):
        w.write({**record(i), "raw": bytes([i]) * raw} if raw else record(i))
    w.close()
    assert len(w.paths) >= 3
    seqs: list[int] = []
    previous_chain = None
    for part in w.paths:
        assert verify(part).status == "intact"
        with ArchiveReader(part) as r:
            prev = r.header["previous"]
            if previous_chain is None:
                assert prev is None
            else:
                assert prev["chain"] == previous_chain
            entries = list(r.entries())
            seqs += [e.obj["seq"] for e in entries if e.obj.get("kind") != "end"]
            previous_chain = entries[-1].chain.hex()  # the chain through the end record
    assert seqs == list(range(400 if not raw else 12))


def test_migration_chain_applies_to_older_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = {"format": fmt.MAGIC, "version": 0, "spicetap": "0.0", "who": "old"}
    payload = fmt.pack_payload(header)
    chain = fmt.chain_start(payload, "sha256")
    blob = fmt.frame(payload, chain)
    old_record = fmt.pack_payload({"seq": 0, "kind": "message", "bytes": b"xy"})
    blob += fmt.frame(old_record, fmt.chain_next(chain, old_record, "sha256"))
    path = tmp_path / "old.spta"
    path.write_bytes(blob)
    monkeypatch.setitem(
        reader_mod.MIGRATIONS,
        0,
        (
            lambda h: {**h, "session": {"viewer": h["who"]}},
            lambda r: {**{k: v for k, v in r.items() if k != "bytes"}, "raw": r["bytes"]},
        ),
    )
    with ArchiveReader(path) as r:
        assert r.header["session"] == {"viewer": "old"}
        assert list(r.records()) == [{"seq": 0, "kind": "message", "raw": b"xy"}]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a spicetap archive"),
        (b"\x92\xc4\x01x\xc4", "truncated"),
        (fmt.frame(fmt.pack_payload({"format": "other"}), bytes(32)), "not a spicetap archive"),
    ],
)
def test_foreign_or_broken_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "x.spta"
    path.write_bytes(content)
    with pytest.raises(ArchiveError) as info:
        ArchiveReader(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_newer_version_is_refused_clearly(tmp_path: Path) -> None:
    payload = fmt.pack_payload({"format": fmt.MAGIC, "version": 99})
    path = tmp_path / "new.spta"
    path.write_bytes(fmt.frame(payload, fmt.chain_start(payload, "sha256")))
    with pytest.raises(ArchiveError, match="newer than this spicetap reads"):
        ArchiveReader(path)


def test_rotation_by_time(tmp_path: Path) -> None:
    now = [0.0]
    w = ArchiveWriter(
        tmp_path / "t.spta",
        {"session": {}},
        signing_key=KEY,
        flush=FlushPolicy(interval=0),
        rotation=Rotation(max_seconds=60),
        clock=lambda: now[0],
    )
    for i in range(30):
        now[0] = i * 10.0  # a record every 10 s: a new part every 60 s
        w.write(record(i))
    w.close()
    assert [p.name for p in w.paths] == [
        "t.spta",
        "t.part2.spta",
        "t.part3.spta",
        "t.part4.spta",
        "t.part5.spta",
    ]
    assert all(verify(p).status == "intact" for p in w.paths)


def test_flush_interval_bounds_what_a_crash_can_lose(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "f.spta"
    w = ArchiveWriter(path, {"session": {}}, flush=FlushPolicy(interval=1.0), clock=lambda: now[0])
    w.write(record(0))
    w.write(record(1))
    with ArchiveReader(path) as r:  # still in memory: not older than the interval
        assert list(r.records()) == []
    now[0] = 1.5
    w.tick()  # the proxy's recorder ticks while idle
    with ArchiveReader(path) as r:
        assert [x["seq"] for x in r.records()] == [0, 1]
    w.abandon()


@pytest.mark.parametrize("size", [0, 1, 0xFF, 0x100, 0xFFFF, 0x10000, 0x10001])
def test_frame_is_what_msgpack_packs(size: int) -> None:
    payload, chain = bytes([size % 251]) * size, bytes(range(32))
    assert fmt.frame(payload, chain) == msgpack.packb([payload, chain], use_bin_type=True)
    assert fmt.bin_head(size) + payload == msgpack.packb(payload, use_bin_type=True)


def test_written_objects_are_what_msgpack_packs(tmp_path: Path) -> None:
    """The writer frames payloads by hand; every object must still be msgpack's own bytes."""
    path = tmp_path / "a.spta"
    w = ArchiveWriter(path, {"session": {}}, signing_key=KEY, flush=FlushPolicy(interval=0))
    direct = writer_mod.DIRECT_RAW  # from here on raw is packed last and written in place
    for i, size in enumerate([0, 200, 0xFF, 0x100, 70_000, 0xFFFF, 0x10000, direct, 3]):
        w.write({**record(i), "raw": bytes([i]) * size})
    w.close()
    data = path.read_bytes()
    up = msgpack.Unpacker(raw=False)
    up.feed(data)
    again = b"".join(msgpack.packb([payload, chain], use_bin_type=True) for payload, chain in up)
    assert again == data
    assert verify(path).status == "intact"


@pytest.mark.parametrize("release", [True, False])
def test_written_pages_are_released_from_the_page_cache_behind_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: bool
) -> None:
    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        advised.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    path = tmp_path / "big.spta"
    w = ArchiveWriter(path, {}, flush=FlushPolicy(direct=False, release_cache=release))
    chunk = os.urandom(1 << 20)
    for i in range(5 * (appender_mod.CACHE_WINDOW >> 20)):
        w.write({"kind": "message", "raw": chunk, "i": i})
    w.close()
    if not release:
        assert advised == []
        return
    window = appender_mod.CACHE_WINDOW
    dropped = sorted(a for a in advised if a[0] % window == 0 and a[1] == window)
    # every window from the start is released in turn, up to two windows from the end
    assert [offset for offset, _ in dropped][:3] == [0, window, 2 * window]
    covered = max(offset + length for offset, length in dropped)
    assert path.stat().st_size - 2 * window <= covered <= path.stat().st_size - window
    assert verify(path).status == "intact"  # nothing the reader sees changes


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
@pytest.mark.parametrize("size", [0, 1, fmt.SMALL_PAYLOAD - 33, fmt.SMALL_PAYLOAD, 1 << 20])
def test_chain_is_the_named_hash_of_previous_and_payload(size: int, algo: str) -> None:
    import hashlib

    import blake3

    previous, payload = os.urandom(32), os.urandom(size)
    digest = blake3.blake3 if algo == "blake3" else hashlib.sha256
    want = digest(previous + payload).digest()
    assert len(want) == 32
    assert fmt.chain_next(previous, payload, algo) == want
    assert fmt.chain_next(previous, memoryview(payload), algo) == want  # as the writer hands it
    assert fmt.chain_next_parts(previous, payload[:7], payload[7:], algo=algo) == want


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_an_archive_chains_with_the_hash_its_header_names(tmp_path: Path, algo: str) -> None:
    """Written with either hash, signed: intact; the header says which, and the chain is
    that hash's, record by record (recomputed here, not by verify)."""
    path = tmp_path / "a.spta"
    key = Ed25519PrivateKey.generate()
    w = ArchiveWriter(path, {"session": {}}, signing_key=key, chain_hash=algo)
    for i in range(3):
        w.write({"kind": "message", "raw": bytes([i]) * (i * 300_000)})
    w.close("complete")
    with ArchiveReader(path) as r:
        assert r.header["chain_hash"] == algo and r.header["version"] == fmt.VERSION
        chain = fmt.CHAIN_HASHES[algo](r.header_entry.payload).digest()
        assert chain == r.header_entry.chain
        for entry in r.entries():
            chain = fmt.CHAIN_HASHES[algo](chain + bytes(entry.payload)).digest()
            assert chain == entry.chain
    v = verify(path)
    assert v.status == "intact" and "signature valid" in v.detail, v


def test_a_version_1_archive_chained_with_sha256_still_verifies(tmp_path: Path) -> None:
    """Archives written before version 2 name no hash: SHA-256, and they read and verify
    as they did (signed, and one altered byte found)."""
    key = Ed25519PrivateKey.generate()
    header = {"format": fmt.MAGIC, "version": 1, "spicetap": "0.1", "session": {}}
    payload = fmt.pack_payload(header)
    chain = header_chain = fmt.chain_start(payload, "sha256")
    blob = fmt.frame(payload, chain)
    records = [{"seq": i, "kind": "message", "raw": bytes([i]) * 10} for i in range(2)]
    for rec in records:
        payload = fmt.pack_payload(rec)
        chain = fmt.chain_next(chain, payload, "sha256")
        blob += fmt.frame(payload, chain)
    message = fmt.signed_message(header_chain, chain, len(records))
    public = key.public_key().public_bytes_raw()
    end = {"seq": 2, "kind": "end", "status": "complete", "records": 2, "next": None,
           "signature": key.sign(message),
           "public_key": public}  # fmt: skip
    blob += fmt.frame(fmt.pack_payload(end), fmt.chain_next(chain, fmt.pack_payload(end), "sha256"))
    path = tmp_path / "v1.spta"
    path.write_bytes(blob)
    v = verify(path)
    assert v.status == "intact" and v.records == 2 and "signature valid" in v.detail, v
    with ArchiveReader(path) as r:
        assert r.version == 1 and [rec["seq"] for rec in r.records()] == [0, 1]
    at = blob.index(bytes([1]) * 10)
    path.write_bytes(blob[:at] + b"\x02" + blob[at + 1 :])
    assert verify(path).status == "tampered"


@pytest.mark.parametrize("named", ["md5", ["blake3"], None])
def test_a_header_naming_an_unknown_chain_hash_is_a_verdict(tmp_path: Path, named: Any) -> None:
    header = {"format": fmt.MAGIC, "version": 2, "spicetap": "0.1", "chain_hash": named}
    payload = fmt.pack_payload(header)
    path = tmp_path / "odd.spta"
    path.write_bytes(fmt.frame(payload, fmt.chain_start(payload, "sha256")))
    v = verify(path)
    assert v.status == "tampered" and f"unknown chain hash {named!r}" in v.detail, v


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("max_buffer", [1, 1 << 20, 8 << 20])
def test_large_raw_bytes_read_back_whatever_the_flushes(
    tmp_path: Path, compress: bool, max_buffer: int
) -> None:
    """Megabyte records between small ones, flushed after each record, now and then, or
    only at the end: every record reads back as written, and each payload is canonical
    msgpack (it packs back to itself)."""
    path = tmp_path / ("a.spta.zst" if compress else "a.spta")
    direct = writer_mod.DIRECT_RAW
    sizes = [0x10000, 3, 1 << 20, 5, 0x10001, 300_000, 0, 2 << 20, direct - 1, direct, 7]
    policy = FlushPolicy(interval=60, max_buffer=max_buffer)
    w = ArchiveWriter(path, {"session": {}}, signing_key=KEY, compress=compress, flush=policy)
    written = []
    for i, size in enumerate(sizes):
        rec = {**record(i), "raw": os.urandom(size)}
        written.append(dict(rec))
        w.write(rec)
        assert rec["raw"] == written[-1]["raw"]  # the caller's record keeps its bytes
    w.close()
    with ArchiveReader(path) as r:
        got = list(r.records())
    assert [{k: v for k, v in x.items() if k != "seq"} for x in got] == written
    assert verify(path).status == "intact"
    if not compress:
        up = msgpack.Unpacker(raw=False)
        up.feed(path.read_bytes())
        for payload, _chain in up:
            assert msgpack.packb(msgpack.unpackb(payload), use_bin_type=True) == payload


def test_a_write_that_fails_names_the_archive(tmp_path: Path, monkeypatch: Any) -> None:
    """A full disk: the error says which archive, and what was written before verifies
    as a truncated archive, every record before the cut intact."""
    import errno

    path = tmp_path / "a.spta"
    w = ArchiveWriter(path, {"session": {}}, signing_key=KEY, flush=FlushPolicy(interval=0))
    for i in range(10):
        w.write(record(i))

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as failed:
        w.write(record(10))
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(path)
    assert str(path) in str(failed.value)
    monkeypatch.undo()
    w.abandon()
    verdict = verify(path)
    assert verdict.status == "truncated" and verdict.records == 11  # the header and ten
