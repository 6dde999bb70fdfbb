"""Turn away a locked-out viewer the way spice-server refuses a link.

The viewer's link message is read first (bounded in size and time), then answered with a
link reply whose error is PERMISSION_DENIED: closing with its message unread would make
the kernel reset the connection, and the viewer might see the reset before our answer.
Nothing reaches a server.
"""

from __future__ import annotations

import time

import trio

from proxy.core.lockout import LINK_REFUSAL, MAX_LINK_MESSAGE, link_message_size
from proxy.io.ends import End
from proxy.io.streams import PeerProtocolError


def refuse_link_blocking(end: End, timeout: float) -> None:
    """On a blocking end (a pump thread's worker): read the link message, answer it."""
    data, end.prefix = end.prefix, b""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_LINK_MESSAGE):  # each receive brings a byte at least
            need = link_message_size(data)
            left = deadline - time.monotonic()
            if (need is not None and len(data) >= need) or left <= 0:
                break
            end.sock.settimeout(left)
            chunk = end.receive()
            if not chunk:
                return  # the viewer left: nobody to answer
            data += chunk
        end.sock.settimeout(timeout)
        end.send(LINK_REFUSAL)
    except OSError:  # a timeout, a reset: the viewer is closed all the same
        pass


async def refuse_link(stream: trio.abc.Stream) -> None:
    """On a trio stream (the WebSocket front's): read the link message, answer it. The
    caller bounds the time."""
    data = b""
    try:
        for _ in range(MAX_LINK_MESSAGE):  # each receive brings a byte at least
            need = link_message_size(data)
            if need is not None and len(data) >= need:
                break
            chunk = await stream.receive_some(MAX_LINK_MESSAGE)
            if not chunk:
                return
            data += chunk
        await stream.send_all(LINK_REFUSAL)
    except (trio.BrokenResourceError, trio.ClosedResourceError, PeerProtocolError, OSError):
        pass


__all__ = ["refuse_link", "refuse_link_blocking"]
