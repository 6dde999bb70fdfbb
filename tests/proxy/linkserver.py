"""A SPICE server's first step, for the fronts' tests on loopback: it reads one link
message, answers it with a link reply, and holds the connection a while."""

from __future__ import annotations

from functools import partial

import trio

from proxy.io.server import Upstream, tcp_end_opener, tcp_opener


class LinkServer:
    def __init__(self, link: bytes, reply: bytes) -> None:
        self.link_size = len(link)
        self.reply = reply
        self.got = bytearray()  # what it read, of every connection
        self.linked = trio.Event()  # a whole link message came

    async def handle(self, stream: trio.SocketStream) -> None:
        while len(self.got) < self.link_size:
            data = await stream.receive_some()
            if not data:
                return
            self.got.extend(data)
        self.linked.set()
        await stream.send_all(self.reply)
        await trio.sleep(5)

    async def start(self, nursery: trio.Nursery) -> Upstream:
        """Listening on 127.0.0.1 in `nursery`: the upstream that reaches it, for either
        shell."""
        (listener,) = await nursery.start(partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        opener, end = tcp_opener("127.0.0.1", port), tcp_end_opener("127.0.0.1", port)
        return Upstream(opener, f"127.0.0.1:{port}", "vm1", end, None, ("127.0.0.1", port))
