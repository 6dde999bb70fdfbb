# Types of the C extension proxy/io/_forward.c.
from types import TracebackType

class Lock:
    """A lock that C can take without the GIL (a context manager)."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class RecordWalk:
    """Whether a TLS stream's raw bytes, fed so far, end inside a record (`cut` > 0)."""

    @property
    def cut(self) -> int: ...
    def feed(self, data: bytes) -> None: ...

class TlsCore:
    """A TLS end's OpenSSL connection (an _ssl._SSLSocket, handshake done), taken over from
    its memory BIOs; its receives and sends, as TlsEnd's."""

    def __init__(
        self,
        sslsocket: object,
        fd: int,
        crypto_lock: Lock,
        send_lock: Lock,
        walk: RecordWalk,
        size: int,
    ) -> None: ...
    def receive(self) -> bytes: ...
    def send(self, data: bytes) -> tuple[int, int]:
        """(plaintext the peer can read, errno that cut the send or 0)."""

class Forwarder:
    """One receive from `source` and its bytes sent to `sink` under `lock`, per call."""

    def __init__(self, source: int, sink: int, lock: Lock, size: int) -> None: ...
    def decrypt(self, core: TlsCore) -> None:
        """The source is this TLS end."""
    def encrypt(self, core: TlsCore) -> None:
        """The sink is this TLS end."""
    def __call__(self) -> tuple[bytes, int, int, float]:
        """(data, delivered, errno that cut the send or 0, monotonic time of arrival)."""

def shares_openssl(path: str) -> bool:
    """Whether the extension module at `path` calls the OpenSSL this one was built with."""
