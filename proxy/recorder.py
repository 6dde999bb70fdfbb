"""Recording for the proxy: turning relayed bytes into signed archives.

RecorderWorker runs in the recording process (proxy/io/recording.py starts it and feeds it):
it turns each connection's items (open, data, gap, error, event, close) into records
(spicetap.records), applies the privacy policy, and writes one archive per session
(sessions are told apart by connection id), closing each archive, signed, when the last
channel of its session closes or the proxy stops. What the proxy must learn back (which
session a connection joined, which archives exist) goes out through `report`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.core.endpoint import endpoint_text
from proxy.core.framing import DEFAULT_MAX_MESSAGE
from spicetap.archive.format import DEFAULT_CHAIN_HASH
from spicetap.archive.importer import dissector_hashes
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.records import to_archive
from spicetap.archive.writer import ArchiveWriter, FlushPolicy, Rotation
from spicetap.records import Record, RecordBuilder

log = logging.getLogger("spicetap.recorder")

BACKLOG_POLICIES = ("gap", "close")
# Connections that never named a SPICE channel (a load balancer's health checks, a port
# scan, another protocol) share one archive per run instead of one each.
UNLINKED = ("unlinked",)
Report = Callable[[tuple[Any, ...]], None]
# With sasl_user, the archive a channel still linking would open waits (this much at most)
# for that channel's login, so that its header names the user: on a plain server leg SASL
# hides the main channel's INIT, and another channel opens the session's archive.
WAIT_RECORDS = 64
WAIT_BYTES = 1 << 20
# records after which a channel's login can say no more: it is done, or was never begun
_LINK_OVER_KINDS = frozenset({"message", "agent", "close", "error", "gap"})


@dataclass(frozen=True)
class RecordingOptions:
    directory: Path
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    flush: FlushPolicy = field(default_factory=FlushPolicy)
    rotation: Rotation = field(default_factory=Rotation)
    compress: bool = False
    chain_hash: str = DEFAULT_CHAIN_HASH  # the archives' hash chain (spicetap.archive.format)
    # Bytes relayed but not yet handed to the recording process: the most the proxy holds
    # for it. Past this the backlog policy applies.
    max_backlog: int = 512 << 20
    backlog: str = "gap"
    # The recording process's niceness (and SCHED_BATCH when above 0): when CPU is short,
    # forwarding gets it first and recording catches up later, within max_backlog.
    nice: int = 10
    # The proxy's --max-message: the recording process frames what the proxy relays with
    # the same limit (a smaller one would refuse messages the proxy let through).
    max_message: int = DEFAULT_MAX_MESSAGE
    # The proxy's alone: seconds after a recording failure (a full disk) before new
    # connections get a new recording process (proxy/io/resuming.py).
    resume_after: float = 30.0


@dataclass
class _Session:
    writer: ArchiveWriter
    t0: float
    policy: PrivacyPolicy  # the one its header describes, whatever a reload brings later
    conns: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)


class RecorderWorker:
    def __init__(
        self,
        options: RecordingOptions,
        meta: dict[str, Any],
        signing_key: Ed25519PrivateKey | None,
        report: Report = lambda _report: None,
    ) -> None:
        self.options = options
        self.meta = meta
        self.key = signing_key
        self.report = report
        self.builder = RecordBuilder(options.max_message, views=True)  # see to_archive
        self.sessions: dict[Any, _Session] = {}
        # Every session a connection wrote to, the one it writes to now last: a main
        # channel may write to two (records let go without a session before a late INIT,
        # or a second INIT), and each such archive closes when its last connection does.
        self.conn_keys: dict[int, list[Any]] = {}
        self.viewers: dict[int, str] = {}  # connection -> the viewer's address
        self.routes: dict[int, dict[str, Any]] = {}  # connection -> insertion, upstream...
        # connection -> whom it authenticated as (inject: a token naming its user; SASL with
        # sasl_user: the name it logged in with), from its auth event: known before a main
        # channel's INIT lets its records (held till then) open the session's archive, so
        # the header can say whose the session is
        self.users: dict[int, str] = {}
        self.waiting: dict[Any, list[Record]] = {}  # session -> records before its archive

    def tick(self) -> None:
        """Call while idle: time-based flushes."""
        for s in self.sessions.values():
            s.writer.tick()

    def handle(self, item: tuple[Any, ...]) -> None:
        kind, conn, t = item[0], item[1], item[2]
        b = self.builder
        if kind == "data":
            records = b.data(conn, t, item[3], item[4])
        elif kind == "open":
            extra: dict[str, Any] = {"tls": item[5]} if item[5] else {}
            if item[7] is not None:
                extra["via"] = endpoint_text(item[7])
            if item[6] and "forwarded_by" in item[6]:  # each connection's, linked or not
                extra["forwarded_by"] = item[6]["forwarded_by"]
            b.opened(conn, t, item[3], item[4], extra or None)
            self.viewers[conn] = endpoint_text(item[3])
            self.routes[conn] = item[6] or {}
            records = []
        elif kind == "gap":
            records = b.gap(conn, t, item[3], item[4], where="the recording (backlog)")
        elif kind == "error":
            records = b.error(conn, t, item[3], item[4])
        elif kind == "event":
            said = item[6]
            # a refused SASL login names whom the viewer claimed to be: not the session's
            accepted = said.get("outcome", "accepted") == "accepted"
            if item[4] == "auth" and isinstance(said.get("user"), str) and accepted:
                self.users[conn] = said["user"]
            records = b.event(conn, t, *item[3:])
        elif kind == "options":  # a reload's: for sessions opened from now on
            self.options = item[3]
            return
        else:
            records = b.closed(conn, t, item[3])
        for rec in records:
            self._write(rec)
        if kind == "close":
            self.viewers.pop(conn, None)
            self.routes.pop(conn, None)
            self.users.pop(conn, None)
            if self._connection_closed(conn):
                self.report(("gone", conn))

    def _session_key(self, rec: Record) -> Any:
        if rec.session is not None:
            return rec.session
        if rec.channel == "unknown":  # records wait for the link message (RecordBuilder)
            return UNLINKED
        return ("unassigned", rec.connection)  # e.g. a link refused before any INIT

    def _write(self, rec: Record) -> None:
        key = self._session_key(rec)
        session = self.sessions.get(key)
        if session is None:
            held = self.waiting.get(key)
            if held is None and not self._waits(key, rec):
                session = self._open_session(key, rec, self.users.get(rec.connection))
            else:
                held = self.waiting.setdefault(key, [])
                held.append(rec)
                if not self._wait_over(held):
                    return
                self._open_waiting(key)
                return
        self._append(session, key, rec)

    def _waits(self, key: Any, rec: Record) -> bool:
        """Whether the archive `rec` would open waits for its channel's login."""
        linking = rec.connection not in self.users and not _link_over(rec)
        return self.options.policy.sasl_user and isinstance(key, int) and linking

    def _wait_over(self, held: list[Record]) -> bool:
        last = held[-1]
        if last.connection in self.users or _link_over(last) or len(held) >= WAIT_RECORDS:
            return True
        return sum(len(r.raw) for r in held) >= WAIT_BYTES

    def _open_waiting(self, key: Any) -> None:
        held = self.waiting.pop(key)
        user = next((self.users[r.connection] for r in held if r.connection in self.users), None)
        session = self._open_session(key, held[0], user)
        for rec in held:
            self._append(session, key, rec)

    def _append(self, session: _Session, key: Any, rec: Record) -> None:
        keys = self.conn_keys.setdefault(rec.connection, [])
        if not keys or keys[-1] != key:
            session.conns.add(rec.connection)
            keys.append(key)
            self.report(("session", rec.connection, key))
        obj = to_archive(rec, session.t0, session.policy)
        if obj is not None:
            session.writer.write(obj)

    def _open_session(self, key: Any, rec: Record, user: str | None) -> _Session:
        wall = time.time() - (time.monotonic() - rec.time)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(wall))
        if isinstance(key, int):
            label = f"{key:08x}"
        else:
            label = "unlinked" if key == UNLINKED else f"unassigned-{key[1]}"
        name, suffix = f"{stamp}-{label}", ".spta.zst" if self.options.compress else ".spta"
        path = self.options.directory / f"{name}{suffix}"
        n = 1
        while path.exists():
            n += 1
            path = path.with_name(f"{name}-{n}{suffix}")
        about: dict[str, Any]
        if key == UNLINKED:  # many viewers: each connection's open record names its own
            about = {"viewer": None, "unlinked": True}
        else:
            about = {
                **self.routes.get(rec.connection, {}),
                "viewer": self.viewers.get(rec.connection),
            }
            if user is not None:
                about["user"] = user
        header = {
            "dissector": dissector_hashes(),
            "session": {**self.meta, **about, "id": key if isinstance(key, int) else None},
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
            chain_hash=self.options.chain_hash,
        )
        session = _Session(writer, rec.time, self.options.policy)
        self.sessions[key] = session  # first: the archive is written to whatever follows
        fields = {"event": "archive_opened", "session": key if isinstance(key, int) else None,
                  "path": str(path)}  # fmt: skip
        log.info("recording session %s to %s", label, path, extra={"fields": fields})
        self.report(("archive", str(path)))  # the proxy keeps the list
        return session

    def _connection_closed(self, conn: int) -> bool:
        """Close each archive the connection was the last open one of; whether it wrote any
        record (the proxy was told of its session, and now learns it is gone)."""
        keys = self.conn_keys.pop(conn, [])
        for key in keys:
            session = self.sessions.get(key)
            if session is None:
                continue
            if key == UNLINKED:  # open until the proxy stops; its connections are not kept
                session.conns.discard(conn)
                continue
            session.closed.add(conn)
            if session.closed >= session.conns:
                session.writer.close("complete")
                del self.sessions[key]
        return bool(keys)

    def close_all(self, status: str) -> None:
        """Close every archive with `status`. Connections still open (the proxy vanished,
        or stopped before telling of their close) end here: what the builder still holds
        for them (a main channel waiting for INIT, a link header for its link message) is
        written first, with a close record naming the status."""
        now = time.monotonic()  # the proxy's clock too: CLOCK_MONOTONIC is system-wide
        for conn in list(self.builder.conns):
            try:
                for rec in self.builder.closed(conn, now, status):
                    self._write(rec)
            except OSError as exc:  # the disk's doing, said in one line
                log.error("recording the end of connection %d failed: %s", conn, exc)
        for key in list(self.waiting):  # a safety net: the close records above end waits
            try:
                self._open_waiting(key)
            except OSError as exc:
                log.error("recording session %s failed: %s", key, exc)
        for session in self.sessions.values():
            try:
                session.writer.close(status)
            except OSError as exc:
                log.error("closing an archive failed: %s", exc)
                with contextlib.suppress(OSError):  # the proxy may be gone too
                    self.report(("cut", str(session.writer.paths[-1])))
        self.sessions.clear()


def _link_over(rec: Record) -> bool:
    """Whether `rec` shows its channel past its login (or past where one could be)."""
    if rec.kind in _LINK_OVER_KINDS or rec.name == "link_result":
        return True
    return rec.kind == "auth" and rec.name == "sasl_login"
