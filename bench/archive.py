"""Archive speed: write throughput, and show/stats on a large archive with flat memory.

Theory of operation. Every figure is a ratio to a baseline measured in the same run:

1. Write. Real captures are dissected once and turned into archive maps by `to_archive`
   (default privacy policy), kept in memory; only `ArchiveWriter.write()` + `close()` is
   timed (signed, the live recorder's default flush policy), plain and zstd-compressed, over
   as many passes of the session as make about --write-mb of archive. Baseline: the same
   plaintext bytes (every record's `raw`) written record by record to a plain buffered file,
   the page-cache ceiling for "keep what crossed the wire".
2. Read. An archive of --size-gb (and one a tenth of that) is made by repeating the records
   of the display-heavy and mixed sessions, time moving on with every repetition. Each
   command runs in its own process under GNU time, which reports its peak RSS: `stats
   --json`, `show`, `show -f 'display and msg == draw_copy'`. Baselines: `cat ARCHIVE` (the
   page-cache ceiling) and a bare msgpack.Unpacker pass that unpacks every object and its
   payload map (the format's ceiling). Memory is flat when RSS(large) / RSS(small) is ~1.

The archives live in a temporary directory, deleted at the end. Without captures on the
command line the lab's display-heavy and mixed captures are used, and a key-flood session
(input-heavy) is recorded with the QEMU harness first (`--no-record` skips that).

    python -m bench.archive [CAPTURE.pcapng ...] [--size-gb 1] [--write-mb 200] [--repeat 3]
                            [--no-record]

Results: bench/results/archive.json and bench/results/archive.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from dissectors.regen import LAB_CAPTURES as LAB
from spicetap.archive.importer import dissector_hashes
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.records import to_archive
from spicetap.archive.writer import ArchiveWriter
from spicetap.show import iter_capture

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LAB_CAPTURES = (LAB / "video-stream-mjpeg.pcapng", LAB / "plain-linux-all-channels.pcapng")
MB = 1e6
MIN_FREE = 5e9  # below this much free disk the read archive is scaled down
FILTER = "display and msg == draw_copy"
READ_COMMANDS: tuple[tuple[str, list[str]], ...] = (
    ("stats --json", ["stats", "--json"]),
    ("show", ["show"]),
    (f"show -f '{FILTER}'", ["show", "-f", FILTER]),
)
BASELINES = {"vs_cat": "cat (baseline)", "vs_msgpack": "msgpack pass (baseline)"}
# The format's ceiling: unpack every [payload, chain] object and its payload map, importing
# nothing else, and print how many objects there were.
UNPACK_PASS = """
import sys, msgpack
n = 0
with open(sys.argv[1], "rb") as f:
    for payload, _chain in msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 30):
        msgpack.unpackb(payload, raw=False, strict_map_key=False)
        n += 1
print(n)
"""
GNU_TIME = Path("/usr/bin/time")  # Debian package time
COMMAND_TIMEOUT = 1800.0  # seconds; a command still running then is killed and reported


@dataclass(frozen=True)
class Workload:
    name: str  # the capture's file name
    kind: str  # display-heavy, input-heavy or mixed: decided from the records themselves
    records: list[dict[str, Any]]
    raw_bytes: int


def classify(records: Sequence[dict[str, Any]]) -> str:
    channels = Counter(r["channel"] for r in records)
    display_raw = sum(len(r["raw"]) for r in records if r["channel"] == "display")
    all_raw = sum(len(r["raw"]) for r in records) or 1
    if channels["inputs"] * 2 > len(records):
        return "input-heavy"
    if display_raw * 2 > all_raw:
        return "display-heavy"
    return "mixed"


def load(path: Path) -> Workload:
    """The archive maps of a capture's records, as the recorder would write them."""
    policy = PrivacyPolicy()
    records: list[dict[str, Any]] = []
    t0: float | None = None
    for rec in iter_capture(path):
        t0 = rec.time if t0 is None else t0
        obj = to_archive(rec, t0, policy)
        if obj is not None:
            records.append(obj)
    raw = sum(len(r["raw"]) for r in records)
    return Workload(path.name, classify(records), records, raw)


def header(source: str) -> dict[str, Any]:
    return {
        "dissector": dissector_hashes(),
        "session": {
            "viewer": None,
            "server": None,
            "insertion": "import",
            "source": source,
            "tls": {"viewer": None, "server": None},
            "auth": None,
        },
        "policy": PrivacyPolicy().describe(),
        "started": time.time(),
    }


