"""One entry point for inspector commands: an archive or a pcap/pcapng capture, by content."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from spicetap.about import ArchiveSeen
from spicetap.archive import format as fmt
from spicetap.archive.importer import dissector_hashes
from spicetap.archive.reader import ArchiveError, ArchiveReader
from spicetap.archive.records import ArchivedRecord, from_archive
from spicetap.archive.shape import MalformedRecord, started_of
from spicetap.capture import CaptureError, NotACapture
from spicetap.capture.piped import STDIN, Piped, is_piped
from spicetap.capture.source import CHUNK
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
    return is_archive_start(head)


def check_input(path: Path) -> None:
    """InputError unless `path` is a regular file or a pipe (`-`, standard input, or a
    named pipe: read once, as it comes). A socket or a device is refused by name, before
    it is opened, and so is a terminal as standard input (nothing was piped in)."""
    if str(path) == STDIN:
        if os.isatty(sys.stdin.fileno()):
            raise InputError(
                "standard input is a terminal: pipe a capture or an archive in "
                "(tcpdump -U -w - port 5900 | spicetap show -)"
            )
        return
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    if not path.is_file() and not path.is_fifo():
        kind = "a socket" if path.is_socket() else "a device"
        raise InputError(
            f"{path}: is {kind}, not a regular file or a pipe: save it to a file first"
        )


def is_archive_start(head: bytes) -> bool:
    # [payload, chain] is a 2-element msgpack array (0x92) of bin8/16/32 (0xc4-0xc6).
    return head == fmt.ZSTD_MAGIC or (
        len(head) >= 2 and head[0] == 0x92 and 0xC4 <= head[1] <= 0xC6
    )


@contextmanager
def archive_file(path: Path) -> Iterator[Path]:
    """A path to read an archive at: `path` itself, or for a pipe a temporary copy of what
    it brought (see _spooled). InputError when a pipe brings no archive."""
    if not is_piped(path):
        yield path
        return
    try:
        with Piped.open(path) as piped:
            if not is_archive_start(piped.peek(4)):
                raise InputError(f"{piped.name}: not a spicetap archive")
            with _spooled(piped) as copy:
                yield copy
    except CaptureError as exc:  # a named pipe that cannot be opened
        raise InputError(str(exc)) from None


@contextmanager
def _spooled(piped: Piped) -> Iterator[Path]:
    """An archive is read more than once (its signature chain, then its records, and what
    follows its end): what the pipe brings is copied to a temporary file, removed after."""
    with tempfile.TemporaryDirectory(prefix="spicetap-") as tmp:
        copy = Path(tmp) / "piped.spta"
        with copy.open("wb") as out:
            while chunk := piped.read1(CHUNK):
                out.write(chunk)
        yield copy


def iter_records(
    path: Path, problems: list[str], seen: ArchiveSeen | None = None
) -> Iterator[AnyRecord]:
    """Records of an archive or a capture; a damaged or truncated tail lands in `problems`;
    an archive's header, and its end record once reached, in `seen`. A capture on a pipe
    is read as it comes; an archive on one is copied first (see _spooled)."""
    check_input(path)
    if not is_piped(path):
        if is_archive(path):
            yield from _archive_records(path, str(path), problems, seen)
        else:
            yield from _capture_records(path, problems)
        return
    with ExitStack() as stack:
        try:
            piped = stack.enter_context(Piped.open(path))
        except CaptureError as exc:  # a named pipe that cannot be opened
            raise InputError(str(exc)) from None
        if not is_archive_start(piped.peek(4)):
            yield from _capture_records(piped, problems)
            return
        with _spooled(piped) as copy:
            yield from _archive_records(copy, piped.name, problems, seen)


def _archive_records(
    path: Path, name: str, problems: list[str], seen: ArchiveSeen | None
) -> Iterator[AnyRecord]:
    try:
        reader = ArchiveReader(path)
    except ArchiveError as exc:
        raise InputError(str(exc).replace(str(path), name)) from None
    with reader:
        try:
            started = started_of(reader.header)
        except MalformedRecord as exc:
            raise InputError(f"{name}: damaged archive header ({exc})") from None
        same = reader.header.get("dissector") == dissector_hashes()
        if seen is not None:
            seen.header = reader.header
        for obj in reader.records():
            try:
                rec = from_archive(obj, started, same)
            except MalformedRecord as exc:
                # well-formed msgpack, wrong shape: a damaged or forged record
                problems.append(f"{name}: a malformed record was skipped ({exc})")
                continue
            yield rec
        if seen is not None:
            seen.end = reader.end
        if reader.truncated or reader.damaged:
            problems.append(f"{name}: {reader.damaged or 'truncated'}")
        after = reader.bytes_after_end() if reader.end is not None else None
        if after:  # an archive ends with its end record: these were added since
            plural = "s" if after > 1 else ""
            problems.append(
                f"{name}: {after:,} byte{plural} after the end record not read "
                "(`spicetap verify` calls the archive tampered)"
            )


def _capture_records(source: Path | Piped, problems: list[str]) -> Iterator[AnyRecord]:
    try:
        yield from iter_capture(source, problems)
    except NotACapture as exc:  # not an archive either (sniffed above)
        raise InputError(
            f"{exc.name}: neither a spicetap archive nor a pcap or pcapng capture ({exc.hint})"
        ) from None
    except CaptureError as exc:
        raise InputError(str(exc)) from None
