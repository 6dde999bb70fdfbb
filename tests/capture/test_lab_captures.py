"""The real captures of the lab (shared/lab/captures), when they are there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dissectors.regen import LAB_CAPTURES
from spicetap.capture import (
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamGap,
    StreamOpened,
    TcpReassembler,
    read_packets,
)

LAB = LAB_CAPTURES
CAPTURES = sorted(LAB.glob("*.pcapng")) if LAB.is_dir() else []
SPICE_MAGIC = b"REDQ"
TLS_HANDSHAKE = b"\x16\x03"  # a TLS channel: the SPICE link is inside, encrypted


def reassemble(path: Path) -> tuple[list[StreamEvent], dict[tuple[int, str], bytes]]:
    reassembler = TcpReassembler()
    with read_packets(path) as reader:
        events = [event for segment in reader for event in reassembler.feed(segment)]
    events += reassembler.finish()
    assert reader.problem is None
    assert reader.frames == reader.segments  # loopback captures of SPICE: all TCP
    streams: dict[tuple[int, str], bytearray] = {}
    for event in events:
        if isinstance(event, StreamData):
            streams.setdefault((event.conn, event.direction), bytearray()).extend(event.data)
    return events, {key: bytes(value) for key, value in streams.items()}


@pytest.fixture(params=CAPTURES, ids=[path.name for path in CAPTURES])
def capture(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_lab_folder() -> None:
    if not LAB.is_dir():
        pytest.skip(f"{LAB} is absent")
    assert CAPTURES, f"no captures in {LAB}"


def test_every_stream_is_whole_and_starts_with_the_link_magic(capture: Path) -> None:
    events, streams = reassemble(capture)
    assert not [e for e in events if isinstance(e, StreamGap)]
    opened = [e for e in events if isinstance(e, StreamOpened)]
    closed = [e for e in events if isinstance(e, StreamClosed)]
    assert opened
    assert [e.conn for e in opened] == list(range(len(opened)))
    assert sorted(e.conn for e in closed) == [e.conn for e in opened]
    assert {e.reason for e in closed} <= {"fin", "rst"}
    assert not any(e.midstream for e in opened)
    for conn in (e.conn for e in opened):
        client = streams[(conn, "c2s")]
        server = streams[(conn, "s2c")]
        if client.startswith(TLS_HANDSHAKE):
            assert server.startswith(TLS_HANDSHAKE), conn
        else:
            assert client[:4] == SPICE_MAGIC, conn
            assert server[:4] == SPICE_MAGIC, conn


def _tshark_streams(path: Path, count: int) -> dict[tuple[int, str], bytes]:
    """Each stream's bytes as tshark's "Follow TCP Stream" gives them."""
    args = ["tshark", "-r", str(path), "-q"]
    for conn in range(count):
        args += ["-z", f"follow,tcp,raw,{conn}"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    streams: dict[tuple[int, str], bytes] = {}
    conn = -1
    body = False
    for line in output.splitlines():
        if line.startswith("Filter: tcp.stream eq"):
            conn = int(line.split()[-1])
            streams[(conn, "c2s")] = streams[(conn, "s2c")] = b""
        elif line.startswith("Node 1:"):
            body = True
        elif line.startswith("====="):
            body = False
        elif body and line.strip():
            key = (conn, "s2c" if line.startswith("\t") else "c2s")
            streams[key] += bytes.fromhex(line.strip())
    return {key: value for key, value in streams.items() if value}


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_same_bytes_as_tshark(capture: Path) -> None:
    events, streams = reassemble(capture)
    count = sum(isinstance(e, StreamOpened) for e in events)
    assert streams == _tshark_streams(capture, count)
