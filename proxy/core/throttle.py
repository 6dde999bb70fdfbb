"""How often a repeated warning reaches the log (no I/O, no clock: the caller says when).

A peer can make the proxy refuse things as fast as it can connect; one log line each would
let it flood the log. So the first refusal is said at once, and later ones at most once per
`every` seconds, as a count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOG_EVERY = 10.0


@dataclass
class LogThrottle:
    every: float = LOG_EVERY
    _unlogged: int = 0
    _logged_at: float = -math.inf

    def happened(self) -> None:
        self._unlogged += 1

    def to_log(self, now: float) -> int:
        """How many events a log line should report now; 0: none, or not yet."""
        if not self._unlogged or now - self._logged_at < self.every:
            return 0
        count, self._unlogged, self._logged_at = self._unlogged, 0, now
        return count
