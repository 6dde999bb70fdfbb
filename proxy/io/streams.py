"""Small trio stream adapters the front ends need."""

from __future__ import annotations

from dataclasses import dataclass

import trio


class PeerProtocolError(Exception):
    """A stream's peer broke the framing the stream itself speaks (WebSocket frames): the
    channel ends with this as its error, recorded, instead of looking like a close."""


class PrefixedStream(trio.abc.Stream):
    """A stream whose first bytes were already read (to sniff TLS from plain SPICE, or
    because they followed an HTTP request): receive_some returns them first."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix
        # reach the socket the way proxy.io.server.peer_address looks for it
        self.transport_stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Sent:
    """How many bytes of a send crossed so far (see send_counted)."""

    bytes: int = 0


async def send_counted(stream: trio.abc.Stream, data: bytes, sent: Sent) -> None:
    """send_all, keeping in `sent` how many bytes a plain socket has taken, so that a send
    cut short (the connection breaks, or the channel is cancelled) still says what crossed.
    Other streams count only a whole send: a TLS record or a WebSocket message cut part-way
    reaches no application."""
    while isinstance(stream, PrefixedStream):
        stream = stream.stream
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(data)
        sent.bytes = len(data)
        return
    view = memoryview(data)
    try:
        while sent.bytes < len(view):
            sent.bytes += await stream.socket.send(view[sent.bytes :])
    except OSError as exc:  # as SocketStream.send_all says it
        raise trio.BrokenResourceError(exc) from exc
