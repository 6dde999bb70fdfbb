"""Reading the PROXY protocol header a trusted load balancer sends before the viewer's
bytes (proxy/core/proxyproto.py decides; this only reads, blocking, in a pump's thread)."""

from __future__ import annotations

import time

from proxy.core.proxyproto import V2_FIXED, ProxyHeader, ProxyHeaderError, parse_proxy_header
from proxy.io.ends import PlainEnd

MAX_HEADER = V2_FIXED + 0xFFFF  # version 2's length field bounds it


def read_proxy_header(end: PlainEnd, timeout: float) -> ProxyHeader:
    """The header at the start of `end`, read within `timeout` seconds; what came after it
    is given back to `end` to be received again (a TLS ClientHello, a link message).
    ProxyHeaderError when there is none; TimeoutError or OSError when the bytes do not
    come."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_HEADER + 1):  # each receive brings a byte at least
            header = parse_proxy_header(data)
            if header is not None:
                end.prefix = data[header.length :]
                return header
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole PROXY protocol header in time")
            end.sock.settimeout(left)
            chunk = end.receive()
            if not chunk:
                raise ProxyHeaderError("the connection ended before its PROXY header was whole")
            data += chunk
    finally:
        end.sock.settimeout(None)
    raise ProxyHeaderError("PROXY protocol header too long")
