"""The recording process, and the proxy's never-blocking handle on it.

Why a process: recording costs about 3 CPU s per GB (framing, every field dissected, the
archive's SHA-256 chain, the disk). As a thread of the proxy it held the GIL the pump threads
need: TLS bulk fell from 306-344 MB/s forwarding alone to 200-225 recording, and a forwarded
message could wait out a GIL switch interval behind it. In a process of its own it runs
beside the pumps, and it outlives the proxy: if the proxy dies, even by SIGKILL, the
recording process reads end-of-file and closes every archive, signed ("proxy vanished").

The proxy side (Recorder) is called from any forwarding thread and never blocks: it copies
each item into a ring in shared memory (proxy/core/ring.py, items as proxy/core/recwire.py
frames them) and drops it. When the ring is full, items wait in a deque that a shipper
thread moves into the ring as room comes; it also gives back the ring's memory after a
burst. Both together are bounded in bytes
(options.max_backlog; past it the backlog policy applies). A socketpair carries doorbells
to the recording process when it sleeps, and its reports back (sessions, archives, a
failure), read by a reports thread. Its end-of-file is how each side learns the other is
gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import proxy
from proxy import logs
from proxy.core import recwire
from proxy.core.ring import ByteRing
from proxy.recorder import RecorderWorker, RecordingOptions, Report

log = logging.getLogger("spicetap.recorder")

# The shipper looks for room in a full ring every POLL_MIN. The recording process sleeps
# at most POLL_MAX between looks at the ring (a doorbell wakes it sooner) and ticks its
# worker's timers about as often.
POLL_MIN = 0.001
POLL_MAX = 0.05
# Shared memory between the proxy and the recording process: as big as the backlog may
# grow, but elastic (proxy/core/ring.py). While recording keeps up only its first HOT bytes
# are used; a burst goes further, and COLD_KEEP seconds after the last item that did, the
# pages past HOT go back to the system. Measured on plain bulk, the recording process
# behind: with a 32 MiB ring that overflowed into the spill deque, the proxy took 56-122k
# page faults and 1.3-1.65 CPU s per GB; now, once a burst has touched the pages, under
# 400 faults and 0.84-1.14 s. The first burst after a release faults them in again, so
# they are kept a minute: bursts come in runs (video, a busy screen).
HOT = 32 << 20
COLD_KEEP = 60.0
MAX_CHUNK = 1 << 20  # bigger chunks go in pieces: every item must fit the ring whole
MIN_RING = 4 * MAX_CHUNK
STOP_TIMEOUT = 60.0  # seconds the recording process gets to drain and sign on stop
# glibc malloc for the recording process: every chunk (up to 256 KiB) and every archive
# buffer (1 MiB) comes from the heap and is reused, instead of a fresh mmap per allocation
# until glibc's threshold adapts, and up to 64 MiB freed stays for reuse. Fresh pages are
# dear in a VM: measured, the first 1 GiB burst cost the process 880k page faults per GB.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"
_STOP = ("stop", 0, 0.0)
# RecordingOptions' fields as a reload's log line names them
REWORDED = {"policy": "privacy switches", "flush": "flushing", "compress": "compression",
            "chain_hash": "hash chain", "backlog": "backlog policy"}  # fmt: skip


class RecordingSink(Protocol):
    """What the proxy's shells and API use of a recorder: a Recorder, or a
    ResumingRecorder (proxy/io/resuming.py) that starts new ones after failures."""

    @property
    def failed(self) -> str | None: ...
    @property
    def archives(self) -> list[Path]: ...
    @property
    def conn_session(self) -> dict[int, Any]: ...
    @property
    def backlog_items(self) -> int: ...
    @property
    def backlog_bytes(self) -> int: ...
    @property
    def lost_total(self) -> int: ...
    @property
    def resumed(self) -> int: ...
    @property
    def cut(self) -> list[Path]: ...

    def opened(
        self,
        conn: int,
        t: float,
        client: tuple[str, int],
        server: tuple[str, int],
        tls: dict[str, bool] | None = None,
        route: dict[str, Any] | None = None,
        via: tuple[str, int] | None = None,
    ) -> None: ...
    def data(self, conn: int, t: float, direction: str, data: bytes) -> bool: ...
    def refusal(self, conn: int) -> str: ...
    def event(
        self,
        conn: int,
        t: float,
        direction: str,
        kind: str,
        name: str,
        fields: dict[str, Any],
        raw: bytes = b"",
    ) -> None: ...
    def error(self, conn: int, t: float, direction: str, reason: str) -> None: ...
    def closed(self, conn: int, t: float, reason: str) -> None: ...
    def reconfigure(self, options: RecordingOptions) -> None: ...


class Recorder:
    resumed = 0  # a Recorder never starts again (proxy/io/resuming.py does)

    def __init__(
        self,
        options: RecordingOptions,
        meta: dict[str, Any],
        signing_key: Ed25519PrivateKey | None,
        ring_capacity: int | None = None,
        ring_hot: int = HOT,
        cold_keep: float = COLD_KEEP,
    ) -> None:
        self.options = options
        self.meta = meta
        self.key = signing_key
        # The ring is one FIFO, so each connection's items stay in order. When it is full
        # (the recording process is behind) items wait in `spill`, and once anything waits
        # there every new item does too. Only byte chunks count against max_backlog (checked
        # in data()); control items, a few per connection, always go in.
        if ring_capacity is None:
            ring_capacity = max(options.max_backlog, MIN_RING)
        if ring_capacity < MIN_RING:
            raise ValueError(f"a recording ring needs at least {MIN_RING} bytes")
        # the ring's views keep the mapping alive; the file is passed on at start, then closed
        self._memory_fd, memory = _shared_memory(ring_capacity)
        self.ring = ByteRing(memory, hot=ring_hot if ring_capacity >= 2 * ring_hot else None)
        self.cold_keep = cold_keep
        self._cold_seen = 0  # the ring's cold_puts when the shipper last looked
        self._cold_at = 0.0  # when it last saw them grow
        self.spill: deque[tuple[tuple[bytes, ...], int]] = deque()  # (item, chunk bytes)
        self._spilled = 0  # chunk bytes in spill
        self._lock = threading.Lock()  # the ring's producer end, spill, _spilled
        self._put_in_ring = False  # since the last look at the consumer (_bell_wanted)
        self._wake = threading.Event()  # something went to spill
        self.lost: dict[tuple[int, str], int] = defaultdict(int)
        self.lost_total = 0
        self.archives: list[Path] = []
        self.cut: list[Path] = []  # archives a failure left unfinished
        self.conn_session: dict[int, Any] = {}  # connection -> session, as recording learnt it
        self.failed: str | None = None  # recording stopped (logged); forwarding goes on
        self.failed_at: float | None = None  # when (monotonic)
        self.process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._started = False  # until then items wait in spill, behind the config item
        self._stopping = False
        self._stop_asked = False  # before the stop item: its end is then no crash (_read)
        self._last_warning = 0.0
        self._shipper = threading.Thread(target=self._ship, name="spicetap-rec-ship", daemon=True)
        self._reader = threading.Thread(target=self._read, name="spicetap-rec-reports", daemon=True)

    @property
    def backlog_bytes(self) -> int:
        """Bytes waiting for the recording process: in the ring (item headers included) and
        in spill."""
        if self.failed is not None:
            return 0  # dropped with spill (_fail)
        return self._spilled + self.ring.used()

    @property
    def backlog_items(self) -> int:
        """Items waiting for room in the ring."""
        return len(self.spill)

    # -- called from the forwarding side (any thread): never blocks ---------------------------
    def start(self) -> None:
        """Start the recording process (the directory is made here, so errors show early)."""
        self.options.directory.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        memory_fd = self._memory_fd
        # the child imports this package from where the proxy did, installed or not
        root = str(Path(proxy.__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
        env = {**os.environ, "PYTHONPATH": path, "GLIBC_TUNABLES": tunables}
        argv = [str(theirs.fileno()), str(memory_fd), logs.style()]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy.io.recording", *argv],
            pass_fds=(theirs.fileno(), memory_fd),
            stdin=subprocess.DEVNULL,
            env=env,
            # a process group of its own: a terminal's Ctrl-C goes to the proxy alone, even
            # while this process is still starting (before main() can ignore it)
            process_group=0,
        )
        theirs.close()
        os.close(memory_fd)  # the child has its own; our mapping stays
        self._sock = ours
        log.info("recording to %s in process %d", self.options.directory, self.process.pid)
        key = self.key.private_bytes_raw() if self.key is not None else None
        level = logging.getLogger().getEffectiveLevel()
        config = ("config", 0, 0.0, self.options, self.meta, key, level)
        with self._lock:  # first, before anything put ahead of start
            self.spill.appendleft(((recwire.control(config),), 0))
            self._started = True
        self._wake.set()
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
        with self._lock:
            room = self._spilled + self.ring.used() + size <= self.options.max_backlog
            if room:
                if self.lost.get(key):  # the recording caught up: say how much is missing first
                    gap = ("gap", conn, t, direction, self.lost[key])
                    self._enqueue((recwire.control(gap),), 0)
                    self.lost[key] = 0
                for at in range(0, size, MAX_CHUNK):  # once, but for the rare huge chunk
                    piece = data if size <= MAX_CHUNK else data[at : at + MAX_CHUNK]
                    header = recwire.chunk_header(conn, t, direction, len(piece))
                    self._enqueue((header, piece), len(piece))
                bell = self._bell_wanted()
        if room:
            if bell:
                self._ring_bell()
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

    def refusal(self, conn: int) -> str:
        """Why data() said False (the policy is to close)."""
        return "recording failed" if self.failed is not None else "recording backlog"

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

    def reconfigure(self, options: RecordingOptions) -> None:
        """Sessions whose first record comes after this get archives made as `options`
        say; the archives of those begun before keep theirs (each header describes the
        privacy policy and format its records follow). The ring's size, the recording
        process's niceness and the largest message are set at start and stay."""
        options = replace(
            options,
            max_backlog=self.options.max_backlog,
            nice=self.options.nice,
            max_message=self.options.max_message,
        )
        changed = [
            REWORDED.get(f.name, f.name)
            for f in fields(options)
            if getattr(options, f.name) != getattr(self.options, f.name)
        ]
        if not changed:
            return
        log.info("recording: sessions from now on follow the new %s", ", ".join(changed))
        self.options = options  # data() reads the backlog policy from any thread: one store
        self._put(("options", 0, time.monotonic(), options))  # in order with the items

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Drain the backlog, let the recording process close every archive (signed), and
        wait for it. Past `timeout` the process is ended, and that is logged."""
        process, sock = self.process, self._sock
        if process is None or sock is None or self._stopping:
            return
        deadline = time.monotonic() + timeout
        self._stop_asked = True  # the process may stop, and its end be read, before _put returns
        self._put(_STOP)
        self._stopping = True  # after the stop item: the shipper ends once spill is empty
        self._wake.set()
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

    def release_ring(self) -> None:
        """After a failure and stop(): give the ring's memory back. Nothing touches the ring
        of a failed recorder (data() and _put() stop first), so its views can go."""
        assert self.failed is not None
        memory = self.ring.buffer
        self.ring.release()
        if isinstance(memory, mmap.mmap):
            memory.close()

    def _put(self, item: tuple[Any, ...]) -> None:
        if self.failed is not None:  # after a failure nothing more is recorded
            return
        with self._lock:
            self._enqueue((recwire.control(item),), 0)
            bell = self._bell_wanted()
        if bell:
            self._ring_bell()

    def _enqueue(self, parts: tuple[bytes, ...], size: int) -> None:
        """Into the ring, or behind what already waits in spill. Under _lock."""
        if self._started and not self.spill and self.ring.put(parts):
            self._put_in_ring = True
            return
        self.spill.append((parts, size))
        self._spilled += size
        if not self._wake.is_set():
            self._wake.set()

    def _bell_wanted(self) -> bool:
        """Whether the recording process sleeps on items put since the last call. Under
        _lock: the ring's producer end is used by one thread at a time."""
        put, self._put_in_ring = self._put_in_ring, False
        return put and self.ring.consumer_waiting()

    def _ring_bell(self) -> None:
        """Wake the recording process (a byte on the socketpair). A full socket means it has
        doorbells enough; a closed one, that it is gone (the reports thread says so)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.send(b"!", socket.MSG_DONTWAIT)

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed_at = time.monotonic()
            self.failed = reason
            log.error("recording stopped: %s; forwarding goes on without it", reason)
        with self._lock:
            self.spill.clear()  # nothing will take it now: free the memory
            self._spilled = 0

    # -- the shipper thread: moves spill into the ring as the recording process makes room ---
    def _ship(self) -> None:
        while True:
            self._wake.wait(POLL_MAX)
            self._wake.clear()
            self._release_cold(time.monotonic())
            while True:
                with self._lock:
                    while self.spill and self.ring.put(self.spill[0][0]):
                        self._spilled -= self.spill.popleft()[1]
                        self._put_in_ring = True
                    waiting = bool(self.spill)
                    bell = self._bell_wanted()
                if bell:
                    self._ring_bell()
                if not waiting:
                    break
                time.sleep(POLL_MIN)  # the ring is full: the recording process is behind
            if self._stopping:
                return

    def _release_cold(self, now: float) -> None:
        """Give back the ring's pages past its hot part cold_keep seconds after a burst
        last used them. The forwarding threads are not held up meanwhile: items that would
        go there wait in spill."""
        ring = self.ring
        if ring.cold_puts != self._cold_seen:
            self._cold_seen, self._cold_at = ring.cold_puts, now
            return
        if not self._cold_at or now - self._cold_at < self.cold_keep:
            return
        with self._lock:
            kept = ring.keep_to_hot()
        if not kept:
            return  # the recording process is still behind: later
        try:
            ring.release_cold()
        except OSError as exc:  # the shipper must go on: keep the memory instead
            self.cold_keep = math.inf
            log.warning("recording ring: cannot give memory back (%s); keeping it", exc)
        else:
            self._cold_at = 0.0
            log.debug("recording ring: the pages past its hot part given back")
        finally:
            with self._lock:
                ring.reopen_cold()

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
        if not self._stop_asked:  # it ended on its own: a crash, or someone killed it
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
        elif kind == "cut":  # left unfinished by a failure: `verify` says what is intact
            self.cut.append(Path(report[1]))
        elif kind == "failed":
            self._fail(report[1])


def _receive(sock: socket.socket, buffer: recwire.ItemParser) -> bool:
    """Read what is there straight into the buffer; False at end-of-file."""
    with buffer.space() as room:
        n = sock.recv_into(room)
    buffer.received(n)
    return n > 0


def _shared_memory(capacity: int) -> tuple[int, mmap.mmap]:
    """An anonymous shared file for the ring, and our mapping of it (the recording process
    maps the same file through the inherited descriptor)."""
    fd = os.memfd_create("spicetap-recording-ring")
    size = ByteRing.size_for(capacity)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


# -- the recording process ------------------------------------------------------------------
def serve(sock: socket.socket, ring: ByteRing) -> int:
    """Handle the proxy's items until it says stop (or vanishes); close every archive."""
    worker: RecorderWorker | None = None
    status = "proxy vanished"  # end-of-file without a stop: the proxy died
    proxy_gone = False
    ticked = time.monotonic()

    def report(item: tuple[Any, ...]) -> None:
        # The proxy may be gone (killed, or a second signal ended it): what it put in the
        # ring is still recorded and every archive closed, so a report nobody reads is
        # dropped rather than failing the recording.
        nonlocal proxy_gone
        if proxy_gone:
            return
        try:
            sock.sendall(recwire.control(item))
        except OSError as exc:
            log.info("the proxy is gone (%s): recording what it relayed, then stopping", exc)
            proxy_gone = True

    try:
        while status == "proxy vanished":
            # chunks as views into the ring: RecordBuilder copies what it keeps, a large
            # message straight into its assembly (one copy per byte instead of two)
            for item in recwire.ring_items(ring, views=True):
                if worker is not None and item[0] not in ("config", "stop"):
                    worker.handle(item)
                elif item[0] == "config":
                    worker = _worker(item, report)
                elif item[0] == "stop":
                    status = "proxy stopped"
                    break
            if status != "proxy vanished" or proxy_gone:  # gone: what it put is handled
                break
            now = time.monotonic()
            if worker is not None and now - ticked >= POLL_MAX:
                worker.tick()
                ticked = now
            proxy_gone = not _wait(sock, ring)
    except Exception as exc:  # a disk error must not go unsaid
        status = "recording failed"
        if isinstance(exc, OSError):  # the disk's doing (it names the archive): one line
            log.error("recording failed: %s", exc)
        else:  # a bug: its traceback
            log.exception("recording failed")
        with contextlib.suppress(OSError):
            report(("failed", f"{type(exc).__name__}: {exc}"))
    if worker is not None:
        worker.close_all(status)
    return 1 if status == "recording failed" else 0


def _wait(sock: socket.socket, ring: ByteRing) -> bool:
    """Sleep until the ring has items, at most POLL_MAX; False once the proxy's end of the
    socketpair is closed (it stopped, or died)."""
    ring.set_waiting(True)  # from here on a producer that puts an item rings the doorbell
    try:
        if ring.readable():
            return True
        ready, _w, _x = select.select([sock], [], [], POLL_MAX)
        return not ready or bool(sock.recv(64 * 1024))  # doorbells, or end-of-file
    finally:
        ring.set_waiting(False)


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
    logs.configure(logging.INFO, argv[3] if len(argv) > 3 else "text")
    with socket.socket(fileno=int(argv[1])) as sock, mmap.mmap(int(argv[2]), 0) as memory:
        ring = ByteRing(memory)
        try:
            return serve(sock, ring)
        finally:
            ring.release()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
