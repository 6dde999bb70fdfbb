"""Proxy overhead: spicetap (full dissection, signed recording) beside no proxy, socat,
haproxy and mitmproxy (recording to a file), plain and with TLS on both legs, in one run.

Theory of operation. A fake spice-server and a fake viewer (bench/spice_peers.py, one
process each) speak real SPICE on 127.0.0.1: link stage, main channel INIT with a session
id, then display and inputs channels linked with that id. For each mode (plain, TLS), every
proxy (bench/proxies.py) is started, and each measurement runs through one proxy after the
other, repeats interleaved, so a change in the shared machine's load hits all of them:

1. bulk: DRAW_COPY messages with 1 MiB bodies, server to viewer; MB/s as the viewer sees
   them (best of the repeats). A proxy may still be busy after the viewer has everything
   (spicetap's recorder thread, mitmdump writing its flow): how long, until its CPU goes
   quiet, is "busy after", and "done MB/s" counts that time too. The next measurement
   starts only once the proxy is quiet;
2. small: 16-byte MOUSE_MOTION messages, viewer to server, 64 per write (so that the
   viewer's system calls are not the bottleneck); messages/s, and "done" as above;
3. latency: PING/PONG round trips on a display channel through the proxy, alternating with
   a display channel straight to the server (same load for both); p50 and p99 in
   microseconds. Added latency per traversal = (proxy percentile - direct percentile) / 2:
   a round trip crosses the proxy twice;
then, one proxy at a time, a fresh process of each carries
4. rss: --sessions concurrent sessions (main, display, inputs and cursor each) with traffic
   flowing both ways; VmRSS from /proc/PID/status of the proxy's PID (plus the processes it
   forked: socat forks one per connection, and for it PSS is the fair sum), highest of the
   samples taken while traffic flows.

After each spicetap process stops, every archive it wrote is verified
(spicetap.archive.verify) and read back: each session must hold exactly the messages the
peers exchanged (counted by both ends), byte for byte in total, fully dissected, with no gap
or error record. A run where that fails exits 1.

    python -m bench.proxy [--quick] [--out bench/results/proxy.json] [--proxies a,b,...]

bench/setup installs socat, haproxy and (in bench/.venv) mitmproxy on Debian 12.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from bench.proxies import (
    Pki,
    RunningProxy,
    available,
    cpu_seconds,
    free_port,
    make_pki,
    pss_bytes,
    rss_bytes,
    start_proxy,
    stop_proxy,
    wait_quiet,
)
from bench.proxy_report import markdown_table, print_tables, summarize
from bench.spice_peers import (
    INIT_SIZE,
    MOTION_ACK,
    MOUSE_MOTION,
    PING_SIZE,
    PONG_SIZE,
    Phase,
    server_process,
    viewer_process,
)
from proxy.core.framing import MINI_HEADER
from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify

ROOT = Path(__file__).resolve().parents[1]
PROXIES = ("direct", "socat", "haproxy", "mitmproxy", "spicetap")
OPTIONAL = ("spicetap-norecord",)  # forwarding alone: where spicetap's time goes
MODES = ("plain", "tls")
MB = 1e6
MIB = 1 << 20
RSS_BODY = 16 * 1024  # display message body during the RSS phase
RSS_INTERVAL = 0.1  # seconds between messages, per display and per inputs channel
CALL_TIMEOUT = 900.0  # the longest one endpoint command may take (a slow proxy's bulk)


@dataclass(frozen=True)
class Sizes:
    bulk_messages: int  # 1 MiB display messages per bulk transfer
    small_messages: int
    pings: int
    warmup: int  # pings not counted
    repeat: int  # bulk and small: best of
    sessions: int
    rss_seconds: float


FULL = Sizes(1024, 500_000, 5000, 200, 3, 50, 10.0)
QUICK = Sizes(128, 100_000, 1000, 100, 1, 50, 3.0)
SMALL_BURST = 64  # messages per write in the small-message phase


class Peer:
    """One endpoint process and the pipe that drives it."""

    def __init__(self, ctx: SpawnContext, target: Callable[..., None], args: tuple[Any, ...]):
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.hello: Any = self._receive(120.0)

    def call(self, *command: Any, timeout: float = CALL_TIMEOUT) -> Any:
        self.pipe.send(command)
        reply = self._receive(timeout)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def _receive(self, timeout: float) -> Any:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"endpoint process silent for {timeout:g} s")
        return self.pipe.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(("quit",))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()  # by its PID: we started it
            self.proc.join(5)


@dataclass
class Expected:
    """What one session's archive must hold: messages by "channel dir name", wire bytes."""

    counts: Counter[str]
    wire: int


