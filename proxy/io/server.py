"""The trio shell of `spicetap proxy`: accept viewer connections, connect upstream, move
bytes. All decisions come from proxy.core (ChannelRelay commands); this module only awaits.

Each viewer connection gets its own upstream connection and one nursery holding a pump per
direction and a ticker; when either side ends, the whole channel is closed (SPICE channels
are not half-closed, and TLS streams cannot be).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from proxy.core.admission import Admission
from proxy.core.allow import IpNetwork
from proxy.core.endpoint import endpoint_text
from proxy.core.forwarded import is_trusted
from proxy.core.framing import C2S, LINK_ASKS, S2C, link_asks
from proxy.core.lockout import Lockout, address_key
from proxy.core.management import channel_name
from proxy.core.migration import Destination, MigrationUnavailable
from proxy.core.proxyproto import ProxyHeader, ProxyHeaderError
from proxy.core.relay import (
    MAIN,
    AuthFailed,
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
    record_of_part,
)
from proxy.core.saslident import SASL_LOGIN
from proxy.io.ends import End, PlainEnd, tls_end, tls_error_text
from proxy.io.guard import guarded
from proxy.io.lockout import refuse_link, refuse_link_blocking
from proxy.io.oserrors import os_reason
from proxy.io.proxyproto import read_proxy_header, receive_proxy_header
from proxy.io.pumps import SINK_GONE_GRACE, ThreadedChannel
from proxy.io.recording import RecordingSink
from proxy.io.streams import PeerProtocolError, PrefixedStream, Sent, send_counted
from proxy.tls import check_subject

if TYPE_CHECKING:
    from proxy.io.migration import ServedAt

log = logging.getLogger("spicetap.proxy")

RECEIVE_SIZE = 256 * 1024
TICK = 0.5
CONNECT_TIMEOUT = 10.0

Opener = Callable[[], Awaitable[trio.abc.Stream]]


class Follower(Protocol):
    """How a front follows live migrations: serve the destination where viewers reach
    spicetap (MigrationListeners), or None: pass the message on unchanged, the viewer
    comes back through this front by itself (the CONNECT front)."""

    async def serve(
        self, dest: Destination, local_host: str, policy: LinkPolicy | None = None
    ) -> ServedAt | None: ...


EndOpener = Callable[[], Awaitable[End]]
T = TypeVar("T")


@dataclass(frozen=True)
class Upstream:
    """Where one viewer connection goes: how to open the server side, and what to call it."""

    open: Opener
    label: str  # host:port, with " (tls)" when re-originated over TLS
    target: str | None = None  # the configured target's name, if any
    # the same server as a blocking end for the threaded pumps (reverse mode), if it can
    open_end: EndOpener | None = None
    policy: LinkPolicy | None = None  # the target's own link-stage rewrites, if any
    address: tuple[str, int] | None = None  # the server's host and port, as configured


@dataclass
class ChannelStats:
    conn: int
    viewer: tuple[str, int]
    upstream: str
    started: float
    relay: ChannelRelay
    closed_reason: str | None = None
    route: Upstream | None = None  # where it was sent (a reload may re-point its listener)
    forwarded_by: tuple[str, int] | None = None  # the proxy or balancer that named the viewer
    # the shell's: ticks the relay now, not at its ticker's next turn
    ender: Callable[[], None] | None = None

    def end(self, why: str) -> None:
        """The operator ends this channel (from the trio thread): at once by `ender` when
        it can, else by its ticker."""
        self.relay.ending = why
        if self.ender is not None:
            self.ender()


@dataclass
class ProxyState:
    """What the management API and metrics read."""

    channels: dict[int, ChannelStats] = field(default_factory=dict)
    total_channels: int = 0
    errors: int = 0
    admission: Admission | None = None  # None: no cap on connections
    # viewer addresses that fail authentication too often (None: not counted)
    lockout: Lockout | None = None
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
        recorder: RecordingSink | None,
        state: ProxyState | None = None,
        link_policy: LinkPolicy | None = None,
    ) -> None:
        self.limits = limits
        self.recorder = recorder
        self.state = state or ProxyState()
        self.link_policy = link_policy  # rewrites of the link stage (caps, auth), if any
        # whether to read whom viewers log in as over SASL ([recording.privacy] sasl_user):
        # for channels from then on
        self.sasl_user = False
        self._ids = itertools.count()

    async def handle(
        self,
        viewer: trio.abc.Stream,
        upstream_to: Upstream,
        *,
        viewer_tls: bool = False,
        insertion: str = "reverse",
        client: tuple[str, int] | None = None,
        migration: Follower | None = None,
        forwarded_by: tuple[str, int] | None = None,
    ) -> None:
        """Relay one viewer channel connection to `upstream_to` until either side ends, in
        trio (the shell for fronts that hand over a stream: CONNECT, WebSocket). `client`
        overrides the viewer's address (e.g. the browser behind a WebSocket, or, told by
        the trusted reverse proxy `forwarded_by`, the browser behind that); with
        `migration`, a live migration's destination is served there so the viewer stays."""
        client = client or peer_address(viewer)
        tls_asked = {"viewer": viewer_tls}
        if self._locked_out(client, upstream_to, insertion, tls_asked, forwarded_by):
            with trio.move_on_after(self.limits.link_timeout):
                await refuse_link(viewer)
            await trio.aclose_forcefully(viewer)
            return
        conn = next(self._ids)
        now = time.monotonic()
        opener = upstream_to.open
        upstream = await self._connect(
            conn, client, upstream_to, opener, insertion, viewer_tls, forwarded_by
        )
        if upstream is None:
            await trio.aclose_forcefully(viewer)
            return
        tls = {"viewer": viewer_tls, "server": isinstance(upstream, trio.SSLStream)}
        ends = (peer_address(upstream), local_address(upstream))
        stats = self._begin(
            conn, now, client, upstream_to, insertion, migration, tls, ends, forwarded_by
        )
        relay = stats.relay
        reason = "closed"
        try:
            async with trio.open_nursery() as nursery:
                sinks: dict[str, Any] = {"c2s": upstream, "s2c": viewer}
                # one send at a time per side: send_counted works below SocketStream's own
                # check, and in a rewritten link stage either pump may answer the viewer
                sending = {C2S: trio.Lock(), S2C: trio.Lock()}
                # the relay's calls in turn; the link stage's commands, the bytes that end it
                # included, run holding it, so what a peer answers them with (e.g. after
                # SASL's result) is recorded after them, as the framer needs
                order = trio.Lock()
                done = trio.Event()

                def finish(why: str) -> None:
                    nonlocal reason
                    if not done.is_set():
                        reason = why
                        done.set()
                        nursery.cancel_scope.cancel()

                async def run(commands: list[Command]) -> None:
                    for i, cmd in enumerate(commands):
                        if isinstance(cmd, Forward):
                            sent = Sent()
                            try:
                                async with sending[cmd.direction]:
                                    await send_counted(sinks[cmd.direction], cmd.data, sent)
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                partly(cmd, sent, commands[i + 1 :])
                                sink_gone(cmd.direction)
                                return
                            except trio.Cancelled:  # the channel ends: what crossed counts
                                partly(cmd, sent, commands[i + 1 :])
                                raise
                        elif isinstance(cmd, Redirect):
                            host = local_address(viewer)[0]
                            at = await self._serve_destination(
                                cmd, host, migration, self._destination_policy(upstream_to, relay)
                            )
                            await run(_redirected(relay, at))
                        else:
                            why = self._effect(stats, cmd)
                            if why is not None:
                                finish(why)

                # Directions whose receiving side a send found gone. That side may have
                # sent bytes just before (read, or still in its stream): the pump reading
                # it relays them, then ends the channel as TCP would (see pumps.py).
                broken: set[str] = set()

                def sink_gone(direction: str) -> None:
                    if not broken:
                        nursery.start_soon(give_up, S2C if direction == C2S else C2S)
                    broken.add(direction)
                    if len(broken) == 2:
                        finish("viewer and server closed")

                async def give_up(gone: str) -> None:
                    await trio.sleep(SINK_GONE_GRACE)
                    await run(relay.peer_closed(gone, time.monotonic()))
                    finish(f"{'viewer' if gone == C2S else 'server'} closed")

                def partly(cmd: Forward, sent: Sent, rest: list[Command]) -> None:
                    part = record_of_part(cmd, sent.bytes, rest)
                    if part is not None and sent.bytes < len(cmd.data):
                        self._effect(stats, part)

                async def pump(src: trio.abc.Stream, direction: str) -> None:
                    try:
                        while direction not in broken:  # else its sink is gone
                            data = await src.receive_some(RECEIVE_SIZE)
                            now = time.monotonic()
                            if not data:
                                await run(relay.peer_closed(direction, now))
                                return
                            async with order:
                                linking = not relay.passing
                                commands = relay.received(direction, bytes(data), now)
                                if linking:
                                    await run(commands)
                                    continue
                            await run(commands)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        now = time.monotonic()
                        if isinstance(exc.__cause__, ssl.SSLError):  # the peer broke TLS
                            text = tls_error_text(exc.__cause__)
                            await run(relay.peer_failed(direction, text, now))
                        else:
                            await run(relay.peer_closed(direction, now))
                        log.debug("channel %d %s: %r", conn, direction, exc)
                    except PeerProtocolError as exc:
                        await run(relay.peer_failed(direction, str(exc), time.monotonic()))

                async def ticker() -> None:
                    while True:
                        await trio.sleep(TICK)
                        await run(relay.tick(time.monotonic()))

                def end() -> None:
                    with contextlib.suppress(RuntimeError):  # closed: it is ending already
                        nursery.start_soon(run, relay.tick(time.monotonic()))

                stats.ender = end
                nursery.start_soon(pump, viewer, "c2s")
                nursery.start_soon(pump, upstream, "s2c")
                nursery.start_soon(ticker)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(upstream)
                await trio.aclose_forcefully(viewer)
            self._end(stats, reason)

    async def handle_socket(
        self,
        stream: trio.SocketStream,
        upstream_to: Upstream,
        *,
        tls: ssl.SSLContext | None = None,
        insertion: str = "reverse",
        migration: Follower | None = None,
        prefix: bytes = b"",
        rejoin: Rejoin | None = None,
        proxied: tuple[IpNetwork, ...] = (),
        named: tuple[tuple[str, int], tuple[str, int]] | None = None,
    ) -> None:
        """A viewer on a TCP socket (TLS terminated here with `tls`), relayed by a blocking
        pump thread per direction (proxy/io/pumps.py) to an upstream that opens a blocking
        end (every Target's does). `prefix`: what a front already read from the viewer.
        `rejoin`: set while sessions begun before a reload moved this front's target live
        on; a channel of one of them goes where its session is. `proxied`: load balancers
        whose connections begin with a PROXY protocol header naming the viewer; `named`:
        (viewer, balancer) when the front read such a header itself (CONNECT's comes before
        its request)."""
        sock = detach(stream)
        plain = PlainEnd(sock, prefix)
        viewer: End = plain
        try:  # until the relay owns it: a stop (cancelled) closes it here
            client, forwarded_by = named or (viewer.peer(), None)
            if proxied and is_trusted(client[0], proxied):
                told = await self._proxy_header(plain, client, upstream_to, insertion, tls)
                if told is None:
                    return
                if told.source is not None:  # else the balancer's own (a health check)
                    forwarded_by, client = client, told.source
            if tls is not None:
                viewer = tls_end(sock, tls, server_side=True, prefix=plain.prefix)
                try:
                    await in_thread(viewer.handshake, self.limits.link_timeout)
                except OSError as exc:
                    self.state.errors += 1
                    why = f"TLS handshake failed: {exception_text(exc)}"
                    shown = endpoint_text(client)
                    fields = {"event": "viewer_refused", "viewer": shown}
                    log.warning("viewer %s: %s", shown, why, extra={"fields": fields})
                    viewer.close()
                    conn = next(self._ids)
                    tls_used = {"viewer": True}
                    self._attempt_failed(
                        conn, client, upstream_to, insertion, C2S, why, tls_used, forwarded_by
                    )
                    return
            tls_asked = {"viewer": viewer.tls}
            if self._locked_out(client, upstream_to, insertion, tls_asked, forwarded_by):
                await in_thread(refuse_link_blocking, viewer, self.limits.link_timeout)
                viewer.close()
                return
            if rejoin is not None:
                asks = await in_thread(peek_link, viewer, self.limits.link_timeout)
                upstream_to = self.session_route(asks, rejoin) or upstream_to
            open_end = upstream_to.open_end
            if open_end is None:  # a caller's mistake, not a peer's
                raise ValueError(f"upstream {upstream_to.label} opens no blocking end")
            conn = next(self._ids)
            now = time.monotonic()
            upstream = await self._connect(
                conn, client, upstream_to, open_end, insertion, tls is not None, forwarded_by
            )
            if upstream is None:
                viewer.close()
                return
        except BaseException:
            viewer.close()
            raise
        tls_used = {"viewer": viewer.tls, "server": upstream.tls}
        ends = (upstream.peer(), upstream.local())
        stats = self._begin(
            conn, now, client, upstream_to, insertion, migration, tls_used, ends, forwarded_by
        )
        relay = stats.relay
        reached_at = viewer.local()[0]

        def redirector(cmd: Redirect) -> list[Command]:
            policy = self._destination_policy(upstream_to, relay)
            at = trio.from_thread.run(self._serve_destination, cmd, reached_at, migration, policy)
            with channel.lock:
                return _redirected(relay, at)

        channel = ThreadedChannel(
            conn, relay, viewer, upstream, partial(self._effect, stats), redirector
        )
        stats.ender = lambda: channel.tick(time.monotonic())
        try:
            async with trio.open_nursery() as nursery:

                async def ticker() -> None:
                    try:
                        while True:
                            await trio.sleep(TICK)
                            channel.tick(time.monotonic())
                    finally:  # cancelled from outside (the proxy stops): wake the pumps
                        channel.finish("proxy stopped")

                nursery.start_soon(ticker)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(in_thread, channel.pump, "c2s")
                    pumps.start_soon(in_thread, channel.pump, "s2c")
                nursery.cancel_scope.cancel()
        finally:
            upstream.close()
            viewer.close()
            self._end(stats, channel.reason or "closed")

    async def _proxy_header(
        self,
        plain: PlainEnd,
        client: tuple[str, int],
        upstream_to: Upstream,
        insertion: str,
        tls: ssl.SSLContext | None,
    ) -> ProxyHeader | None:
        """A load balancer's PROXY header, read from `plain`; None when it sent none (the
        connection is closed: logged, counted, recorded as an attempt of the balancer's)."""
        try:
            return await in_thread(read_proxy_header, plain, self.limits.link_timeout)
        except (ProxyHeaderError, OSError) as exc:
            self.state.errors += 1
            why = f"PROXY protocol: {exception_text(exc)}"
            shown = endpoint_text(client)
            fields = {"event": "viewer_refused", "viewer": shown}
            log.warning("load balancer %s: %s", shown, why, extra={"fields": fields})
            conn, tls_asked = next(self._ids), {"viewer": tls is not None}
            self._attempt_failed(conn, client, upstream_to, insertion, C2S, why, tls_asked)
            plain.close()
            return None

    async def behind_balancer(
        self,
        stream: trio.SocketStream,
        client: tuple[str, int],
        upstream_to: Upstream,
        insertion: str,
    ) -> tuple[trio.abc.Stream, tuple[str, int], tuple[str, int] | None] | None:
        """What the trio fronts (WebSocket, CONNECT) do first with a trusted balancer's
        connection: read its PROXY header. Returns the stream to read on (what came after
        the header first), the viewer, and the balancer when the header named a viewer
        (LOCAL or UNKNOWN: a health check, the balancer's own); None when it sent none
        (closed, logged, counted, recorded as the balancer's attempt before it goes)."""
        try:
            with trio.fail_after(self.limits.link_timeout):
                header, rest = await receive_proxy_header(stream)
        except (ProxyHeaderError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            why = f"PROXY protocol: {exception_text(exc)}"
            shown = endpoint_text(client)
            fields = {"event": "viewer_refused", "viewer": shown}
            log.warning(
                "load balancer %s (%s): %s", shown, insertion, why, extra={"fields": fields}
            )
            self.refused(client, upstream_to, insertion, why)
            await trio.aclose_forcefully(stream)
            return None
        if header.source is None:
            return PrefixedStream(stream, rest), client, None
        return PrefixedStream(stream, rest), header.source, client

    async def _connect(
        self,
        conn: int,
        client: tuple[str, int],
        upstream_to: Upstream,
        opener: Callable[[], Awaitable[T]],
        insertion: str,
        viewer_tls: bool,
        forwarded_by: tuple[str, int] | None = None,
    ) -> T | None:
        """The server side as `opener` opens it, or None when it cannot be reached: logged,
        and recorded as a failed attempt."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await opener()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.state.errors += 1
            why = f"cannot reach upstream {upstream_to.label}: {exception_text(exc)}"
            fields = {
                "event": "upstream_unreachable", "conn": conn,
                "viewer": endpoint_text(client), "upstream": upstream_to.label,
            }  # fmt: skip
            log.warning(
                "channel %d from %s: %s", conn, endpoint_text(client), why, extra={"fields": fields}
            )
            tls = {"viewer": viewer_tls}
            self._attempt_failed(conn, client, upstream_to, insertion, S2C, why, tls, forwarded_by)
            return None

    def _locked_out(
        self,
        client: tuple[str, int],
        upstream_to: Upstream,
        insertion: str,
        tls: dict[str, bool],
        forwarded_by: tuple[str, int] | None = None,
    ) -> bool:
        """Whether the viewer's address is locked out (proxy/core/lockout.py): then the
        caller refuses its link. Logged (throttled: a locked-out viewer may keep trying
        fast), and recorded as an attempt refused on the viewer's side."""
        lockout = self.state.lockout
        if lockout is None:
            return False
        now = time.monotonic()
        left = lockout.locked_for(client[0], now)
        if not left:
            return False
        why = (
            f"address {address_key(client[0])} locked out after repeated failed "
            f"authentications ({math.ceil(left)} s left): link refused"
        )
        count = lockout.refusals_to_log(now)
        if count:
            shown = endpoint_text(client)
            fields = {"event": "viewer_refused", "viewer": shown}
            log.warning(
                "viewer %s: %s (%d connection(s) from locked-out addresses refused)",
                shown, why, count, extra={"fields": fields},
            )  # fmt: skip
        conn = next(self._ids)
        self._attempt_failed(conn, client, upstream_to, insertion, C2S, why, tls, forwarded_by)
        return True

    def _auth_failed(self, stats: ChannelStats, by: str) -> None:
        """A viewer's credentials were refused: counted against its address."""
        lockout = self.state.lockout
        if lockout is None:
            return
        locked = lockout.failed(stats.viewer[0], time.monotonic())
        if locked is None:
            return
        policy = lockout.policy
        fields = {
            "event": "viewer_locked_out", "conn": stats.conn, "address": locked.address,
            "failures": locked.failures, "seconds": locked.seconds, "refused_by": by,
        }  # fmt: skip
        log.warning(
            "viewer address %s locked out for %g s: %d failed authentications within %g s",
            locked.address, locked.seconds, locked.failures, policy.window,
            extra={"fields": fields},
        )  # fmt: skip

    def refused(
        self,
        client: tuple[str, int],
        upstream_to: Upstream,
        insertion: str,
        reason: str,
        forwarded_by: tuple[str, int] | None = None,
    ) -> None:
        """A viewer connection a front turned away before relaying anything (the CONNECT
        front's tunnel that carries neither TLS nor SPICE): counted and recorded as an
        attempt that failed on the viewer's side."""
        self.state.errors += 1
        conn = next(self._ids)
        self._attempt_failed(conn, client, upstream_to, insertion, C2S, reason, None, forwarded_by)

    def _attempt_failed(
        self,
        conn: int,
        client: tuple[str, int],
        upstream_to: Upstream,
        insertion: str,
        side: str,
        reason: str,
        tls: dict[str, bool] | None = None,
        forwarded_by: tuple[str, int] | None = None,
    ) -> None:
        """A viewer connection that ended before it became a channel: its TLS handshake
        failed (side c2s) or its server could not be reached (s2c). Recorded all the same,
        as an open, an error on the side at fault and a close, so that the archives show
        every attempt; having never linked, it goes to the archive of unlinked connections."""
        if self.recorder is None:
            return
        now = time.monotonic()
        server = upstream_to.address or (upstream_to.label, 0)
        route = _route(upstream_to, insertion, forwarded_by)
        self.recorder.opened(conn, now, client, server, tls, route)
        self.recorder.error(conn, now, side, reason)
        self.recorder.closed(conn, now, reason)

    def _begin(
        self,
        conn: int,
        now: float,
        client: tuple[str, int],
        upstream_to: Upstream,
        insertion: str,
        migration: Follower | None,
        tls: dict[str, bool],
        ends: tuple[tuple[str, int], tuple[str, int]],
        forwarded_by: tuple[str, int] | None = None,
    ) -> ChannelStats:
        """A channel is relayed: counted, announced to the recorder, logged."""
        policy = upstream_to.policy or self.link_policy
        gate = self._session_gate if self.state.admission is not None else None
        relay = ChannelRelay(
            self.limits,
            now,
            policy,
            follow_migration=migration is not None,
            session_gate=gate,
            server_tls=bool(tls.get("server")),
            sasl_user=self.sasl_user,
        )
        stats = ChannelStats(
            conn, client, upstream_to.label, now, relay, route=upstream_to,
            forwarded_by=forwarded_by,
        )  # fmt: skip
        self.state.channels[conn] = stats
        self.state.total_channels += 1
        if self.recorder is not None:
            route = {**_route(upstream_to, insertion, forwarded_by), "tls": tls}
            if policy is not None:  # per target, and a reload may change the proxy's
                route.update(policy.describe())
            self.recorder.opened(conn, now, client, ends[0], tls, route, ends[1])
        fields = {
            "event": "channel_open", "conn": conn, "viewer": endpoint_text(client),
            "upstream": upstream_to.label, "target": upstream_to.target, "insertion": insertion,
            "tls_viewer": bool(tls.get("viewer")), "tls_server": bool(tls.get("server")),
        }  # fmt: skip
        if forwarded_by is not None:
            fields["forwarded_by"] = endpoint_text(forwarded_by)
        log.info(
            "channel %d: %s -> %s (%s)", conn, endpoint_text(client), upstream_to.label, insertion,
            extra={"fields": fields},
        )  # fmt: skip
        return stats

    def session_route(self, asks: tuple[int, int] | None, rejoin: Rejoin) -> Upstream | None:
        """Where `rejoin` sends a channel of the session it links to, if any."""
        if asks is None:
            return None
        channel_type, connection_id = asks
        if channel_type == MAIN and not connection_id:
            return None  # a new session: where the listener points now
        for stats in list(self.state.channels.values()):  # one C-level copy: thread-safe
            route = stats.route
            if stats.relay.session == connection_id and route is not None:
                chosen = rejoin(route)
                if chosen is not None:
                    return chosen
        return None

    def live_routes(self) -> list[Upstream]:
        """Where the open channels were sent."""
        channels = list(self.state.channels.values())  # one C-level copy: thread-safe
        return [stats.route for stats in channels if stats.route is not None]

    def in_use(self, upstreams: Sequence[Upstream]) -> list[Upstream]:
        """Those of `upstreams` some open channel was sent to."""
        used = {id(route) for route in self.live_routes()}
        return [upstream for upstream in upstreams if id(upstream) in used]

    def _session_gate(self) -> bool:
        """Whether a new session may begin (any channel's thread): see Admission."""
        admission = self.state.admission
        if admission is None or admission.session_allowed():
            return True
        count = admission.session_refusals_to_log(time.monotonic())
        if count:
            log.warning(
                "%d new session(s) refused: %d connections open, and the last %d under "
                "--max-connections %d are kept for channels of sessions already begun",
                count, admission.open, admission.reserve, admission.limit,
            )  # fmt: skip
        return False

    def _end(self, stats: ChannelStats, reason: str) -> None:
        # what follows an operator's end (the server closing a session's other channels as
        # its main one goes) is that end too
        relay = stats.relay
        reason = relay.ending or reason
        stats.closed_reason = reason
        self.state.channels.pop(stats.conn, None)
        for direction in ("c2s", "s2c"):
            self.state.closed_bytes[direction] += relay.bytes[direction]
            self.state.closed_messages[direction] += relay.messages[direction]
        if self.recorder is not None:
            self.recorder.closed(stats.conn, time.monotonic(), reason)
        guard = relay.guard
        fields = {
            "event": "channel_closed", "conn": stats.conn, "reason": reason,
            "channel": channel_name(guard.channel_type),
            "session": relay.session,
            "seconds": round(time.monotonic() - stats.started, 3),
            "bytes_c2s": relay.bytes["c2s"], "bytes_s2c": relay.bytes["s2c"],
            "messages_c2s": relay.messages["c2s"], "messages_s2c": relay.messages["s2c"],
        }  # fmt: skip
        if relay.user is not None:  # inject: the token's user (POST /api/tokens "user")
            fields["user"] = relay.user
        log.info("channel %d closed: %s", stats.conn, reason, extra={"fields": fields})

    def _effect(self, stats: ChannelStats, cmd: Command) -> str | None:
        """What both shells do the same way: record, log, account for a close. Returns a
        reason to end the channel, or None."""
        conn = stats.conn
        rec = self.recorder
        if isinstance(cmd, RecordData):
            stats.relay.crossed(cmd)
            if rec is not None and not rec.data(conn, cmd.time, cmd.direction, cmd.data):
                return f"{rec.refusal(conn)}: session dropped by policy"
        elif isinstance(cmd, RecordEvent):
            if rec is not None:
                rec.event(conn, cmd.time, cmd.direction, cmd.kind, cmd.name, cmd.fields, cmd.raw)
            if cmd.name == SASL_LOGIN:
                _log_sasl_login(conn, cmd.fields)
        elif isinstance(cmd, AuthFailed):
            self._auth_failed(stats, cmd.by)
        elif isinstance(cmd, Log):
            fields = {"event": "channel_warning", "conn": conn}
            log.warning("channel %d: %s", conn, cmd.message, extra={"fields": fields})
        elif isinstance(cmd, Close):
            if cmd.error:
                self.state.errors += 1
                if rec is not None and not cmd.seen_in_bytes:
                    rec.error(conn, time.monotonic(), cmd.direction, cmd.reason)
            return cmd.reason
        return None

    def _destination_policy(self, upstream_to: Upstream, relay: ChannelRelay) -> LinkPolicy | None:
        """The link policy at a migration's destination: the source's, and under inject,
        room for the migrated session's token to start one session there (the viewer links
        afresh after the move)."""
        policy = upstream_to.policy or self.link_policy
        if policy is None or relay.readmission is None:
            return upstream_to.policy
        # one per session: its SWITCH_HOST after MIGRATE_BEGIN_SEAMLESS finds the same
        # listener (MigrationListeners tells policies apart by identity)
        if relay.destination_policy is None:
            relay.destination_policy = replace(policy, readmit=relay.readmission)
        return relay.destination_policy

    async def _serve_destination(
        self,
        cmd: Redirect,
        reached_at: str,
        migration: Follower | None,
        policy: LinkPolicy | None,
    ) -> ServedAt | str | None:
        """Serve the migration's destination where this viewer reaches us (`reached_at`, our
        local address), with the source target's own `policy` if any, or say why not (or
        None: the front lets the message pass, see Follower)."""
        if migration is None:
            return "not following migrations here"
        try:
            return await migration.serve(cmd.destination, reached_at, policy)
        except MigrationUnavailable as exc:
            return str(exc)


def _log_sasl_login(conn: int, said: dict[str, Any]) -> None:
    """One line per SASL login the relay read (sasl_user): whom, by what, how it went."""
    who = f"as {said['user']}" if "user" in said else "of a user not named in clear"
    text = f"SASL login {who} ({said['sasl_mechanism']}): {said['outcome']}"
    fields = {"event": SASL_LOGIN, "conn": conn, **said}
    level = logging.INFO if said["outcome"] == "accepted" else logging.WARNING
    log.log(level, "channel %d: %s", conn, text, extra={"fields": fields})


def _redirected(relay: ChannelRelay, at: ServedAt | str | None) -> list[Command]:
    """Let the relay rewrite the held migration message to point at `at` (or pass it on
    unchanged: loudly when `at` says why it cannot be served, quietly when None)."""
    if at is None:
        return relay.redirect_unchanged(time.monotonic())
    if isinstance(at, str):
        return relay.redirect_failed(at, time.monotonic())
    return relay.redirected(at.host, at.port, at.tls_port, at.cert_subject, time.monotonic())


def _route(
    upstream_to: Upstream, insertion: str, forwarded_by: tuple[str, int] | None = None
) -> dict[str, Any]:
    """How a viewer connection came in and where it was headed, for the recorder; the
    trusted reverse proxy that told the viewer's address, if one did."""
    route = {"insertion": insertion, "server": upstream_to.label, "target": upstream_to.target}
    if forwarded_by is not None:
        route["forwarded_by"] = endpoint_text(forwarded_by)
    return route


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a worker thread of its own. Not on trio's default limiter (40 threads
    for the whole process): pumps live as long as their channel, so the 21st channel would
    wait for another to end, and a server that stalls its TLS handshakes would hold every
    thread while other servers' viewers waited behind it."""
    return await trio.to_thread.run_sync(fn, *args, limiter=trio.CapacityLimiter(math.inf))


