"""The WebSocket front: spice-html5 in a browser reaches the SPICE server through spicetap,
no websockify needed.

Each connection to the WebSocket port asks for one thing: a file of spice-html5 (a plain
GET, answered from static.py, then closed) or a WebSocket upgrade that carries one SPICE
channel connection. An upgraded socket becomes a `WebSocketStream`, a trio Stream of the
binary payload, and goes to the same ChannelProxy as reverse-mode viewers with
insertion="websocket": relaying, recording, sessions and limits do not know the difference.
All protocol decisions come from proxy.core.http and proxy.core.websocket.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import trio

from proxy.core.allow import IpNetwork
from proxy.core.endpoint import endpoint_text
from proxy.core.forwarded import Forwarding, forwarding, is_trusted
from proxy.core.framing import LINK_ASKS, link_asks
from proxy.core.http import MAX_HEAD, HeadReader, HttpError, Request, error_response
from proxy.core.relay import Limits
from proxy.core.websocket import (
    ABNORMAL,
    NORMAL,
    VERSION,
    Closed,
    Payload,
    Reply,
    WebSocketConnection,
    accept,
    is_upgrade,
)
from proxy.io.guard import guarded
from proxy.io.server import (
    ChannelProxy,
    Routing,
    Serving,
    Upstream,
    accept_tls,
    rejoin_retired,
    serve_listening,
)
from proxy.io.static import SPICE_HTML5_DIR, static_response
from proxy.io.streams import PeerProtocolError, PrefixedStream

log = logging.getLogger("spicetap.proxy")

RECEIVE = 64 * 1024  # per socket read: bounds what one read can unmask and hold
CLOSE_TIMEOUT = 0.5  # to write our close frame / let a client read its last response
LINGER_READS = 16
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class WebSocketStream(trio.abc.Stream):
    """An accepted WebSocket as a byte stream: send_all sends one binary message,
    receive_some returns payload bytes, b"" once the browser closed (or broke the
    protocol: then it was sent a close frame saying why, that is logged, and receive_some
    raises PeerProtocolError once the payload before it was returned). `told`: whom the
    browser is, as the request said (through trusted reverse proxies)."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        connection: WebSocketConnection,
        early: bytes = b"",
        peer: str = "?",
        told: Forwarding | None = None,
    ) -> None:
        self.transport = transport
        self.connection = connection
        self.peer = peer
        self.told = told
        self._early = early  # frame bytes that arrived with the request head
        self._incoming = bytearray()  # payload not yet returned: at most one read's worth
        self._eof = False
        self._closed = False
        self._write_lock = trio.Lock()  # pongs go out from the receiving task
        self._writes_clean = True  # no frame was cut off by a cancelled write
        self._failure: str | None = None  # the browser broke the protocol: said after its data

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            self._writes_clean = False
            await self.transport.send_all(data)
            self._writes_clean = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("WebSocket closed")
        if not data:
            return
        frame = self.connection.send(bytes(data))
        if not frame:
            raise trio.BrokenResourceError("WebSocket is closing")
        await self._write(frame)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("WebSocket closed")
        # Ends: every pass consumes at least one byte, and the core fails the connection
        # after a bounded run of frames without data (MAX_EMPTY_RUN), each <= 139 bytes.
        while not self._incoming and not self._eof:
            data = self._early or await self.transport.receive_some(RECEIVE)
            self._early = b""
            for event in self.connection.receive_data(bytes(data)):
                if isinstance(event, Payload):
                    self._incoming += event.data
                elif isinstance(event, Reply):
                    await self._write(event.data)
                elif isinstance(event, Closed):
                    self._eof = True
                    if event.error:
                        why, code = event.reason, event.code
                        log.warning("websocket from %s: %s (%d)", self.peer, why, code)
                        if code != ABNORMAL:  # ABNORMAL: the TCP connection just ended
                            self._failure = f"WebSocket: {why} ({code})"
        if self._failure is not None and not self._incoming:  # after the payload before it
            raise PeerProtocolError(self._failure)
        n = len(self._incoming) if max_bytes is None else min(max_bytes, len(self._incoming))
        out = bytes(self._incoming[:n])
        del self._incoming[:n]
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        frame = self.connection.close(NORMAL)
        try:
            if frame and self._writes_clean:
                # called from aclose_forcefully too: still tell the browser, briefly
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await self._write(frame)
        except (*_GONE, trio.BusyResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self.transport)


