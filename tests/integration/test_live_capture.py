"""`dumpcap -w - | tee FILE | spicetap show -`: a real viewer's session against QEMU, shown
while it is captured, and Ctrl-C as a terminal sends it to the pipeline's ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.conftest import peers
from tests.harness import PeerFailed, QemuServer, spicy_screenshot
from tests.harness.capture import port_filter
from tests.harness.procs import OutputLines, need_program, stop_process, tail, wait_until

pytestmark = pytest.mark.peers

LIMIT = 60.0  # seconds for any one wait
DRAWN = re.compile(r"display:0\s+s2c (draw_\w+|surface_create)")


@contextmanager
def _started(argv: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours, ended by its PID if the test leaves it running."""
    proc = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop_process(proc, timeout=10.0)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_a_session_is_shown_while_it_is_captured(tmp_path: Path) -> None:
    saved = tmp_path / "live.pcapng"
    dumpcap_log = tmp_path / "dumpcap.log"
    # the user's: output into a pipe is buffered unless spicetap flushes it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with peers(), QemuServer(guest="boot", run_dir=tmp_path / "qemu") as srv, ExitStack() as stack:
        dumpcap_bin = need_program("dumpcap", "tshark")
        tee_bin = need_program("tee", "coreutils")
        log = stack.enter_context(dumpcap_log.open("wb"))
        argv = [dumpcap_bin, "-q", "-i", "lo", "-f", port_filter(srv.ports), "-w", "-"]
        dumpcap = stack.enter_context(
            _started(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        )
        tee = stack.enter_context(
            _started([tee_bin, str(saved)], stdin=dumpcap.stdout, stdout=subprocess.PIPE)
        )
        show = stack.enter_context(
            _started(
                [sys.executable, "-m", "spicetap", "show", "-"],
                stdin=tee.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            )
        )  # fmt: skip
        assert dumpcap.stdout is not None and tee.stdout is not None
        dumpcap.stdout.close()  # theirs now: tee's end of the pipe is the only reader
        tee.stdout.close()

        def capturing() -> bool:
            if dumpcap.poll() is not None:
                raise PeerFailed(f"dumpcap exited with {dumpcap.returncode}:\n{tail(dumpcap_log)}")
            return "File: -" in tail(dumpcap_log)

        wait_until(capturing, timeout=LIMIT, what="dumpcap to start")
        lines = OutputLines(show, LIMIT)
        spicy_screenshot(srv.endpoint(), tmp_path / "shot.ppm")
        lines.until(r"main:0\s+s2c init ")
        lines.until(DRAWN)
        assert dumpcap.poll() is None and show.poll() is None  # shown live, not at the end

        # Ctrl-C in a terminal: the writer and the reader get it. dumpcap writes what it
        # has and closes; spicetap reads to that end instead of quitting.
        show.send_signal(signal.SIGINT)
        dumpcap.send_signal(signal.SIGINT)
        assert dumpcap.wait(LIMIT) == 0, tail(dumpcap_log)
        assert tee.wait(LIMIT) == 0
        assert show.wait(LIMIT) == 0
        lines.rest()
        assert show.stderr is not None
        problems = show.stderr.read().decode()
    whole = subprocess.run(
        [sys.executable, "-m", "spicetap", "show", str(saved)],
        capture_output=True, text=True, timeout=LIMIT, check=True,
    )  # fmt: skip
    assert lines.text() == whole.stdout  # nothing lost to Ctrl-C, nothing held back
    assert problems == ""
    channels = {m.group(1) for m in re.finditer(r"#\d+\s+(\w+):\d+", whole.stdout)}
    assert {"main", "display"} <= channels
