"""One entry point for inspector commands: an archive or a pcap/pcapng capture, by content."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from spicetap.about import ArchiveSeen
from spicetap.archive import format as fmt
from spicetap.archive.importer import dissector_hashes
from spicetap.archive.reader import ArchiveError, ArchiveReader
from spicetap.archive.records import ArchivedRecord, from_archive
from spicetap.archive.shape import MalformedRecord, started_of
from spicetap.capture import CaptureError, NotACapture
from spicetap.records import Record
from spicetap.show import iter_capture

AnyRecord = Record | ArchivedRecord


class InputError(Exception):
    """A file given to an inspector command cannot be read (one line naming it)."""


def is_archive(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    # [payload, chain] is a 2-element msgpack array (0x92) of bin8/16/32 (0xc4-0xc6).
    return head == fmt.ZSTD_MAGIC or (
        len(head) >= 2 and head[0] == 0x92 and 0xC4 <= head[1] <= 0xC6
    )


def check_input(path: Path) -> None:
    """InputError unless `path` is a regular file. Every command reads its input more than
    once (what it is, then its content; verify looks ahead past damage): a pipe's bytes,
    once read, are gone, so a pipe or a device is refused by name, before it is opened."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    if not path.is_file():
        kind = "a pipe" if path.is_fifo() else "a socket" if path.is_socket() else "a device"
        raise InputError(
            f"{path}: is {kind}, not a regular file (spicetap reads its input more than "
            "once): save it to a file first"
        )


def iter_records(
    path: Path, problems: list[str], seen: ArchiveSeen | None = None
) -> Iterator[AnyRecord]:
    """Records of an archive or a capture; a damaged or truncated tail lands in `problems`;
    an archive's header, and its end record once reached, in `seen`."""
    check_input(path)
    if is_archive(path):
        try:
            reader = ArchiveReader(path)
        except ArchiveError as exc:
            raise InputError(str(exc)) from None
        with reader:
            try:
                started = started_of(reader.header)
            except MalformedRecord as exc:
                raise InputError(f"{path}: damaged archive header ({exc})") from None
            same = reader.header.get("dissector") == dissector_hashes()
            if seen is not None:
                seen.header = reader.header
            for obj in reader.records():
                try:
                    rec = from_archive(obj, started, same)
                except MalformedRecord as exc:
                    # well-formed msgpack, wrong shape: a damaged or forged record
                    problems.append(f"{path}: a malformed record was skipped ({exc})")
                    continue
                yield rec
            if seen is not None:
                seen.end = reader.end
            if reader.truncated or reader.damaged:
                problems.append(f"{path}: {reader.damaged or 'truncated'}")
            after = reader.bytes_after_end() if reader.end is not None else None
            if after:  # an archive ends with its end record: these were added since
                plural = "s" if after > 1 else ""
                problems.append(
                    f"{path}: {after:,} byte{plural} after the end record not read "
                    "(`spicetap verify` calls the archive tampered)"
                )
        return
    try:
        yield from iter_capture(path, problems)
    except NotACapture as exc:  # not an archive either (sniffed above)
        raise InputError(
            f"{exc.name}: neither a spicetap archive nor a pcap or pcapng capture ({exc.hint})"
        ) from None
    except CaptureError as exc:
        raise InputError(str(exc)) from None
