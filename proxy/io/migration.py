"""Serving a migration's destination (trio shell): when the server sends the viewer to a new
host, spicetap opens listeners for it on the address the viewer already uses, and relays
what arrives there to the real destination. The relay core rewrites the message to point at
them (proxy.core.migration); here are only sockets.

Listeners are per destination and short-lived: viewers connect every channel within seconds
of the migration, so a listener that accepted nothing for `linger` seconds closes. Channels
it accepted run on in the proxy's nursery, so closing the listener never cuts them.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from proxy.core.linkrewrite import LinkPolicy
from proxy.core.migration import Destination, MigrationUnavailable
from proxy.io.guard import guarded
from proxy.io.server import ChannelProxy, Upstream
from proxy.targets import Target

log = logging.getLogger("spicetap.migration")


@dataclass(frozen=True, slots=True)
class ServedAt:
    host: str
    port: int | None
    tls_port: int | None
    cert_subject: str | None


@dataclass
class _Served:
    at: ServedAt
    # one per listener task (plain, and TLS for a TLS front): a scope enters one `with`
    scopes: list[trio.CancelScope] = field(default_factory=list)
    last_accept: float = field(default_factory=time.monotonic)

    def stop(self) -> None:
        for scope in self.scopes:
            scope.cancel()


@dataclass
class MigrationListeners:
    """Per front end: how to reach destinations (CA checks) and how to serve viewers (the
    front's TLS context and certificate subject)."""

    proxy: ChannelProxy
    nursery: trio.Nursery
    ca: Path | None = None
    insecure: bool = False
    keylog: Path | None = None
    viewer_tls: ssl.SSLContext | None = None
    tls_subject: str | None = None
    insertion: str = "reverse"
    linger: float = 120.0
    limit: int = 16
    # by destination, where viewers reach us, and whose authentication (a policy's id)
    served: dict[tuple[Destination, str, int], _Served] = field(default_factory=dict)

    async def serve(
        self, dest: Destination, local_host: str, policy: LinkPolicy | None = None
    ) -> ServedAt:
        """Where viewers reach `dest` through spicetap (listening from now on); `policy`:
        the migrating target's own authentication, kept at the destination."""
        key = (dest, local_host, id(policy))
        known = self.served.get(key)
        if known is not None:  # e.g. SWITCH_HOST after MIGRATE_BEGIN_SEAMLESS
            known.last_accept = time.monotonic()
            return known.at
        if len(self.served) >= self.limit:
            raise MigrationUnavailable(f"{self.limit} migrations are already being served")
        target = Target(
            None,
            (dest.host, dest.port) if dest.port else None,
            (dest.host, dest.tls_port) if dest.tls_port else None,
            self.ca,
            dest.cert_subject,
            self.insecure,
            policy,
        )
        if target.plain is None and target.tls is None:
            raise MigrationUnavailable(f"destination {dest.host} has no port")
        entry = _Served(ServedAt(local_host, None, None, None))
        plain_port = tls_port = None
        try:
            # A viewer on a plain front can only be served plain (TLS is added upstream).
            # Behind a TLS front, a plain port only where the destination has one: else
            # the viewer's channels would come back in clear (spice-gtk tries a plain port
            # first) where the server itself allows TLS alone.
            if self.viewer_tls is None or dest.port:
                upstream = target.upstream(False, self.keylog)
                plain_port = await self._listen(entry, local_host, upstream)
            if self.viewer_tls is not None and dest.tls_port:
                tls_port = await self._listen(
                    entry, local_host, target.upstream(True, self.keylog), self.viewer_tls
                )
        except OSError as exc:
            entry.stop()
            raise MigrationUnavailable(f"cannot listen on {local_host}: {exc}") from None
        subject = self.tls_subject if tls_port else None
        entry.at = ServedAt(local_host, plain_port, tls_port, subject)
        self.served[key] = entry
        self.nursery.start_soon(self._expire, key, entry)
        log.info(
            "following a migration to %s (port %s, tls-port %s): viewers come back on %s",
            dest.host, dest.port, dest.tls_port, entry.at,
        )  # fmt: skip
        return entry.at

    async def _listen(
        self,
        entry: _Served,
        host: str,
        upstream: Upstream,
        tls: ssl.SSLContext | None = None,
    ) -> int:
        listeners = await trio.open_tcp_listeners(0, host=host)
        port = int(listeners[0].socket.getsockname()[1])

        async def handle(stream: trio.SocketStream) -> None:
            entry.last_accept = time.monotonic()
            await self.proxy.handle_socket(
                stream, upstream, tls=tls, insertion=self.insertion, migration=self
            )

        scope = trio.CancelScope()
        entry.scopes.append(scope)

        async def run() -> None:
            with scope:
                await trio.serve_listeners(
                    guarded(handle, "migrated viewer", self.proxy.state),
                    listeners,
                    handler_nursery=self.nursery,
                )

        self.nursery.start_soon(run)
        return port

    async def _expire(self, key: tuple[Destination, str, int], entry: _Served) -> None:
        while True:  # until no viewer came for `linger` seconds (each accept moves it on)
            remaining = entry.last_accept + self.linger - time.monotonic()
            if remaining <= 0:
                break
            await trio.sleep(remaining)
        entry.stop()
        self.served.pop(key, None)
        log.info("migration listeners %s closed (no new viewer for %g s)", entry.at, self.linger)
