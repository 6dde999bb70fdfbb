"""haproxy in front of spicetap, as operators put it: in HTTP mode before the WebSocket
front (it adds X-Forwarded-For with option forwardfor, says the scheme and Host the
browser used, and rewrites Host to the backend's name the way nginx's proxy_pass does by
default), or in TCP mode before a reverse listener, sending a PROXY protocol header
(`send-proxy`, `send-proxy-v2`). It connects to spicetap from its own loopback address
(`source`), so that spicetap sees a peer other than the viewer's 127.0.0.1."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.harness.procs import (
    LOOPBACK,
    PeerFailed,
    need_program,
    pid_listens_on,
    reserve_ports,
    stop_process,
    tail,
    wait_until,
)

PROXY_SOURCE = "127.0.0.2"  # haproxy's end of its connections to spicetap
BACKEND_HOST = "spicetap.internal"  # the Host spicetap is asked for behind it

COMMON = """\
global
    maxconn 200
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 60s
"""
HTTP = """\
frontend browsers
    mode http
    bind {listen}:{port}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header Host {backend_host}
    default_backend spicetap
backend spicetap
    mode http
    source {source}
    server websocket {listen}:{backend}
"""
TCP = """\
frontend viewers
    mode tcp
    bind {listen}:{port}
    default_backend spicetap
backend spicetap
    mode tcp
    source {source}
    server reverse {listen}:{backend} {send}
"""
MODES = ("http", "send-proxy", "send-proxy-v2")


class Haproxy:
    """haproxy on 127.0.0.1:`port` relaying to `backend_port`: HTTP (WebSockets too) with
    mode "http", else TCP with a PROXY header ("send-proxy": v1, "send-proxy-v2")."""

    def __init__(self, backend_port: int, work: Path, mode: str = "http") -> None:
        if mode not in MODES:
            raise ValueError(mode)
        self.binary = need_program("haproxy", "haproxy")
        self.backend_port = backend_port
        self.work = work
        self.mode = mode
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.port,) = reserve_ports(1)
        config = self.work / "haproxy.cfg"
        config.write_text(
            COMMON
            + (HTTP if self.mode == "http" else TCP).format(
                listen=LOOPBACK,
                port=self.port,
                backend=self.backend_port,
                backend_host=BACKEND_HOST,
                source=PROXY_SOURCE,
                send=self.mode,
            )
        )
        log = self.work / "haproxy.log"
        with log.open("wb") as out:  # -db: in the foreground, its PID is ours to stop
            self.proc = subprocess.Popen(
                [self.binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        proc = self.proc
        try:
            wait_until(
                lambda: proc.poll() is not None or pid_listens_on(proc.pid, self.port),
                timeout=10,
                what=f"haproxy listening on {self.port}",
            )
            if proc.poll() is not None:
                raise PeerFailed(f"haproxy exited {proc.returncode}: {tail(log)}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