SIZES_ON_WIRE = {
    "main s2c init": INIT_SIZE,
    "inputs c2s mouse_motion": len(MOUSE_MOTION),
    "inputs s2c mouse_motion_ack": len(MOTION_ACK),
    "display s2c ping": PING_SIZE,
    "display c2s pong": PONG_SIZE,
}


def expect(counts: dict[str, int], draw_copy_size: int = 0) -> Expected:
    full = Counter({"main s2c init": 1, **{k: v for k, v in counts.items() if v}})
    sizes = {**SIZES_ON_WIRE, "display s2c draw_copy": draw_copy_size}
    return Expected(full, sum(n * sizes[k] for k, n in full.items()))


@dataclass
class Bench:
    sizes: Sizes
    pki: Pki
    tmp: Path
    ctx: SpawnContext
    progress: Progress
    task: Any
    # fixed, so that a restarted server (after a proxy failed) is where proxies still expect
    server_ports: dict[str, int] = field(
        default_factory=lambda: {"plain": free_port(), "tls": free_port()}
    )
    server: Peer | None = None
    viewer: Peer | None = None

    def start_peers(self) -> None:
        self.stop_peers()
        cert, key = str(self.pki.server_cert), str(self.pki.server_key)
        self.server = Peer(self.ctx, server_process, (cert, key, self.server_ports))
        self.viewer = Peer(self.ctx, viewer_process, (str(self.pki.ca),))

    def stop_peers(self) -> None:
        for peer in (self.server, self.viewer):
            if peer is not None:
                peer.close()
        self.server = self.viewer = None

    def step(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def done(self) -> None:
        self.progress.advance(self.task)

    def run(
        self, phase: Phase, running: RunningProxy, tls: bool
    ) -> tuple[Any, Any, float, CpuSplit]:
        """One phase through the proxy: the viewer's and the server's results, how long the
        proxy stayed busy after the viewer was done, and the CPU seconds of the proxy's
        process and of the processes it started (spicetap's recording process, socat's
        forks)."""
        assert self.server is not None and self.viewer is not None
        self.server.call("phase", phase)
        pids = running.pids
        before = CpuSplit.of(pids)
        direct = self.server_ports["tls" if tls else "plain"]
        got = self.viewer.call("run", phase, running.port, tls, direct)
        busy = wait_quiet(running)
        cpu = CpuSplit.of(running.pids).minus(before)
        served = self.server.call("results", 60.0)
        return got, served, busy, cpu


@dataclass(frozen=True)
class CpuSplit:
    main: float  # the proxy's own process (with its children already reaped)
    children: float  # the processes it started that are still there

    @property
    def total(self) -> float:
        return self.main + self.children

    @staticmethod
    def of(pids: list[int]) -> CpuSplit:
        return CpuSplit(cpu_seconds(pids[:1]), sum(cpu_seconds([p]) for p in pids[1:]))

    def minus(self, earlier: CpuSplit) -> CpuSplit:
        # a child that exited in between (socat's) has moved into main's reaped time
        return CpuSplit(self.main - earlier.main, max(0.0, self.children - earlier.children))


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


Expectations = dict[int, Expected]  # session id -> what its archive must hold


def measure_bulk(
    b: Bench, running: RunningProxy, tls: bool, expected: Expectations
) -> dict[str, Any]:
    phase = Phase("bulk", count=b.sizes.bulk_messages, body_size=MIB)
    got, _served, busy, cpu = b.run(phase, running, tls)
    expected[got["session"]] = expect(
        {"display s2c draw_copy": phase.count}, MINI_HEADER.size + MIB
    )
    seconds, wire = got["seconds"], got["bytes"]
    return {
        "messages": got["messages"],
        "bytes": wire,
        "seconds": seconds,
        "mb_per_s": wire / seconds / MB,
        "busy_after_s": busy,
        "done_mb_per_s": wire / (seconds + busy) / MB,
        "proxy_cpu_s_per_gb": cpu.total / (wire / 1e9) if running.proc else None,
        # where it went: spicetap's proxy process and its recording process
        "main_cpu_s_per_gb": cpu.main / (wire / 1e9) if running.proc else None,
        "children_cpu_s_per_gb": cpu.children / (wire / 1e9) if running.proc else None,
        # what a burst costs in memory (spicetap holds what recording has not taken yet)
        "peak_rss_mb": rss_bytes(running.pids, "VmHWM") / MB if running.proc else None,
    }


def measure_small(
    b: Bench, running: RunningProxy, tls: bool, expected: Expectations
) -> dict[str, Any]:
    phase = Phase("small", count=b.sizes.small_messages, burst=SMALL_BURST)
    got, _served, busy, cpu = b.run(phase, running, tls)
    expected[got["session"]] = expect(
        {"inputs c2s mouse_motion": phase.count, "inputs s2c mouse_motion_ack": 1}
    )
    seconds, n = got["seconds"], got["messages"]
    return {
        "messages": n,
        "seconds": seconds,
        "msg_per_s": n / seconds,
        "busy_after_s": busy,
        "done_msg_per_s": n / (seconds + busy),
        "proxy_cpu_us_per_msg": cpu.total / n * 1e6 if running.proc else None,
    }


def measure_latency(
    b: Bench, running: RunningProxy, tls: bool, expected: Expectations
) -> dict[str, Any]:
    phase = Phase("latency", count=b.sizes.pings, warmup=b.sizes.warmup)
    got, served, _busy, _cpu = b.run(phase, running, tls)
    by_session: dict[str, list[int]] = {}
    for r in served["results"]:
        by_session.update(r.get("rtt_ns", {}))
    via, direct = by_session[str(got["session"])], by_session[str(got["direct_session"])]
    pings = phase.count + phase.warmup
    expected[got["session"]] = expect({"display s2c ping": pings, "display c2s pong": pings})
    out: dict[str, Any] = {"round_trips": len(via)}
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        mine, base = percentile(via, q) / 1e3, percentile(direct, q) / 1e3
        out[f"rtt_{name}_us"], out[f"direct_rtt_{name}_us"] = mine, base
        out[f"added_{name}_us"] = (mine - base) / 2  # two traversals per round trip
    return out


def measure_rss(
    b: Bench, running: RunningProxy, tls: bool, expected: Expectations
) -> dict[str, Any]:
    assert b.server is not None and b.viewer is not None
    phase = Phase("rss", body_size=RSS_BODY, interval=RSS_INTERVAL)
    b.server.call("phase", phase)
    idle = rss_bytes(running.pids)
    opened = b.viewer.call("open", phase, running.port, tls, b.sizes.sessions)
    samples, pss = [], []
    deadline = time.monotonic() + b.sizes.rss_seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        samples.append(rss_bytes(running.pids))
        pss.append(pss_bytes(running.pids))
    b.server.call("stop")
    b.viewer.call("stop")
    time.sleep(1.0)  # what is in flight arrives before the viewer hangs up
    counted = b.viewer.call("close", 30.0)["sessions"]
    served = b.server.call("results", 60.0)["results"]
    sent = {r["session"]: r["sent"] for r in served if r["channel"] == "display"}
    received = {r["session"]: r["received"] for r in served if r["channel"] == "inputs"}
    mismatches = []
    for key, c in counted.items():
        session = int(key)
        display, inputs = sent.get(session), received.get(session)
        if c["display_received"] != display or c["inputs_sent"] != inputs:
            mismatches.append(f"session {session:x}: display {display}/{c['display_received']}")
        expected[session] = expect(
            {"display s2c draw_copy": display or 0, "inputs c2s mouse_motion": inputs or 0},
            MINI_HEADER.size + RSS_BODY,
        )
    return {
        "sessions": len(counted),
        "channels": opened["channels"],
        "idle_rss_mb": idle / MB,
        "rss_mb": max(samples, default=0) / MB,
        "rss_last_mb": (samples[-1] if samples else 0) / MB,
        "pss_mb": max(pss, default=0) / MB,
        "processes": len(running.pids),
        "display_messages": sum(sent.values()),
        "inputs_messages": sum(received.values()),
        "endpoint_mismatches": mismatches[:10],
    }


# -- spicetap's archives --------------------------------------------------------------------
def read_archive(path: Path) -> tuple[int | None, Counter[str], int, list[str]]:
    """Session id, message counts by "channel dir name", wire bytes, problems."""
    counts: Counter[str] = Counter()
    wire = 0
    problems: list[str] = []
    with ArchiveReader(path) as reader:
        session = reader.header.get("session", {}).get("id")
        for rec in reader.records():
            kind = rec.get("kind")
            if kind in ("gap", "error"):
                problems.append(f"{kind} record: {rec.get('err')}")
            elif kind == "message":
                counts[f"{rec.get('channel')} {rec.get('dir')} {rec.get('name')}"] += 1
                wire += len(rec.get("raw") or b"")
                if rec.get("nfd") or rec.get("err") or rec.get("redacted"):
                    problems.append(f"message {rec.get('name')} not kept whole or dissected")
    return session, counts, wire, problems[:5]


def check_archives(directory: Path, expected: dict[int, Expected]) -> dict[str, Any]:
    """Every archive intact, and each session holding exactly what the peers exchanged."""
    problems: list[str] = []
    archives = sorted(directory.glob("*.spta*")) if directory.exists() else []
    seen: set[int] = set()
    messages = wire = 0
    for path in archives:
        verdict = verify(path)
        if verdict.status != "intact":
            problems.append(f"{path.name}: {verdict.status}: {verdict.detail}")
        session, counts, got_wire, found = read_archive(path)
        problems += [f"{path.name}: {p}" for p in found]
        want = expected.get(session) if session is not None else None
        if session is None or want is None:
            problems.append(f"{path.name}: session {session} was not one of the benchmark's")
            continue
        seen.add(session)
        if counts != want.counts or got_wire != want.wire:
            problems.append(
                f"{path.name}: holds {dict(counts)} ({got_wire} bytes), "
                f"expected {dict(want.counts)} ({want.wire} bytes)"
            )
        messages += sum(counts.values())
        wire += got_wire
    problems += [f"session {s:x}: no archive" for s in sorted(set(expected) - seen)]
    return {
        "ok": not problems,
        "archives": len(archives),
        "sessions_expected": len(expected),
        "messages": messages,
        "bytes": wire,
        "problems": problems[:20],
    }


# -- one mode -------------------------------------------------------------------------------
Measure = Callable[[Bench, RunningProxy, bool, Expectations], dict[str, Any]]
PHASES: tuple[tuple[str, Measure, str | None], ...] = (
    ("bulk", measure_bulk, "mb_per_s"),  # best of the repeats by this figure
    ("small", measure_small, "msg_per_s"),
    ("latency", measure_latency, None),  # one run: its percentiles come from thousands
)


def best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    top = max(runs, key=lambda r: float(r[key]))
    return {**top, "runs": [r[key] for r in runs]}


def finish(running: RunningProxy, expected: Expectations, out: dict[str, Any], key: str) -> None:
    """Stop the proxy; check what it recorded, then delete it (disk space)."""
    code = stop_proxy(running)
    if code not in (None, 0, -15, 143):  # SIGTERM (socat and haproxy are sent it)
        out.setdefault("warnings", []).append(f"{running.name} exited with {code}")
    if running.record_dir is not None:
        out[key] = check_archives(running.record_dir, expected)
        shutil.rmtree(running.record_dir, ignore_errors=True)
    if running.flows is not None:
        size = running.flows.stat().st_size if running.flows.exists() else 0
        out[f"{key}_flow_file_mb"] = size / MB  # mitmdump's -w file: it did record
        running.flows.unlink(missing_ok=True)


class Mode:
    """Every proxy of one mode, each with what its sessions must have recorded."""

    def __init__(self, b: Bench, names: list[str], tls: bool, console: Console) -> None:
        self.b, self.tls, self.console = b, tls, console
        self.mode = "tls" if tls else "plain"
        self.upstream = b.server_ports[self.mode]
        self.out: dict[str, dict[str, Any]] = {name: {} for name in names}
        self.running: dict[str, RunningProxy] = {}
        self.expected: dict[str, Expectations] = {name: {} for name in names}

    def failed(self, name: str, exc: BaseException) -> None:
        """One proxy failed: report it, take it out of the mode, start fresh endpoints."""
        self.console.print(f"[red]{self.mode} {name} failed: {exc}[/red]")
        self.out[name]["error"] = str(exc)[:2000]
        running = self.running.pop(name, None)
        if running is not None:
            if running.log is not None and running.log.exists():  # why, from the proxy's side
                tail = running.log.read_text(errors="replace").splitlines()[-20:]
                self.out[name]["log_tail"] = tail
                self.console.print("\n".join(tail), markup=False, highlight=False)
            finish(running, self.expected[name], self.out[name], "recording")
        self.b.start_peers()  # the old pair may be in the middle of a command

    def traffic(self) -> None:
        b = self.b
        for name in self.out:
            try:
                work = b.tmp / f"{self.mode}-{name}" / "traffic"
                self.running[name] = start_proxy(name, self.tls, self.upstream, work, b.pki)
            except (RuntimeError, OSError) as exc:
                self.failed(name, exc)
        try:
            for phase, measure, key in PHASES:
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in self.running}
                for i in range(b.sizes.repeat if key else 1):
                    for name in list(self.running):
                        b.step(f"{self.mode}: {phase} {i + 1}, {name}")
                        try:
                            got = measure(b, self.running[name], self.tls, self.expected[name])
                            runs[name].append(got)
                        except (RuntimeError, TimeoutError, OSError) as exc:
                            self.failed(name, exc)
                        b.done()
                for name, got_runs in runs.items():
                    if got_runs and name in self.running:
                        self.out[name][phase] = best(got_runs, key) if key else got_runs[0]
        finally:
            for name in list(self.running):
                b.step(f"{self.mode}: stopping {name}, checking what it recorded")
                finish(self.running.pop(name), self.expected[name], self.out[name], "recording")

    def sessions(self) -> None:
        b = self.b
        for name, out in self.out.items():
            if name == "direct" or "error" in out:
                continue
            b.step(f"{self.mode}: {b.sizes.sessions} sessions through {name}, RSS")
            expected: Expectations = {}
            try:
                work = b.tmp / f"{self.mode}-{name}" / "sessions"
                running = start_proxy(name, self.tls, self.upstream, work, b.pki)
            except (RuntimeError, OSError) as exc:  # its traffic figures still stand
                self.console.print(f"[red]{self.mode} {name} (sessions) failed: {exc}[/red]")
                out["rss_error"] = str(exc)[:2000]
                b.done()
                continue
            try:
                out["rss"] = measure_rss(b, running, self.tls, expected)
            except (RuntimeError, TimeoutError, OSError) as exc:
                out["rss_error"] = str(exc)[:2000]
                b.start_peers()
            finally:
                finish(running, expected, out, "rss_recording")
            b.done()