# -- write ---------------------------------------------------------------------------------
def time_writer(
    w: Workload, path: Path, passes: int, key: Ed25519PrivateKey, compress: bool
) -> tuple[float, int]:
    """Seconds to write `passes` repetitions of the session, and the archive's size."""
    hdr = header(w.name)
    start = time.perf_counter()
    writer = ArchiveWriter(path, hdr, signing_key=key, compress=compress)
    for _ in range(passes):
        for rec in w.records:
            writer.write(rec)  # assigns rec["seq"]: the maps are reused as they are
    writer.close()
    elapsed = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    return elapsed, size


def time_plain(w: Workload, path: Path, passes: int) -> float:
    """Baseline: the same plaintext bytes, record by record, to a plain buffered file."""
    start = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(passes):
            for rec in w.records:
                f.write(rec["raw"])
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def bench_write(
    workloads: Sequence[Workload], tmp: Path, write_mb: float, repeat: int, progress: Progress
) -> list[dict[str, Any]]:
    """Best of `repeat` rounds, each round timing the baseline, plain and zstd in turn."""
    key = Ed25519PrivateKey.generate()  # throwaway: the user's signing key is not touched
    results = []
    task = progress.add_task("write throughput", total=len(workloads) * (1 + 3 * repeat))
    for w in workloads:
        _s, pass_size = time_writer(w, tmp / "warm.spta", 1, key, compress=False)  # warm-up
        progress.advance(task)
        passes = max(1, min(100_000, math.ceil(write_mb * MB / pass_size)))
        records = passes * len(w.records)
        raw = passes * w.raw_bytes
        best: dict[str, tuple[float, int]] = {}
        for _round in range(repeat):
            timings = {
                "baseline": (time_plain(w, tmp / "plain.bin", passes), raw),
                "plain": time_writer(w, tmp / "w.spta", passes, key, compress=False),
                "zstd": time_writer(w, tmp / "w.spta.zst", passes, key, compress=True),
            }
            for mode, timing in timings.items():
                if mode not in best or timing[0] < best[mode][0]:
                    best[mode] = timing
            progress.advance(task, 3)
        base = best["baseline"][0]
        row: dict[str, Any] = {
            "capture": w.name,
            "kind": w.kind,
            "passes": passes,
            "records": records,
            "raw_bytes": raw,
            "baseline": {"seconds": base, "mb_per_s": raw / base / MB, "rec_per_s": records / base},
        }
        for mode in ("plain", "zstd"):
            secs, size = best[mode]
            row[mode] = {
                "seconds": secs,
                "archive_bytes": size,
                "mb_per_s": raw / secs / MB,  # plaintext recorded per second
                "archive_mb_per_s": size / secs / MB,
                "rec_per_s": records / secs,
                "ratio": base / secs,  # = spicetap MB/s / baseline MB/s on the same bytes
            }
        results.append(row)
    return results


# -- read ----------------------------------------------------------------------------------
def make_archive(
    path: Path, workloads: Sequence[Workload], target: int, progress: Progress
) -> dict[str, Any]:
    """An archive of about `target` bytes repeating the sessions' records, time moving on."""
    records = [r for w in workloads for r in w.records]
    cycle_raw = sum(len(r["raw"]) for r in records)
    span = max(r["t"] for r in records) + 1_000_000  # each repetition starts 1 ms later
    max_cycles = target // max(cycle_raw, 1) + 2  # archive bytes exceed raw bytes
    task = progress.add_task(f"making {target / MB:,.0f} MB archive", total=target)
    writer = ArchiveWriter(
        path,
        header("bench"),
        signing_key=Ed25519PrivateKey.generate(),
    )
    count = raw = 0
    for cycle in range(max_cycles):
        offset = cycle * span
        for rec in records:
            obj = dict(rec)
            obj["t"] = rec["t"] + offset
            writer.write(obj)
            count += 1
            raw += len(rec["raw"])
            if writer.part_bytes >= target:
                break
        progress.update(task, completed=min(writer.part_bytes, target))
        if writer.part_bytes >= target:
            break
    writer.close()
    progress.update(task, completed=target)
    return {"path": str(path), "bytes": path.stat().st_size, "records": count, "raw_bytes": raw}


