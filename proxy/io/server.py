"""The trio shell of `spicetap proxy`: accept viewer connections, connect upstream, move
bytes. All decisions come from proxy.core (ChannelRelay commands); this module only awaits.

Each viewer connection gets its own upstream connection and one nursery holding a pump per
direction and a ticker; when either side ends, the whole channel is closed (SPICE channels
are not half-closed, and TLS streams cannot be).
"""

from __future__ import annotations

import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from proxy.core.migration import MigrationUnavailable
from proxy.core.relay import (
    ChannelRelay,
    Close,
    Command,
    Forward,
    Limits,
    LinkPolicy,
    Log,
    RecordData,
    RecordEvent,
    Redirect,
)
from proxy.recorder import Recorder
from proxy.tls import check_subject

if TYPE_CHECKING:
    from proxy.io.migration import MigrationListeners

log = logging.getLogger("spicetap.proxy")

RECEIVE_SIZE = 256 * 1024
TICK = 0.5
CONNECT_TIMEOUT = 10.0

Opener = Callable[[], Awaitable[trio.abc.Stream]]


@dataclass(frozen=True)
class Upstream:
    """Where one viewer connection goes: how to open the server side, and what to call it."""

    open: Opener
    label: str  # host:port, with " (tls)" when re-originated over TLS
    target: str | None = None  # the configured target's name, if any


@dataclass
class ChannelStats:
    conn: int
    viewer: tuple[str, int]
    upstream: str
    started: float
    relay: ChannelRelay
    closed_reason: str | None = None


@dataclass
class ProxyState:
    """What the management API and metrics read."""

    channels: dict[int, ChannelStats] = field(default_factory=dict)
    total_channels: int = 0
    errors: int = 0
    # bytes and messages of channels already closed, so the metrics' totals only grow
    closed_bytes: dict[str, int] = field(default_factory=lambda: {"c2s": 0, "s2c": 0})
    closed_messages: dict[str, int] = field(default_factory=lambda: {"c2s": 0, "s2c": 0})


def _address(stream: trio.abc.Stream, *, local: bool) -> tuple[str, int]:
    layer: Any = stream
    for _ in range(4):  # wrappers reach their transport through .transport_stream
        sock = getattr(layer, "socket", None)
        if sock is not None:
            try:
                host, port = (sock.getsockname() if local else sock.getpeername())[:2]
            except OSError:
                return ("?", 0)
            return (str(host), int(port))
        layer = getattr(layer, "transport_stream", None)
    return ("?", 0)


def peer_address(stream: trio.abc.Stream) -> tuple[str, int]:
    """The remote address under any stack of wrappers (TLS, prefixed, ...)."""
    return _address(stream, local=False)


def local_address(stream: trio.abc.Stream) -> tuple[str, int]:
    """Our side's address: the one the viewer used to reach spicetap."""
    return _address(stream, local=True)


