"""Loopback packet capture with dumpcap, started before and stopped after a client.

    with LoopbackCapture(out, ports=[srv.port]) as cap:
        run the client
    cap.path  # pcapng with every packet to/from those ports

Capturing must be confirmed before the client starts, or the SPICE link
messages (the only place a connection states its channel type) are lost.
dumpcap reports "File: ..." on stderr once its capture is open; we wait for
that, and for our own PID to be alive. It is stopped with SIGINT so it
finishes the pcapng cleanly (SIGKILL only if it does not).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from tests.harness.procs import PeerFailed, need_program, stop_process, tail, wait_until

T = TypeVar("T")
SETTLE_SECONDS = 0.3  # lets the last segments on lo reach dumpcap's ring


def port_filter(ports: Sequence[int]) -> str:
    return " or ".join(f"tcp port {p}" for p in ports)


class LoopbackCapture:
    def __init__(
        self,
        path: Path,
        *,
        ports: Sequence[int] = (),
        bpf: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if not ports and bpf is None:
            raise ValueError("give ports or a bpf filter")
        self.path = path
        self.bpf = bpf if bpf is not None else port_filter(ports)
        self.start_timeout = start_timeout
        self.log = path.with_suffix(".dumpcap.log")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        dumpcap = need_program("dumpcap", "tshark")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [dumpcap, "-q", "-i", "lo", "-f", self.bpf, "-B", "64", "-w", str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        proc = self._proc

        def capturing() -> bool:
            if proc.poll() is not None:
                raise PeerFailed(f"dumpcap exited with {proc.returncode}:\n{tail(self.log)}")
            return "File:" in tail(self.log) and self.path.exists()

        try:
            wait_until(capturing, timeout=self.start_timeout, what="dumpcap to start")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> Path:
        proc, self._proc = self._proc, None
        if proc is not None:
            time.sleep(SETTLE_SECONDS)
            stop_process(proc, sig=signal.SIGINT, timeout=10.0)
        return self.path

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def capture_around(path: Path, ports: Sequence[int], action: Callable[[], T]) -> tuple[Path, T]:
    """Run `action` while capturing `ports` on lo; returns (pcapng, action's result)."""
    with LoopbackCapture(path, ports=ports) as cap:
        result = action()
    return cap.path, result