def run_measured(
    cmd: Sequence[str], stdout: Path | None, tmp: Path
) -> tuple[float, int | None, int]:
    """Seconds, peak RSS in bytes (None without GNU time) and exit code of one command.

    The RSS comes from GNU time, a small process that starts the command: a child forked
    straight from this (large) Python process would report this process's RSS as its own
    peak, since Linux carries the pre-exec high-water mark over into the child's rusage.
    """
    rss_file = tmp / "rss.txt"
    wrapped = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *cmd] if GNU_TIME.exists() else cmd
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with stdout.open("wb") if stdout is not None else Path(os.devnull).open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started here
            rc = proc.wait()
        elapsed = time.perf_counter() - start
    rss = None
    if GNU_TIME.exists():
        rss = int(rss_file.read_text().split()[-1]) * 1024  # %M is in KiB
    return elapsed, rss, rc


def bench_read(
    archives: dict[str, dict[str, Any]], tmp: Path, progress: Progress
) -> list[dict[str, Any]]:
    py = sys.executable
    cat = shutil.which("cat")
    commands: list[tuple[str, list[str]]] = []  # label, the command before the archive
    if cat is not None:
        commands.append(("cat (baseline)", [cat]))
    commands.append(("msgpack pass (baseline)", [py, "-c", UNPACK_PASS]))
    commands += [(label, [py, "-m", "spicetap", *args]) for label, args in READ_COMMANDS]
    task = progress.add_task("show / stats", total=len(commands) * len(archives))
    results = []
    for label, prefix in commands:
        row: dict[str, Any] = {"command": label}
        for size_name, info in archives.items():
            path = Path(info["path"])
            capture = tmp / "stdout.txt" if "stats" in label or "msgpack" in label else None
            secs, rss, rc = run_measured([*prefix, str(path)], capture, tmp)
            progress.advance(task)
            row[size_name] = {
                "seconds": secs,
                "mb_per_s": info["bytes"] / secs / MB,
                "rec_per_s": info["records"] / secs,
                "peak_rss_bytes": rss,
                "exit": rc,
                "check": check_output(label, capture, info) if rc == 0 else f"exit {rc}",
            }
        results.append(row)
    add_read_ratios(results, list(archives))
    return results


def check_output(label: str, capture: Path | None, info: dict[str, Any]) -> str:
    """That a command really read every record: "ok" or what was wrong."""
    if capture is None:
        return "ok"
    text = capture.read_text()
    if "msgpack" in label:
        seen = int(text.strip()) - 2  # header and end record
    else:
        seen = sum(json.loads(text)["records"].values())
    return "ok" if seen == info["records"] else f"saw {seen} of {info['records']} records"


def add_read_ratios(results: list[dict[str, Any]], sizes: list[str]) -> None:
    base = {r["command"]: r for r in results}
    for r in results:
        for size in sizes:
            m = r[size]
            for name, key in BASELINES.items():
                if key in base:
                    m[name] = m["mb_per_s"] / base[key][size]["mb_per_s"]
        rss_small, rss_large = r["small"]["peak_rss_bytes"], r["large"]["peak_rss_bytes"]
        if rss_small and rss_large:
            r["rss_ratio_large_to_small"] = rss_large / rss_small


# -- report --------------------------------------------------------------------------------
def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MB:,.1f}"


def _size(data: dict[str, Any], which: str) -> str:
    return f"{data['archives'][which]['bytes'] / MB:,.0f} MB"