def _address(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return ("?", 0)
    return (str(host), int(port))


async def _finish(transport: trio.abc.Stream, data: bytes) -> None:
    """Send a last response and close without losing it: half-close, then let the
    client read and hang up (a close with unread input would reset the connection).
    The caller bounds the sending; the lingering is bounded here."""
    try:
        await transport.send_all(data)
        with trio.move_on_after(CLOSE_TIMEOUT):
            if isinstance(transport, trio.abc.HalfCloseableStream):
                await transport.send_eof()
                for _ in range(LINGER_READS):
                    if not await transport.receive_some(RECEIVE):
                        break
    except _GONE:
        pass
    finally:
        await trio.aclose_forcefully(transport)


async def _read_request(transport: trio.abc.Stream) -> tuple[Request | HttpError | None, bytes]:
    """The request head and the bytes after it; None if the client hung up before sending
    anything (a browser's speculative connection). The caller bounds the time."""
    reader = HeadReader()
    # every read adds at least one byte, and the reader stops past MAX_HEAD
    for count in range(1, MAX_HEAD + 3):
        data = bytes(await transport.receive_some(RECEIVE))
        if not data and count == 1:
            return None, b""
        result = reader.feed(data)
        if result is not None:
            return result, reader.rest
    return HttpError(431, "request head too long"), b""


def _shown(told: Forwarding) -> str:
    """A browser's address for a log line, with the reverse proxy that told it."""
    client = endpoint_text(told.client)
    if told.proxy is None:
        return client
    return f"{client} (via {endpoint_text(told.proxy)})"


async def open_websocket(
    transport: trio.abc.Stream,
    limits: Limits,
    web_root: Path,
    client: tuple[str, int],
    tls: bool = False,
    origins: tuple[str, ...] = (),
    trusted: tuple[IpNetwork, ...] = (),
) -> WebSocketStream | None:
    """Answer one request on a new connection from `client`: a WebSocket (returned,
    upgraded) or a file or an error page (sent; the connection is closed and None
    returned). `trusted`: reverse proxies whose forwarding headers say whom they relay."""
    peer = endpoint_text(client)
    request: Request | HttpError | None = None
    rest = b""
    with trio.move_on_after(limits.link_timeout), contextlib.suppress(*_GONE):
        request, rest = await _read_request(transport)
    if request is None:
        await trio.aclose_forcefully(transport)
        return None
    if isinstance(request, HttpError):
        log.warning("websocket port, %s: %s", peer, request.reason)
        with trio.move_on_after(limits.link_timeout):
            await _finish(transport, error_response(request))
        return None
    told = forwarding(request.headers, client, trusted)
    peer = _shown(told)
    if not is_upgrade(request):
        page = await static_response(web_root, request)
        log.debug("websocket port, %s: %s %s", peer, request.method, request.target)
        with trio.move_on_after(limits.link_timeout):
            await _finish(transport, page)
        return None
    accepted = accept(request, tls, origins, told)
    if isinstance(accepted, HttpError):
        log.warning("websocket from %s refused: %s", peer, accepted.reason)
        extra = [("Sec-WebSocket-Version", VERSION)] if accepted.status == 426 else []
        with trio.move_on_after(limits.link_timeout):
            await _finish(transport, error_response(accepted, extra))
        return None
    reply, _subprotocol = accepted
    try:
        with trio.fail_after(limits.link_timeout):
            await transport.send_all(reply)
    except (*_GONE, trio.TooSlowError):
        await trio.aclose_forcefully(transport)
        return None
    connection = WebSocketConnection(limits.max_message)
    return WebSocketStream(transport, connection, rest, peer, told)


async def _rejoin(
    proxy: ChannelProxy, retired: list[Upstream], ws: WebSocketStream, upstream: Upstream
) -> tuple[Upstream, trio.abc.Stream]:
    """While sessions begun before a reload moved the upstream live on, a channel of one of
    them goes to their server (QEMU refuses a session id it did not give): its link
    message's first bytes are read to tell, then given back."""
    rejoin = rejoin_retired(retired)
    if rejoin is None:
        return upstream, ws
    seen = b""
    with trio.move_on_after(proxy.limits.link_timeout):
        try:
            while len(seen) < LINK_ASKS:  # each receive brings a byte at least
                chunk = await ws.receive_some(LINK_ASKS - len(seen))
                if not chunk:
                    break
                seen += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, PeerProtocolError):
            pass  # the relay meets it again, and says so
    chosen = proxy.session_route(link_asks(seen), rejoin)
    return chosen or upstream, PrefixedStream(ws, seen)


async def serve_websocket(
    proxy: ChannelProxy,
    routing: Routing,
    host: str,
    port: int,
    web_root: Path = SPICE_HTML5_DIR,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept browsers on host:port (wss:// with `routing.tls`): spice-html5's files and one
    WebSocket per SPICE channel, each relayed where `routing` points through `proxy`. Pages from
    `routing.origins` may open WebSockets too, besides spicetap's own."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        client = _address(stream)
        transport: trio.abc.Stream = stream
        balancer = None  # a load balancer's, that named `client` in a PROXY header
        if routing.proxied and is_trusted(client[0], routing.proxied):
            named = await proxy.behind_balancer(stream, client, routing.upstream, "websocket")
            if named is None:
                return
            transport, client, balancer = named
        tls = routing.tls  # as it is at its arrival (a reload may renew the certificate)
        if tls is not None:  # over what came after a balancer's header, if one sent it
            wrapped = await accept_tls(proxy, transport, tls)
            if wrapped is None:
                return
            transport = wrapped
        # as they are at its arrival
        secure, origins, trusted = tls is not None, routing.origins, routing.trusted
        ws = await open_websocket(
            transport, proxy.limits, web_root, client, secure, origins, trusted
        )
        if ws is None:
            return
        told = ws.told or Forwarding(client)
        upstream = routing.upstream  # where it points once the viewer got this far
        viewer: trio.abc.Stream = ws
        if routing.retired:  # forgotten once their last channel is gone
            routing.retired = proxy.in_use(routing.retired)
            upstream, viewer = await _rejoin(proxy, routing.retired, ws, upstream)
        await proxy.handle(
            viewer,
            upstream,
            viewer_tls=tls is not None,
            insertion="websocket",
            client=told.client,
            forwarded_by=told.proxy or balancer,
        )

    handler = guarded(handle, "WebSocket front", proxy.state)
    await serve_listening(listeners, handler, task_status)
