"""The value types shared by the capture readers and the TCP reassembler."""

from __future__ import annotations

import mmap
from typing import NamedTuple

__all__ = [
    "ACK",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "Buffer",
    "CaptureError",
    "TcpSegment",
]

# TCP header flags, as in the low 9 bits of the header's offset/flags word.
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10


Buffer = bytes | mmap.mmap
"""What the readers and decoders read from: the file mapped, or a chunk of it."""


class CaptureError(Exception):
    """The capture file cannot be read at all.

    The message is one line naming the file and the problem, fit to show a user as it is.
    A file that is good up to a truncated or damaged tail does not raise this: the reader
    yields what it could read and reports the damage in ``CaptureReader.problem``.
    """


class NotACapture(CaptureError):
    """The file is some other kind of file; `hint` says what it looks like."""

    def __init__(self, name: str, hint: str) -> None:
        super().__init__(f"{name}: not a pcap or pcapng capture ({hint})")
        self.name, self.hint = name, hint


class TcpSegment(NamedTuple):
    """One TCP segment as captured.

    A NamedTuple rather than a frozen dataclass on purpose: one is built per captured
    packet, and on CPython 3.11 a 10-field frozen slots dataclass costs about 1.8 us to
    construct against 0.13 us for this tuple (measured), which alone would be a third of
    the per-packet budget.
    """

    ts: float
    """Capture time, seconds since the epoch."""
    src: str
    """Source address, the usual text form ("127.0.0.1", "::1")."""
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    flags: int
    """The TCP flags (FIN, SYN, RST, PSH, ACK, ...), 9 bits."""
    payload: bytes
    """The TCP payload that was captured."""
    snapped: int = 0
    """Payload bytes that were on the wire but not in the capture (cut by the snap length)."""
