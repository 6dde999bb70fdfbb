"""A listener's handler that raises ends that connection only."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import pytest
import trio

from proxy.io.guard import guarded


@dataclass
class Counts:
    errors: int = 0


def test_an_escaping_exception_closes_that_connection_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = Counts()
    a, b = socket.socketpair()

    async def handler(stream: trio.SocketStream) -> None:
        raise RuntimeError("a bug")

    async def main() -> bytes:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        await guarded(handler, "test front", counts)(stream)  # does not raise
        return b.recv(10)  # the handler's socket was closed: end of file

    with caplog.at_level(logging.ERROR, logger="spicetap.proxy"):
        assert trio.run(main) == b""
    b.close()
    assert counts.errors == 1
    assert "test front: unexpected error; this connection is closed, others go on" in caplog.text
    assert "RuntimeError: a bug" in caplog.text


def test_cancellation_still_passes_through() -> None:
    a, b = socket.socketpair()

    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def main() -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        with trio.move_on_after(0.05) as scope:
            await guarded(handler, "test front")(stream)
        assert scope.cancelled_caught
        await stream.aclose()

    trio.run(main)
    b.close()


def test_a_timeout_is_named_in_log_lines() -> None:
    """A timeout's own text is empty: "CONNECT failed: " said nothing."""
    from proxy.io.server import exception_text

    assert exception_text(trio.TooSlowError()) == "timed out"
    assert exception_text(TimeoutError()) == "timed out"
    assert exception_text(ConnectionRefusedError(111, "Connection refused")).endswith("refused")
    assert exception_text(trio.BrokenResourceError()) == "BrokenResourceError()"
