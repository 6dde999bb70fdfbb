"""The trio shell of `spicetap probe` and POST /api/spice/connect: connect (TCP or TLS),
then move bytes between the socket and proxy.core.probe.LinkProbe, all under one deadline.
By default two connections (main channel up to its link reply, then the ticket check on an
inputs channel: see proxy/core/probe.py for why). Every trio and OS error becomes a
ProbeOutcome here, in one place."""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass

import trio

from proxy.core.probe import (
    CONNECTION_REFUSED,
    INPUTS,
    TIMEOUT,
    TLS_FAILED,
    LinkProbe,
    ProbeOutcome,
    combine,
    failure,
)
from proxy.io.oserrors import os_reason
from proxy.tls import check_subject

RECEIVE_SIZE = 4096  # a link reply is a few hundred bytes


@dataclass(frozen=True)
class ProbeTarget:
    host: str
    port: int
    password: str | None = None
    tls: ssl.SSLContext | None = None  # None: plain TCP
    host_subject: str | None = None  # with tls: the subject the certificate must have
    timeout: float = 5.0  # seconds for everything: connect, TLS, link
    # authenticate on the main channel itself, as a viewer does: spice-server then
    # disconnects whichever viewer is connected now
    full_link: bool = False


class _Failed(Exception):
    def __init__(self, outcome: ProbeOutcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


async def probe(target: ProbeTarget) -> ProbeOutcome:
    """What the target is and whether it takes the password; raises ValueError only for
    an unusable password (before any I/O)."""
    if target.full_link:
        main = LinkProbe(target.password)
        check = None
    else:
        main = LinkProbe(target.password, authenticate=False)
        check = LinkProbe(target.password, channel_type=INPUTS)
    try:
        with trio.fail_after(target.timeout):
            outcome = await _exchange(target, main)
            if check is None or not outcome.success:
                return outcome
            return combine(outcome, await _exchange(target, check))
    except trio.TooSlowError:
        return failure(TIMEOUT, f"no complete answer within {target.timeout:g} s")
    except _Failed as exc:
        return exc.outcome


async def _exchange(target: ProbeTarget, core: LinkProbe) -> ProbeOutcome:
    """One connection's link stage."""
    stream = await _open(target)
    try:
        await _link(stream, core)
    finally:
        await trio.aclose_forcefully(stream)
    assert core.outcome is not None  # _link returns only when the core is done
    return core.outcome


async def _open(target: ProbeTarget) -> trio.abc.Stream:
    try:
        tcp = await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:  # refused, unreachable, unknown name: the OS says which
        raise _Failed(failure(CONNECTION_REFUSED, os_reason(exc))) from None
    except UnicodeError:  # a name IDNA cannot encode (an empty or 64-letter label)
        raise _Failed(failure(CONNECTION_REFUSED, "not a valid host name")) from None
    if target.tls is None:
        return tcp
    stream = trio.SSLStream(tcp, target.tls, server_hostname=target.host)
    problem: str | None = None
    try:
        await stream.do_handshake()
        problem = check_subject(stream.getpeercert(), target.host_subject)
    except trio.BrokenResourceError as exc:  # the cause is the ssl.SSLError, or EOF
        problem = str(exc.__cause__ or "the server closed during the handshake")
    except BaseException:  # cancelled (the deadline): do not leak the socket
        await trio.aclose_forcefully(tcp)
        raise
    if problem is not None:
        await trio.aclose_forcefully(tcp)
        raise _Failed(failure(TLS_FAILED, problem))
    return stream


async def _link(stream: trio.abc.Stream, core: LinkProbe) -> None:
    # A peer that resets the connection ends the stream like an EOF: the core then says
    # what was missing. Each read returns at least one byte or ends the loop, and the
    # caller's deadline bounds the whole exchange.
    await _send(stream, core.initial_bytes())
    while not core.done:
        try:
            data = bytes(await stream.receive_some(RECEIVE_SIZE))
        except trio.BrokenResourceError:
            data = b""
        answer = core.receive_data(data)
        if answer:
            await _send(stream, answer)


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    # the server hung up: what it said before that is still to be read
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(data)
