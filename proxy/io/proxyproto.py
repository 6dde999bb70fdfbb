"""Reading the PROXY protocol header a trusted load balancer sends before the viewer's
bytes (proxy/core/proxyproto.py decides; this only reads): blocking, in a pump's thread,
for the reverse listeners, and in trio for the WebSocket front."""

from __future__ import annotations

import time

import trio

from proxy.core.proxyproto import MAX_HEADER, ProxyHeader, ProxyHeaderError, ProxyHeaderReader
from proxy.io.ends import PlainEnd

_ENDED = "the connection ended before its PROXY header was whole"


def read_proxy_header(end: PlainEnd, timeout: float) -> ProxyHeader:
    """The header at the start of `end`, read within `timeout` seconds; what came after it
    is given back to `end` to be received again (a TLS ClientHello, a link message).
    ProxyHeaderError when there is none; TimeoutError or OSError when the bytes do not
    come."""
    reader = ProxyHeaderReader()
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_HEADER + 2):  # each receive brings a byte at least
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole PROXY protocol header in time")
            end.sock.settimeout(left)
            chunk = end.receive()
            if not chunk:
                raise ProxyHeaderError(_ENDED)
            header = reader.feed(chunk)
            if header is not None:
                end.prefix = reader.rest
                return header
    finally:
        end.sock.settimeout(None)
    raise ProxyHeaderError("PROXY protocol header too long")  # unreachable: feed bounds it


async def receive_proxy_header(stream: trio.abc.Stream) -> tuple[ProxyHeader, bytes]:
    """The header at the start of `stream`, and the bytes that followed it; the caller
    bounds the time. ProxyHeaderError when there is none."""
    reader = ProxyHeaderReader()
    for _ in range(MAX_HEADER + 2):  # each receive brings a byte at least
        chunk = await stream.receive_some()
        if not chunk:
            raise ProxyHeaderError(_ENDED)
        header = reader.feed(bytes(chunk))
        if header is not None:
            return header, reader.rest
    raise ProxyHeaderError("PROXY protocol header too long")  # unreachable: feed bounds it
