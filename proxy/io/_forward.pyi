# Types of the C extension proxy/io/_forward.c.
from types import TracebackType

class SendLock:
    """A lock for a socket's sends (a context manager), also taken by Forwarder in C."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class Forwarder:
    """One recv() from `source` and its bytes sent to `sink` under `lock`, per call."""

    def __init__(self, source: int, sink: int, lock: SendLock, size: int) -> None: ...
    def __call__(self) -> tuple[bytes, int, int, float]:
        """(data, delivered, errno that cut the send or 0, monotonic time of arrival)."""
