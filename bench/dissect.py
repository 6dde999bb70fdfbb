"""Dissection speed: spicetap's whole `show` pipeline vs tshark's SPICE dissector.

Both read the same capture in the same run. spicetap reads the pcapng, reassembles TCP,
frames every channel and decodes every field of every message (agent messages included);
tshark runs `-d tcp.port==N,spice -T fields -e spice.message_type`. Reports messages/s and
MB/s for each and the ratio, best of --repeat runs, and writes bench/results/dissect.json.
The runs alternate (ours, theirs, ours, ...) so that both meet the same machine load; the
load average at the start is recorded beside the figures.

    python -m bench.dissect [CAPTURE.pcapng ...] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dissectors.regen import LAB_CAPTURES
from spicetap.capture import SYN, read_packets
from spicetap.show import iter_capture

RESULTS = Path(__file__).resolve().parent / "results"
LAB_CAPTURE = LAB_CAPTURES / "plain-linux-all-channels.pcapng"


def spice_ports(path: Path) -> set[int]:
    """Server ports: destinations of SYNs whose streams carry SPICE."""
    ports: set[int] = set()
    with read_packets(path) as reader:
        for seg in reader:
            if seg.flags & SYN and not seg.flags & 0x10:
                ports.add(seg.dport)
    return ports


def run_spicetap(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    messages = 0
    for rec in iter_capture(path):
        if rec.kind in ("message", "agent"):
            messages += 1
    return time.perf_counter() - start, messages


def run_tshark(path: Path, ports: set[int], packets: int | None = None) -> tuple[float, int]:
    """tshark's time on the capture; with `packets`, only that many (its start-up)."""
    cmd = ["tshark", "-n", "-r", str(path)] + (["-c", str(packets)] if packets else [])
    for port in sorted(ports):
        cmd += ["-d", f"tcp.port=={port},spice"]
    cmd += ["-T", "fields", "-e", "spice.message_type"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=600).stdout
    elapsed = time.perf_counter() - start
    messages = sum(len(line.split(b",")) for line in out.splitlines() if line.strip())
    return elapsed, messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captures", nargs="*", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    captures: list[Path] = args.captures or [LAB_CAPTURE]
    if shutil.which("tshark") is None:
        print("bench: tshark is not installed (Debian package tshark)")
        return 2
    console = Console()
    results: list[dict[str, Any]] = []
    with Progress(console=console) as progress:
        task = progress.add_task("dissecting", total=len(captures) * args.repeat * 2)
        for path in captures:
            ports = spice_ports(path)
            load = os.getloadavg()
            ours_runs, theirs_runs, startups = [], [], []
            for _ in range(args.repeat):
                ours_runs.append(run_spicetap(path))
                progress.advance(task)
                theirs_runs.append(run_tshark(path, ports))
                startups.append(run_tshark(path, ports, packets=1)[0])
                progress.advance(task)
            ours = min(ours_runs, key=lambda r: r[0])
            theirs = min(theirs_runs, key=lambda r: r[0])
            # tshark's time includes starting a process and loading its dissectors; spicetap
            # runs in this one. The steady-state ratio leaves that start-up out.
            startup = min(startups)
            steady = theirs[0] - startup
            # Start-up that is nearly all of tshark's time leaves no steady state to compare
            # (noise can even make it exceed the whole run): no ratio then.
            steady_ratio = (
                (ours[1] / ours[0]) / (theirs[1] / steady) if steady > 0.1 * theirs[0] else None
            )
            size = path.stat().st_size
            results.append(
                {
                    "capture": path.name,
                    "bytes": size,
                    "load_average": load,
                    "spicetap": {
                        "seconds": ours[0],
                        "messages": ours[1],
                        "msg_per_s": ours[1] / ours[0],
                        "mb_per_s": size / ours[0] / 1e6,
                    },
                    "tshark": {
                        "seconds": theirs[0],
                        "messages": theirs[1],
                        "msg_per_s": theirs[1] / theirs[0],
                        "mb_per_s": size / theirs[0] / 1e6,
                    },
                    "ratio_msg_per_s": (ours[1] / ours[0]) / (theirs[1] / theirs[0]),
                    "ratio_time": theirs[0] / ours[0],
                    "tshark_startup_seconds": startup,
                    "ratio_msg_per_s_steady": steady_ratio,
                }
            )
    table = Table(title="dissection: spicetap (every field) vs tshark (message types)")
    for col in (
        "capture",
        "spicetap msg/s",
        "MB/s",
        "tshark msg/s",
        "MB/s",
        "ratio msg/s",
        "ratio without tshark's start-up",
    ):
        table.add_column(col)
    for r in results:
        s, t = r["spicetap"], r["tshark"]
        table.add_row(
            str(r["capture"]),
            f"{s['msg_per_s']:,.0f}",
            f"{s['mb_per_s']:.1f}",
            f"{t['msg_per_s']:,.0f}",
            f"{t['mb_per_s']:.1f}",
            f"{r['ratio_msg_per_s']:.2f}x",
            "n/a (start-up is all of it)"
            if r["ratio_msg_per_s_steady"] is None
            else f"{r['ratio_msg_per_s_steady']:.2f}x",
        )
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dissect.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