def print_tables(console: Console, data: dict[str, Any]) -> None:
    t = Table(title="archive write, signed: spicetap vs plain buffered writes of the raw bytes")
    for col in (
        "capture (kind)",
        "records",
        "raw MB",
        "writer",
        "raw MB/s",
        "file MB/s",
        "records/s",
        "ratio",
    ):
        t.add_column(col, justify="left" if col in ("capture (kind)", "writer") else "right")
    for r in data["write"]:
        b = r["baseline"]
        t.add_row(
            f"{r['capture']} ({r['kind']})",
            f"{r['records']:,}",
            f"{r['raw_bytes'] / MB:,.0f}",
            "baseline",
            f"{b['mb_per_s']:,.0f}",
            "",
            f"{b['rec_per_s']:,.0f}",
            "1x",
        )
        for mode in ("plain", "zstd"):
            m = r[mode]
            t.add_row(
                "",
                "",
                "",
                f"spicetap {mode}",
                f"{m['mb_per_s']:,.1f}",
                f"{m['archive_mb_per_s']:,.1f}",
                f"{m['rec_per_s']:,.0f}",
                f"{m['ratio']:.3f}x",
            )
    console.print(t)
    small, large = (_size(data, s) for s in ("small", "large"))
    title = "archive read, one process each, page cache warm: " + "; ".join(
        f"{a['bytes'] / MB:,.0f} MB = {a['records']:,} records" for a in data["archives"].values()
    )
    t = Table(title=title)
    for col in (
        "command",
        "MB/s",
        "records/s",
        "vs cat",
        "vs msgpack",
        f"RSS MB @{small}",
        f"RSS MB @{large}",
        "RSS ratio",
        "check",
    ):
        t.add_column(col, justify="left" if col in ("command", "check") else "right")
    for r in data["read"]:
        m = r["large"]
        ratio = r.get("rss_ratio_large_to_small")
        t.add_row(
            r["command"],
            f"{m['mb_per_s']:,.1f}",
            f"{m['rec_per_s']:,.0f}",
            f"{m.get('vs_cat', 0):.4f}x",
            f"{m.get('vs_msgpack', 0):.3f}x",
            _mb(r["small"]["peak_rss_bytes"]),
            _mb(m["peak_rss_bytes"]),
            "n/a" if ratio is None else f"{ratio:.2f}",
            "ok"
            if m["check"] == r["small"]["check"] == "ok"
            else f"{r['small']['check']} / {m['check']}",
        )
    console.print(t)


Bar = tuple[str, float, str, str]  # label, value, text after the bar, colour ("" = no bar)


def chart_panels(data: dict[str, Any]) -> list[tuple[str, list[Bar]]]:
    panels: list[tuple[str, list[Bar]]] = []
    rows: list[Bar] = []
    for r in data["write"]:
        b = r["baseline"]
        rows.append((f"{r['capture']} ({r['kind']})", 0.0, "", ""))
        rows.append(
            (
                "  plain buffered write",
                b["mb_per_s"],
                f"{b['mb_per_s']:,.0f} MB/s, {b['rec_per_s']:,.0f} rec/s",
                "#9e9e9e",
            )
        )
        for mode, color in (("plain", "#1e88e5"), ("zstd", "#43a047")):
            m = r[mode]
            text = f"{m['mb_per_s']:,.1f} MB/s, {m['rec_per_s']:,.0f} rec/s = {m['ratio']:.3f}x"
            rows.append((f"  spicetap {mode}", m["mb_per_s"], text, color))
    panels.append(("Write: plaintext MB/s recorded, ratio to plain buffered writes", rows))
    small, large = (_size(data, s) for s in ("small", "large"))
    rows = []
    for r in data["read"]:
        m = r["large"]
        color = "#9e9e9e" if "baseline" in r["command"] else "#1e88e5"
        text = (
            f"{m['mb_per_s']:,.1f} MB/s, {m['rec_per_s']:,.0f} rec/s = "
            f"{m.get('vs_cat', 0):.4f}x cat, {m.get('vs_msgpack', 0):.3f}x msgpack"
        )
        rows.append((r["command"], m["mb_per_s"], text, color))
    panels.append((f"Read: MB/s over a {large} archive, ratio to cat and msgpack", rows))
    if all(r.get("rss_ratio_large_to_small") for r in data["read"]):
        rows = []
        for r in data["read"]:
            for size, name, color in (("small", small, "#90caf9"), ("large", large, "#1e88e5")):
                mb = r[size]["peak_rss_bytes"] / MB
                extra = f" = {r['rss_ratio_large_to_small']:.2f}x" if size == "large" else ""
                rows.append((f"{r['command']} @{name}", mb, f"{mb:,.1f} MB{extra}", color))
        panels.append((f"Peak RSS: {small} vs {large} archive (flat memory: ratio ~1)", rows))
    return panels


