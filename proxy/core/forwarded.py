"""Who a browser is when a reverse proxy stands in front of the WebSocket front (no I/O).

A reverse proxy (nginx, haproxy, Apache) connects from its own address and says whom it
relays in a header: RFC 7239's Forwarded ("for=192.0.2.7;proto=https;host=vdi.example"), or
the older X-Forwarded-For, -Proto and -Host that nginx and haproxy send. Anyone can send
those headers, so they are believed only from proxies the operator names
(--ws-trusted-proxy), and only as far as a chain of trusted proxies goes: reading the hops
from the right (the nearest first), the first address not trusted is the client, as
nginx's real_ip_recursive and Werkzeug's ProxyFix read them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.core.allow import IpNetwork

# RFC 7230 token characters; a Forwarded value is a token or a quoted string (RFC 7239 §4)
_PAIR = re.compile(
    r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[!#$%&\'*+.^_`|~0-9A-Za-z:\[\]-]*)\s*'
)
# what a Host header or a host= holds: a name or an address, and a port
_HOST = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?")
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


@dataclass(frozen=True)
class Hop:
    """One proxy's word on whom it relayed: the address it heard from (None: "unknown", an
    obfuscated name like "_hidden", or unreadable), its port (0: not told), and the scheme
    and Host that client asked for, when told."""

    address: str | None
    port: int = 0
    proto: str | None = None
    host: str | None = None


@dataclass(frozen=True)
class Forwarding:
    """Whom a WebSocket connection comes from, as far as trusted proxies vouch for it."""

    client: tuple[str, int]  # the browser, or the nearest peer no trusted proxy spoke for
    proxy: tuple[str, int] | None = None  # the proxy that connected, when it was believed
    proto: str | None = None  # "http"/"https": the scheme the browser's page used
    host: str | None = None  # the Host the browser asked for


def parse_trusted(texts: Iterable[str]) -> tuple[IpNetwork, ...]:
    """Networks ("10.0.0.0/8", "192.0.2.7", "fd00::/64") as the operator wrote them;
    ValueError names one that is none."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network") from None
    return tuple(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # a link-local zone is no part
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener's IPv4 peers
    return ip


def is_trusted(address: str, networks: tuple[IpNetwork, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in network for network in networks)


def _address(text: str) -> tuple[str | None, int]:
    """ "192.0.2.7", "192.0.2.7:4711", "[2001:db8::1]:4711", "2001:db8::1" -> (address,
    port); (None, 0) for "unknown", an obfuscated name or anything unreadable."""
    text = text.strip()
    ip = _ip(text)
    if ip is not None:
        return str(ip), 0
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    ip = _ip(host)
    if ip is None or (port and not (port.isdigit() and int(port) < 65536)):
        return None, 0
    return str(ip), int(port or 0)


def _scheme(text: str | None) -> str | None:
    return None if text is None else _SCHEMES.get(text.strip().lower())


def _host(text: str | None) -> str | None:
    if text is None or not _HOST.fullmatch(text.strip()):
        return None
    return text.strip().lower()


def _forwarded_elements(value: str) -> list[dict[str, str]] | None:
    """RFC 7239's Forwarded as one dict per element; None if it cannot be read (a
    quoted string may hold "," and ";", so it is scanned, not split)."""
    elements: list[dict[str, str]] = [{}]
    at = 0
    while at < len(value):
        pair = _PAIR.match(value, at)
        if pair is None:
            return None
        raw = pair[2]
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        elements[-1][pair[1].lower()] = raw
        at = pair.end()
        if at < len(value):
            if value[at] == ",":
                elements.append({})
            elif value[at] != ";":
                return None
            at += 1
    return elements


def _listed(headers: Mapping[str, str], name: str, count: int) -> list[str | None]:
    """X-Forwarded-Proto/-Host for each of `count` hops: a list as long as
    X-Forwarded-For's pairs with it; one value (the outer proxy's, passed on) is every
    hop's; anything else tells nothing."""
    values: list[str | None] = []
    if name in headers:
        values = [v.strip() for v in headers[name].split(",")]
    if len(values) == count:
        return values
    if len(values) == 1:
        return values * count
    return [None] * count


def hops(headers: Mapping[str, str]) -> list[Hop]:
    """What the forwarding headers say, the hop nearest the browser first; [] when they say
    nothing. Forwarded wins over X-Forwarded-* (a proxy that sends both means the same);
    an unreadable Forwarded is one unknown hop."""
    if "forwarded" in headers:
        elements = _forwarded_elements(headers["forwarded"])
        if elements is None:
            return [Hop(None)]
        result = []
        for element in elements:
            address, port = _address(element.get("for", ""))
            result.append(
                Hop(address, port, _scheme(element.get("proto")), _host(element.get("host")))
            )
        return result
    if "x-forwarded-for" not in headers:
        return []
    listed = [text for text in headers["x-forwarded-for"].split(",") if text.strip()]
    protos = _listed(headers, "x-forwarded-proto", len(listed))
    hosts = _listed(headers, "x-forwarded-host", len(listed))
    return [
        Hop(*_address(text), _scheme(proto), _host(host))
        for text, proto, host in zip(listed, protos, hosts, strict=True)
    ]


def forwarding(
    headers: Mapping[str, str], peer: tuple[str, int], trusted: tuple[IpNetwork, ...]
) -> Forwarding:
    """Whom a request from `peer` comes from: its forwarding headers (lower-case names) are
    read only if `peer` is a trusted proxy, and hop by hop from the nearest only while each
    address is trusted too. A hop that cannot be read ends the chain: the client is then
    the last address a trusted proxy did tell."""
    if not is_trusted(peer[0], trusted):
        return Forwarding(peer)
    told = hops(headers)
    if not told:
        return Forwarding(peer)
    chosen: Hop | None = None  # the hop whose address is the client's
    for hop in reversed(told):
        if hop.address is None:
            break
        chosen = hop
        if not is_trusted(hop.address, trusted):
            break
    if chosen is None or chosen.address is None:  # the nearest hop already unreadable
        return Forwarding(peer, peer)
    return Forwarding((chosen.address, chosen.port), peer, chosen.proto, chosen.host)
