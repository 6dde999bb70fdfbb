"""A listener's handler that raises ends that connection only; past the cap on
connections a new one is closed at once."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import pytest
import trio

from proxy.core.admission import RESERVED_FILES, Admission, connection_budget, files_needed
from proxy.io.guard import guarded, raise_open_files_limit


@dataclass
class Counts:
    errors: int = 0
    admission: Admission | None = None


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


def test_admission_counts_refuses_and_logs_at_most_every_ten_seconds() -> None:
    adm = Admission(2)
    assert adm.admit() and adm.admit()
    assert not adm.admit() and not adm.admit()
    assert (adm.open, adm.refused) == (2, 2)
    assert adm.refusals_to_log(100.0) == 2  # the first line at once
    assert not adm.admit()
    assert adm.refusals_to_log(105.0) == 0  # not yet
    assert adm.refusals_to_log(110.0) == 1
    assert adm.refusals_to_log(130.0) == 0  # nothing new to say
    adm.release()
    assert adm.admit() and adm.open == 2 and adm.refused == 3


def test_the_budget_leaves_descriptors_for_the_proxy_itself() -> None:
    assert connection_budget(1024) == (1024 - RESERVED_FILES) // 2 == 448
    assert connection_budget(10) == 1  # never none
    assert files_needed(448) == 1024


def test_past_the_cap_a_connection_is_closed_before_its_handler_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = Counts(admission=Admission(1))
    handled: list[int] = []
    pairs = [socket.socketpair() for _ in range(3)]

    async def handler(stream: trio.SocketStream) -> None:
        handled.append(1)
        await trio.sleep(0.2)  # still open when the others come
        await stream.aclose()

    async def main() -> list[bytes]:
        serve = guarded(handler, "test front", state)
        async with trio.open_nursery() as nursery:
            for a, _b in pairs:
                nursery.start_soon(serve, trio.SocketStream(trio.socket.from_stdlib_socket(a)))
                await trio.sleep(0.01)
            assert state.admission is not None and state.admission.open == 1
        return [b.recv(10) for _a, b in pairs]

    with caplog.at_level(logging.WARNING, logger="spicetap.proxy"):
        assert trio.run(main) == [b"", b"", b""]  # all closed: two at once, one when done
    for _a, b in pairs:
        b.close()
    assert handled == [1]
    assert state.admission is not None
    assert (state.admission.open, state.admission.refused) == (0, 2)
    assert "test front: 1 new connection(s) closed at once: 1 open" in caplog.text


def test_the_open_files_limit_is_raised_to_the_hard_one() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lower = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
        got = raise_open_files_limit()
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got >= lower
        if hard != resource.RLIM_INFINITY:
            assert got == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("limit", "reserve"), [(1, 0), (2, 1), (11, 1), (16, 2), (100, 12), (1000, 125)]
)
def test_the_last_eighth_of_the_cap_is_kept_for_sessions_already_begun(
    limit: int, reserve: int
) -> None:
    adm = Admission(limit)
    assert adm.reserve == reserve
    for _ in range(limit - reserve):  # new sessions come in up to the reserve, own included
        assert adm.admit() and adm.session_allowed()
    for _ in range(reserve):  # then only channels of sessions already begun
        assert adm.admit() and not adm.session_allowed()
    assert not adm.admit()  # and at the cap, nothing
    assert (adm.refused, adm.sessions_refused) == (1, reserve)
    assert adm.session_refusals_to_log(0.0) == reserve and adm.refusals_to_log(0.0) == 1
    for _ in range(max(reserve, 1)):  # once as many have ended, sessions may begin again
        adm.release()
    assert adm.session_allowed()
