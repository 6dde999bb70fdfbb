"""The HTTP CONNECT front (trio shell): remote-viewer --spice-proxy=http://HOST:PORT.

Per proxy connection: read the CONNECT request (proxy.core.connect), ask the router whether
that target may be reached, answer, then sniff the tunnel's first byte. A viewer that speaks
TLS (it CONNECTed to a tls-port) gets spicetap's certificate for the host it named, and the
server side is TLS again; plain SPICE stays plain. Then the channel is relayed like any
other, through the shared ChannelProxy. From a trusted load balancer
(`--proxy-protocol-from`) a PROXY protocol header comes before the request and names the
viewer.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.core.allow import IpNetwork
from proxy.core.connect import ConnectHandshake, ConnectRequest, Refusal, tunnel_kind
from proxy.core.endpoint import endpoint_text
from proxy.core.forwarded import is_trusted
from proxy.core.linkrewrite import LinkPolicy
from proxy.core.migration import Destination
from proxy.io.guard import guarded
from proxy.io.migration import ServedAt
from proxy.io.server import (
    ChannelProxy,
    Rejoin,
    Serving,
    Upstream,
    exception_text,
    in_thread,
    peer_address,
    serve_listening,
)
from proxy.io.streams import PrefixedStream
from proxy.targets import ConnectRouter, Target
from proxy.tls import HostCertificates, TlsSetupError
from spicetap.errors import UserError

log = logging.getLogger("spicetap.connect")

RECEIVE = 16 * 1024


@dataclass
class ConnectFront:
    """What the CONNECT front serves with. The running one stays across reloads (its router
    remembers where moved targets were, its certificates are cached): a reload changes its
    router in place (ConnectRouter.reconfigure), whether migrations are followed, and its
    certificates when their subject or CA changes."""

    router: ConnectRouter
    certificates: HostCertificates
    keylog: Path | None
    follow_migration: bool = True  # read per tunnel
    proxied: tuple[IpNetwork, ...] = ()  # load balancers that send PROXY headers; per tunnel


@dataclass(frozen=True)
class ConnectFollower:
    """Live migration behind the CONNECT front: a viewer set up with a proxy reaches the
    destination through the proxy too, so the message passes unchanged and the destination
    is admitted here for `linger` seconds, allow-list or not; its channels then come back
    through this front as CONNECT tunnels, relayed and recorded like the rest."""

    router: ConnectRouter
    linger: float = 120.0

    async def serve(
        self, dest: Destination, local_host: str, policy: LinkPolicy | None = None
    ) -> ServedAt | None:
        until = time.monotonic() + self.linger
        for port in (dest.port, dest.tls_port):
            if port:
                self.router.admit((dest.host, port), until)
        log.info(
            "migration to %s (port %s, tls-port %s): admitted on the CONNECT front for %g s",
            dest.host, dest.port, dest.tls_port, self.linger,
        )  # fmt: skip
        return None


async def _read_request(
    stream: trio.abc.Stream, handshake: ConnectHandshake
) -> ConnectRequest | Refusal:
    while True:  # bounded by MAX_HEAD (h11 refuses more) and the caller's deadline
        data = await stream.receive_some(RECEIVE)
        if not data:
            return handshake.eof()
        result = handshake.feed(bytes(data))
        if result is not None:
            return result


async def _first_bytes(stream: trio.abc.Stream, already: bytes) -> bytes:
    data = already
    while not data:  # one read is enough: any byte tells TLS from SPICE
        chunk = await stream.receive_some(RECEIVE)
        if not chunk:
            return b""
        data = bytes(chunk)
    return data


def _no_target_yet(stream: trio.SocketStream) -> Upstream:
    """Where a connection refused before its CONNECT request is recorded as headed: this
    front's own address (no target was named); never opened."""
    host, port = stream.socket.getsockname()[:2]

    async def unopened() -> trio.abc.Stream:
        raise OSError("no CONNECT request was read")

    label = f"{endpoint_text((host, port))} (CONNECT front)"
    return Upstream(unopened, label, address=(host, port))


