"""`spicetap demo`: the whole job on one machine, with nothing to prepare.

With no upstream it boots a small local QEMU VM with SPICE (spicetap.demo.vm), puts
`spicetap proxy` in front of it recording to ./recordings, and says how to connect a viewer;
with --upstream it proxies that server instead. --check connects spicy-screenshot through
the proxy once, so the run proves itself without a viewer. Ctrl-C (or --minutes) stops the
proxy, which signs its archives; then the recorded sessions are verified and summarised.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spicetap.errors import UserError

START_TIMEOUT = 30.0
LINES_BEFORE_READY = 16


def add_demo_command(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="boot a local test VM (or use --upstream), proxy it, record to ./recordings"
    )
    p.add_argument("--upstream", help="HOST:PORT of a SPICE server to proxy instead of the VM")
    p.add_argument("--listen", default="127.0.0.1:5900", help="where viewers connect")
    p.add_argument("--record", default="recordings", metavar="DIR", help="archives go here")
    p.add_argument("--minutes", type=float, help="stop after this long (default: Ctrl-C)")
    p.add_argument(
        "--check",
        action="store_true",
        help="take one screenshot through the proxy with spicy-screenshot (DIR/demo.png)",
    )
    p.set_defaults(func=cmd_demo)


def _start_proxy(listen: str, upstream: str, record: Path) -> tuple[subprocess.Popen[str], int]:
    argv = [sys.executable, "-m", "spicetap", "proxy", "--listen", listen, "--upstream", upstream]
    proc = subprocess.Popen(
        [*argv, "--record", str(record)],
        stdout=subprocess.PIPE,
        text=True,
        # the proxy's log goes straight to our stderr; it stops on the SIGINT we send it
        start_new_session=True,
    )
    assert proc.stdout is not None
    port = 0
    for _ in range(LINES_BEFORE_READY):
        line = proc.stdout.readline()
        if line.startswith("spicetap proxy listening (plain)"):
            port = int(line.rsplit(":", 1)[1])
        elif line.startswith("spicetap proxy ready") or not line:
            break
    if not port:
        _stop(proc)
        raise UserError("the proxy did not start (see its log above)")
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # drain and sign the archives
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _check(port: int, record: Path) -> None:
    binary = shutil.which("spicy-screenshot")
    if binary is None:
        print("--check: spicy-screenshot not found (apt-get install spice-client-gtk)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        ppm = Path(tmp) / "shot.ppm"
        run = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), "-o", str(ppm)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if run.returncode != 0 or not ppm.exists():
            raise UserError(f"--check: spicy-screenshot through the proxy failed: {run.stderr!r}")
        from PIL import Image

        with Image.open(ppm) as image:
            image.save(record / "demo.png")
    print(f"checked: a screenshot through spicetap is in {record / 'demo.png'}")


def _summarise(record: Path, since: float) -> int:
    from spicetap.cli import main as spicetap

    archives = sorted(
        (p for p in record.glob("*.spta*") if p.stat().st_mtime >= since),
        key=lambda p: p.stat().st_mtime,
    )
    if not archives:
        print("no session was recorded (no viewer connected)")
        return 0
    status = 0
    for archive in archives:
        status |= spicetap(["verify", str(archive)])
    spicetap(["stats", str(archives[-1])])
    print(f"\nmessage by message: spicetap show {archives[-1]}")
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    from spicetap.demo.vm import DemoVm

    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UserError(f"--minutes {args.minutes:g}: expected a number of minutes above 0")
    record = Path(args.record).resolve()
    if record.exists() and not record.is_dir():
        raise UserError(f"--record {args.record}: not a directory")
    record.mkdir(parents=True, exist_ok=True)
    since = time.time() - 1
    with contextlib.ExitStack() as stack:
        upstream = args.upstream
        if upstream is None:
            vm = stack.enter_context(DemoVm())
            upstream = f"127.0.0.1:{vm.port}"
            if not vm.wait_animating():
                print("the test VM's guest did not report READY; its screen may stay black")
            print(f"QEMU test VM with SPICE on {upstream} (a boot-sector guest animating VGA)")
        proxy, port = _start_proxy(args.listen, upstream, record)
        stack.callback(_stop, proxy)
        print(f"spicetap proxy on 127.0.0.1:{port} -> {upstream}, recording to {record}")
        if args.check:
            _check(port, record)
        print(
            f"\nconnect a viewer:  remote-viewer spice://127.0.0.1:{port}\n"
            f"               or  spicetap vv 127.0.0.1:{port} -o demo.vv && remote-viewer demo.vv\n"
            + ("stop with Ctrl-C" if args.minutes is None else f"stops in {args.minutes:g} min"),
            flush=True,
        )
        deadline = None if args.minutes is None else time.monotonic() + args.minutes * 60
        with contextlib.suppress(KeyboardInterrupt):
            while proxy.poll() is None and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.2)
        if proxy.poll() not in (None, 0):
            raise UserError(f"the proxy stopped unexpectedly (exit {proxy.returncode})")
    # the proxy has drained and signed its archives (ExitStack), and the VM is stopped
    return _summarise(record, since)
