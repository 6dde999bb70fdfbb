"""Lock out a viewer address that keeps failing authentication (no I/O, no clock).

SPICE has no rate limit of its own: spice-server checks tickets as fast as viewers send
them, and so do spicetap's inject checks, so a viewer could try passwords or tokens without
end. As bastions do (fail2ban, Guacamole's ban extension), failures are counted per viewer
address: `failures` of them within `window` seconds lock the address out for `duration`
seconds, during which its links are refused before anything reaches a server.

A success does not wipe an address's failures: a viewer holding one good credential could
otherwise interleave it with guesses at another target's. IPv6 viewers are counted by /64,
the block one host usually holds (and may pick any address in). The table is bounded
(`max_addresses`): past it, the address heard from longest ago is forgotten.

Calls come from any channel's thread (a failure is seen by a pump) and from the trio
thread (a new connection, the management API): the table takes a lock.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from proxy.core.framing import LINK_HEADER, LINK_MAGIC, LINK_REPLY_FIXED, PUB_KEY_SIZE
from proxy.core.linkrewrite import PERMISSION_DENIED
from proxy.core.throttle import LogThrottle

MAX_ADDRESSES = 100_000  # each entry holds at most `failures` floats
IPV6_PREFIX = 64
SPICE_VERSION = (2, 2)  # protocol.h: SPICE_VERSION_MAJOR, SPICE_VERSION_MINOR
# A viewer's link message is its header and a SpiceLinkMess with a few capability words:
# spice-gtk's is under 100 bytes. Read no more than this of a locked-out viewer's.
MAX_LINK_MESSAGE = 4096

# What spice-server sends to refuse a link (reds.c reds_send_link_error): a link header and
# a SpiceLinkReply that is all zeros but its error.
LINK_REFUSAL = LINK_HEADER.pack(
    LINK_MAGIC, *SPICE_VERSION, LINK_REPLY_FIXED.size
) + LINK_REPLY_FIXED.pack(PERMISSION_DENIED, bytes(PUB_KEY_SIZE), 0, 0, 0)


def link_message_size(data: bytes) -> int | None:
    """How many bytes the viewer's whole link message is, from its first bytes: None while
    its header is not in, or when they are no SPICE link header (or claim more than
    MAX_LINK_MESSAGE): then nothing more is worth reading."""
    if len(data) < LINK_HEADER.size:
        return None
    magic, _major, _minor, size = LINK_HEADER.unpack_from(data)
    total: int = LINK_HEADER.size + size
    if magic != LINK_MAGIC or total > MAX_LINK_MESSAGE:
        return len(data)
    return total


def address_key(host: str) -> str:
    """The address failures are counted under: an IPv4 address (an IPv4-mapped IPv6 one
    too) as it is, an IPv6 one by its /64; anything else as given."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # a link-local zone is no part
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


@dataclass(frozen=True)
class LockoutPolicy:
    failures: int = 10  # within `window` seconds lock the address out; 0: never
    window: float = 300.0
    duration: float = 300.0

    def __post_init__(self) -> None:
        if self.failures < 0 or self.window <= 0 or self.duration <= 0:
            raise ValueError(f"lockout policy {self}: failures >= 0, window and duration > 0")

    @property
    def active(self) -> bool:
        return self.failures > 0

    def describe(self) -> str:
        if not self.active:
            return "off"
        return (
            f"{self.failures} failed authentications within {self.window:g} s lock an "
            f"address out for {self.duration:g} s"
        )


@dataclass(frozen=True, slots=True)
class Locked:
    """An address that has just been locked out."""

    address: str
    failures: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Entry:
    """An address the table holds, for the management API."""

    address: str
    failures: int  # within the window
    locked_for: float  # seconds left; 0: not locked out


@dataclass
class _Address:
    failures: deque[float]
    locked_until: float = 0.0


@dataclass
class Lockout:
    policy: LockoutPolicy = field(default_factory=LockoutPolicy)
    max_addresses: int = MAX_ADDRESSES
    failures_total: int = 0  # since start, for the metrics
    lockouts_total: int = 0
    refused_total: int = 0  # connections refused while their address was locked out
    refusals: LogThrottle = field(default_factory=LogThrottle)
    _table: OrderedDict[str, _Address] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, host: str, now: float) -> Locked | None:
        """A viewer at `host` failed to authenticate; a Locked when that locks it out."""
        policy, key = self.policy, address_key(host)
        with self._lock:
            self.failures_total += 1
            if not policy.active:
                return None
            entry = self._table.pop(key, None)
            if entry is None:
                entry = _Address(deque(maxlen=policy.failures))
                while len(self._table) >= self.max_addresses:
                    self._table.popitem(last=False)
            elif entry.failures.maxlen != policy.failures:  # a reload changed the count
                entry.failures = deque(entry.failures, maxlen=policy.failures)
            self._table[key] = entry  # the most recently heard from goes last
            recent = entry.failures
            recent.append(now)
            while recent and now - recent[0] > policy.window:
                recent.popleft()
            if len(recent) < policy.failures or entry.locked_until > now:
                return None
            entry.locked_until = now + policy.duration
            self.lockouts_total += 1
            counted = len(recent)
            recent.clear()  # a fresh count once the lock ends
            return Locked(key, counted, policy.duration)

    def locked_for(self, host: str, now: float) -> float:
        """Seconds `host`'s address stays locked out; 0 when it is not. A connection turned
        away for it counts as refused."""
        if not self._table:  # the usual case, and lock-free
            return 0.0
        with self._lock:
            entry = self._table.get(address_key(host))
            if entry is None or entry.locked_until <= now:
                return 0.0
            self.refused_total += 1
            self.refusals.happened()
            return entry.locked_until - now

    def release(self, host: str | None = None) -> list[str]:
        """Forget `host`'s address (None: every address); the addresses that were locked."""
        with self._lock:
            if host is None:
                gone = list(self._table.items())
                self._table.clear()
            else:
                key = address_key(host)
                entry = self._table.pop(key, None)
                gone = [] if entry is None else [(key, entry)]
        return [key for key, entry in gone if entry.locked_until > 0]

    def entries(self, now: float) -> list[Entry]:
        """Addresses locked out or with failures still in the window, locked ones first;
        the rest are dropped from the table as they are found."""
        window = self.policy.window
        found: list[Entry] = []
        with self._lock:
            for key in list(self._table):
                entry = self._table[key]
                recent = sum(1 for t in entry.failures if now - t <= window)
                left = max(0.0, entry.locked_until - now)
                if not recent and not left:
                    del self._table[key]
                    continue
                found.append(Entry(key, recent, left))
        return sorted(found, key=lambda e: (-e.locked_for, e.address))

    def locked_count(self, now: float) -> int:
        with self._lock:
            return sum(1 for e in self._table.values() if e.locked_until > now)

    def refusals_to_log(self, now: float) -> int:
        with self._lock:
            return self.refusals.to_log(now)


__all__ = [
    "LINK_REFUSAL",
    "MAX_LINK_MESSAGE",
    "Entry",
    "Locked",
    "Lockout",
    "LockoutPolicy",
    "address_key",
    "link_message_size",
]
