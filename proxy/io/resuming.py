"""Recording that resumes after a failure, for the connections that open later.

A Recorder (proxy/io/recording.py) stops for good when its process fails: a full disk, a
quota, a crash. Forwarding goes on unrecorded (or the `close` policy turns viewers away),
and until now only a restart of the proxy, which drops every session, brought recording
back. Here a new Recorder, a fresh recording process, takes the connections that open
`resume_after` seconds (RecordingOptions) or more after the failure, and again after each
further failure: once the disk has room, new sessions are recorded again. Connections
opened before stay with the recorder they began on: a failed one answers them by the
policy, as before. The failed recorder is stopped in the background; its archives (cut
where writing failed, `verify` says `truncated`) stay listed.

Callers use it as they would a Recorder: opened() and closed() from the listeners' thread,
data(), event() and error() from any channel's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.io.recording import Recorder
from proxy.recorder import RecordingOptions

log = logging.getLogger("spicetap.recorder")

RETIRE_TIMEOUT = 10.0  # for a failed recorder's process to be done


class ResumingRecorder:
    def __init__(
        self,
        make: Callable[[RecordingOptions], Recorder],
        options: RecordingOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make = make
        self.options = options  # a resumed recording's, and when (a reload changes them)
        self._clock = clock
        self.current = make(options)
        # each connection stays with the recorder it began on (read from any thread: a
        # dict lookup is atomic, and a connection's entry changes only at open and close)
        self._recorder_of: dict[int, Recorder] = {}
        self._next_try = 0.0  # after a resume attempt that could not start
        self._retired: list[tuple[Recorder, threading.Thread]] = []
        self.resumed = 0  # new recording processes after failures, for the log and tests

    # -- what the proxy reads -------------------------------------------------------------
    @property
    def failed(self) -> str | None:
        return self.current.failed

    @property
    def backlog_bytes(self) -> int:
        return self.current.backlog_bytes

    @property
    def backlog_items(self) -> int:
        return self.current.backlog_items

    @property
    def lost_total(self) -> int:
        return self.current.lost_total + sum(r.lost_total for r, _t in self._retired)

    @property
    def archives(self) -> list[Path]:
        return [p for r, _t in self._retired for p in r.archives] + self.current.archives

    @property
    def cut(self) -> list[Path]:
        return [p for r, _t in self._retired for p in r.cut] + self.current.cut

    @property
    def conn_session(self) -> dict[int, Any]:
        return dict(self.current.conn_session)  # one C-level copy: safe across threads

    # -- the Recorder calls --------------------------------------------------------------
    def start(self) -> None:
        self.current.start()

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
        self._resume_if_due()
        self._recorder_of[conn] = self.current
        self.current.opened(conn, t, client, server, tls, route, via)

    def data(self, conn: int, t: float, direction: str, data: bytes) -> bool:
        # a recorder that failed answers by the policy itself, without its ring
        return self._of(conn).data(conn, t, direction, data)

    def refusal(self, conn: int) -> str:
        return self._of(conn).refusal(conn)

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
        self._of(conn).event(conn, t, direction, kind, name, fields, raw)

    def error(self, conn: int, t: float, direction: str, reason: str) -> None:
        self._of(conn).error(conn, t, direction, reason)

    def closed(self, conn: int, t: float, reason: str) -> None:
        self._of(conn).closed(conn, t, reason)
        self._recorder_of.pop(conn, None)

    def reconfigure(self, options: RecordingOptions) -> None:
        """For sessions from now on, and for a recording that resumes later."""
        self.options = options
        self.current.reconfigure(options)

    def stop(self, timeout: float = 60.0) -> None:
        self.current.stop(timeout)
        for _rec, thread in self._retired:
            thread.join(RETIRE_TIMEOUT)

    # -- resuming ------------------------------------------------------------------------
    def _of(self, conn: int) -> Recorder:
        return self._recorder_of.get(conn) or self.current

    def _resume_if_due(self) -> None:
        """A new recording process, if the current one failed long enough ago."""
        old = self.current
        if old.failed is None or old.failed_at is None:
            return
        now = self._clock()
        if now - old.failed_at < self.options.resume_after or now < self._next_try:
            return
        try:
            fresh = self._make(self.options)
            fresh.start()
        except OSError as exc:  # no memory for its ring, no process: later, again
            log.error("recording cannot resume yet: %s", exc)
            self._next_try = now + self.options.resume_after
            return
        retiring = threading.Thread(target=_retire, args=(old,), daemon=True)
        retiring.start()
        self._retired.append((old, retiring))
        self.current = fresh
        self.resumed += 1
        log.warning(
            "recording resumed for new connections, in a new process (the last one "
            "stopped: %s); connections opened before it stay unrecorded",
            old.failed,
        )


def _retire(rec: Recorder) -> None:
    """A failed recorder's end: its process reaped, its ring's memory given back (a failed
    recorder never touches the ring again)."""
    rec.stop(RETIRE_TIMEOUT)
    rec.release_ring()


__all__ = ["ResumingRecorder"]
