"""One connection's bug must not end the others: the last line of defence of every listener.

Handlers catch what peers can cause (closed sockets, timeouts, bad input) themselves. An
exception that still escapes one would, through trio's handler nursery, end the listener and
with it the whole proxy. Here it ends that connection only: logged with its traceback (it is
a bug to fix), counted, and the socket closed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

log = logging.getLogger("spicetap.proxy")


class _Counts(Protocol):
    errors: int


def guarded(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    what: str,
    counts: _Counts | None = None,
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception:  # not trio.Cancelled (a BaseException): shutdown still works
            log.exception("%s: unexpected error; this connection is closed, others go on", what)
            if counts is not None:
                counts.errors += 1
            await trio.aclose_forcefully(stream)

    return run