def draw_chart(data: dict[str, Any], out: Path) -> None:
    """Labelled horizontal bars, one panel per question; the numbers are written beside them."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = Path("/usr/share/fonts/truetype/dejavu")
    font: Any = ImageFont.load_default(13)
    bold: Any = ImageFont.load_default(15)
    if (fonts / "DejaVuSans.ttf").exists() and (fonts / "DejaVuSans-Bold.ttf").exists():
        font = ImageFont.truetype(str(fonts / "DejaVuSans.ttf"), 13)
        bold = ImageFont.truetype(str(fonts / "DejaVuSans-Bold.ttf"), 15)
    panels = chart_panels(data)
    width, label_w, bar_w, row_h, title_h = 1280, 380, 360, 22, 34
    height = 20 + sum(title_h + row_h * len(rows) + 16 for _t, rows in panels)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    y = 10
    for title, rows in panels:
        draw.text((10, y + 6), title, fill="black", font=bold)
        y += title_h
        top = max((value for _l, value, _t, _c in rows), default=1.0) or 1.0
        for label, value, text, color in rows:
            draw.text((14, y + 3), label, fill="black", font=font)
            if color:
                length = max(1, round(bar_w * value / top))
                draw.rectangle((label_w, y + 2, label_w + length, y + row_h - 4), fill=color)
                draw.text((label_w + length + 6, y + 3), text, fill="black", font=font)
            y += row_h
        y += 16
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


# -- main ----------------------------------------------------------------------------------
def record_key_flood(tmp: Path, console: Console) -> Path | None:
    out = tmp / "keys.pcapng"
    console.print("recording an input-heavy session (QEMU + spice-gtk, 20,000 keys) ...")
    cmd = [sys.executable, "-m", "bench.make_capture", str(out), "--keys", "20000"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        console.print("[yellow]notice: recording timed out; no input-heavy session[/yellow]")
        return None
    if done.returncode != 0 or not out.exists():
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        console.print(f"[yellow]notice: recording failed ({tail}); no input-heavy session[/yellow]")
        return None
    return out


def read_sizes(size_gb: float, tmp: Path, console: Console) -> dict[str, int]:
    """Target sizes of the two read archives: "large" (scaled to the free disk) and "small"."""
    free = shutil.disk_usage(tmp).free
    large = int(size_gb * 1e9)
    if free < MIN_FREE or large * 1.2 > free / 2:
        scaled = int(min(large, free / 5))
        console.print(
            f"[yellow]notice: {free / 1e9:.1f} GB free in {tmp}: read archive scaled "
            f"down from {large / MB:,.0f} MB to {scaled / MB:,.0f} MB[/yellow]"
        )
        large = scaled
    return {"small": large // 10, "large": large}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captures", nargs="*", type=Path, help="real pcapng captures")
    parser.add_argument("--size-gb", type=float, default=1.0, help="read archive size")
    parser.add_argument(
        "--write-mb", type=float, default=200.0, help="archive MB written per capture and mode"
    )
    parser.add_argument("--repeat", type=int, default=3, help="write timings: best of N")
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="do not record an input-heavy session when none is given",
    )
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_gb <= 0 or args.write_mb <= 0:
        parser.error("--repeat, --size-gb and --write-mb must be positive")
    console = Console()
    started = time.perf_counter()
    if not GNU_TIME.exists():
        console.print(f"[yellow]notice: no {GNU_TIME} (Debian package time): no peak RSS[/yellow]")
    captures: list[Path] = args.captures or [p for p in LAB_CAPTURES if p.exists()]
    with tempfile.TemporaryDirectory(prefix="spicetap-bench-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        workloads = [load(p) for p in captures]
        if not any(w.kind == "input-heavy" for w in workloads) and not args.no_record:
            keys = record_key_flood(tmp, console)
            if keys is not None:
                workloads.append(load(keys))
        if not workloads:
            console.print("bench: no captures (give pcapng files)")
            return 2
        sizes = read_sizes(args.size_gb, tmp, console)
        bulk = [w for w in workloads if w.kind != "input-heavy"] or workloads
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            write = bench_write(workloads, tmp, args.write_mb, args.repeat, progress)
            archives = {
                name: make_archive(tmp / f"read-{name}.spta", bulk, size, progress)
                for name, size in sizes.items()
            }
            read = bench_read(archives, tmp, progress)
    data: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "captures": [
            {"name": w.name, "kind": w.kind, "records": len(w.records), "raw_bytes": w.raw_bytes}
            for w in workloads
        ],
        "write_mb": args.write_mb,
        "repeat": args.repeat,
        "read_archive_made_from": [w.name for w in bulk],
        "write": write,
        "archives": {
            k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in archives.items()
        },
        "read": read,
        "seconds": time.perf_counter() - started,
    }
    print_tables(Console(width=max(console.width, 150)), data)  # whole rows, even in logs
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "archive.json").write_text(json.dumps(data, indent=2) + "\n")
    draw_chart(data, RESULTS / "archive.png")
    console.print(
        f"{data['seconds']:.0f} s; results in {RESULTS / 'archive.json'} and "
        f"{RESULTS / 'archive.png'}"
    )
    failed = [r["command"] for r in read for s in archives if r[s]["check"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
