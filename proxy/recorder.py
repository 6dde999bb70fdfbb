"""Recording for the proxy: dissection and archive writing in a worker thread.

The forwarding path only puts (connection, time, direction, bytes) on a bounded queue and
never waits: if the disk or the dissector falls behind and max_queue chunks wait, the policy
decides: "gap" keeps forwarding and records how many bytes are missing; "close" ends the
session's channels rather than leave a hole. Either way it is logged loudly. The worker
turns the bytes into records (spicetap.records), applies the privacy policy, and writes one
archive per session (sessions are told apart by connection id), closing each archive, signed,
when the last channel of its session closes or the proxy stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spicetap.archive.importer import dissector_hashes
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.records import to_archive
from spicetap.archive.writer import ArchiveWriter, FlushPolicy, Rotation
from spicetap.records import Record, RecordBuilder

log = logging.getLogger("spicetap.recorder")

BACKLOG_POLICIES = ("gap", "close")
# How long the idle worker sleeps between looks at its queue: short while traffic flows,
# up to POLL_MAX when quiet (what it adds is recording delay, never forwarding delay).
POLL_MIN = 0.001
POLL_MAX = 0.05
_STOP = ("stop",)


@dataclass(frozen=True)
class RecordingOptions:
    directory: Path
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    flush: FlushPolicy = field(default_factory=FlushPolicy)
    rotation: Rotation = field(default_factory=Rotation)
    compress: bool = False
    max_queue: int = 20000  # chunks waiting for the worker
    backlog: str = "gap"


@dataclass
class _Session:
    writer: ArchiveWriter
    t0: float
    conns: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)


class Recorder:
    def __init__(
        self, options: RecordingOptions, meta: dict[str, Any], signing_key: Ed25519PrivateKey | None
    ) -> None:
        self.options = options
        self.meta = meta
        self.key = signing_key
        # One FIFO, so each connection's events stay in order. Only byte chunks are bounded
        # (by max_queue, checked in data()); control items, a few per connection, always go
        # in without waiting: the forwarding thread must never block here. A deque, not a
        # queue.Queue: appending takes no lock and wakes nobody; the worker polls it (_run),
        # so a forwarded message does not hand the GIL to the recorder there and then.
        self.queue: deque[tuple[Any, ...]] = deque()
        self.builder = RecordBuilder()
        self.sessions: dict[Any, _Session] = {}
        self.conn_session: dict[int, Any] = {}
        self.lost: dict[tuple[int, str], int] = defaultdict(int)
        self.lost_total = 0
        self.archives: list[Path] = []
        self.viewers: dict[int, str] = {}  # connection -> the viewer's address
        self.routes: dict[int, dict[str, Any]] = {}  # connection -> insertion, upstream...
        self.failed: str | None = None  # the worker died: recording stopped (logged)
        self._thread = threading.Thread(target=self._run, name="spicetap-recorder", daemon=True)
        self._last_warning = 0.0

    # -- called from the forwarding side (any thread): never blocks ---------------------------
    def start(self) -> None:
        self.options.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()

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
        """False when the bytes could not be queued and the policy is to close."""
        key = (conn, direction)
        if len(self.queue) < self.options.max_queue:
            if self.lost.get(key):  # the worker caught up: say how much is missing first
                self._put(("gap", conn, t, direction, self.lost[key]))
                self.lost[key] = 0
            self._put(("data", conn, t, direction, data))
            return True
        self.lost[key] += len(data)
        self.lost_total += len(data)
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

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue, close every archive (signed), stop the worker."""
        if self._thread.is_alive():
            self._put(_STOP)
            self._thread.join(timeout)

    def _put(self, item: tuple[Any, ...]) -> None:
        if self.failed is None:  # after a failure nothing more is recorded; forwarding goes on
            self.queue.append(item)  # unbounded: never waits

    # -- the worker --------------------------------------------------------------------------
    def _run(self) -> None:
        pause = POLL_MIN
        try:
            while True:
                try:
                    item = self.queue.popleft()
                except IndexError:  # idle: time-based flushes, then a longer and longer nap
                    for s in self.sessions.values():
                        s.writer.tick()
                    time.sleep(pause)
                    pause = min(pause * 2, POLL_MAX)
                    continue
                pause = POLL_MIN
                if item is _STOP:
                    break
                self._handle(item)
        except Exception as exc:  # a disk error must not take the proxy down
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("recording failed; forwarding goes on without it")
        finally:
            self._close_all("proxy stopped" if self.failed is None else "recording failed")

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind, conn, t = item[0], item[1], item[2]
        b = self.builder
        if kind == "data":
            records = b.data(conn, t, item[3], item[4])
        elif kind == "open":
            extra: dict[str, Any] = {"tls": item[5]} if item[5] else {}
            if item[7] is not None:
                extra["via"] = f"{item[7][0]}:{item[7][1]}"
            b.opened(conn, t, item[3], item[4], extra or None)
            self.viewers[conn] = f"{item[3][0]}:{item[3][1]}"
            self.routes[conn] = item[6] or {}
            records = []
        elif kind == "gap":
            records = b.gap(conn, t, item[3], item[4], where="the recording (backlog)")
        elif kind == "error":
            records = b.error(conn, t, item[3], item[4])
        elif kind == "event":
            records = b.event(conn, t, *item[3:])
        else:
            records = b.closed(conn, t, item[3])
        for rec in records:
            self._write(rec)
        if kind == "close":
            self._connection_closed(conn)
            self.viewers.pop(conn, None)
            self.routes.pop(conn, None)

    def _session_key(self, rec: Record) -> Any:
        if rec.session is not None:
            return rec.session
        return ("unassigned", rec.connection)  # e.g. a link refused before any INIT

    def _write(self, rec: Record) -> None:
        key = self._session_key(rec)
        session = self.sessions.get(key)
        if session is None:
            session = self._open_session(key, rec)
        session.conns.add(rec.connection)
        self.conn_session[rec.connection] = key
        obj = to_archive(rec, session.t0, self.options.policy)
        if obj is not None:
            session.writer.write(obj)

    def _open_session(self, key: Any, rec: Record) -> _Session:
        wall = time.time() - (time.monotonic() - rec.time)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(wall))
        label = f"{key:08x}" if isinstance(key, int) else f"unassigned-{key[1]}"
        name = f"{stamp}-{label}"
        path = self.options.directory / f"{name}{'.spta.zst' if self.options.compress else '.spta'}"
        n = 1
        while path.exists():
            n += 1
            path = path.with_name(f"{name}-{n}{path.name[len(name) :]}")
        header = {
            "dissector": dissector_hashes(),
            "session": {
                **self.meta,
                **self.routes.get(rec.connection, {}),
                "viewer": self.viewers.get(rec.connection),
                "id": key if isinstance(key, int) else None,
            },
            "policy": self.options.policy.describe(),
            "started": wall,
        }
        writer = ArchiveWriter(
            path,
            header,
            signing_key=self.key,
            flush=self.options.flush,
            rotation=self.options.rotation,
            compress=self.options.compress,
        )
        self.archives.append(path)
        log.info("recording session %s to %s", label, path)
        session = _Session(writer, rec.time)
        self.sessions[key] = session
        return session

    def _connection_closed(self, conn: int) -> None:
        key = self.conn_session.get(conn)
        session = self.sessions.get(key) if key is not None else None
        if session is None:
            return
        session.closed.add(conn)
        if session.closed >= session.conns:
            session.writer.close("complete")
            del self.sessions[key]

    def _close_all(self, status: str) -> None:
        for session in self.sessions.values():
            try:
                session.writer.close(status)
            except OSError:
                log.exception("closing an archive failed")
        self.sessions.clear()
