"""The recording process, and the proxy's never-blocking handle on it.

Why a process: recording costs about 3 CPU s per GB (framing, every field dissected, the
archive's SHA-256 chain, the disk). As a thread of the proxy it held the GIL the pump threads
need: TLS bulk fell from 306-344 MB/s forwarding alone to 200-225 recording, and a forwarded
message could wait out a GIL switch interval behind it. In a process of its own it runs
beside the pumps, and it outlives the proxy: if the proxy dies, even by SIGKILL, the
recording process reads end-of-file and closes every archive, signed ("proxy vanished").

The proxy side (Recorder) is called from any forwarding thread and never blocks: it appends
to a deque, bounded by bytes (options.max_backlog; past it the backlog policy applies). A
shipper thread sends the items over a socketpair (proxy/core/recwire.py); a reports thread
reads what the recording process learns (sessions, archives, a failure).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import proxy
from proxy.core import recwire
from proxy.recorder import LOG_FORMAT, RecorderWorker, RecordingOptions, Report

log = logging.getLogger("spicetap.recorder")

# How long the idle shipper sleeps between looks at its deque: short while traffic flows,
# up to POLL_MAX when quiet (what it adds is recording delay, never forwarding delay).
POLL_MIN = 0.001
POLL_MAX = 0.05
BATCH = 256 * 1024  # small items are gathered into one send up to this size
SOCKET_BUFFER = 4 << 20
STOP_TIMEOUT = 60.0  # seconds the recording process gets to drain and sign on stop
# glibc malloc for the recording process: every chunk (up to 256 KiB) and every archive
# buffer (1 MiB) comes from the heap and is reused, instead of a fresh mmap per allocation
# until glibc's threshold adapts, and up to 64 MiB freed stays for reuse. Fresh pages are
# dear in a VM: measured, the first 1 GiB burst cost the process 880k page faults per GB.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"
_STOP = ("stop", 0, 0.0)


class Recorder:
    def __init__(
        self, options: RecordingOptions, meta: dict[str, Any], signing_key: Ed25519PrivateKey | None
    ) -> None:
        self.options = options
        self.meta = meta
        self.key = signing_key
        # One FIFO, so each connection's events stay in order. Only byte chunks count
        # against max_backlog (checked in data()); control items, a few per connection,
        # always go in. A deque, not a queue.Queue: appending takes no lock and wakes nobody;
        # the shipper polls it, so a forwarded message does not hand over the GIL.
        self.queue: deque[tuple[Any, ...]] = deque()
        self.lost: dict[tuple[int, str], int] = defaultdict(int)
        self.lost_total = 0
        self.archives: list[Path] = []
        self.conn_session: dict[int, Any] = {}  # connection -> session, as recording learnt it
        self.failed: str | None = None  # recording stopped (logged); forwarding goes on
        self.process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._queued = 0  # bytes put on the deque (under _count_lock: several pump threads)
        self._shipped = 0  # bytes sent on (the shipper thread alone writes it)
        self._count_lock = threading.Lock()
        self._stopping = False
        self._last_warning = 0.0
        self._shipper = threading.Thread(target=self._ship, name="spicetap-rec-ship", daemon=True)
        self._reader = threading.Thread(target=self._read, name="spicetap-rec-reports", daemon=True)

    @property
    def backlog_bytes(self) -> int:
        if self.failed is not None:
            return 0  # dropped with the queue (_fail)
        return max(0, self._queued - self._shipped)

    # -- called from the forwarding side (any thread): never blocks ---------------------------
    def start(self) -> None:
        """Start the recording process (the directory is made here, so errors show early)."""
        self.options.directory.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        # the child imports this package from where the proxy did, installed or not
        root = str(Path(proxy.__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
        env = {**os.environ, "PYTHONPATH": path, "GLIBC_TUNABLES": tunables}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy.io.recording", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._sock = ours
        log.info("recording to %s in process %d", self.options.directory, self.process.pid)
        key = self.key.private_bytes_raw() if self.key is not None else None
        level = logging.getLogger().getEffectiveLevel()
        self.queue.appendleft(("config", 0, 0.0, self.options, self.meta, key, level))
        self._shipper.start()
        self._reader.start()

    def opened(
        self,
        conn: int,
        t: float,
        client: tuple[str, int],
        server: tuple[str, int],
        tls: dict[str, bool] | None = None,
        route: dict[str, Any] | None = None,
        via: tuple[str, int] | None = None,
    ) -> None:
        """A viewer connection was relayed; `route` says how it came in and where it went
        (insertion mode, upstream, target name): it heads its session's archive. `via` is
        spicetap's own end of the server connection, the client address the server logs."""
        self._put(("open", conn, t, client, server, tls, route, via))

    def data(self, conn: int, t: float, direction: str, data: bytes) -> bool:
        """False when the bytes cannot be recorded and the policy is to close: the backlog
        is full, or recording has failed (a session must not go on unrecorded then)."""
        if self.failed is not None:
            return self.options.backlog != "close"  # the failure itself was logged
        key = (conn, direction)
        size = len(data)
        with self._count_lock:
            room = self._queued - self._shipped + size <= self.options.max_backlog
            if room:
                self._queued += size
        if room:
            if self.lost.get(key):  # the recording caught up: say how much is missing first
                self._put(("gap", conn, t, direction, self.lost[key]))
                self.lost[key] = 0
            self.queue.append(("data", conn, t, direction, data))
            return True
        self.lost[key] += size
        self.lost_total += size
        now = time.monotonic()
        if now - self._last_warning > 1.0:
            self._last_warning = now
            log.error(
                "recording cannot keep up: %d bytes not recorded so far (policy: %s)",
                self.lost_total,
                self.options.backlog,
            )
        return self.options.backlog != "close"

    def event(
        self,
        conn: int,
        t: float,
        direction: str,
        kind: str,
        name: str,
        fields: dict[str, Any],
        raw: bytes = b"",
    ) -> None:
        """What the proxy did to a link stage (rewrite) or how authentication went (auth)."""
        self._put(("event", conn, t, direction, kind, name, fields, raw))

    def error(self, conn: int, t: float, direction: str, reason: str) -> None:
        self._put(("error", conn, t, direction, reason))

    def closed(self, conn: int, t: float, reason: str) -> None:
        self._put(("close", conn, t, reason))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Drain the backlog, let the recording process close every archive (signed), and
        wait for it. Past `timeout` the process is ended, and that is logged."""
        process, sock = self.process, self._sock
        if process is None or sock is None or self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout
        self.queue.append(_STOP)
        self._shipper.join(timeout)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        self._reader.join(max(0.0, deadline - time.monotonic()))
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("the recording process did not finish within %.0f s: ending it", timeout)
            process.kill()
            process.wait()
        sock.close()

    def _put(self, item: tuple[Any, ...]) -> None:
        if self.failed is None:  # after a failure nothing more is recorded
            self.queue.append(item)

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.error("recording stopped: %s; forwarding goes on without it", reason)
        self.queue.clear()  # nothing will take it now: free the memory

    # -- the shipper thread -------------------------------------------------------------------
    def _ship(self) -> None:
        assert self._sock is not None
        sock, queue, batch = self._sock, self.queue, bytearray()
        pause = POLL_MIN
        try:
            while True:
                try:
                    item = queue.popleft()
                except IndexError:
                    if batch:
                        sock.sendall(batch)
                        batch.clear()
                    time.sleep(pause)
                    pause = min(pause * 2, POLL_MAX)
                    continue
                pause = POLL_MIN
                if item[0] == "data":
                    data = item[4]
                    batch += recwire.chunk_header(item[1], item[2], item[3], len(data))
                    if len(data) >= BATCH:  # big chunks go as they are: no copy into the batch
                        sock.sendall(batch)
                        batch.clear()
                        sock.sendall(data)
                    else:
                        batch += data
                    self._shipped += len(data)
                else:
                    batch += recwire.control(item)
                    if item is _STOP:
                        sock.sendall(batch)
                        return
                if len(batch) >= BATCH:
                    sock.sendall(batch)
                    batch.clear()
        except OSError as exc:
            self._fail(f"the recording process is gone ({exc})")

    # -- the reports thread -------------------------------------------------------------------
    def _read(self) -> None:
        assert self._sock is not None and self.process is not None
        sock, parser = self._sock, recwire.ItemParser(64 * 1024)
        try:
            while _receive(sock, parser):
                for report in parser.items():
                    self._on_report(report)
        except OSError as exc:
            log.debug("recording reports: %r", exc)
        if not self._stopping:  # it ended on its own: a crash, or someone killed it
            code = self.process.wait()
            self._fail(f"the recording process exited (status {code})")

    def _on_report(self, report: tuple[Any, ...]) -> None:
        kind = report[0]
        if kind == "session":
            self.conn_session[report[1]] = report[2]
        elif kind == "gone":
            self.conn_session.pop(report[1], None)
        elif kind == "archive":
            self.archives.append(Path(report[1]))
        elif kind == "failed":
            self._fail(report[1])


def _receive(sock: socket.socket, buffer: recwire.ItemParser) -> bool:
    """Read what is there straight into the buffer; False at end-of-file."""
    with buffer.space() as room:
        n = sock.recv_into(room)
    buffer.received(n)
    return n > 0


# -- the recording process ------------------------------------------------------------------
def serve(sock: socket.socket) -> int:
    """Handle the proxy's items until it says stop (or vanishes); close every archive."""
    parser = recwire.ItemParser()
    worker: RecorderWorker | None = None
    status = "proxy vanished"  # end-of-file without a stop: the proxy died

    def report(item: tuple[Any, ...]) -> None:
        sock.sendall(recwire.control(item))

    try:
        while status == "proxy vanished":
            ready, _w, _x = select.select([sock], [], [], POLL_MAX)
            if not ready:
                if worker is not None:
                    worker.tick()
                continue
            if not _receive(sock, parser):
                break
            for item in parser.items():
                if worker is not None and item[0] not in ("config", "stop"):
                    worker.handle(item)
                elif item[0] == "config":
                    worker = _worker(item, report)
                elif item[0] == "stop":
                    status = "proxy stopped"
    except Exception as exc:  # a disk error must not go unsaid
        status = "recording failed"
        log.exception("recording failed")
        with contextlib.suppress(OSError):
            report(("failed", f"{type(exc).__name__}: {exc}"))
    if worker is not None:
        worker.close_all(status)
    return 1 if status == "recording failed" else 0


def _worker(item: tuple[Any, ...], report: Report) -> RecorderWorker:
    _kind, _conn, _t, options, meta, key, level = item
    logging.getLogger().setLevel(level)
    if options.nice > 0:
        # Measured with TLS on both legs: 5-10% more forwarded than at nice 0, recording
        # still keeping up. A batch task also does not preempt the pumps when it wakes.
        os.nice(options.nice)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    signing_key = Ed25519PrivateKey.from_private_bytes(key) if key is not None else None
    return RecorderWorker(options, meta, signing_key, report)


def main(argv: list[str]) -> int:
    # The proxy decides when recording ends: Ctrl-C in a terminal (SIGINT to the whole
    # process group), a closed terminal's SIGHUP, or a service manager's SIGTERM to every
    # process must not cut the archives short; the proxy drains, then sends stop, or
    # vanishes (end-of-file).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    with socket.socket(fileno=int(argv[1])) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
