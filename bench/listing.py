"""`spicetap sessions` over a folder of compressed archives: the end record read from each
archive's last zstd frame, against reading each archive through (what the listing did
before, and still does for damaged frames), in the same run.

    python -m bench.listing [CAPTURE.pcapng ...] [--archives 8] [--archive-mb 100]

Each archive repeats the captures' records (the lab's video and mixed sessions by default)
to about --archive-mb MB of recorded bytes, written compressed with the recorder's flush
policy, so its frames are the ones a real recording has. Timed in this process, best of 3,
the files in the page cache (this measures CPU, not the disk): `summary()` for every
archive (the listing's work) and the read-through baseline. Then `spicetap sessions --json`
on the folder as a user runs it, once. Results: bench/results/listing.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.archive import LAB_CAPTURES, MB, RESULTS, ROOT, Workload, header, load
from spicetap.archive.reader import ArchiveReader
from spicetap.archive.writer import ArchiveWriter
from spicetap.listing import summary

REPEAT = 3
CLI_TIMEOUT = 600.0  # seconds


def make_archive(path: Path, workloads: Sequence[Workload], target: float) -> int:
    """A compressed archive of about `target` recorded bytes; its size on disk."""
    writer = ArchiveWriter(
        path, header("bench"), signing_key=Ed25519PrivateKey.generate(), compress=True
    )
    records = [r for w in workloads for r in w.records]
    recorded, cycle = 0, 0
    while recorded < target and cycle < 10_000:
        for rec in records:
            writer.write({**rec, "t": rec["t"] + cycle * 1_000_000_000})
            recorded += len(rec["raw"])
        cycle += 1
    writer.close()
    return path.stat().st_size


def read_through(path: Path) -> dict[str, Any] | None:
    with ArchiveReader(path) as reader:
        for _record in reader.records():
            pass
        return reader.end


def best_of(paths: Sequence[Path], step: Callable[[Path], object]) -> float:
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        for path in paths:
            step(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captures", nargs="*", type=Path, help="real pcapng captures")
    parser.add_argument("--archives", type=int, default=8, help="archives in the folder")
    parser.add_argument("--archive-mb", type=float, default=100.0, help="recorded MB each")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    if not 0 < args.archives <= 1000 or not 0 < args.archive_mb <= 10_000:
        parser.error("--archives must be 1-1000 and --archive-mb 0-10000")
    captures: list[Path] = args.captures or [p for p in LAB_CAPTURES if p.exists()]
    if not captures:
        print("bench: no captures (give pcapng files)", file=sys.stderr)
        return 2
    console = Console()
    workloads = [load(p) for p in captures]
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
    with tempfile.TemporaryDirectory(prefix="spicetap-bench-", dir=args.tmp) as tmp_name:
        folder = Path(tmp_name)
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("making compressed archives", total=args.archives)
            paths, disk = [], 0
            for n in range(args.archives):
                path = folder / f"session-{n}.spta.zst"
                disk += make_archive(path, workloads, args.archive_mb * MB)
                paths.append(path)
                progress.advance(task)
            task = progress.add_task("timing", total=3)
            ends = [read_through(p) for p in paths]  # warms the page cache too
            listed = [summary(p)[1]["end"] for p in paths]
            if any(e is None for e in ends) or any(e is None for e in listed):
                console.print("[red]bench: an archive has no end record[/red]")
                return 1
            through = best_of(paths, read_through)
            progress.advance(task)
            tail = best_of(paths, summary)
            progress.advance(task)
            start = time.perf_counter()
            cli = subprocess.run(
                [sys.executable, "-m", "spicetap", "sessions", "--json", str(folder)],
                cwd=ROOT, capture_output=True, timeout=CLI_TIMEOUT, check=False,
            )  # fmt: skip
            cli_seconds = time.perf_counter() - start
            progress.advance(task)
    if cli.returncode != 0 or len(json.loads(cli.stdout)) != args.archives:
        console.print(f"[red]bench: spicetap sessions failed: {cli.stderr.decode()[-300:]}[/red]")
        return 1
    data = {
        "archives": args.archives,
        "archive_disk_mb": disk / args.archives / MB,
        "recorded_mb_each": args.archive_mb,
        "captures": [p.name for p in captures],
        "read_through_s": through,
        "summary_s": tail,
        "speedup": through / tail,
        "cli_sessions_s": cli_seconds,
    }
    table = Table(title=f"listing {args.archives} compressed archives (page cache warm)")
    for column in ("measure", "seconds", "per archive", "ratio to read-through"):
        table.add_column(column)
    for name, secs in (("read through (baseline)", through), ("last frame (spicetap)", tail)):
        per = f"{secs / args.archives * 1000:,.1f} ms"
        table.add_row(name, f"{secs:.3f}", per, f"{through / secs:,.0f}x")
    table.add_row("`spicetap sessions --json`, whole command", f"{cli_seconds:.3f}", "", "")
    Console(width=max(console.width, 110)).print(table)  # whole rows, even in logs
    console.print(f"{data['archive_disk_mb']:.1f} MB on disk per archive")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "listing.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
