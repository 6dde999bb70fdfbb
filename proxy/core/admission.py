"""How many connections the proxy holds at once (no I/O: the listeners ask, then tell).

Every relayed connection holds two file descriptors, the viewer's and the upstream's. Past
the process's open-files limit accept() and connect() fail (EMFILE), and a viewer already
let in would then lose a channel in the middle of its link. So the proxy admits only what
its descriptors can serve, and closes any connection past that at once: logged (throttled,
proxy/core/throttle.py) and counted.
"""

from __future__ import annotations

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


@dataclass
class Admission:
    limit: int
    open: int = 0
    refused: int = 0  # since start, for the metrics
    _log: LogThrottle = field(default_factory=LogThrottle)

    def admit(self) -> bool:
        """Whether a new connection may be served; if so, release() once it ends."""
        if self.open >= self.limit:
            self.refused += 1
            self._log.happened()
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def refusals_to_log(self, now: float) -> int:
        """How many refusals a log line should report now; 0: none, or not yet."""
        return self._log.to_log(now)
