"""Process and port helpers shared by every peer the harness starts.

Every wait here is bounded by a deadline, and every stop targets the one PID
we spawned: tests run next to other engineers' QEMUs and clients, so nothing
may be found or killed by name.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"


class PeerMissing(RuntimeError):
    """A program or package the harness needs is not installed."""


class PeerFailed(RuntimeError):
    """A peer we started died, timed out or produced no usable result."""


def need_program(name: str, package: str) -> str:
    """Absolute path of `name`, or PeerMissing naming the Debian package."""
    found = shutil.which(name)
    if found is None:
        raise PeerMissing(f"{name} not found: apt-get install {package}")
    return found


def wait_until(
    check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `check` until it is true; PeerFailed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if check():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise PeerFailed(f"timed out after {timeout:.1f} s waiting for {what}")


def reserve_ports(count: int, *, avoid: frozenset[int] = frozenset()) -> list[int]:
    """Ports that were free a moment ago, all distinct.

    The OS picks them (bind to port 0), so parallel test runs do not collide on
    a fixed range. Another process may still take one before QEMU binds it;
    QemuServer detects that (QEMU exits) and retries with fresh ports.
    """
    held: list[socket.socket] = []
    try:
        ports: list[int] = []
        for _ in range(count + len(avoid) + 8):
            if len(ports) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            held.append(s)  # keep bound so the next pick differs
            port = int(s.getsockname()[1])
            if port not in avoid:
                ports.append(port)
        if len(ports) != count:
            raise PeerFailed("could not reserve free loopback ports")
        return ports
    finally:
        for s in held:
            s.close()


def is_connectable(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def pid_listens_on(pid: int, port: int) -> bool:
    """True if process `pid` itself owns a TCP LISTEN socket on `port`.

    A bare connect() would also succeed against whatever other process holds
    the port, so we match the listening socket's inode against the PID's fds.
    """
    inodes = _socket_inodes(pid)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    return True
    return False


def stop_process(
    proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Stop the process we spawned (by its PID only) and reap it.

    Sends `sig` first, SIGKILL after `timeout`. Returns the exit status.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


def tail(path: Path, limit: int = 2000) -> str:
    """Last `limit` characters of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class OutputLines:
    """A process's stdout a line at a time, as it prints them (read by a thread of its
    own); `seen` holds every line taken so far."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        self.timeout = timeout  # for each line
        self.seen: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stdout is not None:
            for raw in proc.stdout:
                self._lines.put(raw.decode(errors="replace"))
        self._lines.put("")  # the end

    def until(self, pattern: str | re.Pattern[str]) -> None:
        """Take lines until one matches; AssertionError if the output ends first,
        queue.Empty if a line takes longer than `timeout`."""
        found = re.compile(pattern) if isinstance(pattern, str) else pattern
        while not any(found.search(line) for line in self.seen):
            line = self._lines.get(timeout=self.timeout)
            assert line, f"output ended before {found.pattern!r}:\n{''.join(self.seen[-20:])}"
            self.seen.append(line)

    def rest(self) -> None:
        """Take the lines to the end of the output."""
        while line := self._lines.get(timeout=self.timeout):
            self.seen.append(line)

    def text(self) -> str:
        return "".join(self.seen)
