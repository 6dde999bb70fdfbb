"""How many connections the proxy holds at once (no I/O: the listeners ask, then tell).

Every relayed connection holds two file descriptors, the viewer's and the upstream's. Past
the process's open-files limit accept() and connect() fail (EMFILE), and a viewer already
let in would then lose a channel in the middle of its link. So the proxy admits only what
its descriptors can serve, and closes any connection past that at once: logged (throttled,
proxy/core/throttle.py) and counted.

A SPICE session is several connections: the main channel first, then the others, linked
with the connection id the main channel learnt. Near the cap, a session let in by its main
channel could then lose the rest to other sessions' main channels, and a viewer would be
left with half a session. So the last `reserve` connections serve only channels of sessions
already begun: a main channel linking with connection id 0 (a new session) is refused there
by the relay (session_allowed), when its link message shows what it is. A migration's main
channel carries its session's id and may use them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from proxy.core.throttle import LogThrottle

# Descriptors the proxy needs besides its connections: listeners, the recording process's
# socket and ring, archives being written, the log, the management API, TLS files.
RESERVED_FILES = 128


def connection_budget(open_files: int) -> int:
    """Connections that `open_files` descriptors can serve: two each, after the reserve."""
    return max(1, (open_files - RESERVED_FILES) // 2)


def files_needed(connections: int) -> int:
    return 2 * connections + RESERVED_FILES


def session_reserve(limit: int) -> int:
    """Connections kept for channels of sessions already begun: the last eighth of the
    limit, at least one (none under a limit of 1, where it would refuse every session)."""
    return min(max(1, limit // 8), limit - 1)


@dataclass
class Admission:
    """admit() and release() come from the listeners' thread, session_allowed() from any
    channel's (the counters it shares take a lock)."""

    limit: int
    open: int = 0
    refused: int = 0  # at once, past the limit (since start, for the metrics)
    sessions_refused: int = 0  # new sessions, within the reserve
    reserve: int = -1  # -1: session_reserve(limit)
    _log: LogThrottle = field(default_factory=LogThrottle)
    _session_log: LogThrottle = field(default_factory=LogThrottle)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.reserve < 0:
            self.reserve = session_reserve(self.limit)

    def admit(self) -> bool:
        """Whether a new connection may be served; if so, release() once it ends."""
        if self.open >= self.limit:
            with self._lock:
                self.refused += 1
                self._log.happened()
            return False
        self.open += 1
        return True

    def session_allowed(self) -> bool:
        """Whether a connection already admitted may begin a new session: not within the
        last `reserve` connections (its own included)."""
        if self.open <= self.limit - self.reserve:
            return True
        with self._lock:
            self.sessions_refused += 1
            self._session_log.happened()
        return False

    def release(self) -> None:
        self.open -= 1

    def resize(self, limit: int) -> None:
        """A reload's cap, and its reserve: connections open past it carry on, new ones are
        closed until fewer are open."""
        self.limit = limit
        self.reserve = session_reserve(limit)

    def refusals_to_log(self, now: float) -> int:
        """How many refusals a log line should report now; 0: none, or not yet."""
        with self._lock:
            return self._log.to_log(now)

    def session_refusals_to_log(self, now: float) -> int:
        with self._lock:
            return self._session_log.to_log(now)
