"""Which HOST:PORT targets the CONNECT front may reach (no I/O, no name resolution).

A pattern is HOST:PORT. HOST is a host name (matched case-insensitively, "*." prefix for
subdomains), an IP address, or a CIDR block ("10.0.0.0/24", "[fd00::]/64"); PORT is a
number, a range "5900-5999" or "*". Names are compared as the viewer wrote them: resolving
them here would let DNS decide what the allow-list means.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowListError(ValueError):
    """A pattern that cannot be read (the message names it)."""


@dataclass(frozen=True)
class Pattern:
    text: str
    network: IpNetwork | None  # None: a host name pattern
    name: str
    low: int
    high: int

    def matches(self, host: str, port: int) -> bool:
        if not self.low <= port <= self.high:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        host = host.lower().rstrip(".")
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name


def split_host_port(text: str) -> tuple[str, str]:
    """ "host:port", "[v6]:port" -> (host, port text); raises ValueError."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(text)
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(text)
    return host, port


PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?", re.ASCII)


def _ports(text: str, pattern: str) -> tuple[int, int]:
    if text == "*":
        return 1, 65535
    ports = PORTS.fullmatch(text)  # not int(): it takes " 5900", "5_900" and other digits
    if ports is None:
        raise AllowListError(f"allow {pattern!r}: port {text!r} is not N, N-M or *")
    a, b = int(ports[1]), int(ports[2] or ports[1])
    if not 1 <= a <= b <= 65535:
        raise AllowListError(f"allow {pattern!r}: ports must be 1-65535, low to high")
    return a, b


def parse_pattern(text: str) -> Pattern:
    # CIDR with an IPv6 block in brackets: "[fd00::]/64:5900"
    raw = text.strip()
    if raw.startswith("[") and "]/" in raw:
        inner, _, rest = raw[1:].partition("]")
        prefix, sep, port = rest[1:].partition(":")
        if not sep:
            raise AllowListError(f"allow {text!r}: expected HOST:PORT")
        host = f"{inner}/{prefix}"
    else:
        try:
            host, port = split_host_port(raw)
        except ValueError:
            raise AllowListError(f"allow {text!r}: expected HOST:PORT") from None
    low, high = _ports(port, text)
    network: IpNetwork | None = None
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        bare = host.removeprefix("*.").replace("-", "").replace(".", "").replace("_", "")
        if not bare.isalnum():
            raise AllowListError(
                f"allow {text!r}: {host!r} is not a host name, IP or CIDR"
            ) from None
    return Pattern(raw, network, host.lower().rstrip("."), low, high)


@dataclass(frozen=True)
class AllowList:
    patterns: tuple[Pattern, ...]

    @classmethod
    def parse(cls, texts: tuple[str, ...] | list[str]) -> AllowList:
        return cls(tuple(parse_pattern(t) for t in texts))

    def allows(self, host: str, port: int) -> bool:
        return any(p.matches(host, port) for p in self.patterns)