def detach(stream: trio.SocketStream) -> socket.socket:
    """Take the socket out of trio (which then never touches it again) for a pump thread."""
    sock = stream.socket
    return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())


async def accept_tls(
    proxy: ChannelProxy, stream: trio.abc.Stream, tls: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream] | None:
    """Terminate a viewer's TLS with spicetap's certificate; None (logged) when it fails.
    https_compatible: a browser (the WebSocket front's only user) may drop TCP without
    TLS's close_notify, a closed tab; the blocking TLS ends take that as the viewer closing
    too. A cut inside a WebSocket frame still shows, as a message cut short."""
    wrapped = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
    try:
        with trio.fail_after(proxy.limits.link_timeout):
            await wrapped.do_handshake()
    except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        proxy.state.errors += 1
        log.warning(
            "viewer %s: TLS handshake failed: %s",
            endpoint_text(peer_address(stream)),
            exception_text(exc.__cause__ or exc),
        )
        await trio.aclose_forcefully(stream)
        return None
    return wrapped


@dataclass
class Routing:
    """Where a listener's viewers go. A reload re-points it: connections accepted from
    then on go to the new upstream (channels of sessions begun on a `retired` one go
    there); those already relayed stay where they are."""

    upstream: Upstream
    migration: Follower | None = None
    retired: list[Upstream] = field(default_factory=list)
    origins: tuple[str, ...] = ()  # the WebSocket front's: other pages that may connect
    # the WebSocket front's: reverse proxies whose forwarding headers are believed
    trusted: tuple[IpNetwork, ...] = ()
    # load balancers that begin their connections with a PROXY header (reverse, WebSocket)
    proxied: tuple[IpNetwork, ...] = ()
    # TLS terminated here with it (None: plain); a reload swaps in a renewed certificate
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True)
class Serving:
    """A front's listeners, and the scope that accepts on them: cancelling it stops new
    viewers (the listeners close), while channels already relayed run on to their end."""

    listeners: list[trio.SocketListener]
    accepting: trio.CancelScope

    def stop(self) -> None:
        """At once: the port is free when this returns (a reload may listen there again)."""
        self.accepting.cancel()  # delivered now: no accept is waiting on the sockets below
        for listener in self.listeners:
            listener.socket.close()


