"""Telling systemd how the proxy is doing (sd_notify(3)), for `Type=notify` units
(config/spicetap.service): ready once every listener is up, reloading while a SIGHUP's
reload runs, stopping while archives drain, a status line for `systemctl status`, and the
watchdog's keep-alive from the event loop, so a proxy whose loop hangs is restarted.

The protocol is a datagram of "KEY=VALUE" lines to the AF_UNIX socket named in
$NOTIFY_SOCKET (a leading "@" names one in the abstract namespace). Without that variable
(not started by systemd) every call does nothing. A failed send is logged once and never
stops the proxy: systemd may have gone away while the proxy serves on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger("spicetap.proxy")

STATUS_EVERY = 5.0  # seconds between status lines when no watchdog asks for more often


class ServiceManager:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog = _watchdog_seconds(environ) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._failed = False

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) matches the reload with
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config")

    def stopping(self, status: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")

    def notify(self, text: str) -> None:
        if self.address is None or self._failed:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            self._failed = True
            self.close()
            log.warning("cannot notify systemd (NOTIFY_SOCKET): %s; not trying again", exc)

    async def keep_alive(self, status: Callable[[], str]) -> None:
        """The watchdog's keep-alive at half its interval (sd_watchdog_enabled(3)), with the
        status line; run as a task of the proxy's event loop: if the loop stalls, systemd
        sees no keep-alive and restarts the service."""
        if self.address is None:
            return
        every = STATUS_EVERY if self.watchdog is None else min(STATUS_EVERY, self.watchdog / 2)
        while True:
            line = f"STATUS={status()}"
            self.notify(line if self.watchdog is None else f"WATCHDOG=1\n{line}")
            await trio.sleep(every)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):  # abstract namespace: a leading NUL byte on the wire
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # unset, or a kind (vsock:...) this proxy does not speak


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC, if it is meant for this process (WATCHDOG_PID absent or ours)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        pid = int(environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 1e6
