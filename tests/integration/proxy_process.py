"""Run `spicetap proxy` as a real subprocess on loopback, stopped by its own PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def tls_both_legs(tls_port: int, ca_file: Path, host_subject: str) -> tuple[str, ...]:
    """`spicetap proxy` arguments for TLS on both legs: a TLS listener on a free port, the
    server's TLS port checked against its CA and host subject."""
    return (
        "--tls-listen",
        "127.0.0.1:0",
        "--upstream-tls",
        f"127.0.0.1:{tls_port}",
        "--upstream-ca",
        str(ca_file),
        "--upstream-host-subject",
        host_subject,
    )


def run_spicetap(
    config_dir: Path, *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """One `spicetap` command as a subprocess, its config (CA, keys) in config_dir."""
    env = {**os.environ, "SPICETAP_CONFIG_DIR": str(config_dir), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "spicetap", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ProxyProcess:
    def __init__(
        self, upstream_port: int, record: Path | None, work: Path, extra: tuple[str, ...] = ()
    ) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "proxy.log"
        self.record = record
        argv = [sys.executable, "-m", "spicetap", "proxy", *extra]
        if upstream_port and not {"--tls-listen", "--listen"} & set(extra):
            argv += ["--listen", "127.0.0.1:0"]
        if upstream_port:  # 0: the upstream comes from a --config file in `extra`
            argv += ["--upstream", f"127.0.0.1:{upstream_port}"]
        if record is not None:
            argv += ["--record", str(record)]
        env = {**os.environ, "SPICETAP_CONFIG_DIR": str(work / "config"), "PYTHONPATH": str(REPO)}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True
        )
        self.ports = self._read_ports()
        # the reverse-mode port: plain if there is one, else TLS
        self.port = self.ports.get("plain") or self.ports.get("tls") or 0

    def _read_ports(self) -> dict[str, int]:
        """kind -> port from "spicetap proxy listening (KIND) on HOST:PORT" lines, up to
        "spicetap proxy ready" (bounded: one line per listener, or the proxy exits)."""
        assert self.proc.stdout is not None
        ports: dict[str, int] = {}
        for _ in range(16):
            line = self.proc.stdout.readline()
            if line.startswith("spicetap proxy listening ("):
                kind = line.split("(", 1)[1].split(")", 1)[0]
                ports[kind] = int(line.rsplit(":", 1)[1])
            elif line.startswith("spicetap proxy ready"):
                return ports
            else:
                break
        self.kill()
        raise RuntimeError(f"proxy did not start: {line!r}\n{self.log()}")

    def next_line(self, timeout: float = 15.0) -> str:
        """The proxy's next stdout line (after "ready": a reload's), or "" when none comes
        within `timeout` seconds."""
        stdout = self.proc.stdout
        assert stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return got[0] if got else ""

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT: the proxy drains and closes its archives."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        return self.proc.returncode

    def children(self) -> list[int]:
        """PIDs of the processes the proxy started (its recording process)."""
        return _children(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the proxy, then wait (bounded) for its recording process: it reads
        end-of-file and closes the archives by itself."""
        if self.proc.poll() is None:
            children = _children(self.proc.pid)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            for pid in children:
                _wait_gone(pid, 30.0)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def archives(self) -> list[Path]:
        assert self.record is not None
        return sorted(self.record.glob("*.spta"))

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return found


def _wait_gone(pid: int, seconds: float) -> None:
    """Until the process has exited (gone from /proc, or a zombie waiting for init)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running after {seconds} s")