def steps(sizes: Sizes, names: list[str]) -> int:
    per_mode = len(names) * (2 * sizes.repeat + 1) + sum(name != "direct" for name in names)
    return len(MODES) * per_mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "proxy.json")
    parser.add_argument("--proxies", default=",".join(PROXIES), help="comma-separated subset")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    console = Console()
    wanted = [p for p in args.proxies.split(",") if p]
    unknown = set(wanted) - set(PROXIES) - set(OPTIONAL)
    if unknown:
        choices = ", ".join(PROXIES + OPTIONAL)
        parser.error(f"unknown proxies {sorted(unknown)}; choose from {choices}")
    names = []
    for name in wanted:
        missing = available(name)
        if missing:
            console.print(f"[yellow]notice: {name} skipped: no {missing}[/yellow]")
        else:
            names.append(name)
    started = time.perf_counter()
    load_at_start = os.getloadavg()  # the machine is shared: say how busy it was
    results: dict[str, dict[str, Any]] = {mode: {} for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="spicetap-bench-proxy-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        pki = make_pki(tmp / "pki")
        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("starting", total=steps(sizes, names))
            ctx = multiprocessing.get_context("spawn")  # no rich or pipe state inherited
            b = Bench(sizes, pki, tmp, ctx, progress, task)
            b.start_peers()
            try:
                for mode in MODES:
                    run = Mode(b, names, mode == "tls", console)
                    run.traffic()
                    run.sessions()
                    results[mode] = run.out
            finally:
                b.stop_peers()
    data: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "sizes": asdict(sizes),
        "quick": args.quick,
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    data.update(summarize(results))
    print_tables(Console(width=max(console.width, 160)), data)
    print(markdown_table(data))  # unwrapped, to paste into the README
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    console.print(f"{data['seconds']:.0f} s; results in {args.out}")
    recordings = [
        r.get(key, {}).get("ok", False)
        for mode in results.values()
        for name, r in mode.items()
        if name == "spicetap"
        for key in ("recording", "rss_recording")
    ]
    return 0 if all(recordings) else 1  # spicetap must have recorded everything


if __name__ == "__main__":
    raise SystemExit(main())
