"""A capture that arrives on a pipe: standard input (`-`) or a named pipe.

`tcpdump -U -w - port 5900 | spicetap show -` shows a session's messages as it runs: each
read returns what the pipe holds at that moment, never waiting to fill a buffer, and the
format readers (refill) ask again for what a record still lacks.

Ctrl-C reaches every process of a terminal's pipeline. The writer (tcpdump, dumpcap) then
writes its last packets and closes the pipe; a command that quit at once would lose them and
its summary (`spicetap stats -` prints only at the end). So while a pipe is read, a first
Ctrl-C ends the input where the writer ends it, or INTERRUPT_GRACE later if it goes on (a
named pipe's writer may be elsewhere), and the command finishes with what came; a second
Ctrl-C quits at once.
"""

from __future__ import annotations

import os
import select
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from spicetap import interrupts

from .segment import CaptureError

__all__ = ["INTERRUPT_GRACE", "STDIN", "Piped", "is_piped", "shown_name"]

STDIN = "-"  # the input's name for standard input, as in most Unix tools
INTERRUPT_GRACE = 1.0  # seconds the writer has, after Ctrl-C, to close the pipe
_POLL = 0.2  # how often a wait for the pipe looks whether Ctrl-C set a deadline


def is_piped(path: Path) -> bool:
    """Standard input (`-`, whatever it is), or a named pipe."""
    if str(path) == STDIN:
        return True
    try:
        return stat.S_ISFIFO(path.stat().st_mode)
    except OSError:
        return False


def shown_name(path: Path) -> str:
    """How messages name the input."""
    return "standard input" if str(path) == STDIN else str(path)


class Piped:
    """The bytes of a pipe, read once, as they come. `peek` looks ahead without using them
    up (what the input is: an archive or a capture, plain or gzip'd)."""

    def __init__(self, name: str, fd: int, *, owned: bool) -> None:
        self.name = name
        self.fd = fd
        self.owned = owned  # a named pipe we opened (standard input stays open)
        self.head = b""
        self.ended_by_interrupt = False
        self._deadline: float | None = None  # set by a first Ctrl-C

    @classmethod
    @contextmanager
    def open(cls, path: Path) -> Iterator[Piped]:
        """The pipe `path` names, read with Ctrl-C as the module says. CaptureError when a
        named pipe cannot be opened."""
        if str(path) == STDIN:
            piped = cls(shown_name(path), sys.stdin.fileno(), owned=False)
        else:  # waits for a writer to open it, as any reader of a named pipe does
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CaptureError(f"{path}: cannot read: {exc.strerror or exc}") from None
            piped = cls(str(path), fd, owned=True)
        try:
            with interrupts.handled(piped._interrupted):
                yield piped
        finally:
            if piped.owned:
                os.close(piped.fd)

    def peek(self, size: int) -> bytes:
        """Up to `size` bytes from the start, kept for read1 (fewer only at the end)."""
        while len(self.head) < size:
            more = self._wait_read(size - len(self.head))
            if not more:
                break
            self.head += more
        return self.head[:size]

    def read1(self, size: int) -> bytes:
        """What the pipe has, up to `size` bytes, waiting for at least one; b"" at its end."""
        if self.head:
            out, self.head = self.head[:size], self.head[size:]
            return out
        return self._wait_read(size)

    def _wait_read(self, size: int) -> bytes:
        while True:
            deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline:
                self.ended_by_interrupt = True
                return b""
            ready, _, _ = select.select([self.fd], [], [], _POLL)
            if ready:
                return os.read(self.fd, size)

    def _interrupted(self, _signum: int, _frame: FrameType | None) -> None:
        if self._deadline is not None:
            raise KeyboardInterrupt  # the second: quit now
        self._deadline = time.monotonic() + INTERRUPT_GRACE