class ChannelProxy:
    """Serves viewer streams: one upstream stream each. Connection numbers are unique across
    every front end sharing this object (reverse, TLS, CONNECT, WebSocket)."""

    def __init__(
        self,
        limits: Limits,
        recorder: Recorder | None,
        state: ProxyState | None = None,
        link_policy: LinkPolicy | None = None,
    ) -> None:
        self.limits = limits
        self.recorder = recorder
        self.state = state or ProxyState()
        self.link_policy = link_policy  # rewrites of the link stage (caps, auth), if any
        self._ids = itertools.count()

    async def handle(
        self,
        viewer: trio.abc.Stream,
        upstream_to: Upstream,
        *,
        viewer_tls: bool = False,
        insertion: str = "reverse",
        client: tuple[str, int] | None = None,
        migration: MigrationListeners | None = None,
    ) -> None:
        """Relay one viewer channel connection to `upstream_to` until either side ends.
        `client` overrides the viewer's address (e.g. the browser behind a WebSocket); with
        `migration`, a live migration's destination is served there so the viewer stays."""
        conn = next(self._ids)
        now = time.monotonic()
        client = client or peer_address(viewer)
        label = upstream_to.label
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                upstream = await upstream_to.open()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.state.errors += 1
            log.warning(
                "channel %d from %s:%d: cannot reach upstream %s: %s",
                conn,
                *client,
                label,
                exc or "timeout",
            )
            await trio.aclose_forcefully(viewer)
            return
        relay = ChannelRelay(
            self.limits, now, self.link_policy, follow_migration=migration is not None
        )
        stats = ChannelStats(conn, client, label, now, relay)
        self.state.channels[conn] = stats
        self.state.total_channels += 1
        if self.recorder is not None:
            tls = {"viewer": viewer_tls, "server": isinstance(upstream, trio.SSLStream)}
            route: dict[str, Any] = {"insertion": insertion, "server": label}
            route["target"] = upstream_to.target
            route["tls"] = tls
            self.recorder.opened(
                conn, now, client, peer_address(upstream), tls, route, local_address(upstream)
            )
        log.info("channel %d: %s:%d -> %s (%s)", conn, *client, label, insertion)
        reason = "closed"
        try:
            async with trio.open_nursery() as nursery:
                ends: dict[str, Any] = {"c2s": upstream, "s2c": viewer}
                done = trio.Event()

                def finish(why: str) -> None:
                    nonlocal reason
                    if not done.is_set():
                        reason = why
                        done.set()
                        nursery.cancel_scope.cancel()

                async def run(commands: list[Command]) -> None:
                    for cmd in commands:
                        if isinstance(cmd, Forward):
                            await ends[cmd.direction].send_all(cmd.data)
                        elif isinstance(cmd, RecordData):
                            rec = self.recorder
                            if rec is not None and not rec.data(
                                conn, cmd.time, cmd.direction, cmd.data
                            ):
                                finish("recording backlog: session dropped by policy")
                        elif isinstance(cmd, RecordEvent):
                            if self.recorder is not None:
                                self.recorder.event(
                                    conn,
                                    cmd.time,
                                    cmd.direction,
                                    cmd.kind,
                                    cmd.name,
                                    cmd.fields,
                                    cmd.raw,
                                )
                        elif isinstance(cmd, Redirect):
                            await run(await self._redirect(relay, cmd, viewer, migration))
                        elif isinstance(cmd, Log):
                            log.warning("channel %d: %s", conn, cmd.message)
                        elif isinstance(cmd, Close):
                            if cmd.error:
                                self.state.errors += 1
                                if self.recorder is not None:
                                    self.recorder.error(conn, time.monotonic(), "c2s", cmd.reason)
                            finish(cmd.reason)

                async def pump(src: trio.abc.Stream, direction: str) -> None:
                    try:
                        while True:
                            data = await src.receive_some(RECEIVE_SIZE)
                            now = time.monotonic()
                            if not data:
                                await run(relay.peer_closed(direction, now))
                                return
                            await run(relay.received(direction, bytes(data), now))
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        await run(relay.peer_closed(direction, time.monotonic()))
                        log.debug("channel %d %s: %r", conn, direction, exc)

                async def ticker() -> None:
                    while True:
                        await trio.sleep(TICK)
                        await run(relay.tick(time.monotonic()))

                nursery.start_soon(pump, viewer, "c2s")
                nursery.start_soon(pump, upstream, "s2c")
                nursery.start_soon(ticker)
        finally:
            stats.closed_reason = reason
            self.state.channels.pop(conn, None)
            for direction in ("c2s", "s2c"):
                self.state.closed_bytes[direction] += relay.bytes[direction]
                self.state.closed_messages[direction] += relay.messages[direction]
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(upstream)
                await trio.aclose_forcefully(viewer)
            if self.recorder is not None:
                self.recorder.closed(conn, time.monotonic(), reason)
            log.info("channel %d closed: %s", conn, reason)


    async def _redirect(
        self,
        relay: ChannelRelay,
        cmd: Redirect,
        viewer: trio.abc.Stream,
        migration: MigrationListeners | None,
    ) -> list[Command]:
        """Serve the migration's destination where this viewer reaches us, then let the
        relay rewrite the message to point there."""
        if migration is None:
            return relay.redirect_failed("not following migrations here", time.monotonic())
        try:
            at = await migration.serve(cmd.destination, local_address(viewer)[0])
        except MigrationUnavailable as exc:
            return relay.redirect_failed(str(exc), time.monotonic())
        return relay.redirected(at.host, at.port, at.tls_port, at.cert_subject, time.monotonic())


async def accept_tls(
    proxy: ChannelProxy, stream: trio.abc.Stream, tls: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream] | None:
    """Terminate a viewer's TLS with spicetap's certificate; None (logged) when it fails."""
    wrapped = trio.SSLStream(stream, tls, server_side=True)
    try:
        with trio.fail_after(proxy.limits.link_timeout):
            await wrapped.do_handshake()
    except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        proxy.state.errors += 1
        log.warning(
            "viewer %s:%d: TLS handshake failed: %s",
            *peer_address(stream),
            exc.__cause__ or exc or "timeout",
        )
        await trio.aclose_forcefully(stream)
        return None
    return wrapped


async def serve_tcp(
    proxy: ChannelProxy,
    upstream: Upstream,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    migration: MigrationListeners | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reverse mode: accept viewers on host:port and relay each to `upstream`; with `tls`,
    terminate TLS first (spicetap's certificate); with `migration`, follow migrations."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        if tls is None:
            await proxy.handle(stream, upstream, migration=migration)
            return
        wrapped = await accept_tls(proxy, stream, tls)
        if wrapped is not None:
            await proxy.handle(wrapped, upstream, viewer_tls=True, migration=migration)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


def tcp_opener(host: str, port: int) -> Opener:
    async def open_upstream() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return open_upstream


class UpstreamTlsError(OSError):
    """The real server's TLS does not check out."""


async def start_tls(
    tcp: trio.abc.Stream, host: str, context: ssl.SSLContext, subject: str | None
) -> trio.SSLStream[trio.abc.Stream]:
    """Re-originate TLS to the real server over `tcp`, checking its CA and, SPICE-style, its
    subject (or its host name, per `context`)."""
    stream = trio.SSLStream(tcp, context, server_hostname=host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        raise UpstreamTlsError(f"TLS handshake failed: {exc.__cause__ or exc}") from None
    except BaseException:  # cancelled (a timeout) mid-handshake: the socket is ours to close
        await trio.aclose_forcefully(tcp)
        raise
    problem = check_subject(stream.getpeercert(), subject)
    if problem is not None:
        await trio.aclose_forcefully(stream)
        raise UpstreamTlsError(problem)
    return stream


def tls_opener(host: str, port: int, context: ssl.SSLContext, subject: str | None) -> Opener:
    async def open_upstream() -> trio.abc.Stream:
        return await start_tls(await trio.open_tcp_stream(host, port), host, context, subject)

    return open_upstream
