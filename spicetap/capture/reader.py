"""Opening a capture file: which format, plain or gzip, and what went wrong, in one line."""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .pcap import PCAP_MAGICS, read_pcap
from .pcapng import PCAPNG_MAGIC, read_pcapng
from .piped import Piped
from .segment import Buffer, CaptureError, NotACapture, TcpSegment
from .source import CHUNK, GZIP_MAGIC, READ_ERRORS, Gunzip, Read, ReadStats

__all__ = ["CaptureReader", "read_packets"]

_HINTS = {
    b"REDQ": "a raw SPICE stream",
    b"\x89PNG": "a PNG image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a zip archive",
    b"\x7fELF": "an executable",
}


def _at_end(_size: int) -> bytes:
    return b""


def _open_error(name: str, exc: OSError) -> CaptureError:
    if isinstance(exc, FileNotFoundError):
        return CaptureError(f"{name}: no such file")
    if isinstance(exc, IsADirectoryError):
        return CaptureError(f"{name}: is a directory, not a capture file")
    if isinstance(exc, PermissionError):
        return CaptureError(f"{name}: permission denied")
    return CaptureError(f"{name}: cannot read: {exc.strerror or exc}")


def _foreign(name: str, head: bytes) -> NotACapture:
    for magic, what in _HINTS.items():
        if head.startswith(magic):
            return NotACapture(name, f"looks like {what}")
    return NotACapture(name, f"starts with {head.hex()}")


class CaptureReader:
    """The TCP segments of one capture file (pcap or pcapng, maybe gzip'd), read lazily.

    Opening checks the file header and raises CaptureError if the file is missing,
    unreadable, empty, cut short inside its header or not a capture at all. Iterating
    yields TcpSegments in file order; damage further on (a truncated tail, a corrupt
    block) ends the iteration quietly and is described in ``problem``. The file is closed
    when the iteration ends, by ``close()`` or on leaving a ``with`` block.
    """

    path: str
    format: str
    """"pcap" or "pcapng"."""
    compressed: bool

    def __init__(self, path: str | os.PathLike[str] | Piped) -> None:
        self._stats = ReadStats()
        self._map: mmap.mmap | None = None
        self._raw: BinaryIO | None = None
        self.compressed = False
        # a pipe is read as it comes, and closed by its opener; a file is opened here
        source: Piped | BinaryIO
        if isinstance(path, Piped):
            self.path = name = path.name
            source = path
        else:
            self.path = name = os.fspath(path)
            try:
                source = Path(self.path).open("rb")  # noqa: SIM115 - kept open until closed
            except OSError as exc:
                raise _open_error(name, exc) from None
            self._raw = source
        try:
            buf, read = self._piped(source) if isinstance(source, Piped) else self._start(source)
            head = bytes(buf[:4])
            if not head:
                empty = "empty compressed file" if self.compressed else "empty file"
                raise CaptureError(f"{name}: {empty}, not a capture")
            if head in PCAP_MAGICS:
                self.format = "pcap"
                inner = read_pcap(buf, read, name, self._stats)
            elif head == PCAPNG_MAGIC:
                self.format = "pcapng"
                inner = read_pcapng(buf, read, name, self._stats)
            elif len(head) < 4:
                raise CaptureError(f"{name}: {len(head)}-byte file, not a capture")
            else:
                raise _foreign(name, head)
        except CaptureError:
            self._close_files()
            raise
        except READ_ERRORS as exc:
            self._close_files()
            if isinstance(exc, OSError) and not self.compressed:
                raise _open_error(name, exc) from None
            msg = f"{name}: damaged gzip data ({exc or type(exc).__name__})"
            raise CaptureError(msg) from None
        except BaseException:
            self._close_files()
            raise
        self._segments = self._run(inner)

    def _start(self, raw: BinaryIO) -> tuple[Buffer, Read]:
        """The start of the file's content, and how to read on.

        A plain regular file is mapped whole: no reads, no copies but the payloads (and,
        measured, a third faster than reading a megabyte at a time). A gzip'd file, or
        one that cannot be mapped, is read in chunks.
        """
        head = raw.read(2)
        self.compressed = head == GZIP_MAGIC
        if self.compressed:
            raw.seek(0)
            read = Gunzip(raw.read).read
            return read(CHUNK), read
        try:
            info = os.fstat(raw.fileno())
            if info.st_size and stat.S_ISREG(info.st_mode):
                self._map = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
                raw.close()  # the map holds a file descriptor of its own
                return self._map, _at_end
        except (OSError, ValueError):
            pass
        raw.seek(0)
        return raw.read(CHUNK), raw.read

    def _piped(self, pipe: Piped) -> tuple[Buffer, Read]:
        """Like _start, for a pipe: what it has so far (a capture's magic at least), and
        each read what it has then. gzip'd data is read a megabyte at a time."""
        self.compressed = pipe.peek(4)[:2] == GZIP_MAGIC
        if self.compressed:
            read = Gunzip(pipe.read1).read
            return read(CHUNK), read
        return pipe.read1(CHUNK), pipe.read1

    def _close_files(self) -> None:
        if self._map is not None:
            self._map.close()
        if self._raw is not None:
            self._raw.close()

    def _run(self, inner: Iterator[TcpSegment]) -> Generator[TcpSegment, None, None]:
        try:
            yield from inner
        finally:
            self._close_files()

    def __iter__(self) -> Iterator[TcpSegment]:
        return self._segments

    def __next__(self) -> TcpSegment:
        return next(self._segments)

    def close(self) -> None:
        """Stop reading and close the file."""
        self._segments.close()
        self._close_files()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def problem(self) -> str | None:
        """Why reading stopped before the end of the file (one line), or None."""
        return self._stats.problem

    @property
    def truncated(self) -> bool:
        """Whether reading stopped early at a truncated or damaged record."""
        return self._stats.problem is not None

    @property
    def frames(self) -> int:
        """Packets read (complete once the iteration has ended)."""
        return self._stats.frames

    @property
    def segments(self) -> int:
        """TCP segments yielded (complete once the iteration has ended)."""
        return self._stats.segments

    @property
    def unsupported_linktypes(self) -> frozenset[int]:
        """Link types of pcapng interfaces whose packets were skipped."""
        return frozenset(self._stats.unsupported)


def read_packets(path: str | os.PathLike[str] | Piped) -> CaptureReader:
    """Open a capture file (or read a pipe); iterate the result for its TCP segments. See
    CaptureReader."""
    return CaptureReader(path)