async def handle_connect(
    proxy: ChannelProxy, front: ConnectFront, stream: trio.SocketStream
) -> None:
    viewer = peer_address(stream)
    balancer = None  # a load balancer's, that named `viewer` in a PROXY header
    source: trio.abc.Stream = stream
    if front.proxied and is_trusted(viewer[0], front.proxied):
        named = await proxy.behind_balancer(stream, viewer, _no_target_yet(stream), "connect")
        if named is None:
            return
        source, viewer, balancer = named
    handshake = ConnectHandshake()
    target: Target | None = None
    try:
        with trio.fail_after(proxy.limits.link_timeout):
            request = await _read_request(source, handshake)
            if isinstance(request, ConnectRequest):
                target = front.router.route(request.host, request.port)
                if target is None:
                    where = endpoint_text((request.host, request.port))
                    request = Refusal(403, f"{where} is not allowed")
            if isinstance(request, Refusal):
                status, reason = request.status, request.reason
                shown = endpoint_text(viewer)
                log.warning("viewer %s: CONNECT refused (%d): %s", shown, status, reason)
                proxy.state.errors += 1
                await stream.send_all(handshake.refuse(request))
                await trio.aclose_forcefully(stream)
                return
            await stream.send_all(handshake.accept())
            first = await _first_bytes(source, handshake.tunnel_data)
            if isinstance(source, PrefixedStream):  # the balancer's rest, if unread yet
                first, source.prefix = first + source.prefix, b""
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.warning("viewer %s: CONNECT failed: %s", endpoint_text(viewer), exception_text(exc))
        await trio.aclose_forcefully(stream)
        return
    assert target is not None
    kind = tunnel_kind(first)
    try:
        upstream = target.upstream(kind == "tls", front.keylog)
    except UserError as exc:
        log.warning("viewer %s: %s", endpoint_text(viewer), exc)
        await trio.aclose_forcefully(stream)
        return
    if kind is None:  # nothing is relayed; the archive of unlinked connections says so
        where = endpoint_text((request.host, request.port))
        why = f"tunnel to {where} carries neither TLS nor SPICE (starts {first[:8]!r})"
        log.warning("viewer %s: %s", endpoint_text(viewer), why)
        proxy.refused(viewer, upstream, "connect", f"{why}: closed, nothing relayed", balancer)
        await trio.aclose_forcefully(stream)
        return
    tls = None
    if kind == "tls":
        tls = await _certificate_for(front, request.host)
        if tls is None:
            await trio.aclose_forcefully(stream)
            return
    log.info(
        "viewer %s: CONNECT %s (%s) -> %s",
        endpoint_text(viewer),
        endpoint_text((request.host, request.port)),
        kind,
        upstream.label,
    )
    follower = ConnectFollower(front.router) if front.follow_migration else None
    rejoin = _rejoin_moved(proxy, front, target, kind == "tls")
    await proxy.handle_socket(
        stream, upstream, tls=tls, insertion="connect", migration=follower, prefix=first,
        rejoin=rejoin, named=(viewer, balancer) if balancer else None,
    )  # fmt: skip


def _rejoin_moved(
    proxy: ChannelProxy, front: ConnectFront, target: Target, tls: bool
) -> Rejoin | None:
    """While sessions begun before a reload moved `target` live on, a channel of one of
    them goes to their server (QEMU refuses a session id it did not give), not the new."""
    if target.name is None or target.name not in front.router.retired:
        return None
    ours = [r for r in proxy.live_routes() if r.target == target.name]
    moved = front.router.moved(target, [r.address for r in ours if r.address is not None])
    now = (target.plain, target.tls)

    def rejoin(route: Upstream) -> Upstream | None:
        if route.target != target.name or route.address is None or route.address in now:
            return None
        for before in moved:
            if route.address in (before.plain, before.tls):
                return before.upstream(tls, front.keylog)
        return None

    return rejoin if moved else None


async def _certificate_for(front: ConnectFront, host: str) -> ssl.SSLContext | None:
    """spicetap's certificate for the host the viewer named (issued once, then cached)."""
    started = time.monotonic()
    try:
        ctx = await in_thread(front.certificates.context_for, host)
    except (TlsSetupError, OSError) as exc:
        log.error("cannot issue a certificate for %s: %s", host, exc)
        return None
    log.debug("certificate for %s ready in %.3f s", host, time.monotonic() - started)
    return ctx


async def serve_connect(
    proxy: ChannelProxy,
    front: ConnectFront,
    host: str,
    port: int,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        await handle_connect(proxy, front, stream)

    await serve_listening(listeners, guarded(handle, "CONNECT front", proxy.state), task_status)
