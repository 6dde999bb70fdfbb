"""What every listener's handler goes through first: admission, then the last line of
defence.

Admission (proxy/core/admission.py): past --max-connections a new connection is closed at
once, before any upstream is opened. Defence: handlers catch what peers can cause (closed
sockets, timeouts, bad input) themselves. An exception that still escapes one would,
through trio's handler nursery, end the listener and with it the whole proxy. Here it ends
that connection only: logged with its traceback (it is a bug to fix), counted, and the
socket closed.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from proxy.core.admission import Admission, connection_budget, files_needed

log = logging.getLogger("spicetap.proxy")


class _State(Protocol):
    errors: int
    admission: Admission | None


def guarded(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    what: str,
    state: _State | None = None,
    limit_name: str = "--max-connections",
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    admission = state.admission if state is not None else None

    async def run(stream: trio.SocketStream) -> None:
        if admission is not None and not admission.admit():
            count = admission.refusals_to_log(trio.current_time())
            if count:
                log.warning(
                    "%s: %d new connection(s) closed at once: %d open, the limit (%s)",
                    what, count, admission.open, limit_name,
                )  # fmt: skip
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler(stream)
        except Exception:  # not trio.Cancelled (a BaseException): shutdown still works
            log.exception("%s: unexpected error; this connection is closed, others go on", what)
            if state is not None:
                state.errors += 1
            await trio.aclose_forcefully(stream)
        finally:
            if admission is not None:
                admission.release()

    return run


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (Debian's default soft limit, 1024,
    serves some 450 channel connections: about 40 sessions); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # a sandbox may refuse: keep soft
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limit(max_connections: int | None, files: int, *, warn: bool = True) -> int:
    """The cap on connections: `max_connections` (--max-connections, [proxy]
    max_connections), or by default what `files` open files (raise_open_files_limit)
    serve. A cap they cannot serve is said in a warning, if `warn`."""
    budget = connection_budget(files)
    if max_connections is None:
        return budget
    if warn and max_connections > budget:
        log.warning(
            "max_connections %d needs about %d open files; the limit is %d: past %d "
            "connections, new ones may fail", max_connections, files_needed(max_connections),
            files, budget,
        )  # fmt: skip
    return max_connections
