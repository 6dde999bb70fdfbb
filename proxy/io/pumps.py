"""The threaded shell of one channel: a blocking pump thread per direction.

Why threads under trio: measured on the proxy benchmark, a trio wake-up per chunk already
costs more than the latency budget (a bare trio relay added 56-120 us per traversal), and
trio's SSLStream does Python work per 16 KiB TLS record. A thread blocked in recv() wakes
straight into the forwarding code and OpenSSL runs without the GIL. Trio still owns the
channel's lifetime: it opens the ends, starts the pumps through trio.to_thread, ticks the
relay's timers, and aborting the ends (socket shutdown) is how a pump is stopped.

The relay core is the same as the trio shell's. Its calls take the channel's lock. During
the link stage commands run under that lock too: one direction's input can then produce
output in the other (a rewriter), and the recorder must get each side's link units in the
order the relay saw them (the link reply after the link message it answers). Once linked,
each pump only sends its own direction and runs its commands unlocked.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable

from proxy.core.framing import C2S, S2C
from proxy.core.relay import ChannelRelay, Close, Command, Forward, Redirect, record_of_part
from proxy.io.ends import End, Undelivered, tls_error_text

log = logging.getLogger("spicetap.proxy")

# The effects both shells share (recording, logging, close accounting): returns a reason
# to end the channel, or None.
Effects = Callable[[Command], str | None]
# Serve a migration's destination (on the trio thread) and return the relay's commands.
Redirector = Callable[[Redirect], list[Command]]

# After a send finds one side gone, how long the pump reading that side has to relay what
# it sent before (normally it reads those bytes, then the end of the stream, at once).
SINK_GONE_GRACE = 1.0


class ThreadedChannel:
    def __init__(
        self,
        conn: int,
        relay: ChannelRelay,
        viewer: End,
        upstream: End,
        effects: Effects,
        redirector: Redirector,
    ) -> None:
        self.conn = conn
        self.relay = relay
        self.lock = threading.RLock()
        self.sources = {C2S: viewer, S2C: upstream}
        self.sinks = {C2S: upstream, S2C: viewer}
        self.effects = effects
        self.redirector = redirector
        # made before either pump runs: a TLS end moves into C as its forwarder is made
        self.forwards = {d: self.sources[d].forward_to(self.sinks[d]) for d in (C2S, S2C)}
        self.reason: str | None = None
        self._reason_lock = threading.Lock()
        # Directions whose receiving side a send found gone, and when the first was. That
        # side may have sent bytes just before (already in our socket, or read and not yet
        # relayed): the pump reading it brings them in and then ends the channel, the way
        # TCP hands a peer what came before a close. tick() ends it after SINK_GONE_GRACE.
        self.broken: set[str] = set()
        self.broken_at: float | None = None

    def finish(self, why: str) -> None:
        """End the channel (first reason wins): both pumps wake and return. Any thread."""
        with self._reason_lock:
            if self.reason is None:
                self.reason = why
        for end in self.sources.values():
            end.abort()

    def pump(self, direction: str) -> None:
        """One direction until its source ends or the channel finishes (a worker thread)."""
        source, relay, lock = self.sources[direction], self.relay, self.lock
        forward = self.forwards[direction]  # None: Python only (no extension, a test's end)
        try:
            while self.reason is None and direction not in self.broken:
                if forward is not None and relay.unchanged(direction) and not source.prefix:
                    # the usual case, in C: forwarded before the GIL is asked for
                    data, delivered, error, now = forward()
                    if not data:
                        break
                    if delivered < len(data):
                        self.sink_failed(direction, OSError(error, os.strerror(error)))
                    if not self.crossed(direction, data, delivered, now):
                        break
                    continue
                data = source.receive()
                if not data:
                    break
                now = time.monotonic()
                if relay.unchanged(direction):  # likewise in Python: forward before anything
                    if not self.crossed(direction, data, self.send(direction, data), now):
                        break
                    continue
                with lock:
                    # The link stage's commands, the bytes that end it included, run under
                    # the lock: the peer answering them (e.g. after SASL's result) is then
                    # recorded after them, as the framer needs.
                    linking = not relay.passing
                    commands = relay.received(direction, data, now)
                    if linking:
                        self.run(commands)
                        continue
                self.run(commands)
        except ssl.SSLError as exc:  # the peer broke TLS: an error of this channel
            if self.reason is None:
                with lock:
                    self.run(relay.peer_failed(direction, tls_error_text(exc), time.monotonic()))
        except OSError as exc:  # a reset, or our own abort
            log.debug("channel %d %s: %r", self.conn, direction, exc)
        except Exception as exc:  # a bug: the other pump must not wait on its peer for it
            self.finish(f"spicetap internal error ({type(exc).__name__})")
            raise
        if direction in self.broken and self.reason is None:
            return  # our sink is gone, not our source: the other pump ends the channel
        if self.reason is None:  # the source ended (not our abort): the relay says how
            with lock:
                self.run(relay.peer_closed(direction, time.monotonic()))
        self.finish("closed")

    def crossed(self, direction: str, data: bytes, delivered: int, now: float) -> bool:
        """Record the part of `data` that was forwarded first (unchanged() allowed it):
        what crossed is recorded. False when not all of it was delivered: the channel
        ends, and the rest, never delivered, is not recorded."""
        if delivered:
            with self.lock:
                part = data if delivered == len(data) else data[:delivered]
                commands = self.relay.received(direction, part, now, sent=True)
            self.run(commands)
        return delivered == len(data)

    def tick(self, now: float) -> None:
        """The relay's timers, from the trio thread; skipped while a pump holds the lock
        (it may be waiting on the trio thread to serve a migration). A side a send found
        gone gets SINK_GONE_GRACE to end its own pump (see broken)."""
        broken_at = self.broken_at
        if broken_at is not None and now - broken_at > SINK_GONE_GRACE:
            self.finish(f"{'server' if C2S in self.broken else 'viewer'} closed")
            return
        if self.lock.acquire(blocking=False):
            try:
                commands = self.relay.tick(now)
            finally:
                self.lock.release()
            self.run(commands)

    def send(self, direction: str, data: bytes) -> int:
        """How many of the bytes reached the receiving side: all, or fewer when it is gone
        (the channel then ends)."""
        try:
            self.sinks[direction].send(data)
        except OSError as exc:
            self.sink_failed(direction, exc)
            return exc.delivered if isinstance(exc, Undelivered) else 0
        return len(data)

    def sink_failed(self, direction: str, exc: OSError) -> None:
        """A send in `direction` broke: its receiving side is gone. The pump reading that
        side still relays what it sent before going, then ends the channel (see broken);
        if both sides are gone, nobody is left to hear from, and it ends now."""
        log.debug("channel %d %s: %r", self.conn, direction, exc)
        with self._reason_lock:
            self.broken.add(direction)
            if self.broken_at is None:
                self.broken_at = time.monotonic()
        if len(self.broken) == 2:
            self.finish("viewer and server closed")

    def run(self, commands: list[Command]) -> None:
        for i, cmd in enumerate(commands):
            if isinstance(cmd, Forward):
                delivered = self.send(cmd.direction, cmd.data)
                if delivered < len(cmd.data):  # what did cross is recorded
                    part = record_of_part(cmd, delivered, commands[i + 1 :])
                    if part is not None:
                        self.effects(part)
                    return  # as in the trio shell: nothing after an undelivered Forward
            elif isinstance(cmd, Redirect):
                self.run(self.redirector(cmd))
            else:
                why = self.effects(cmd)
                if isinstance(cmd, Close):
                    why = why or cmd.reason
                if why is not None:
                    self.finish(why)


__all__ = ["SINK_GONE_GRACE", "ThreadedChannel"]
