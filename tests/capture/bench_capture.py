"""How fast captures are read and reassembled: ``python3 -m tests.capture.bench_capture``.

With capture files as arguments, times those; without, the lab's plain capture and a
synthetic loopback capture of many small segments (written to a temporary folder).
Prints, for each file, the best of several runs of reading alone and of reading plus
reassembly, in segments per second and megabytes (of file) per second.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from dissectors.regen import LAB_CAPTURES
from spicetap.capture import TcpReassembler, read_packets

from .builders import Frame, stream_frames, write_pcapng

LAB_PLAIN = LAB_CAPTURES / "plain-linux-all-channels.pcapng"


def synthetic(path: Path, connections: int = 50, messages: int = 2000) -> Path:
    """Loopback-like traffic: many small messages each way, some large ones."""
    rng = random.Random(1)
    frames: list[Frame] = []
    for conn in range(connections):
        chunks = [
            (rng.random() < 0.4, rng.randbytes(rng.choice((16, 64, 200, 1400, 8000))))
            for _ in range(messages)
        ]
        frames += stream_frames(chunks, client_isn=conn * 7919, ts0=1.7e9 + conn)
    return write_pcapng(path, frames)


def read_only(path: Path) -> int:
    with read_packets(path) as reader:
        for _segment in reader:
            pass
    return reader.segments


def read_and_reassemble(path: Path) -> int:
    reassembler = TcpReassembler()
    feed = reassembler.feed
    with read_packets(path) as reader:
        for segment in reader:
            for _event in feed(segment):
                pass
    reassembler.finish()
    return reader.segments


def bench(path: Path, runs: int) -> None:
    size = path.stat().st_size
    for name, job in (("read", read_only), ("read+reassemble", read_and_reassemble)):
        best = float("inf")
        segments = 0
        for _ in range(runs):
            start = time.perf_counter()
            segments = job(path)
            best = min(best, time.perf_counter() - start)
        print(
            f"{path.name:40} {name:16} {segments:8} segments"
            f" {segments / best:10,.0f} seg/s {size / best / 1e6:8,.0f} MB/s"
            f" ({best * 1e3:.1f} ms)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("captures", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    paths: list[Path] = args.captures
    with tempfile.TemporaryDirectory() as tmp:
        if not paths:
            paths = [LAB_PLAIN] if LAB_PLAIN.exists() else []
            paths.append(synthetic(Path(tmp) / "synthetic-loopback.pcapng"))
        for path in paths:
            bench(path, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