async def serve_listening(
    listeners: list[trio.SocketListener],
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    task_status: trio.TaskStatus[Serving],
) -> None:
    """Accept on `listeners` until stopped (Serving.stop) or cancelled; handlers live in a
    nursery outside the accepting scope, so stopping does not end them."""
    async with trio.open_nursery() as handlers:
        with trio.CancelScope() as accepting:
            task_status.started(Serving(listeners, accepting))
            # serve_listeners closes each listener as it returns
            await trio.serve_listeners(handler, listeners, handler_nursery=handlers)


async def serve_tcp(
    proxy: ChannelProxy,
    routing: Routing,
    host: str,
    port: int,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reverse mode: accept viewers on host:port and relay each where `routing` points at
    its arrival; with `routing.tls`, terminate TLS first (spicetap's certificate)."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        upstream, migration, tls = routing.upstream, routing.migration, routing.tls
        if routing.retired:  # forgotten once their last channel is gone
            routing.retired = proxy.in_use(routing.retired)
        await proxy.handle_socket(
            stream,
            upstream,
            tls=tls,
            migration=migration,
            rejoin=rejoin_retired(routing.retired),
            proxied=routing.proxied,
        )

    handler = guarded(handle, f"viewer on {endpoint_text((host, port))}", proxy.state)
    await serve_listening(listeners, handler, task_status)


Rejoin = Callable[[Upstream], "Upstream | None"]
"""Given where a channel of the session a new connection links to was sent: where the new
one goes, or None when that session is not one that stays behind."""


def rejoin_retired(retired: Sequence[Upstream]) -> Rejoin | None:
    """A re-pointed listener's: channels of sessions begun on a retired upstream go there."""
    if not retired:
        return None

    def rejoin(route: Upstream) -> Upstream | None:
        return route if any(route is r for r in retired) else None

    return rejoin


def peek_link(end: End, timeout: float) -> tuple[int, int] | None:
    """The channel type and connection id a viewer's link message asks for, read within
    `timeout` seconds (blocking) and given back to `end` to be received again; None when
    the bytes are no link message, or do not come (the relay then says why)."""
    data, end.prefix = end.prefix, b""  # received again below otherwise
    deadline = time.monotonic() + timeout
    try:
        for _ in range(LINK_ASKS):  # each receive brings a byte at least
            left = deadline - time.monotonic()
            if len(data) >= LINK_ASKS or left <= 0:
                break
            end.sock.settimeout(left)
            chunk = end.receive()
            if not chunk:
                break
            data += chunk
    except OSError:  # a timeout, a reset: the relay sees the same end
        pass
    finally:
        end.sock.settimeout(None)
        end.prefix = data
    return link_asks(data)


def exception_text(exc: BaseException) -> str:
    """An exception for a log line: a timeout's own text is empty, and a failed connect's
    says only that all attempts failed (the OS's reason is inside)."""
    if isinstance(exc, OSError) and hasattr(exc.__cause__, "exceptions"):
        return f"{exc} ({os_reason(exc)})"
    return str(exc) or (
        "timed out" if isinstance(exc, trio.TooSlowError | TimeoutError) else repr(exc)
    )


def tcp_opener(host: str, port: int) -> Opener:
    async def open_upstream() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return open_upstream


def tcp_end_opener(host: str, port: int) -> EndOpener:
    async def open_upstream() -> End:
        return PlainEnd(detach(await trio.open_tcp_stream(host, port)))

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


def tls_end_opener(host: str, port: int, context: ssl.SSLContext, subject: str | None) -> EndOpener:
    """As tls_opener, for the threaded pumps: the handshake runs in a worker thread."""

    async def open_upstream() -> End:
        sock = detach(await trio.open_tcp_stream(host, port))
        end = tls_end(sock, context, server_side=False, server_hostname=host)
        try:
            await in_thread(end.handshake, CONNECT_TIMEOUT)
            problem = check_subject(end.getpeercert(), subject)
        except ssl.SSLError as exc:
            end.close()
            raise UpstreamTlsError(f"TLS handshake failed: {exc}") from None
        except BaseException:
            end.close()
            raise
        if problem is not None:
            end.close()
            raise UpstreamTlsError(problem)
        return end

    return open_upstream
