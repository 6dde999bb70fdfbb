"""Where a SPICE client should connect: a server, or a proxy in front of one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.harness.procs import LOOPBACK


@dataclass(frozen=True)
class SpiceEndpoint:
    port: int | None = None
    tls_port: int | None = None
    host: str = LOOPBACK
    password: str | None = None
    username: str | None = None  # SASL: the client then authenticates with SASL
    ca_file: Path | None = None  # needed with tls_port
    host_subject: str | None = None  # optional with tls_port (else hostname check)
    proxy: str | None = None  # "http://HOST:PORT": reach `host` through an HTTP CONNECT proxy

    def __post_init__(self) -> None:
        if self.port is None and self.tls_port is None:
            raise ValueError("an endpoint needs a port or a tls_port")
