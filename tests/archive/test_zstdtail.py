"""A compressed archive's end record, read from its last zstd frame alone, is the one a
reader finds reading the whole file; damage sends `spicetap sessions` the long way."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.writer import ArchiveWriter
from spicetap.archive.zstdtail import TailUnreadable, compressed_end_at_tail
from spicetap.listing import summary


def read_through(path: Path) -> dict[str, object] | None:
    with ArchiveReader(path) as reader:
        for _record in reader.records():
            pass
        return reader.end


def written(path: Path, compress: bool, sizes: list[int], *, random: bool = False) -> Path:
    """An archive with a record of each size (repeated bytes, or random ones: zstd then
    keeps blocks raw), closed with a signed end record."""
    writer = ArchiveWriter(
        path, {"session": {}}, signing_key=Ed25519PrivateKey.generate(), compress=compress
    )
    for i, size in enumerate(sizes):
        raw = os.urandom(size) if random else bytes([i % 256]) * size
        writer.write({"kind": "message", "raw": raw, "t": i})
        if i % 7 == 0:
            writer.flush()  # a frame of its own now and then
    writer.close("complete", {"note": "\x28\xb5\x2f\xfd" * 8})  # zstd's magic inside it
    return path


SHAPES = {
    "small records": ([12] * 300, False),
    "repeated bytes (RLE blocks)": ([300_000, 5, 200_000], False),
    "random bytes (raw blocks)": ([300_000, 40, 70_000], True),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_end_from_the_last_frame_is_the_one_read_through(tmp_path: Path, shape: str) -> None:
    sizes, random = SHAPES[shape]
    path = written(tmp_path / "a.spta.zst", True, sizes, random=random)
    end = compressed_end_at_tail(path)
    assert end is not None and end["kind"] == "end" and end["status"] == "complete"
    assert end == read_through(path)


def reframed(plain: Path, out: Path, content_size: bool, checksum: bool) -> Path:
    """The plain archive's objects in zstd frames of other kinds than the writer's (no
    content size, no checksum; single segment), a frame per run of objects, with a
    skippable frame between two of them: every frame header RFC 8878 allows here."""
    with ArchiveReader(plain) as reader:
        starts = [entry.offset for entry in reader.entries()]
    data = plain.read_bytes()
    cuts = [0, *starts[1::5], len(data)]
    compressor = zstandard.ZstdCompressor(write_content_size=content_size, write_checksum=checksum)
    frames = [compressor.compress(data[a:b]) for a, b in itertools.pairwise(cuts)]
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"spare"
    frames.insert(2, skippable)
    out.write_bytes(b"".join(frames))
    return out


@pytest.mark.parametrize(
    ("content_size", "checksum"), [(False, False), (True, True), (True, False)]
)
def test_frame_headers_of_every_form_are_walked(
    tmp_path: Path, content_size: bool, checksum: bool
) -> None:
    plain = written(tmp_path / "a.spta", False, [12] * 40 + [70_000, 3, 200_000])
    path = reframed(plain, tmp_path / "b.spta.zst", content_size, checksum)
    end = compressed_end_at_tail(path)
    assert end is not None and end == read_through(path) == read_through(plain)


def test_an_archive_cut_inside_its_last_frame_has_no_end(tmp_path: Path) -> None:
    """A crash, or a file still being written: the last whole frame ends with no end
    record, as reading it through finds."""
    path = written(tmp_path / "a.spta.zst", True, [12] * 30)
    whole = path.read_bytes()
    cut = tmp_path / "cut.spta.zst"
    for at in range(1, 200, 3):
        cut.write_bytes(whole[:-at])
        assert compressed_end_at_tail(cut) is None, at
        assert summary(cut)[1]["end"] is None, at


def test_damaged_frames_are_read_through(tmp_path: Path) -> None:
    """A frame whose magic is damaged cannot be walked over: the tail says so, and the
    listing reads the file through, as it did before it read tails."""
    path = written(tmp_path / "a.spta.zst", True, [12] * 30)
    data = bytearray(path.read_bytes())
    second = data.find(b"\x28\xb5\x2f\xfd", 4)
    assert second > 0
    data[second] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TailUnreadable, match=f"no zstd frame at byte {second}"):
        compressed_end_at_tail(path)
    assert read_through(path) is None  # the reader stops at the damage
    assert summary(path)[1]["end"] is None


def test_a_last_frame_that_does_not_start_at_an_object_is_not_believed(tmp_path: Path) -> None:
    plain = written(tmp_path / "a.spta", False, [12] * 20)
    data = plain.read_bytes()
    path = tmp_path / "b.spta.zst"
    path.write_bytes(zstandard.compress(data[:-100]) + zstandard.compress(data[-100:]))
    with pytest.raises(TailUnreadable, match="not whole objects"):
        compressed_end_at_tail(path)
    assert read_through(path) == read_through(plain) is not None
    assert summary(path)[1]["end"] == summary(plain)[1]["end"]  # found the long way
    assert summary(path)[1]["end"]["status"] == "complete"
